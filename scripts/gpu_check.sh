#!/usr/bin/env bash
# The offline GPU check, run from the folder scripts/gpu_prepare.sh built (README "GPU check"):
#
#   bash gpu_check.sh            # on the GPU machine (Python 3.12 + its own CUDA torch; no network)
#   bash gpu_check.sh --dry-run  # anywhere: everything up to the GPU, then what it would run
#   bash gpu_check.sh --list-tests  # the test modules the GPU part runs (for gpu_prepare.sh)
#
# 1. unpacks the pack, both ComfyUI trees and the wheels (rebuilt and checked against their RECORD)
#    into $LYCORIS_GPU_WORK (default: ./work beside this script; a temp folder for --dry-run);
# 2. a venv with --system-site-packages (the machine's own torch, torchvision, transformers, …)
#    and the folder's wheels installed with pip --no-index --no-deps (pip never goes online);
#    then every module kept of the trimmed packages (trimmed.txt: scipy) is imported;
# 3. the host-exercising tests with ComfyUI on the GPU (LYCORIS_TEST_DEVICE=cuda) on ComfyUI
#    0.3.75 and 0.28.0, then a low-VRAM pass on each (LYCORIS_TEST_VRAM=low: --novram, partial
#    loading, weights patched on the fly); the tests needing no host run on the CPU anyway and are
#    left to the CPU suite;
# 4. python -m bench.run --device cuda --quick.
# One summary line per part at the end; exit status 1 when a part failed. Each part has a time
# limit (LYCORIS_GPU_TEST_S per host, LYCORIS_GPU_LOWVRAM_S, LYCORIS_GPU_BENCH_S) so the whole
# check stays within 8 minutes; a part that hits it says so.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY="${PYTHON:-}"
if [ -z "$PY" ]; then  # the first that runs (a pyenv shim can exist and refuse to run)
  for PY in python3.12 python3; do "$PY" -c pass >/dev/null 2>&1 && break; done
fi
GPU_TESTS="${LYCORIS_GPU_TESTS:-test_device_paths.py test_loaders_patch.py test_loaders_golden.py \
test_loaders_tiny.py test_loaders_dit.py test_bypass_host.py test_schedule_host.py \
test_merge_comfy.py test_bake_node.py test_train_graph.py}"
LOW_VRAM_TESTS="test_device_paths.py test_loaders_patch.py test_bypass_host.py::test_golden_sample_bypass_equals_patch"
if [ "${1:-}" = "--list-tests" ]; then echo $GPU_TESTS; exit 0; fi
TEST_S="${LYCORIS_GPU_TEST_S:-150}"
LOWVRAM_S="${LYCORIS_GPU_LOWVRAM_S:-40}"
BENCH_S="${LYCORIS_GPU_BENCH_S:-110}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
SUMMARY=()
STATUS=0
part() { SUMMARY+=("$1"); echo "=== $1"; }
failed() { STATUS=1; part "$1"; }
finish() {
  echo; echo "GPU check summary$([ "$DRY" = 1 ] && echo ' (dry run)'):"
  printf '  %s\n' "${SUMMARY[@]}"
  exit "$STATUS"
}
trimmed_check() {  # python: import every module kept of the trimmed packages
  local msg
  if msg="$("$1" "$PACK/scripts/gpu_pack.py" imports "$HERE/trimmed.txt" 2>&1)"; then
    part "trimmed: $msg"
  else
    failed "trimmed: $(echo "$msg" | tail -1)"; finish
  fi
}
for f in pack.tar.xz comfyui.tar.xz wheels.tar.xz requirements-gpu.txt trimmed.txt; do
  [ -f "$HERE/$f" ] || { failed "folder: $f missing in $HERE (run scripts/gpu_prepare.sh)"; finish; }
done

