"""LyCORISEffectMap in real ComfyUI graphs (tiny SDXL): the IMAGE's layout and values, the
table against an independent ΔW oracle, ‖ΔW‖/‖W‖ with the model, comparison, errors."""

from __future__ import annotations

import base64
import math
import re

import pytest
import torch
from test_loaders_common import loras_dir, make_adapter, write_adapter

import lycoris_core as lc
from lycoris_core.effect import EMPTY, effect_map, picture

UNET_KEYS = [
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight",
    "diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight",
    "diffusion_model.output_blocks.8.0.skip_connection.weight",
]
CLIP_KEY = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
BLOCKS = {"IN4", "IN1", "MID", "OUT8"}


@pytest.fixture(scope="module")
def tiny(host):
    """The tiny SDXL's weights of UNET_KEYS / CLIP_KEY and two LoHa / LoKr files for them."""
    import comfy_host

    ex = comfy_host.Executor(host)
    g = {"1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}},
         "2": {"class_type": "LycorisTestSink", "inputs": {"model": ["1", 0], "clip": ["1", 1]}}}
    res = ex.run(g)
    assert res.ok, res.execution_error
    model, clip = res.outputs("1")[0], res.outputs("1")[1]
    state = model.model.state_dict()
    weights = {k: state[k].detach().clone() for k in UNET_KEYS}
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    shapes[CLIP_KEY] = tuple(clip.cond_stage_model.state_dict()[CLIP_KEY].shape)
    files = {}
    for algo in ("loha", "lokr"):
        tensors, deltas = make_adapter(shapes, algo, seed=1 if algo == "loha" else 2)
        files[algo] = (write_adapter(host, f"effect_{algo}.safetensors", tensors, algo), deltas)
    return {"weights": weights, "files": files}


