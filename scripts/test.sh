#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: builds the environment (scripts/bootstrap.sh),
# lints, then runs pytest against the real ComfyUI 0.3.75 host. Extra args go to pytest (paths
# relative to tests/). pytest runs from tests/: the repository root is the node package itself,
# whose __init__.py needs ComfyUI, so it must never be collected as a test package.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh 2> >(grep -v "^WARNING: Location 'file:" >&2)
.venv/bin/ruff check --quiet .
cd tests
exec ../.venv/bin/python -m pytest "$@"
