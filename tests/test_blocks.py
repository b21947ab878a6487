"""Per-block strength presets and the compact preset string (pure; no ComfyUI)."""

from __future__ import annotations

import pytest

import lycoris_core as lc
from lycoris_core.blocks import PRESETS, parse_block_weights

SDXL = list(lc.manifest("sdxl"))
ANIMA = list(lc.manifest("anima"))
IN4 = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
IN8 = "diffusion_model.input_blocks.8.1.transformer_blocks.0.attn1.to_q.weight"
MID = "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight"
OUT0 = "diffusion_model.output_blocks.0.1.transformer_blocks.0.attn1.to_q.weight"
OUT5 = "diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight"
TIME = "diffusion_model.time_embed.0.weight"
CLIP_L = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
CLIP_G = "clip_g.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
B0 = "diffusion_model.blocks.0.self_attn.q_proj.weight"
B27 = "diffusion_model.blocks.27.self_attn.q_proj.weight"
LLM = "diffusion_model.llm_adapter.blocks.0.self_attn.q_proj.weight"
QWEN = "qwen3_06b.transformer.model.layers.0.self_attn.q_proj.weight"


def test_keys_exist_in_manifests():
    assert {IN4, IN8, MID, OUT0, OUT5, TIME, CLIP_L, CLIP_G} <= set(SDXL)
    assert {B0, B27, LLM, QWEN} <= set(ANIMA)


def test_empty_is_all_one():
    bw = parse_block_weights("")
    assert bw.is_default and all(bw.multiplier(k) == 1.0 for k in SDXL + ANIMA)


def test_rules_specific_beats_group_and_later_overrides():
    bw = parse_block_weights("*=0.1, UNET=0.5, IN4-5=0, MID=2, out0=0.25, TE1=0.3, MID=3")
    assert bw.multiplier(IN4) == 0.0
    assert bw.multiplier(IN8) == 0.5            # UNET group
    assert bw.multiplier(MID) == 3.0            # later item wins
    assert bw.multiplier(OUT0) == 0.25          # case-insensitive
    assert bw.multiplier(TIME) == 0.5           # 'other' layers follow the UNET group
    assert bw.multiplier(CLIP_L) == 0.3
    assert bw.multiplier(CLIP_G) == 0.1         # only '*' applies


def test_anima_names():
    bw = parse_block_weights("B0-13=0.5; llm=0; qwen3=0.2")
    assert bw.multiplier(B0) == 0.5 and bw.multiplier(B27) == 1.0
    assert bw.multiplier(LLM) == 0.0 and bw.multiplier(QWEN) == 0.2


def test_positional_sdxl_20_and_12_and_anima_30():
    vals = [str(i / 100) for i in range(20)]
    bw = parse_block_weights(",".join(vals))
    assert bw.multiplier(CLIP_L) == 0.0 and bw.multiplier(CLIP_G) == 0.0   # TE
    assert bw.multiplier(IN4) == 0.05 and bw.multiplier(IN8) == 0.09
    assert bw.multiplier(MID) == 0.1 and bw.multiplier(OUT5) == 0.16
    lbw = parse_block_weights("0,1,0.5,0.25,0.125,2,3,0,0,0,0,0.75")
    assert lbw.multiplier(CLIP_L) == 0.0 and lbw.multiplier(IN4) == 1.0
    assert lbw.multiplier(IN8) == 0.125 and lbw.multiplier(MID) == 2.0
    assert lbw.multiplier(OUT0) == 3.0 and lbw.multiplier(OUT5) == 0.75
    assert lbw.multiplier(TIME) == 1.0          # not listed in the 12-value form
    anima = parse_block_weights(",".join(["0.5"] + ["1"] * 27 + ["0.25", "0"]))
    assert anima.multiplier(QWEN) == 0.5 and anima.multiplier(B27) == 0.25
    assert anima.multiplier(LLM) == 0.0


def test_presets():
    assert parse_block_weights("UNET_ONLY").multiplier(CLIP_G) == 0.0
    assert parse_block_weights("unet_only").multiplier(IN4) == 1.0
    te = parse_block_weights("TE_ONLY")
    assert te.multiplier(IN4) == 0.0 and te.multiplier(QWEN) == 1.0
    out = parse_block_weights("OUTPUT_ONLY")
    assert out.multiplier(OUT0) == 1.0 and out.multiplier(IN4) == 0.0 and out.multiplier(TIME) == 0
    assert out.multiplier(CLIP_L) == 1.0
    assert parse_block_weights("NO_LLM_ADAPTER").multiplier(LLM) == 0.0
    late = parse_block_weights("LATE_BLOCKS, B20=0.5")
    assert late.multiplier(B0) == 0.0 and late.multiplier(B27) == 1.0
    assert late.multiplier("diffusion_model.blocks.20.mlp.layer1.weight") == 0.5
    for name in PRESETS:
        parse_block_weights(name)  # every preset parses


@pytest.mark.parametrize("text,needle", [
    ("IN9=1", "IN9"), ("FOO=1", "FOO"), ("IN4=abc", "abc"), ("IN4=nan", "nan"),
    ("1,2,3", "3 positional"), ("OUT5-2=1", "OUT5-2"), ("NOT_A_PRESET", "NOT_A_PRESET"),
])
def test_bad_strings_raise_naming_the_item(text, needle):
    with pytest.raises(lc.AdapterError, match=needle):
        parse_block_weights(text)


def test_rule_for_reports_the_deciding_rule():
    bw = parse_block_weights("UNET=0.5, IN4=0")
    assert bw.rule_for(IN4) == "input_blocks.4"
    assert bw.rule_for(MID) == "@model"
    assert bw.rule_for(CLIP_L) is None


def test_named_rules_are_kept_for_warnings():
    bw = parse_block_weights("UNET_ONLY, OUT0-2=0.5, TE=0, B3=1")
    assert bw.named == [("OUT0-2=0.5", ["output_blocks.0", "output_blocks.1", "output_blocks.2"]),
                        ("B3=1", ["blocks.3"])]
    assert parse_block_weights(",".join(["1"] * 20)).named == []   # positional: no warnings
