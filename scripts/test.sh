#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: builds the environment (scripts/bootstrap.sh),
# lints, then runs pytest against the real ComfyUI 0.3.75 host. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh 2> >(grep -v "^WARNING: Location 'file:" >&2)
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -c tests/pytest.ini "$@"
