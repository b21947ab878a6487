"""Small real-architecture models built from the host ComfyUI's own classes (test host only).

- tiny SDXL: `model_base.SDXL` with 32 channels: the real SDXL key names, fast sampling.
- golden SDXL: 320 channels, channel_mult [1, 2, 2], transformer depth 2 only where the golden
  fixtures sit, so every golden SDXL module patches a layer of its real full size.
- tiny / golden DiT: on current ComfyUI (0.28+) the real Anima (`supported_models.Anima` →
  `model_base.Anima`, DiT + `llm_adapter`); on 0.3.75, which has no Anima class, Cosmos-Predict2's
  `MiniTrainDIT` (the DiT Anima extends, same block naming) stands in.
- tiny SDXL CLIP: CLIP-L + CLIP-G of hidden size 32 with the real tokenizer.
- tiny Anima CLIP: Anima's Qwen3 text encoder at width 32 with the real tokenizer (current
  ComfyUI: `text_encoders.anima` itself; 0.3.75: its Qwen3 classes under Anima's key names).
ComfyUI's ops leave weights uninitialised, so every parameter is filled from a seeded generator.
"""

from __future__ import annotations

import functools

import torch


def _is_norm(module: torch.nn.Module) -> bool:
    """GroupNorm / LayerNorm / RMSNorm, whatever the layer is called (SDXL's `out.0`,
    `in_layers.0` are GroupNorms without "norm" in their names)."""
    names = {c.__name__ for c in type(module).__mro__}
    return bool(names & {"GroupNorm", "LayerNorm", "RMSNorm"})


def _fill(module: torch.nn.Module, seed: int) -> None:
    """Seeded values at the usual init scale (std 1/√fan_in for matrices, ≈1 for norm scales),
    so activations and model outputs are O(1) and an adapter visibly changes what the sampler
    produces."""
    g = torch.Generator().manual_seed(seed)
    norms = {id(p) for m in module.modules() if _is_norm(m)
             for n, p in m.named_parameters(recurse=False) if n == "weight"}
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if id(p) in norms or ("norm" in name and name.endswith("weight")):
                p.copy_(1.0 + 0.02 * noise)
            elif p.dim() >= 2:
                p.copy_(noise / max(1, p[0].numel()) ** 0.5)
            else:
                p.copy_(0.02 * noise)


def _patcher(model, rebuild: tuple):
    """A ModelPatcher over `model`. `rebuild` = (builder, args) makes the same model again: current
    ComfyUI (`cached_patcher_init`) rebuilds a model that way when it needs a second copy of it
    (core's TrainLoraNode does), as its own loaders register their file loaders."""
    import comfy.model_management as mm
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = rebuild
    return patcher


SDXL_VARIANTS = {
    # model_channels, channel_mult, transformer_depth, depth_output, depth_middle, head channels
    "tiny": (32, [1, 2, 4], [0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2], 1, 16),
    "golden": (320, [1, 2, 2], [0, 0, 2, 2, 0, 0], [0, 0, 0, 2, 2, 2, 0, 0, 0], 0, 64),
}
CONTEXT_DIM = 64        # tiny CLIP-L (32) + tiny CLIP-G (32), concatenated
POOLED_DIM = 32         # tiny CLIP-G projection
ADM_IN = POOLED_DIM + 6 * 256  # SDXL's adm: pooled + 6 size embeddings of 256


def sdxl_model(variant: str = "tiny", seed: int = 0, disable_dynamic: bool = False,
               dtype: torch.dtype = torch.float32):
    """A `ModelPatcher` over `model_base.SDXL` with real SDXL key names; a `dtype` other than
    float32 stores the weights in it and computes in float32 (ComfyUI's manual cast ops)."""
    import comfy.supported_models

    mc, mult, td, tdo, tdm, head = SDXL_VARIANTS[variant]
    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4,
        "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
        "adm_in_channels": ADM_IN, "dtype": torch.float32, "in_channels": 4,
        "model_channels": mc, "num_res_blocks": [2] * len(mult), "transformer_depth": td,
        "channel_mult": mult, "transformer_depth_middle": tdm, "use_linear_in_transformer": True,
        "context_dim": CONTEXT_DIM, "num_head_channels": head, "transformer_depth_output": tdo,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    cfg = comfy.supported_models.SDXL(unet_config)
    cfg.unet_config["num_head_channels"] = head
    if dtype != torch.float32:
        cfg.set_inference_dtype(dtype, torch.float32)
    model = cfg.get_model({}, device="cpu")
    _fill(model.diffusion_model, seed)
    builder = sdxl_model if dtype == torch.float32 else functools.partial(sdxl_model, dtype=dtype)
    return _patcher(model, (builder, (variant, seed)))


