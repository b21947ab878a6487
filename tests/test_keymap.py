"""Module names resolve against real model key sets — never by string guessing."""

from __future__ import annotations

from collections import Counter

import goldens
import pytest
import torch

import lycoris_core as lc
from lycoris_core.keymap import KeyMap, block_of, component_of, detect_architecture
from lycoris_core.naming import underscored


@pytest.fixture(scope="module")
def targets():
    return goldens.sdscripts_targets()


@pytest.mark.parametrize("arch, n", [("sdxl", 1052), ("anima", 536)])
def test_every_sdscripts_target_resolves(targets, arch, n):
    modules = targets[arch]["modules"]
    assert len(modules) == n
    man = lc.manifest(arch)
    km = KeyMap(man)
    res = km.resolve_all(modules)
    assert res.unmatched == [] and res.ambiguous == {}
    for name, rec in modules.items():
        assert res.matched[name] == rec["comfyui_key"], name
        assert tuple(man[rec["comfyui_key"]]) == tuple(rec["weight_shape"])


def test_component_counts(targets):
    km = KeyMap(lc.manifest("anima"))
    res = km.resolve_all(targets["anima"]["modules"])
    assert res.by_component() == {"dit": 280, "llm_adapter": 60, "qwen3": 196}
    km = KeyMap(lc.manifest("sdxl"))
    res = km.resolve_all(targets["sdxl"]["modules"])
    assert res.by_component() == {"unet": 788, "clip_l": 72, "clip_g": 192}


def test_comfyui_and_lycoris_spellings():
    km = KeyMap(lc.manifest("anima"))
    q = "qwen3_06b.transformer.model.layers.3.mlp.down_proj.weight"
    assert km.resolve("lora_te_layers_3_mlp_down_proj") == q
    assert km.resolve("lora_te1_layers_3_mlp_down_proj") == q  # lycoris.kohya's Anima TE naming
    assert km.resolve("text_encoders.qwen3_06b.transformer.model.layers.3.mlp.down_proj") == q
    k = "diffusion_model.blocks.0.adaln_modulation_self_attn.1.weight"
    assert km.resolve("lora_unet_blocks_0_adaln_modulation_self_attn_1") == k
    assert km.resolve("diffusion_model.blocks.0.adaln_modulation_self_attn.1") == k
    assert km.resolve("lycoris_blocks_0_adaln_modulation_self_attn_1") == k
    assert km.resolve("lora_unet_t_embedder_1_linear_1") == "diffusion_model.t_embedder.1.linear_1.weight"
    assert km.resolve("lora_unet_blocks_0_self_attn_q") is None  # a prefix of a real name is no match
    sd = KeyMap(lc.manifest("sdxl"))
    assert sd.resolve("lora_te2_text_model_encoder_layers_31_mlp_fc2") == \
        "clip_g.transformer.text_model.encoder.layers.31.mlp.fc2.weight"
    assert sd.resolve("lora_te1_text_model_encoder_layers_0_self_attn_out_proj") == \
        "clip_l.transformer.text_model.encoder.layers.0.self_attn.out_proj.weight"


DIT_NON_BLOCK = ("x_embedder", "t_embedder", "t_embedding_norm", "final_layer")
SDXL_NON_BLOCK = ("time_embed", "label_emb", "out")


def _every_weight_module(man: dict) -> list[str]:
    """One sd-scripts module name per matrix weight of a manifest (UNet/DiT and text encoders)."""
    km = KeyMap(man)
    names = []
    for key, shape in man.items():
        if key.endswith(".weight") and len(shape) >= 2 and key.startswith("diffusion_model."):
            names.append("lora_unet_" + underscored(key[len("diffusion_model."):-len(".weight")]))
        elif key.endswith(".weight") and len(shape) >= 2:
            names.append("text_encoders." + key[:-len(".weight")])
    assert all(km.resolve(n) for n in names)
    return names


