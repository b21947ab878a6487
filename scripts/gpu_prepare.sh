#!/usr/bin/env bash
# Build the folder for an offline GPU check (see README "GPU check"), on a networked machine:
#
#   bash scripts/gpu_prepare.sh [OUT]        # OUT defaults to .gpu-check/ (git-ignored)
#
# Then copy OUT to the GPU machine and run `bash OUT/gpu_check.sh` there (no network needed).
# OUT holds, and nothing else:
#   pack.tar.xz             this checkout's HEAD (git archive: commit first); pack-commit.txt
#   comfyui.tar.xz          both test hosts' ComfyUI source trees (comfyui-0.3.75/, comfyui-0.28.0/)
#                           in one archive (they share most files), without what the GPU tests never
#                           load: ComfyUI's own tests, the API nodes, the blueprints and examples,
#                           the tokenizers of models the suite never builds (SDXL's CLIP and Anima's
#                           Qwen3 + T5 tokenizers stay)
#   wheels.tar.xz           the files of the wheels the GPU machine lacks (scripts/gpu_pack.py;
#                           gpu_check.sh rebuilds and verifies them), for CPython 3.12 manylinux:
#                           every distribution the GPU tests import on either host beyond what that
#                           machine has (CUDA torch, torchvision, transformers, safetensors, numpy
#                           and their requirements), as listed by scripts/gpu_wheels.py, pinned to
#                           the versions tested here; a pure-Python wheel wherever one exists;
#                           scipy trimmed to the modules a boot of either host loads (trimmed.txt)
#   requirements-gpu.txt    those distributions, name==version
#   trimmed.txt             the modules kept of the trimmed packages (gpu_check.sh imports each)
#   gpu_check.sh            the check itself
# LYCORIS_GPU_TORCH (default 2.11): the GPU machine's torch, which torchaudio must match.
# Wheels are only downloaded (pip download), never installed here. Size budget: 50 MiB, of which
# av (~23 MiB packed: FFmpeg's libraries) and the trimmed scipy (~16 MiB) are most; a machine that
# has either can leave it out: LYCORIS_GPU_HAVE="scipy av" (distributions that machine has). Left
# out always: ComfyUI's optional asset database (gpu_wheels.LEFT_OUT). Before the folder is
# written, the GPU tests run on the CPU here against what it holds (LYCORIS_GPU_VERIFY=0 skips).
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
  echo "[gpu_prepare] note: uncommitted changes are not in pack.tar.xz (it is HEAD)" >&2

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
STAGE="$TMP/out"
mkdir -p "$STAGE" "$TMP/wheels"

XZ=(xz -T1 --lzma2=preset=9e,dict=64MiB)
git archive --format=tar --prefix=lycoris-nodes/ HEAD | "${XZ[@]}" > "$STAGE/pack.tar.xz"
git rev-parse --short HEAD > "$STAGE/pack-commit.txt"
cp scripts/gpu_check.sh "$STAGE/gpu_check.sh"

mkdir "$TMP/trees"
VERSIONS=()  # of host 1, host 2
for dir in "$HOST1_DIR" "$HOST2_DIR"; do
  version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$dir/comfyui_version.py")"
  echo "[gpu_prepare] ComfyUI $version from $dir"
  ln -s "$dir" "$TMP/trees/comfyui-$version"
  VERSIONS+=("$version")
done
# one archive, so that the files both trees share are stored once (a 64 MiB window spans both);
# -h follows the two links above (the trees themselves hold no symbolic links)
(cd "$TMP/trees" && tar -chf - --no-wildcards-match-slash \
    --exclude='comfyui-*/tests' --exclude='comfyui-*/tests-unit' --exclude='comfyui-*/.git*' \
    --exclude='comfyui-*/.lycoris-src-*' --exclude='__pycache__' --exclude='*.pyc' \
    --exclude='comfyui-*/comfy_api_nodes' --exclude='comfyui-*/blueprints' \
    --exclude='comfyui-*/script_examples' --exclude='comfyui-*/openapi.yaml' \
    --exclude='comfyui-*/comfy/text_encoders/llama_tokenizer' \
    --exclude='comfyui-*/comfy/text_encoders/t5_pile_tokenizer' \
    --exclude='comfyui-*/comfy/text_encoders/ace_lyrics_tokenizer' \
    --exclude='comfyui-*/comfy/text_encoders/hydit_clip_tokenizer' \
    --exclude='comfyui-*/comfy/text_encoders/qwen35_tokenizer' \
    comfyui-*/) | "${XZ[@]}" > "$STAGE/comfyui.tar.xz"

