"""End to end in a real browser: the test host's ComfyUI HTTP server (subprocess, loopback only; the
ComfyUI of `comfy_host.COMFY_DIR` run by this test process's Python, so each host drives its own
server and its own frontend: comfyui-frontend-package 1.32 on 0.3.75, 1.45 on 0.28) with this pack,
the real frontend in headless Debian Chromium driven by playwright-core (tests/browser/*.mjs).

The loader script adds a "Load LoKr" node through the node search box, picks a small LoKr file in
its combo, checks the pack's metadata panel, queues tiny model → Load LoKr → sink and waits for the
load report in the same panel; the schedule/train script checks the curve and the live loss chart;
both run with the nodes drawn on the canvas ("classic") and as Vue components ("vue", Nodes 2.0).
Screenshots are kept in tests/artifacts/ (gitignored), named by host and mode. Chromium, Node.js
and playwright-core are installed by scripts/bootstrap.sh.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import math
import os
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import comfy_host
import comfy_server
import pytest
from test_loaders_common import make_adapter
from ui_workflows import EXAMPLES, TINY_UNET_KEYS, input_spec, load_example, put_example_files, tiny_sdxl_shapes

import lycoris_core as lc

ROOT = Path(__file__).resolve().parents[1]
COMFY = comfy_host.COMFY_DIR
NODE_DIR = ROOT / ".cache" / "node"  # `npm install playwright-core` target (bootstrap.sh)
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
LORA = "tiny_sdxl_lokr.safetensors"
# first in the loras list (the loader's combo starts on it): a LoHa, which Load LoKr warns about
FIRST_LORA = "example_loha.safetensors"
MODES = ("classic", "vue")  # nodes on the canvas / as Vue components (tests/browser/common.mjs)
HOST_TAG = f"comfyui-{comfy_host.VERSION}"  # screenshots of both hosts side by side


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
    base = comfy_server.prepare_base(tmp_path_factory.mktemp("comfyui_server"))
    # No first-run template dialog, missing-models warning (the default graph's models) or minimap
    # over the canvas (settings unknown to a frontend are ignored by it).
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({
        "Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False,
        "Comfy.Minimap.Visible": False}))
    put_example_files(base)  # the files the examples name: none is missing when they load
    tensors, _ = make_adapter(tiny_sdxl_shapes(TINY_UNET_KEYS), "lokr", rank=4, alpha=2.0, seed=7)
    lc.save_safetensors(tensors, base / "models" / "loras" / LORA, {
        "ss_network_module": "networks.lokr", "ss_network_dim": "4", "ss_network_alpha": "2.0",
        "ss_base_model_version": "sdxl_base_v1-0", "ss_output_name": "tiny_sdxl_lokr"})
    try:
        with comfy_server.running_server(base) as (url, _proc, log_path):
            yield url, log_path
    except RuntimeError as e:
        pytest.fail(str(e))


def test_metadata_route(server):
    url, _ = server
    status, body = _get(f"{url}/api/lycoris/metadata?lora_name={LORA}")
    assert status == 200, body
    assert body["file"] == LORA  # the name, never the absolute path
    assert body["algorithms"] == {"lokr": 2} and body["architecture"] == "sdxl"
    assert body["metadata"]["ss_network_module"] == "networks.lokr"
    assert [r["reader"] for r in body["readers"]] == ["sd-scripts", "LyCORIS", "ComfyUI core"]
    # the effect map (issue 19), its own route: the blocks of the two modules and the picture as a PNG
    status, body = _get(f"{url}/api/lycoris/effectmap?lora_name={LORA}")
    assert status == 200 and body["file"] == LORA, body
    assert sum(b["modules"] for b in body["blocks"].values()) == 2, body["blocks"]
    assert base64.b64decode(body["blocks_png"])[:8] == b"\x89PNG\r\n\x1a\n"
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


def _shot(name: str, mode: str | None = None) -> Path:
    shot = ARTIFACTS / f"{name}.{HOST_TAG}{f'.{mode}' if mode else ''}.png"
    shot.unlink(missing_ok=True)
    return shot


def _check_page(result: dict, mode: str | None = None) -> None:
    """The page is this host's own frontend (the package installed next to its ComfyUI), in the
    node mode asked for."""
    assert result["frontend_version"] == importlib.metadata.version("comfyui-frontend-package"), result
    if mode is not None:
        assert result["vue_nodes_setting"] is (mode == "vue"), result


@pytest.mark.parametrize("mode", MODES)
def test_loader_panel_in_chromium(server, mode):
    url, log_path = server
    shot = _shot("loader_panel", mode)
    result = _browser("loader_panel.mjs", url + "/", LORA, str(shot), mode, "run", log_path=log_path)
    _check_page(result, mode)
    assert result["vue_node"] is (mode == "vue"), result
    assert "lycoris_nodes.loaders" in result["extensions"]
    assert result["combo_options"][0] == FIRST_LORA and LORA in result["combo_options"], result
    # the file the combo starts on: a LoHa, which this LoKr loader warns about
    initial = result["initial_panel_text"]
    assert result["initial"] == FIRST_LORA and f"file: {FIRST_LORA}" in initial, initial
    assert "WARNING: this node loads LoKr files; this one holds LoHa" in initial, initial
    assert result["selected"] == LORA
    panel = result["panel_text"]
    # the picked file's metadata (GET /lycoris/metadata, shown before anything ran) ...
    for shown in (f"file: {LORA}", "LoKr ×2", "rank", "4 ×2", "matched", "2 of 2 (sdxl)",
                  "ss_network_module", "networks.lokr", "ss_output_name", "readers",
                  # rank 4 on 64-wide layers (b = d = 8): readers expect a full lokr_w2
                  "LyCORIS: cannot read (low-rank lokr_w2 where it expects a full one",
                  "ComfyUI core: reads it"):
        assert shown in panel, (shown, panel)
    assert "WARNING" not in panel and FIRST_LORA not in panel, panel
    # ... and the load report of the queued run (the node's UI text)
    assert "load report (last run)" in panel and "applied: 2 weights" in panel, panel
    assert "matched: 2 of 2 modules" in panel, panel
    assert result["panel_visible"]
    assert "effect map: ‖ΔW‖ per block" in panel, panel
    assert result["effect_map"] and result["effect_map"]["width"] > 100, result["effect_map"]
    assert shot.is_file() and shot.stat().st_size > 10_000


@pytest.mark.parametrize("mode", MODES)
def test_schedule_curve_and_loss_chart_in_chromium(server, mode):
    url, log_path = server
    shot = _shot("schedule_train", mode)
    steps = 6
    result = _browser("schedule_train.mjs", url + "/", LORA, str(shot), str(steps), mode, log_path=log_path)
    _check_page(result, mode)
    assert result["vue_nodes"] == [mode == "vue"] * 2, result
    assert {"lycoris_nodes.schedule", "lycoris_nodes.train"} <= set(result["extensions"])
    assert "cosine" in result["curve_caption"] and "12 steps" in result["curve_caption"], result
    assert "banana" in result["curve_error"], result["curve_error"]
    assert "0%:1" in result["curve_preset_caption"] and result["curve_preset_error"] is None, result
    assert result["loss_caption"].startswith(f"step {steps}/{steps}  loss "), result["loss_caption"]
    assert result["loss_chart_pixels"] > 500
    # chart and caption shown whole: not cut off by the widget the frontend adds for progress text
    assert result["loss_panel"]["fits"] and result["curve_panel"]["fits"], result
    assert shot.is_file() and shot.stat().st_size > 10_000


def _overlaps(layout: list[dict], title: float) -> list[tuple[str, str]]:
    """Pairs of nodes whose boxes (title bar included) intersect."""
    boxes = [(n["type"], n["pos"][0], n["pos"][1] - title, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in layout]
    return [(a[0], b[0]) for i, a in enumerate(boxes) for b in boxes[i + 1:]
            if a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]]


def test_examples_load_in_the_frontend(server, host):
    """The frontend loads every example (no unknown node, no node in error: every file it names is
    on the server) and its own graphToPrompt gives the same API prompt as the suite's converter
    (tests/ui_workflows.py), which test_workflows validates and runs: the examples are real
    frontend workflows and the converter reads them as ComfyUI does."""
    url, log_path = server
    names = sorted(p.stem for p in EXAMPLES.glob("*.json"))
    shot = _shot("example_workflow")
    result = _browser("workflows.mjs", url + "/", "lycoris-nodes", str(shot), *names, log_path=log_path)
    _check_page(result)
    for name in names:
        got = result["workflows"][name]
        ui = json.loads((EXAMPLES / f"{name}.json").read_text())
        assert got["nodes"] == len(ui["nodes"]) and not got["missing"], (name, got["missing"])
        assert not got["errors"], (name, got["errors"])
        # laid out as saved: every node as large as its content needs in this frontend, no node
        # over another (titles included)
        saved = {n["id"]: n for n in ui["nodes"]}
        small = [(n["type"], saved[n["id"]]["size"], n["min"]) for n in got["layout"]
                 if any(s + 1 < m for s, m in zip(saved[n["id"]]["size"], n["min"], strict=True))]
        assert not small, (name, small)
        assert not _overlaps(got["layout"], got["title_height"]), (name, _overlaps(got["layout"], got["title_height"]))
        classes = host.nodes.NODE_CLASS_MAPPINGS
        # frontend-only widgets (e.g. PreviewAny's "preview" text) are sent too; ComfyUI ignores them
        frontend = {nid: {"class_type": n["class_type"], "inputs": {
            k: v for k, v in n["inputs"].items() if k in dict(input_spec(classes[n["class_type"]]))}}
            for nid, n in got["prompt"].items()}
        assert frontend == load_example(name, classes), name
