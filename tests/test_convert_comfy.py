"""Converted files in ComfyUI 0.3.75's own LoRA loader: every module matched, the same ΔW.

Real ComfyUI models from the test host (tiny / golden SDXL UNet + CLIP-L + CLIP-G, Cosmos DiT
with Anima's block naming, and a tiny Qwen3 text encoder built from ComfyUI's own classes under
Anima's `qwen3_06b` name); ComfyUI's key maps (`model_lora_keys_unet/clip`), `load_lora`,
`load_lora_for_models`, the LoraLoaderModelOnly node and `calculate_weight`.
"""

from __future__ import annotations

import json
import logging
import shutil

import goldens
import pytest
import torch
from safetensors.torch import load_file
from test_convert_factors import adapted_weights, comfy_name, make_adapter, sd_name

from lycoris_core import adapter_from_tensors, delta_weights, load_adapter
from lycoris_core.convert import convert_file, convert_tensors

REL = 1e-5  # max-abs relative; float32 rounding is ~1e-7, a wrong factor or scale is >= 1e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def comfy_delta(patches: list, w0: torch.Tensor, key: str) -> torch.Tensor:
    """ΔW ComfyUI applies: its own calculate_weight on the patch list, minus W0 (float32)."""
    import comfy.lora

    w = w0.detach().float()
    return comfy.lora.calculate_weight(patches, w.clone(), key) - w


def not_loaded(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "lora key not loaded" in r.getMessage() or "NOT LOADED" in r.getMessage()]


def check_against_lycoris_core(adapter_sd: dict, state: dict[str, torch.Tensor],
                               patches: dict[str, list]) -> int:
    """Every module of `adapter_sd` (sd-scripts names) patched by ComfyUI with lycoris_core's ΔW."""
    adapter = adapter_from_tensors(adapter_sd)
    expected, unmatched = delta_weights(adapter, {k: state[k] for k in state})
    assert not unmatched
    assert sorted(patches) == sorted(expected)
    worst = {k: rel_err(comfy_delta(patches[k], state[k], k), d) for k, d in expected.items()}
    print(f"ComfyUI vs lycoris_core: {len(worst)} weights, max rel err {max(worst.values()):.1e}")
    bad = {k: e for k, e in worst.items() if e > REL}
    assert not bad, sorted(bad.items(), key=lambda kv: -kv[1])[:5]
    return len(expected)


# --- generated files covering every layer of real ComfyUI models ---------------------------

def test_tiny_sdxl_every_module_loads_after_conversion(host, caplog):
    """UNet + CLIP-L + CLIP-G, all 2-D/4-D weights: sd-scripts → ComfyUI naming → LoraLoader path."""
    import comfy.sd
    from host_nodes import models

    model, clip = models.sdxl_model("tiny", seed=3), models.sdxl_clip(seed=3)
    state = {**model.model.state_dict(), **clip.cond_stage_model.state_dict()}
    weights = adapted_weights({k: tuple(v.shape) for k, v in state.items()})
    assert {k.split(".")[0] for k in weights} == {"diffusion_model", "clip_l", "clip_g"}
    original = make_adapter(weights, seed=5, lokr_tucker=False)  # ComfyUI cannot apply LoKr Tucker
    converted, _, plan = convert_tensors(original, {}, to="comfyui", target=state)
    assert plan.changed == len(weights)
    assert {n.split(".")[0] for n in plan.module_renames.values()} == {"diffusion_model",
                                                                       "text_encoders"}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        new_model, new_clip = comfy.sd.load_lora_for_models(model, clip, converted, 1.0, 1.0)
    assert not_loaded(caplog) == []
    patches = {**new_model.patches, **new_clip.patcher.patches}
    assert check_against_lycoris_core(original, state, patches) == len(weights)


def test_tiny_dit_every_module_loads_after_conversion(host, caplog):
    """Cosmos DiT (Anima's naming): blocks incl. adaln_modulation_*, t_embedder, x_embedder,
    final_layer — sd-scripts → ComfyUI naming → ComfyUI's loader, every module patched."""
    import comfy.lora
    from host_nodes import models

    model = models.dit_model("tiny", seed=4)
    state = model.model.state_dict()
    weights = adapted_weights({k: tuple(v.shape) for k, v in state.items()})
    for part in ("adaln_modulation_self_attn", "adaln_modulation_cross_attn", "t_embedder",
                 "x_embedder", "final_layer"):
        assert any(part in k for k in weights), part
    original = make_adapter(weights, seed=6, lokr_tucker=False)  # ComfyUI cannot apply LoKr Tucker
    converted, _, _ = convert_tensors(original, {}, to="comfyui", target=state)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = comfy.lora.load_lora(converted, key_map)
    assert not_loaded(caplog) == []
    new_model = model.clone()
    assert len(new_model.add_patches(loaded, 1.0)) == len(weights)
    assert check_against_lycoris_core(original, state, new_model.patches) == len(weights)


