"""The effect map (`lycoris_core.effect`, `python -m lycoris_core inspect --map`): per-block
‖ΔW‖ from the factors against the norms of the materialised ΔW, the block names, the PNG."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import goldens
import numpy as np
import pytest
import torch

import lycoris_core as lc
from lycoris_core.algos import norms
from lycoris_core.blocks import block_label, block_labels, parse_block_weights
from lycoris_core.effect import effect_map, format_table, layer_kind, picture
from lycoris_core.png import PNG_SIGNATURE, encode_png

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()))


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


# --- every golden file: the map's norms against the oracle's and the pack's materialised ΔW ---

@pytest.mark.parametrize("case", goldens.cases())
def test_golden_block_norms_equal_materialised(case):
    adapter = lc.load_adapter(goldens.adapter_file(case))
    base = goldens.base_weights(case)
    emap = effect_map(adapter, base or None)
    expected = goldens.expected(case)      # lycoris-lora's ΔW (DoRA: W' − W0 with the base)
    want: dict[str, float] = {}
    for key, delta in expected.items():
        want[block_label(key)] = want.get(block_label(key), 0.0) + _norm(delta) ** 2
    blocks = emap.blocks()
    assert set(blocks) == set(want), (blocks, want)
    for name, sq in want.items():
        assert _rel(blocks[name]["delta_norm"], math.sqrt(sq)) <= TOL, (case, name)
        assert blocks[name]["modules"] == sum(block_label(k) == name for k in expected)
    # and the pack's own ΔW, formed in float64, per module
    for name, module in adapter.modules.items():
        key = next(m["comfyui_key"] for m in goldens.index()[case]["modules"] if m["lora_name"] == name)
        w0 = base.get(key)
        formed = module.delta(torch.float64, base=w0.double() if w0 is not None else None)
        assert _rel(math.sqrt(module.delta_norm_sq(base=w0)), _norm(formed)) <= TOL, (case, name)
    assert not emap.message if not base else "DoRA" not in emap.message


def test_golden_dora_without_base_is_the_unscaled_change():
    case = next(c for c in goldens.cases() if goldens.base_file(c))
    adapter = lc.load_adapter(goldens.adapter_file(case))
    emap = effect_map(adapter)
    (module,) = adapter.modules.values()
    (name,) = emap.blocks()
    assert _rel(emap.blocks()[name]["delta_norm"], _norm(module.raw_delta(torch.float64))) <= TOL
    assert "1 DoRA modules" in emap.message


# --- every algorithm and form, several modules per block ------------------------------------

def _rnd(g, *shape):
    return torch.randn(*shape, generator=g) * 0.1


def _synthetic() -> dict[str, torch.Tensor]:
    """A file with every form, on real SDXL names: LoRA flat / conv-flat / Tucker / DoRA, LoHa
    flat (Gram and dense routes) / Tucker, LoKr full-full / full-decomposed / decomposed-both /
    Tucker w2, two modules in IN4 and in OUT0."""
    g = torch.Generator().manual_seed(7)
    r = lambda *s: _rnd(g, *s)  # noqa: E731
    t = {}
    u = "lora_unet_"
    m = u + "input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    t |= {f"{m}.lora_up.weight": r(40, 4), f"{m}.lora_down.weight": r(4, 24), f"{m}.alpha": torch.tensor(2.0)}
    m = u + "input_blocks_4_0_in_layers_2"
    t |= {f"{m}.lora_up.weight": r(20, 3, 1, 1), f"{m}.lora_down.weight": r(3, 6, 3, 3)}
    m = u + "input_blocks_1_0_in_layers_2"
    t |= {f"{m}.lora_up.weight": r(20, 3, 1, 1), f"{m}.lora_down.weight": r(3, 6, 1, 1),
          f"{m}.lora_mid.weight": r(3, 3, 3, 3), f"{m}.alpha": torch.tensor(1.5)}
    m = u + "output_blocks_0_1_transformer_blocks_0_ff_net_2"
    t |= {f"{m}.hada_w1_a": r(30, 4), f"{m}.hada_w1_b": r(4, 50), f"{m}.hada_w2_a": r(30, 3),
          f"{m}.hada_w2_b": r(3, 50), f"{m}.alpha": torch.tensor(3.0)}
    m = u + "output_blocks_0_1_transformer_blocks_0_attn2_to_k"
    t |= {f"{m}.hada_w1_a": r(8, 12), f"{m}.hada_w1_b": r(12, 9), f"{m}.hada_w2_a": r(8, 12),
          f"{m}.hada_w2_b": r(12, 9)}  # high rank, tiny layer: the dense route
    m = u + "middle_block_0_in_layers_2"
    t |= {f"{m}.hada_w1_a": r(4, 16), f"{m}.hada_w1_b": r(4, 5), f"{m}.hada_t1": r(4, 4, 3, 3),
          f"{m}.hada_w2_a": r(4, 16), f"{m}.hada_w2_b": r(4, 5), f"{m}.hada_t2": r(4, 4, 3, 3),
          f"{m}.alpha": torch.tensor(2.0)}
    m = u + "output_blocks_2_1_proj_in"
    t |= {f"{m}.lokr_w1": r(4, 4), f"{m}.lokr_w2": r(10, 6)}
    m = u + "output_blocks_5_1_transformer_blocks_0_attn1_to_out_0"
    t |= {f"{m}.lokr_w1": r(4, 8), f"{m}.lokr_w2_a": r(10, 2), f"{m}.lokr_w2_b": r(2, 6),
          f"{m}.alpha": torch.tensor(1.0)}
    m = u + "output_blocks_8_0_skip_connection"
    t |= {f"{m}.lokr_w1_a": r(4, 2), f"{m}.lokr_w1_b": r(2, 4), f"{m}.lokr_w2_a": r(5, 2),
          f"{m}.lokr_w2_b": r(2, 7), f"{m}.alpha": torch.tensor(4.0)}
    m = u + "output_blocks_8_0_in_layers_2"
    t |= {f"{m}.lokr_w1": r(2, 3), f"{m}.lokr_w2_a": r(3, 6), f"{m}.lokr_w2_b": r(3, 4),
          f"{m}.lokr_t2": r(3, 3, 3, 3), f"{m}.alpha": torch.tensor(1.0)}
    m = "lora_te1_text_model_encoder_layers_0_mlp_fc1"
    t |= {f"{m}.hada_w1_a": r(12, 2), f"{m}.hada_w1_b": r(2, 7), f"{m}.hada_w2_a": r(12, 2),
          f"{m}.hada_w2_b": r(2, 7)}
    return t


def test_every_algorithm_and_form_equals_materialised():
    adapter = lc.adapter_from_tensors(_synthetic(), name="synthetic.safetensors")
    modes = {str(m.describe()) for m in adapter.modules.values()}
    assert len(adapter.modules) == 11 and len(modes) >= 6, modes
    emap = effect_map(adapter)
    assert emap.architecture == "sdxl" and not emap.message, emap.message
    _, res = adapter.guess_architecture()
    want: dict[str, float] = {}
    for name, key in res.matched.items():
        formed = adapter.modules[name].delta(torch.float64)
        want[block_label(key)] = want.get(block_label(key), 0.0) + _norm(formed) ** 2
    blocks = emap.blocks()
    assert set(blocks) == {"IN1", "IN4", "MID", "OUT0", "OUT2", "OUT5", "OUT8", "TE1"}
    assert blocks["IN4"]["modules"] == blocks["OUT0"]["modules"] == blocks["OUT8"]["modules"] == 2
    for name, sq in want.items():
        assert _rel(blocks[name]["delta_norm"], math.sqrt(sq)) <= TOL, name
    assert set(blocks["OUT0"]["kinds"]) == {"ff", "attn2"}


def test_loha_gram_and_dense_routes_agree_with_formed():
    g = torch.Generator().manual_seed(3)
    for o, n, r1, r2 in ((64, 300, 8, 8), (7, 5, 16, 9), (200, 40, 1, 5)):
        a1, b1, a2, b2 = (torch.randn(*s, generator=g, dtype=torch.float64)
                          for s in ((o, r1), (r1, n), (o, r2), (r2, n)))
        want = _norm((a1 @ b1) * (a2 @ b2)) ** 2
        for method in ("gram", "dense", None):
            assert _rel(norms.hadamard_norm_sq(a1, b1, a2, b2, method), want) <= 1e-9, method
    assert norms.gram_cost(1280, 11520, 4, 4) < norms.dense_cost(1280, 11520, 4, 4)
    assert norms.gram_cost(8, 9, 12, 12) > norms.dense_cost(8, 9, 12, 12)


def test_dora_with_model_weight_is_exact_and_relative():
    """A LoRA DoRA module with its base weight: ‖W' − W0‖ and ‖ΔW‖/‖W‖ against forming them."""
    g = torch.Generator().manual_seed(5)
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    m = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    w0 = torch.randn(40, 24, generator=g)
    t = {f"{m}.lora_up.weight": _rnd(g, 40, 4), f"{m}.lora_down.weight": _rnd(g, 4, 24),
         f"{m}.dora_scale": w0.norm(dim=1, keepdim=True) * 1.1}
    adapter = lc.adapter_from_tensors(t, name="dora.safetensors")
    emap = effect_map(adapter, {key: w0})
    (module,) = adapter.modules.values()
    change = lc.apply_dora(w0.double(), module.raw_delta(torch.float64), t[f"{m}.dora_scale"].double()) - w0.double()
    block = emap.blocks()["IN4"]
    assert _rel(block["delta_norm"], _norm(change)) <= TOL
    assert _rel(block["relative"], _norm(change) / _norm(w0)) <= TOL
    assert _norm(change) > 2 * _norm(module.raw_delta(torch.float64))  # the rescale matters here