# ------------------------------------------------------------------------------------ 1. unpack
if [ "$DRY" = 1 ]; then WORK="$(mktemp -d)"; trap 'rm -rf "$WORK"' EXIT
else WORK="${LYCORIS_GPU_WORK:-$HERE/work}"; rm -rf "$WORK"; mkdir -p "$WORK"; fi
t0=$SECONDS
tar xJf "$HERE/pack.tar.xz" -C "$WORK"
PACK="$WORK/lycoris-nodes"
tar xJf "$HERE/comfyui.tar.xz" -C "$WORK"
declare -A TREES=()
for t in "$WORK"/comfyui-*/; do
  t="${t%/}"; TREES[${t##*/comfyui-}]="$t"
done
wheels_msg="$("$PY" "$PACK/scripts/gpu_pack.py" unpack "$HERE/wheels.tar.xz" "$WORK/wheels" 2>&1)" \
  || { failed "unpack: wheels: $wheels_msg"; finish; }
part "unpack: pack $(cat "$HERE/pack-commit.txt" 2>/dev/null || echo '?'), ComfyUI ${!TREES[*]}, $wheels_msg ($((SECONDS - t0)) s)"
mkdir -p "$PACK/.cache"
{ echo "HOST1_DIR=${TREES[0.3.75]:-}"; echo "HOST1_PY=$WORK/venv/bin/python"
  echo "HOST2_DIR=${TREES[0.28.0]:-}"; echo "HOST2_PY=$WORK/venv/bin/python"; } > "$PACK/.cache/hosts.env"

# ------------------------------------------------------------------------------- 2. environment
n_req=$(grep -c . "$HERE/requirements-gpu.txt")
pyver="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$DRY" = 1 ]; then
  # the GPU machine's view: every pinned wheel is in the folder for CPython 3.12 manylinux
  "$PY" -m venv "$WORK/venv-dry"
  VPIP=("$WORK/venv-dry/bin/python" -m pip)
  if "${VPIP[@]}" install -q --dry-run --no-index --no-deps --find-links "$WORK/wheels" \
      --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 --platform any \
      --target "$WORK/target" -r "$HERE/requirements-gpu.txt" >/dev/null 2>"$WORK/resolve.err"; then
    resolved="all $n_req pinned wheels resolve offline for CPython 3.12 manylinux"
  else
    failed "environment: the folder lacks wheels for CPython 3.12: $(tail -1 "$WORK/resolve.err")"
  fi
  # and a real offline install into a throwaway venv of what this Python can install
  if [ "$pyver" = 3.12 ]; then mine=("$WORK"/wheels/*.whl)
  else mapfile -t mine < <(ls "$WORK"/wheels/*-py3-none-any.whl "$WORK"/wheels/*-py2.py3-none-any.whl 2>/dev/null); fi
  if "${VPIP[@]}" install -q --no-index --no-deps "${mine[@]}" >"$WORK/install.log" 2>&1; then
    installed="${#mine[@]} of $(ls "$WORK"/wheels/*.whl | wc -l) wheels installed offline into a throwaway Python $pyver venv"
    [ "$pyver" = 3.12 ] || installed+=" (the others are CPython 3.12 binaries: checked by the resolver only; PYTHON=<a python3.12> installs them all)"
  else
    failed "environment: offline install failed: $(tail -1 "$WORK/install.log")"
  fi
  [ -n "${resolved:-}" ] && [ -n "${installed:-}" ] && part "environment (dry run): $resolved; $installed"
  if [ "$pyver" != 3.12 ]; then
    part "trimmed (dry run): not imported here: the kept modules are CPython 3.12 builds (the GPU run imports each first)"
  elif ! "$WORK/venv-dry/bin/python" -c "import numpy" 2>/dev/null; then
    part "trimmed (dry run): not imported here: no numpy beside $PY (the GPU run imports each first)"
  else
    trimmed_check "$WORK/venv-dry/bin/python"
  fi
  torch_line="$("$PY" -c 'import torch; print(torch.__version__, "cuda available:", torch.cuda.is_available())' 2>/dev/null || echo "no torch for $PY")"
  part "device (dry run): $PY is Python $pyver, $torch_line: no GPU part runs here"
  VPY="$WORK/venv/bin/python"
  for v in 0.3.75 0.28.0; do
    part "would run (ComfyUI $v on cuda, ≤ ${TEST_S} s): cd $PACK/tests && LYCORIS_TEST_DEVICE=cuda LYCORIS_COMFYUI_DIR=${TREES[$v]:-?} $VPY -m pytest -q $GPU_TESTS"
    part "would run (ComfyUI $v, low VRAM, ≤ ${LOWVRAM_S} s): LYCORIS_TEST_DEVICE=cuda LYCORIS_TEST_VRAM=low LYCORIS_COMFYUI_DIR=${TREES[$v]:-?} $VPY -m pytest -q $LOW_VRAM_TESTS"
  done
  part "would run (bench, ≤ ${BENCH_S} s): cd $PACK && LYCORIS_COMFYUI_DIR=${TREES[0.3.75]:-?} $VPY -m bench.run --device cuda --quick --name gpu_quick"
  finish
fi

[ "$pyver" = 3.12 ] || { failed "environment: $PY is Python $pyver; the wheels are for 3.12 (set PYTHON)"; finish; }
"$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null || {
  failed "device: $PY's torch finds no CUDA device (torch.cuda.is_available() is False)"; finish; }
"$PY" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
if "$VPY" -m pip install -q --no-index --no-deps --find-links "$WORK/wheels" \
    -r "$HERE/requirements-gpu.txt" >"$WORK/install.log" 2>&1; then
  part "environment: Python $pyver venv on the system's packages, $n_req wheels installed offline; $("$VPY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "on", torch.cuda.get_device_name(0))')"
else
  failed "environment: offline install failed: $(tail -1 "$WORK/install.log")"; finish
fi
if ! msg="$("$VPY" -c 'import torchaudio' 2>&1)"; then
  failed "environment: torchaudio does not load with this torch ($(echo "$msg" | tail -1)); rebuild the folder with LYCORIS_GPU_TORCH=<this machine's torch X.Y>"; finish
fi
trimmed_check "$VPY"

# ------------------------------------------------------------------------------------- 3. tests
run_tests() {  # label, seconds, extra env..., -- pytest args...
  local label="$1" limit="$2"; shift 2
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  local log="$WORK/tests-${label//[^a-zA-Z0-9.]/_}.log"
  (cd "$PACK/tests" && env "${envs[@]}" timeout "$limit" "$VPY" -m pytest -q "$@") >"$log" 2>&1
  local rc=$?
  local line; line="$(grep -E '^host ComfyUI' "$log" | tail -1)"
  if [ "$rc" = 124 ]; then failed "tests $label: TIMEOUT after $limit s (log: $log)"
  elif [ "$rc" != 0 ]; then failed "tests $label: FAILED (exit $rc): ${line:-$(tail -1 "$log")} (log: $log)"
  else part "tests $label: ${line#host }"; fi
}
for v in 0.3.75 0.28.0; do
  [ -n "${TREES[$v]:-}" ] || { failed "tests ComfyUI $v: its tree is not in the folder"; continue; }
  # shellcheck disable=SC2086
  run_tests "ComfyUI $v cuda" "$TEST_S" LYCORIS_TEST_DEVICE=cuda LYCORIS_COMFYUI_DIR="${TREES[$v]}" -- $GPU_TESTS
  # shellcheck disable=SC2086
  run_tests "ComfyUI $v low-VRAM" "$LOWVRAM_S" LYCORIS_TEST_DEVICE=cuda LYCORIS_TEST_VRAM=low \
    LYCORIS_COMFYUI_DIR="${TREES[$v]}" -- $LOW_VRAM_TESTS
done

# ------------------------------------------------------------------------------------- 4. bench
log="$WORK/bench.log"
(cd "$PACK" && LYCORIS_COMFYUI_DIR="${TREES[0.3.75]:-}" timeout "$BENCH_S" "$VPY" -m bench.run \
  --device cuda --quick --name gpu_quick) >"$log" 2>&1
rc=$?
benches="$(grep -E '^\[bench\] [a-z]+: ' "$log" | sed 's/^\[bench\] //' | paste -sd ';' -)"
if [ "$rc" = 124 ]; then failed "bench (cuda, quick): TIMEOUT after $BENCH_S s: ${benches} (log: $log)"
elif [ "$rc" != 0 ]; then failed "bench (cuda, quick): FAILED (exit $rc): ${benches} (log: $log)"
else part "bench (cuda, quick): ${benches}; table and JSON: $log, $PACK/bench/results/gpu_quick.json"; fi
finish