def tiny_qwen3_te(seed: int = 0):
    """ComfyUI's own Qwen3 text model (llama.Qwen3_4B at a tiny size) named like Anima's TE,
    so its keys are `qwen3_06b.transformer.model.layers.N.…` as in newer ComfyUI."""
    import comfy.sd1_clip
    import comfy.text_encoders.llama

    cfg = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
           "num_attention_heads": 2, "num_key_value_heads": 1}

    class TinyQwen3(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, layer="hidden", layer_idx=-2,
                             textmodel_json_config=cfg, dtype=dtype, special_tokens={"pad": 0},
                             layer_norm_hidden_state=False,
                             model_class=comfy.text_encoders.llama.Qwen3_4B,
                             model_options=model_options)

    te = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32, name="qwen3_06b",
                                     clip_model=TinyQwen3)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in te.parameters():
            p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return te


def test_anima_qwen3_te_needs_comfyui_naming(host, caplog):
    """SPEC §5: ComfyUI 0.3.75 maps none of Anima's `lora_te_` names (current ComfyUI maps them
    all); the converted file's `text_encoders.qwen3_06b.transformer.model.…` names load on both,
    every module, the same ΔW."""
    import comfy.lora
    import comfy_host

    te = tiny_qwen3_te()
    state = te.state_dict()
    weights = adapted_weights({k: tuple(v.shape) for k, v in state.items()})
    assert any(k.startswith("qwen3_06b.transformer.model.layers.") for k in weights)
    original = make_adapter(weights, seed=8, lokr_tucker=False)  # ComfyUI cannot apply LoKr Tucker
    key_map = comfy.lora.model_lora_keys_clip(te, {})
    # 0.3.75: the sd-scripts file loads nothing; current ComfyUI maps every lora_te_ name
    assert [sd_name(k) in key_map for k in weights] == [comfy_host.CURRENT] * len(weights)
    converted, _, _ = convert_tensors(original, {}, to="comfyui", target=state)
    assert all(comfy_name(k) in key_map for k in weights)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        loaded = comfy.lora.load_lora(converted, key_map)
    assert not_loaded(caplog) == []
    patches = {k: [(1.0, v, 1.0, None, None)] for k, v in loaded.items()}
    assert check_against_lycoris_core(original, state, patches) == len(weights)


# --- golden files through ComfyUI's LoraLoaderModelOnly node ------------------------------

def _golden_files(fixtures_dir, arch: str) -> list[str]:
    cases = json.loads((fixtures_dir / "index.json").read_text())["cases"]
    return [c for c, info in cases.items() if info["arch"] == arch]