echo "[gpu_prepare] listing what the tests import on each host"
{ LYCORIS_COMFYUI_DIR="$HOST1_DIR" "$HOST1_PY" scripts/gpu_wheels.py --loaded "$TMP/loaded.txt"
  LYCORIS_COMFYUI_DIR="$HOST2_DIR" "$HOST2_PY" scripts/gpu_wheels.py --loaded "$TMP/loaded.txt"; } 2>/dev/null \
  | sort -u > "$STAGE/requirements-gpu.txt"
sort -u "$TMP/loaded.txt" > "$TMP/keep.txt"
for name in ${LYCORIS_GPU_HAVE:-}; do
  echo "[gpu_prepare] left out (LYCORIS_GPU_HAVE: the GPU machine has it): $(grep -i "^$name==" "$STAGE/requirements-gpu.txt" || echo "$name (not needed)")"
  grep -iv "^$name==" "$STAGE/requirements-gpu.txt" > "$TMP/req" || true
  mv "$TMP/req" "$STAGE/requirements-gpu.txt"
  grep -v "^$name/" "$TMP/keep.txt" > "$TMP/keep2.txt" || true
  mv "$TMP/keep2.txt" "$TMP/keep.txt"
done
cp "$TMP/keep.txt" "$STAGE/trimmed.txt"
# torchaudio's compiled part is built against one torch: pin the release made with the GPU machine's
# (torchaudio 2.11.1 fails to load with torch 2.11.0: undefined symbol; 2.11.0 loads)
GPU_TORCH="${LYCORIS_GPU_TORCH:-2.11}"
sed -i "s/^torchaudio==.*/torchaudio==$GPU_TORCH.0/" "$STAGE/requirements-gpu.txt"
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
"$HOST1_PY" scripts/gpu_pack.py pack "$TMP/wheels" "$STAGE/wheels.tar.xz" --trim "$STAGE/trimmed.txt"

# The folder as the GPU machine will see it, tried here first: the GPU tests, on the CPU, with the
# folder's ComfyUI trees, its trimmed scipy and without what it leaves out (gpu_pack.py shadow).
# LYCORIS_GPU_VERIFY=0 skips it (about 4 minutes).
if [ "${LYCORIS_GPU_VERIFY:-1}" != 0 ]; then
  mkdir "$TMP/verify"
  tar xJf "$STAGE/comfyui.tar.xz" -C "$TMP/verify"
  read -r -a TESTS <<< "$(bash scripts/gpu_check.sh --list-tests)"
  for n in 1 2; do
    py_var="HOST${n}_PY"; version="${VERSIONS[n - 1]}"
    "${!py_var}" scripts/gpu_pack.py shadow "$STAGE/trimmed.txt" "$TMP/shadow$n" >/dev/null
    log="$TMP/verify-$n.log"
    if (cd tests && PYTHONPATH="$TMP/shadow$n" LYCORIS_COMFYUI_DIR="$TMP/verify/comfyui-$version" \
        "${!py_var}" -m pytest -q -p no:cacheprovider "${TESTS[@]}") >"$log" 2>&1; then
      echo "[gpu_prepare] verified on the CPU with the folder's ComfyUI $version: $(grep -E '^host ComfyUI' "$log" | tail -1 | sed 's/.*: //')"
    else
      tail -30 "$log" >&2
      echo "[gpu_prepare] the GPU tests FAIL here with the folder's ComfyUI $version (above); folder not written" >&2
      exit 1
    fi
  done
fi

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
