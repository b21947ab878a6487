"""The patch object inside ComfyUI's own `comfy.lora.calculate_weight`: float32 sums whatever the
weight dtype (the low-VRAM path hands fp16 weights and an fp16 intermediate dtype), row blocks
equal the whole ΔW, and the Anima llm_adapter golden file (not patchable on 0.3.75's DiT)."""

from __future__ import annotations

import goldens
import pytest
import torch
from helpers import rel_err

import lycoris_core as lc

TOL = 1e-5


@pytest.fixture(scope="module")
def patching(host):
    return host.pack.nodes.patching


def _patch_list(patching, module, key, strength):
    return [(strength, patching.LycorisPatch(module, key), 1.0, None, None)]


def test_llm_adapter_golden_through_comfy_calculate_weight(patching, fixtures_dir):
    import comfy.lora

    case = "anima_lokr_llm_adapter"
    expected = goldens.expected(case)
    adapter = lc.load_adapter(fixtures_dir / f"{case}.safetensors")
    keymap = lc.KeyMap(lc.manifest("anima"))
    res = adapter.resolve(keymap)
    assert set(res.matched.values()) == set(expected) and not res.unmatched
    for name, key in res.matched.items():
        w = torch.zeros(expected[key].shape)
        out = comfy.lora.calculate_weight(_patch_list(patching, adapter.modules[name], key, 0.5),
                                          w, key)
        assert rel_err(out, 0.5 * expected[key]) < TOL


@pytest.mark.parametrize("case", ["loha_linear", "loha_conv_tucker", "lokr_full_w2",
                                  "lyco_lokr_decompose_both", "lokr_linear_default_factor"])
def test_row_blocks_equal_whole_delta(patching, fixtures_dir, case):
    expected = goldens.expected(case)
    adapter = lc.load_adapter(fixtures_dir / f"{case}.safetensors")
    (name, key), = adapter.resolve(lc.KeyMap(lc.manifest("sdxl"))).matched.items()
    shape = tuple(expected[key].shape)
    blocks = list(patching.delta_row_blocks(adapter.modules[name], shape, torch.device("cpu"),
                                            max_elements=3000))
    assert len(blocks) > 3 and blocks[0][0] == 0 and blocks[-1][1] == shape[0]
    whole = torch.cat([b for _, _, b in blocks])
    assert rel_err(whole, expected[key]) < TOL


def test_fp16_weight_is_summed_in_fp32_and_cast_once(patching):
    """LowVramPatch passes the fp16 weight with intermediate_dtype fp16: we still sum in fp32."""
    import comfy.lora
    import comfy.weight_adapter

    g = torch.Generator().manual_seed(0)
    o, i, r = 256, 192, 8
    t = {"m.hada_w1_a": torch.randn(o, r, generator=g) * 3, "m.hada_w1_b": torch.randn(r, i, generator=g) * 3,
         "m.hada_w2_a": torch.randn(o, r, generator=g) * 3, "m.hada_w2_b": torch.randn(r, i, generator=g) * 3,
         "m.alpha": torch.tensor(8.0)}
    module = lc.adapter_from_tensors(t).modules["m"]
    w16 = (torch.randn(o, i, generator=g) * 20).half()
    dw = module.delta(torch.float64, shape=(o, i))
    want = (w16.double() + 0.01 * dw).half()       # exact sum, one rounding to fp16
    ours = comfy.lora.calculate_weight(_patch_list(patching, module, "k", 0.01), w16.clone(), "k",
                                       intermediate_dtype=torch.float16)
    assert ours.dtype == torch.float16
    # one fp16 rounding of the result, plus float32's own error in ΔW (1e-5 of its largest entry)
    ulp = torch.finfo(torch.float16).eps * want.double().abs() + 1e-5 * (0.01 * dw).abs().max()
    assert bool(((ours.double() - want.double()).abs() <= ulp).all())
    # ComfyUI's own LoHa adapter in the same call: products in fp16 lose precision / overflow
    theirs_patch = comfy.weight_adapter.LoHaAdapter.load(
        "m", {k: v.half() for k, v in t.items()}, 8.0, None)
    theirs = comfy.lora.calculate_weight([(0.01, theirs_patch, 1.0, None, None)], w16.clone(), "k",
                                         intermediate_dtype=torch.float16)
    bad = (~torch.isfinite(theirs)) | ((theirs.double() - want.double()).abs() > ulp)
    assert int(bad.sum()) > 0


def test_strength_zero_patch_is_identity(patching, fixtures_dir):
    adapter = lc.load_adapter(fixtures_dir / "loha_linear.safetensors")
    (name, key), = adapter.resolve(lc.KeyMap(lc.manifest("sdxl"))).matched.items()
    w = torch.randn(640, 640)
    out = patching.LycorisPatch(adapter.modules[name], key).calculate_weight(
        w.clone(), key, 0.0, 1.0, None, None)
    assert torch.equal(out, w)