@pytest.mark.parametrize("kind,arch", [("golden_sdxl", "sdxl"), ("golden_dit", "anima")])
def test_golden_files_in_comfyui_lora_loader(host, executor, fixtures_dir, tmp_path, kind, arch):
    """Each golden file, converted to ComfyUI naming, loads through ComfyUI's LoraLoaderModelOnly
    on a real model with the golden layers at full size: the same patches as the sd-scripts
    original (bit for bit) and, DoRA aside (ComfyUI's known DoRA norm defect, SPEC §5), the
    fixture's expected ΔW. Anima's llm_adapter golden needs the real Anima (current ComfyUI):
    0.3.75's Cosmos stand-in has no llm_adapter layer (its naming is covered by the round-trip
    tests there)."""
    import comfy_host

    loras = host.base_dir / "models" / "loras" / f"convert_{arch}"
    loras.mkdir(parents=True, exist_ok=True)
    cases = _golden_files(fixtures_dir, arch)
    prompt = {"m": {"class_type": "LycorisTestModel", "inputs": {"kind": kind, "seed": 11}}}
    used = []
    for case in cases:
        if "llm_adapter" in case and not comfy_host.CURRENT:
            continue
        src = fixtures_dir / f"{case}.safetensors"
        shutil.copy(src, loras / f"{case}.orig.safetensors")
        r = convert_file(src, loras / f"{case}.comfy.safetensors", to="comfyui", target=arch)
        assert r.status == "converted", r.reason
        for tag in ("orig", "comfy"):
            prompt[f"{case}-{tag}"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": ["m", 0], "lora_name": f"convert_{arch}/{case}.{tag}.safetensors",
                "strength_model": 1.0}}
            prompt[f"{case}-{tag}-sink"] = {"class_type": "LycorisTestSink",
                                            "inputs": {"model": [f"{case}-{tag}", 0]}}
        used.append(case)
    assert used
    res = executor.run(prompt)
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    base = res.outputs("m")[0].model.state_dict()
    for case in used:
        adapter = load_adapter(loras / f"{case}.comfy.safetensors")
        orig = res.outputs(f"{case}-orig")[0].patches
        conv = res.outputs(f"{case}-comfy")[0].patches
        assert sorted(conv) == sorted(orig) and len(conv) == len(adapter.modules) == 1
        key = next(iter(conv))
        got = comfy_delta(conv[key], base[key], key)
        assert torch.equal(got, comfy_delta(orig[key], base[key], key))
        if adapter.modules[next(iter(adapter.modules))].has_dora:
            continue
        expected = goldens.expected(case)[key]
        mine = next(iter(adapter.modules.values())).delta(shape=tuple(base[key].shape))
        print(f"{case}: ComfyUI vs expected {rel_err(got, expected):.1e}, vs lycoris_core "
              f"{rel_err(got, mine):.1e}")
        assert rel_err(got, expected) < REL, case
        assert rel_err(got, mine) < REL, case


def test_comfyui_trainer_file_to_sdscripts(host, executor, tmp_path, caplog):
    """A file saved by ComfyUI's own TrainLoraNode + SaveLoRA converts to sd-scripts naming
    (diff / diff_b included); ComfyUI loads it with every key used and the same patches."""
    import comfy.lora
    from host_nodes import models

    lora_out = executor.output_index("TrainLoraNode", "LORA_MODEL")  # 1 on 0.3.75, 0 on 0.28
    prompt = {
        "m": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 2}},
        "c": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["m", 1]}},
        "l": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32,
                                                           "batch_size": 2}},
        # a list of two latents: 0.3.75's trainer fails on a single one (`multi_res` unbound)
        "r": {"class_type": "RebatchLatents", "inputs": {"latents": ["l", 0], "batch_size": 1}},
        "t": {"class_type": "TrainLoraNode", "inputs": executor.with_defaults("TrainLoraNode", {
            "model": ["m", 0], "latents": ["r", 0], "positive": ["c", 0], "batch_size": 2,
            "grad_accumulation_steps": 1, "steps": 1, "learning_rate": 0.01, "rank": 2,
            "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": "fp32",
            "lora_dtype": "bf16", "algorithm": "LoHa", "gradient_checkpointing": False,
            "existing_lora": "[None]"})},
        "s": {"class_type": "SaveLoRA", "inputs": {"lora": ["t", lora_out],
                                                   "prefix": "loras/convert_trainer"}},
    }
    res = executor.run(prompt)
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    [trained] = sorted((host.base_dir / "output" / "loras").glob("convert_trainer_*.safetensors"))
    model = models.sdxl_model("tiny", seed=2)
    state = model.model.state_dict()
    dst = tmp_path / "trained.sd.safetensors"
    r = convert_file(trained, dst, to="sd-scripts", source="comfyui-trainer", target=state)
    assert r.status == "converted", r.reason
    assert r.extras > 100 and r.renamed == r.modules > 100  # modules with only diff_b too
    src_sd, out_sd = load_file(trained), load_file(dst)
    assert len(out_sd) == len(src_sd)
    assert all(k.startswith("lora_unet_") for k in out_sd)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        from_trainer = comfy.lora.load_lora(src_sd, key_map)
        from_converted = comfy.lora.load_lora(out_sd, key_map)
    assert not_loaded(caplog) == []
    assert sorted(from_converted) == sorted(from_trainer)
    assert any(k.endswith(".bias") for k in from_converted)  # diff_b survived
    for key in list(from_trainer)[:: max(1, len(from_trainer) // 40)]:
        w0 = state[key]
        a = comfy_delta([(1.0, from_converted[key], 1.0, None, None)], w0, key)
        b = comfy_delta([(1.0, from_trainer[key], 1.0, None, None)], w0, key)
        assert torch.equal(a, b), key
