"""Anima's Qwen3-0.6B text encoder: sd-scripts writes `lora_te_<path>`, which ComfyUI 0.3.75's own
loader does not map (SPEC §5) and current ComfyUI does. On current ComfyUI the CLIP is Anima's
real text encoder at the tiny size (`host_nodes.models.anima_clip`); the 0.3.75 host has no Anima
text encoder, so a real `comfy.sd.CLIP` / `ModelPatcher` is put over a small torch module holding
the real ComfyUI key names (`qwen3_06b.transformer.model.layers.N.…`); patching then runs
through ComfyUI as usual."""

from __future__ import annotations

import torch
from helpers import rel_err
from test_loaders_common import loaded_weights, loras_dir, make_adapter, write_adapter

from bench.bench_apply import module_tree

KEYS = {
    "qwen3_06b.transformer.model.layers.0.self_attn.q_proj.weight": (32, 16),
    "qwen3_06b.transformer.model.layers.1.mlp.down_proj.weight": (16, 24),
}


def _qwen3_clip():
    """(CLIP, {weight key: shape} of two of its Qwen3 layers)."""
    import comfy_host

    if comfy_host.CURRENT:
        from host_nodes import models

        clip = models.anima_clip(seed=0)
        sd = clip.cond_stage_model.state_dict()
        return clip, {k: tuple(sd[k].shape) for k in KEYS}
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd

    g = torch.Generator().manual_seed(0)
    root = module_tree({k: torch.randn(shape, generator=g) * 0.02 for k, shape in KEYS.items()})
    clip = comfy.sd.CLIP(no_init=True)
    clip.cond_stage_model = root
    clip.patcher = comfy.model_patcher.ModelPatcher(root, load_device=mm.get_torch_device(),
                                                    offload_device=mm.unet_offload_device())
    clip.tokenizer, clip.layer_idx, clip.tokenizer_options = None, None, {}
    clip.use_clip_schedule, clip.apply_hooks_to_conds = False, None
    return clip, KEYS


def _te_name(key: str) -> str:
    return "lora_te_" + key[len("qwen3_06b.transformer.model."):-len(".weight")].replace(".", "_")


def test_qwen3_lora_te_names_are_patched(host):
    import comfy.sd
    import comfy.utils
    import comfy_host

    patching = host.pack.nodes.patching
    clip, shapes = _qwen3_clip()
    tensors, deltas = make_adapter(shapes, "loha", seed=11, module_names=_te_name)
    name = write_adapter(host, "anima_qwen3_te_loha.safetensors", tensors, "loha")
    path = str(loras_dir(host) / name)
    base = loaded_weights(clip.patcher, KEYS)

    _, new_clip, result = patching.apply_adapter(None, clip, path, 0.0, 0.75, "")
    assert result.model_architecture == "anima" and not result.unmatched
    assert result.summary["matched_by_component"] == {"qwen3": 2}
    got = loaded_weights(new_clip.patcher, KEYS)
    for key in KEYS:
        assert rel_err(got[key] - base[key], 0.75 * deltas[key]) < 1e-5

    _, theirs = comfy.sd.load_lora_for_models(None, clip, comfy.utils.load_torch_file(path), 0.0, 0.75)
    if comfy_host.CURRENT:  # current ComfyUI maps Anima's lora_te_ names: the same ΔW
        comfy_weights = loaded_weights(theirs.patcher, KEYS)
        for key in KEYS:
            assert rel_err(comfy_weights[key] - base[key], 0.75 * deltas[key]) < 1e-5
    else:
        assert theirs.patcher.patches == {}        # 0.3.75: "lora key not loaded", nothing applied

    _, same_clip, _ = patching.apply_adapter(None, clip, path, 0.0, 0.75, "QWEN3=0")
    assert same_clip is clip                       # block weight 0 on the only component