def has_anima() -> bool:
    """Whether the host ComfyUI has the real Anima model (current ComfyUI; 0.3.75 has not)."""
    import comfy.supported_models

    return hasattr(comfy.supported_models, "Anima")


TEXT_WIDTH = 32
"""Hidden size of the tiny text encoders' output the DiT reads (Qwen3 at test size)."""

DIT_VARIANTS = {
    # model_channels, blocks, heads, adaln_lora_dim
    "tiny": (64, 2, 4, 16),
    "golden": (2048, 1, 16, 256),
}
"""The golden DiT's blocks have their real Anima size (2048 wide, adaLN-LoRA 256), so
`blocks.0.adaln_modulation_cross_attn.1` is 256 × 2048 as in the golden file."""

LLM_ADAPTER_VARIANTS = {
    # source width (the Qwen3 hidden size), model width (= target width), blocks, heads
    "tiny": (TEXT_WIDTH, 32, 2, 2),
    "golden": (TEXT_WIDTH, 1024, 1, 16),
}
"""Anima's `LLMAdapter` at test sizes. `comfy.ldm.anima.model.Anima` always builds it at its real
size (1024 wide, 6 blocks: 135 M parameters) whatever the model config says, so the tiny models
replace it with the same class at a smaller size: same key names (`llm_adapter.blocks.N.…`,
`embed`, `out_proj`, `norm`; model width = target width, so no `in_proj`, as in the real model).
The golden adapter keeps the real 1024 width, so `llm_adapter.blocks.0.self_attn.q_proj` is
1024 × 1024 as in the golden file; its cross-attention reads a 32-wide text encoder."""

CONTEXT_TOKENS = 7
"""Text tokens of the hand-made conditionings (`dit_conditioning`)."""


def _dit_config(variant: str, image_model: str, cross: int) -> dict:
    mc, blocks, heads, lora_dim = DIT_VARIANTS[variant]
    return {
        "image_model": image_model, "max_img_h": 64, "max_img_w": 64, "max_frames": 1,
        "in_channels": 16, "out_channels": 16, "patch_spatial": 2, "patch_temporal": 1,
        "model_channels": mc, "concat_padding_mask": True, "crossattn_emb_channels": cross,
        "pos_emb_cls": "rope3d", "pos_emb_learnable": True, "pos_emb_interpolation": "crop",
        "min_fps": 1, "max_fps": 30, "use_adaln_lora": True, "adaln_lora_dim": lora_dim,
        "num_blocks": blocks, "num_heads": heads, "extra_per_block_abs_pos_emb": False,
        "rope_h_extrapolation_ratio": 1.0, "rope_w_extrapolation_ratio": 1.0,
        "rope_t_extrapolation_ratio": 1.0, "extra_h_extrapolation_ratio": 1.0,
        "extra_w_extrapolation_ratio": 1.0, "extra_t_extrapolation_ratio": 1.0,
        "rope_enable_fps_modulation": False, "dtype": torch.float32,
    }


def dit_model(variant: str = "tiny", seed: int = 0, disable_dynamic: bool = False):
    """A `ModelPatcher` over the real Anima (current ComfyUI) or, on 0.3.75, Cosmos-Predict2's
    `MiniTrainDIT` with Anima's block naming (no `llm_adapter`)."""
    import comfy.supported_models

    if not has_anima():
        cfg = comfy.supported_models.CosmosT2IPredict2(
            _dit_config(variant, "cosmos_predict2", TEXT_WIDTH))
        model = cfg.get_model({}, device="cpu")
        _fill(model.diffusion_model, seed)
        return _patcher(model, (dit_model, (variant, seed)))
    import comfy.ldm.anima.model
    import comfy.model_management as mm
    import comfy.ops

    source, width, blocks, heads = LLM_ADAPTER_VARIANTS[variant]
    cfg = comfy.supported_models.Anima(_dit_config(variant, "anima", width))  # the adapter's output
    model = cfg.get_model({}, device="cpu")  # model_base.Anima; its weights are not written yet
    ops = comfy.ops.pick_operations(torch.float32, model.manual_cast_dtype, model_config=cfg)
    dm = model.diffusion_model
    dm.llm_adapter = comfy.ldm.anima.model.LLMAdapter(
        source_dim=source, target_dim=width, model_dim=width, num_layers=blocks, num_heads=heads,
        device="cpu", dtype=torch.float32, operations=ops)
    mm.archive_model_dtypes(dm.llm_adapter)
    _fill(dm, seed)
    return _patcher(model, (dit_model, (variant, seed)))


