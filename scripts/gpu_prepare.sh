#!/usr/bin/env bash
# Build the folder for an offline GPU check (see README "GPU check"), on a networked machine:
#
#   bash scripts/gpu_prepare.sh [OUT]        # OUT defaults to .gpu-check/ (git-ignored)
#
# Then copy OUT to the GPU machine and run `bash OUT/gpu_check.sh` there (no network needed).
# OUT holds, and nothing else:
#   pack.tar.gz             this checkout's HEAD (git archive: commit first); pack-commit.txt
#   comfyui-<v>.tar.xz      each test host's ComfyUI source tree (0.3.75, 0.28.0), without its own
#                           tests and the tokenizers of models the suite never builds
#   wheels.tar.xz           the files of the wheels the GPU machine lacks (scripts/gpu_pack.py;
#                           gpu_check.sh rebuilds and verifies them), for CPython 3.12 manylinux:
#                           every distribution the tests import on either host beyond what that
#                           machine has (CUDA torch, torchvision, transformers, safetensors, numpy
#                           and their requirements), as listed by scripts/gpu_wheels.py, pinned to
#                           the versions tested here; a pure-Python wheel wherever one exists
#   requirements-gpu.txt    those distributions, name==version
#   gpu_check.sh            the check itself
# Wheels are only downloaded (pip download), never installed here. Size goal: 50 MiB; scipy and av
# (binary, both needed at ComfyUI's import) alone take ~70 MiB as wheels, ~50 MiB packed, so the
# folder only fits when the GPU machine has some of them: LYCORIS_GPU_HAVE="scipy av" leaves them
# out (a space-separated list of distributions that machine already has).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-$ROOT/.gpu-check}"
BUDGET=$((50 << 20))
bash scripts/bootstrap.sh 2> >(grep -v "^WARNING: Location 'file:" >&2)
# shellcheck disable=SC1091
source .cache/hosts.env
[ -n "${HOST2_DIR:-}" ] || { echo "[gpu_prepare] the second host is needed: ${HOST2_SKIP:-}" >&2; exit 1; }
[ -z "$(git status --porcelain --untracked-files=no)" ] || \
  echo "[gpu_prepare] note: uncommitted changes are not in pack.tar.gz (it is HEAD)" >&2

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
STAGE="$TMP/out"
mkdir -p "$STAGE" "$TMP/wheels"

git archive --format=tar.gz --prefix=lycoris-nodes/ HEAD > "$STAGE/pack.tar.gz"
git rev-parse --short HEAD > "$STAGE/pack-commit.txt"
cp scripts/gpu_check.sh "$STAGE/gpu_check.sh"

for dir in "$HOST1_DIR" "$HOST2_DIR"; do
  version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$dir/comfyui_version.py")"
  echo "[gpu_prepare] ComfyUI $version from $dir"
  tar -C "$dir" -cf - \
    --exclude='./tests' --exclude='./tests-unit' --exclude='./.git*' --exclude='./.lycoris-src-*' \
    --exclude='__pycache__' --exclude='*.pyc' \
    --exclude='./comfy/text_encoders/llama_tokenizer' --exclude='./comfy/text_encoders/t5_tokenizer' \
    --exclude='./comfy/text_encoders/t5_pile_tokenizer' \
    --exclude='./comfy/text_encoders/ace_lyrics_tokenizer' \
    --exclude='./comfy/text_encoders/hydit_clip_tokenizer' \
    --exclude='./comfy/text_encoders/qwen35_tokenizer' \
    . | xz -6 -T2 > "$STAGE/comfyui-$version.tar.xz"
done

echo "[gpu_prepare] listing what the tests import on each host"
{ LYCORIS_COMFYUI_DIR="$HOST1_DIR" "$HOST1_PY" scripts/gpu_wheels.py
  LYCORIS_COMFYUI_DIR="$HOST2_DIR" "$HOST2_PY" scripts/gpu_wheels.py; } 2>/dev/null \
  | sort -u > "$STAGE/requirements-gpu.txt"
for name in ${LYCORIS_GPU_HAVE:-}; do
  echo "[gpu_prepare] left out (LYCORIS_GPU_HAVE: the GPU machine has it): $(grep -i "^$name==" "$STAGE/requirements-gpu.txt" || echo "$name (not needed)")"
  grep -iv "^$name==" "$STAGE/requirements-gpu.txt" > "$TMP/req" || true
  mv "$TMP/req" "$STAGE/requirements-gpu.txt"
done
dupes="$(cut -d= -f1 "$STAGE/requirements-gpu.txt" | uniq -d)"
[ -z "$dupes" ] || { echo "[gpu_prepare] the hosts need different versions of: $dupes" >&2; exit 1; }

PIP=("$HOST1_PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$TMP/wheels")
while read -r req; do
  # a pure-Python wheel when there is one (comfy-kitchen: its eager backend), else CPython 3.12
  "${PIP[@]}" --implementation py --abi none --platform any "$req" 2>/dev/null || \
  "${PIP[@]}" --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 "$req" \
    2> >(grep -v "^WARNING: Location 'file:" >&2)
done < "$STAGE/requirements-gpu.txt"
echo "[gpu_prepare] $(ls "$TMP/wheels" | wc -l) wheels, $(du -sm "$TMP/wheels" | cut -f1) MiB as wheels; packing"
"$HOST1_PY" scripts/gpu_pack.py verify "$TMP/wheels"
"$HOST1_PY" scripts/gpu_pack.py pack "$TMP/wheels" "$STAGE/wheels.tar.xz"

rm -rf "$OUT"
mkdir -p "$(dirname "$OUT")"
mv "$STAGE" "$OUT"
size=$(du -sb "$OUT" | cut -f1)
ls -l "$OUT"
if [ "$size" -le "$BUDGET" ]; then
  echo "[gpu_prepare] $OUT: $((size >> 20)) MiB ($size bytes), within the 50 MiB budget"
else
  echo "[gpu_prepare] $OUT: $((size >> 20)) MiB ($size bytes): OVER the 50 MiB budget" \
       "(largest: $(tar -tvJf "$OUT/wheels.tar.xz" | awk '{split($6,a,"/"); s[a[1]]+=$3} END {for (w in s) print s[w], w}' | sort -rn | head -3 | awk '{printf "%s %d MiB unpacked; ", $2, $1/1048576}'))"
fi