def _graph(lora_name: str, model: bool = False, **extra) -> dict:
    g = {"1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}},
         "2": {"class_type": "LyCORISEffectMap", "inputs": {"lora_name": lora_name, **extra}},
         "3": {"class_type": "LycorisTestSink", "inputs": {"text": ["2", 1]}},
         "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
    if model:
        g["2"]["inputs"]["model"] = ["1", 0]
    return g


def _table_totals(text: str) -> dict[str, tuple[int, float | None]]:
    """{block: (modules, total)} from the first table of the node's text ("-": None)."""
    out = {}
    for line in text.split("\n\n")[0].splitlines():
        m = re.match(r"^(\w+)\s+(\d+)\s+([0-9.e+-]+|-)\s", line)
        if m:
            out[m.group(1)] = (int(m.group(2)), None if m.group(3) == "-" else float(m.group(3)))
    return out


def test_image_layout_and_table(host, executor, tiny):
    name, deltas = tiny["files"]["loha"]
    res = executor.run(_graph(name))
    assert res.ok, res.execution_error
    image, text = res.outputs("2")
    assert image.dtype == torch.float32 and image.dim() == 4 and image.shape[0] == 1 \
        and image.shape[3] == 3 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    pic = picture(effect_map(lc.load_adapter(loras_dir(host) / name)))
    assert tuple(image.shape[1:3]) == pic.rgb.shape[:2]
    assert torch.equal((image[0] * 255).round().to(torch.uint8), torch.from_numpy(pic.rgb))
    rows = ["IN0", "IN1", "IN2", "IN3", "IN4", "IN5", "IN6", "IN7", "IN8", "MID",
            *(f"OUT{i}" for i in range(9)), "TE1", "TE2", "OTHER"]
    cols = ["attn1", "attn2", "ff", "proj", "resnet", "other"]
    assert {(r, c) for _, r, c in pic.cells} == {(r, c) for r in rows for c in cols}
    ys = [pic.cells[(0, r, "attn1")][1] for r in rows]
    xs = [pic.cells[(0, "IN0", c)][0] for c in cols]
    assert ys == sorted(ys) and len(set(ys)) == len(rows) and xs == sorted(xs) and len(set(xs)) == len(cols)
    filled = {("IN4", "attn1"), ("IN4", "attn2"), ("IN1", "resnet"), ("MID", "ff"),
              ("OUT8", "resnet"), ("TE1", "attn1")}  # CLIP self-attention under attn1
    img = (image[0] * 255).round().to(torch.uint8)
    for (_, r, c), (x, y, w, h) in pic.cells.items():
        color = tuple(int(v) for v in img[y + h // 2, x + w // 2])
        assert (color != EMPTY) == ((r, c) in filled), (r, c, color)
    # the table: per block, the norm of the independent oracle's ΔW (3 significant digits)
    totals = _table_totals(text)
    want = {}
    for key, delta in deltas.items():
        b = lc.blocks.block_label(key)
        want[b] = want.get(b, 0.0) + float(delta.norm()) ** 2
    assert set(totals) == BLOCKS | {"TE1"}
    for b, sq in want.items():
        assert abs(totals[b][1] - math.sqrt(sq)) <= 1e-3 * math.sqrt(sq), b
    assert totals["IN4"][0] == 2
    assert res.ui["2"]["text"]  # shown on the node


def test_relative_to_the_model(host, executor, tiny):
    name, deltas = tiny["files"]["lokr"]
    res = executor.run(_graph(name, model=True))
    assert res.ok, res.execution_error
    image, text = res.outputs("2")
    assert "1 modules have no weight in the model" in text    # the CLIP module
    totals = _table_totals(text)
    w = tiny["weights"]
    for b in BLOCKS:
        keys = [k for k in UNET_KEYS if lc.blocks.block_label(k) == b]
        want = math.sqrt(sum(float(deltas[k].norm()) ** 2 for k in keys)
                         / sum(float(w[k].double().norm()) ** 2 for k in keys))
        assert abs(totals[b][1] - want) <= 1e-3 * want, b
    assert totals["TE1"] == (1, None)  # no CLIP weight: no ratio
    pic = picture(effect_map(lc.load_adapter(loras_dir(host) / name), w), relative=True)
    assert torch.equal((image[0] * 255).round().to(torch.uint8), torch.from_numpy(pic.rgb))


@pytest.mark.parametrize("mode", ["same scale", "difference"])
def test_compare_two_files(host, executor, tiny, mode):
    a, b = tiny["files"]["loha"][0], tiny["files"]["lokr"][0]
    res = executor.run(_graph(a, compare=b, compare_mode=mode))
    assert res.ok, res.execution_error
    image, text = res.outputs("2")
    ma, mb = (effect_map(lc.load_adapter(loras_dir(host) / n)) for n in (a, b))
    pic = picture(ma, other=mb, mode=mode)
    assert tuple(image.shape[1:3]) == pic.rgb.shape[:2]
    panels = {k for k, _, _ in pic.cells}
    assert panels == ({0, 1} if mode == "same scale" else {0})
    if mode == "difference":
        ga, gb = ma.grid(), mb.grid()
        i, j = ma.rows().index("IN4"), [c for c, _ in ma.columns()].index("attn1")
        assert pic.vmax >= abs(ga[i][j] - gb[i][j]) > 0
        assert text.startswith("difference:")
    assert text.count("effect map:") == 2


def test_no_known_block_and_broken_file(host, executor):
    t = {"lora_unet_nowhere.lora_up.weight": torch.ones(4, 2),
         "lora_unet_nowhere.lora_down.weight": torch.ones(2, 4)}
    name = write_adapter(host, "effect_nowhere.safetensors", t, "lora")
    res = executor.run(_graph(name))
    assert res.ok, res.execution_error
    image, text = res.outputs("2")
    assert "no module of this file matches a known block" in text and image.shape[0] == 1
    m = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    bad = {f"{m}.lora_up.weight": torch.ones(4, 2),
           f"{m}.lora_down.weight": torch.tensor([[float("inf")] * 4] * 2)}
    name = write_adapter(host, "effect_broken.safetensors", bad, "lora")
    res = executor.run(_graph(name))
    assert not res.ok
    msg = res.execution_error["exception_message"]
    assert "effect_broken.safetensors" in msg and "lora_down" in msg and "NaN or Inf" in msg


def test_metadata_route_fields(host):
    """The loaders' panel data (/lycoris/metadata): the map and its picture; a file whose factors
    are broken still shows its metadata, with the error by the file's name (not its path)."""
    web_api = host.pack.nodes.web_api
    m = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    good = {f"{m}.lora_up.weight": torch.ones(4, 2), f"{m}.lora_down.weight": torch.ones(2, 4)}
    bad = {f"{m}.lora_up.weight": torch.ones(4, 2),
           f"{m}.lora_down.weight": torch.tensor([[float("nan")] * 4] * 2)}
    for name, tensors in (("effect_route_ok.safetensors", good), ("effect_route_nan.safetensors", bad)):
        write_adapter(host, name, tensors, "lora")
    status, body = web_api.effect_info("effect_route_ok.safetensors")
    assert status == 200 and body["blocks"]["IN4"]["modules"] == 1
    assert abs(body["blocks"]["IN4"]["delta_norm"] - 8.0) < 1e-9   # ΔW = 2 everywhere, 4×4
    assert base64.b64decode(body["blocks_png"])[:8] == b"\x89PNG\r\n\x1a\n"
    status, body = web_api.adapter_info("effect_route_nan.safetensors")
    assert status == 200 and body["modules"] == 1  # the metadata still shows
    status, body = web_api.effect_info("effect_route_nan.safetensors")
    assert status == 200 and body["blocks"] == {} and not body["blocks_png"]
    assert "effect_route_nan.safetensors" in body["blocks_message"] and "NaN" in body["blocks_message"]
    assert str(loras_dir(host)) not in body["blocks_message"]
