#!/usr/bin/env bash
# The demo on a fresh machine: set up (scripts/bootstrap.sh), then load a LoKr into a real ComfyUI
# graph on CPU and print the load report and the checks (scripts/demo.py).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh 2> >(grep -v "^WARNING: Location 'file:" >&2)
exec .venv/bin/python scripts/demo.py "$@"