# --- block names and layer kinds -------------------------------------------------------------

@pytest.mark.parametrize("arch", ["sdxl", "anima"])
def test_block_labels_are_the_block_weight_names(arch):
    """Every key of the full-size model gets a name that, written as a block weight, targets
    exactly that key's block (one naming for block weights and the map)."""
    keys = list(lc.manifest(arch))
    labels = {k: block_label(k) for k in keys}
    assert set(labels.values()) == set(block_labels(arch)), set(block_labels(arch)) ^ set(labels.values())
    for name in set(labels.values()) - {"OTHER"}:
        bw = parse_block_weights(f"{name}=0")
        for k in keys[::7]:
            assert (bw.multiplier(k) == 0.0) == (labels[k] == name), (name, k)
    kinds = {layer_kind(k) for k in keys if k.startswith("diffusion_model.")}
    assert kinds == ({"attn1", "attn2", "ff", "proj", "resnet", "other"} if arch == "sdxl"
                     else {"self_attn", "cross_attn", "mlp", "adaln", "other"}), kinds


# --- empty maps and broken files ---------------------------------------------------------------

def test_no_known_block_gives_an_empty_map_with_a_message(tmp_path):
    t = {"lora_unet_not_a_layer.lora_up.weight": torch.ones(4, 2),
         "lora_unet_not_a_layer.lora_down.weight": torch.ones(2, 4)}
    emap = effect_map(lc.adapter_from_tensors(t, name="nothing.safetensors"))
    assert emap.blocks() == {}
    assert "no module of this file matches a known block" in emap.message
    assert "no module of this file matches a known block" in format_table(emap)
    pic = picture(emap)
    assert pic.rgb.ndim == 3 and pic.rgb.shape[2] == 3 and not pic.cells