def dit_conditioning(generator: torch.Generator, batch: int = 1) -> list:
    """A CONDITIONING entry for the DiT as Anima's text encoder makes it: Qwen3 hidden states
    (width 32) with the T5 token ids and weights its `llm_adapter` reads. The Cosmos stand-in
    (0.3.75) ignores the ids and reads the 32-wide states directly."""
    ctx = torch.randn(batch, CONTEXT_TOKENS, TEXT_WIDTH, generator=generator)
    ids = torch.randint(0, 32128, (CONTEXT_TOKENS,), generator=generator, dtype=torch.int64)
    return [ctx, {"t5xxl_ids": ids.int(), "t5xxl_weights": torch.ones(CONTEXT_TOKENS)}]


def sdxl_clip(seed: int = 0):
    """A real `comfy.sd.CLIP` holding `SDXLClipModel` (CLIP-L + CLIP-G) at hidden size 32."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    small = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
             "num_hidden_layers": 3, "projection_dim": POOLED_DIM}
    options = {"clip_l_model_config": dict(small), "clip_g_model_config": dict(small),
               "dtype": torch.float32}
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer,
                                                    comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(target=target, model_options=options)
    _fill(clip.cond_stage_model, seed)
    return clip


QWEN3_TINY = {"hidden_size": TEXT_WIDTH, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1}
"""Anima's Qwen3-0.6B text encoder shrunk to width 32 (what the tiny DiT's LLM adapter reads).
Qwen3's head size stays 128 (a fixed attribute of ComfyUI's config) and so does the vocabulary
(the real tokenizer's ids)."""


def anima_clip(seed: int = 0):
    """A real `comfy.sd.CLIP` of Anima's text encoder at the tiny size, keys
    `qwen3_06b.transformer.model.layers.N.…`, with the real Qwen tokenizer.

    Current ComfyUI: Anima's own `text_encoders.anima` tokenizer (Qwen3 + the T5 ids its LLM
    adapter reads) and `AnimaTEModel`, sized through the model options ComfyUI reads for it
    (`qwen3_06b_model_config`). 0.3.75 has no Anima text encoder: its Qwen3 classes
    (`text_encoders.llama.Qwen3_4B` at the tiny size) under Anima's names stand in."""
    import comfy.sd
    import comfy.supported_models_base

    if has_anima():
        import comfy.text_encoders.anima as anima

        target = comfy.supported_models_base.ClipTarget(anima.AnimaTokenizer, anima.AnimaTEModel)
        clip = comfy.sd.CLIP(target=target, model_options={
            "dtype": torch.float32, "qwen3_06b_model_config": dict(QWEN3_TINY)})
        _fill(clip.cond_stage_model, seed)
        return clip
    import comfy.text_encoders.llama
    import comfy.text_encoders.z_image as zi
    from comfy import sd1_clip

    class Tokenizer(zi.Qwen3Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006 (ComfyUI's)
            super().__init__(embedding_directory, tokenizer_data)
            self.embedding_size, self.embedding_key = 32, "qwen3_06b"

    class TE(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, layer="last", textmodel_json_config=dict(QWEN3_TINY),
                             dtype=dtype, special_tokens={"pad": 151643},
                             layer_norm_hidden_state=False, return_projected_pooled=False,
                             model_class=comfy.text_encoders.llama.Qwen3_4B,
                             enable_attention_masks=True, return_attention_masks=False,
                             model_options=model_options)

    class AnimaTokenizer(sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data={}):  # noqa: B006
            super().__init__(embedding_directory, tokenizer_data, name="qwen3_06b",
                             tokenizer=Tokenizer)

    class AnimaTE(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options={}):  # noqa: B006
            super().__init__(device=device, dtype=dtype, name="qwen3_06b", clip_model=TE,
                             model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(AnimaTokenizer, AnimaTE)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    _fill(clip.cond_stage_model, seed)
    return clip


def tiny_vae(seed: int = 0):
    """A real ComfyUI VAE (AutoencoderKL, SD/SDXL layout: 4 latent channels, 8× down) at 32
    channels with seeded weights, for encoding small training images in tests."""
    import comfy.sd

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3,
                "out_ch": 3, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                "attn_resolutions": [], "dropout": 0.0}
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = {"params": {"embed_dim": 4, "ddconfig": ddconfig}}
    weights = AutoencoderKL(**config["params"])
    _fill(weights, seed)
    return comfy.sd.VAE(sd=weights.state_dict(), config=config)