@pytest.mark.parametrize("arch, parts", [
    ("anima", {"dit", "llm_adapter", "qwen3"}),
    ("sdxl", {"unet", "clip_l", "clip_g"}),
])
def test_components_of_every_full_size_layer(arch, parts):
    """A file patching every matrix weight of the full-size model: the report's parts are the
    architecture's. Anima's DiT layers outside the blocks (x_embedder, t_embedder,
    t_embedding_norm, final_layer) count as `dit`, SDXL's (time_embed, label_emb, out) as
    `unet`; Anima's text encoder is `qwen3`."""
    man = lc.manifest(arch)
    km = KeyMap(man)
    assert km.architecture == arch
    res = km.resolve_all(_every_weight_module(man))
    counts = res.by_component()
    assert set(counts) == parts
    by_key = Counter(component_of(k, arch) for k in res.matched.values())
    assert by_key == Counter(counts)
    diffusion = "dit" if arch == "anima" else "unet"
    assert counts[diffusion] == sum(k.startswith("diffusion_model.")
                                    and not k.startswith("diffusion_model.llm_adapter.")
                                    for k in res.matched.values())
    for part in DIT_NON_BLOCK if arch == "anima" else SDXL_NON_BLOCK:
        keys = [k for k in man if k.startswith(f"diffusion_model.{part}.")]
        assert keys and {component_of(k, arch) for k in keys} == {diffusion}, part


def test_component_needs_the_architecture_for_non_block_layers():
    """The same key spelling says nothing about the model: a DiT's `final_layer` is `dit` on
    Anima and on the bare Cosmos DiT; without an architecture only `blocks.` marks a DiT."""
    key = "diffusion_model.final_layer.linear.weight"
    assert component_of(key, "anima") == component_of(key, "cosmos_predict2") == "dit"
    assert component_of("diffusion_model.out.2.weight", "sdxl") == "unet"
    assert component_of("diffusion_model.blocks.3.mlp.layer1.weight") == "dit"
    assert component_of(key) == component_of(key, "unknown") == "unet"
    assert component_of("diffusion_model.llm_adapter.embed.weight", "anima") == "llm_adapter"
    assert component_of("qwen3_06b.transformer.model.layers.0.mlp.up_proj.weight", "anima") == "qwen3"
    assert component_of("clip_g.transformer.text_model.final_layer_norm.weight", "sdxl") == "clip_g"


def test_ambiguous_names_are_reported_not_guessed():
    km = KeyMap(["diffusion_model.a_b.c.weight", "diffusion_model.a.b_c.weight"])
    res = km.resolve_all(["lora_unet_a_b_c", "diffusion_model.a.b_c"])
    assert res.matched == {"diffusion_model.a.b_c": "diffusion_model.a.b_c.weight"}
    assert res.ambiguous == {"lora_unet_a_b_c": ["diffusion_model.a.b_c.weight", "diffusion_model.a_b.c.weight"]}
    assert "lora_unet_a_b_c" in res.unmatched


def test_detect_architecture():
    assert detect_architecture(lc.manifest("sdxl")) == "sdxl"
    assert detect_architecture(lc.manifest("anima")) == "anima"
    dit_only = [k for k in lc.manifest("anima") if k.startswith("diffusion_model.blocks.")]
    assert detect_architecture(dit_only) == "cosmos_predict2"
    assert detect_architecture(["foo.weight"]) == "unknown"


def test_blocks_and_components():
    assert block_of("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight") == "input_blocks.4"
    assert block_of("diffusion_model.middle_block.1.proj_in.weight") == "middle_block"
    assert block_of("diffusion_model.blocks.27.mlp.layer1.weight") == "blocks.27"
    assert block_of("diffusion_model.llm_adapter.blocks.0.mlp.0.weight") == "llm_adapter"
    assert block_of("diffusion_model.t_embedder.1.linear_1.weight") == "other"
    assert block_of("clip_g.transformer.text_model.encoder.layers.0.mlp.fc1.weight") == "clip_g"
    assert component_of("diffusion_model.llm_adapter.out_proj.weight") == "llm_adapter"


def test_two_spellings_of_one_module_is_an_error():
    key = "diffusion_model.blocks.0.mlp.layer1.weight"
    t = {
        "lora_unet_blocks_0_mlp_layer1.lora_up.weight": torch.zeros(8, 2),
        "lora_unet_blocks_0_mlp_layer1.lora_down.weight": torch.zeros(2, 4),
        "diffusion_model.blocks.0.mlp.layer1.lora_up.weight": torch.zeros(8, 2),
        "diffusion_model.blocks.0.mlp.layer1.lora_down.weight": torch.zeros(2, 4),
    }
    ad = lc.adapter_from_tensors(t, name="twice.safetensors")
    with pytest.raises(lc.AdapterError, match="two spellings") as e:
        lc.delta_weights(ad, {key: (8, 4)})
    assert "twice.safetensors" in str(e.value)


def test_guess_architecture_of_files(fixtures_dir):
    assert lc.load_adapter(fixtures_dir / "anima_lokr_llm_adapter.safetensors").guess_architecture()[0] == "anima"
    assert lc.load_adapter(fixtures_dir / "loha_conv_tucker.safetensors").guess_architecture()[0] == "sdxl"