def test_broken_file_is_an_adapter_error_naming_it():
    m = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    t = {f"{m}.hada_w1_a": torch.ones(4, 2), f"{m}.hada_w1_b": torch.full((2, 4), float("nan")),
         f"{m}.hada_w2_a": torch.ones(4, 2), f"{m}.hada_w2_b": torch.ones(2, 4)}
    with pytest.raises(lc.AdapterError, match=r"broken\.safetensors.*hada_w1_b.*NaN"):
        effect_map(lc.adapter_from_tensors(t, name="broken.safetensors"))


# --- the PNG -------------------------------------------------------------------------------------

def parse_png(data: bytes) -> tuple[int, int, np.ndarray]:
    """(width, height, RGB array) of an 8-bit RGB PNG without filters, every CRC checked."""
    assert data[:8] == PNG_SIGNATURE
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert pos == len(data) and chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(raw) == h * (1 + 3 * w)
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return w, h, rows[:, 1:].reshape(h, w, 3)


def test_encode_png_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    w, h, back = parse_png(encode_png(rgb))
    assert (w, h) == (5, 7) and np.array_equal(back, rgb)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lycoris_core", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_json_blocks_and_map_png(tmp_path, fixtures_dir):
    src = fixtures_dir / "lokr_linear_default_factor.safetensors"
    out = tmp_path / "map.png"
    p = _cli("inspect", "--json", "--map", str(out), str(src))
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    want = _norm(goldens.expected("lokr_linear_default_factor")[
        "diffusion_model.output_blocks.3.1.transformer_blocks.1.attn2.to_q.weight"])
    assert set(s["blocks"]) == {"OUT3"} and s["blocks"]["OUT3"]["modules"] == 1
    assert _rel(s["blocks"]["OUT3"]["delta_norm"], want) <= TOL
    assert s["blocks_message"] == ""
    w, h, rgb = parse_png(out.read_bytes())
    pic = picture(effect_map(lc.load_adapter(src)))
    assert (h, w) == pic.rgb.shape[:2] and np.array_equal(rgb, pic.rgb)
    x, y, cw, ch = pic.cells[(0, "OUT3", "attn2")]
    assert tuple(rgb[y + ch // 2, x + cw // 2]) == (250, 235, 110)     # the largest cell: top colour
    x, y, cw, ch = pic.cells[(0, "IN0", "attn1")]
    assert tuple(rgb[y + ch // 2, x + cw // 2]) == (58, 58, 62)        # no module: grey
    again = _cli("inspect", "--map", str(out), str(src))                # never overwritten unasked
    assert again.returncode == 2 and "exists" in again.stderr
    assert "OUT3" in _cli("inspect", str(src)).stdout


def test_cli_refuses_to_write_the_map_over_the_adapter(tmp_path, fixtures_dir):
    src = tmp_path / "a.safetensors"
    src.write_bytes((fixtures_dir / "loha_linear.safetensors").read_bytes())
    before = src.read_bytes()
    p = _cli("inspect", "--map", str(src), "--overwrite", str(src))
    assert p.returncode == 2 and src.read_bytes() == before
