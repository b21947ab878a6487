"""Diffusers-form SDXL names resolve to the same layers as ComfyUI's own `unet_to_diffusers` map."""

from __future__ import annotations

import goldens

import lycoris_core as lc
from lycoris_core.diffusers_unet import ldm_to_diffusers


def _comfy_map(unet_config: dict) -> dict[str, set[str]]:
    """{ldm path: the diffusers names ComfyUI gives it} (some layers have two, e.g. label_emb)."""
    import comfy.utils

    out: dict[str, set[str]] = {}
    for d, ldm in comfy.utils.unet_to_diffusers(unet_config).items():
        if d.endswith(".weight"):
            out.setdefault(ldm[: -len(".weight")], set()).add(d[: -len(".weight")])
    return out


def test_full_sdxl_matches_comfyui(host):
    config = goldens.read_json("sdxl_unet_config.json")["config"]
    comfy_map = _comfy_map(config)
    man = lc.manifest("sdxl")
    paths = [k[len("diffusion_model."):-len(".weight")] for k in man if k.startswith("diffusion_model.")]
    ours = ldm_to_diffusers(paths)
    present = {ldm: names for ldm, names in comfy_map.items() if f"diffusion_model.{ldm}.weight" in man}
    assert len(present) > 1000
    km = lc.KeyMap(man)
    for ldm, names in present.items():
        assert ours.get(ldm) in names, ldm
        want = f"diffusion_model.{ldm}.weight"
        assert km.resolve("lora_unet_" + ours[ldm].replace(".", "_")) == want
        assert km.resolve("unet." + ours[ldm]) == want


def test_tiny_sdxl_host_model_matches_comfyui(host):
    import sys

    models = next(m for k, m in sys.modules.items() if k.endswith("host_nodes.models"))
    patcher = models.sdxl_model("tiny")
    keys = [k for k in patcher.model.state_dict() if k.startswith("diffusion_model.") and k.endswith(".weight")]
    comfy_map = _comfy_map(patcher.model.model_config.unet_config)
    ours = ldm_to_diffusers(k[len("diffusion_model."):-len(".weight")] for k in keys)
    checked = 0
    for ldm, names in comfy_map.items():
        if f"diffusion_model.{ldm}.weight" in keys:
            assert ours[ldm] in names, ldm
            checked += 1
    assert checked > 100
