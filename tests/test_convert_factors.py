"""Generated adapters that cover every weight of a model, for the conversion tests.

Names are spelled here straight from SPEC §1 (not through the code under test): sd-scripts
`lora_unet_<path>` / `lora_te1_` / `lora_te2_` / `lora_te_`, ComfyUI `diffusion_model.<path>` and
`text_encoders.<te>.<path>`. Factors are tiny and random but have the right shapes for each layer.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from lycoris_core import adapter_from_tensors, factorization, load_tensors, manifest, save_safetensors
from lycoris_core.convert import convert_tensors
from lycoris_core.naming import CANONICAL_SUFFIX, split_key

TE_PREFIX = {  # ComfyUI key head → (inner path prefix, sd-scripts prefix); SDXL and Anima
    "clip_l": ("clip_l.transformer.", "lora_te1_"),
    "clip_g": ("clip_g.transformer.", "lora_te2_"),
    "qwen3_06b": ("qwen3_06b.transformer.model.", "lora_te_"),
}


def sd_name(model_key: str) -> str:
    base = model_key[: -len(".weight")]
    if base.startswith("diffusion_model."):
        return "lora_unet_" + base[len("diffusion_model."):].replace(".", "_")
    inner, prefix = TE_PREFIX[base.split(".", 1)[0]]
    assert base.startswith(inner), base
    return prefix + base[len(inner):].replace(".", "_")


def comfy_name(model_key: str) -> str:
    base = model_key[: -len(".weight")]
    return base if base.startswith("diffusion_model.") else "text_encoders." + base


def adapted_weights(weights: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Every weight a LyCORIS module can patch: Linear, Conv and Embedding weights (ndim >= 2)."""
    return {k: tuple(s) for k, s in weights.items() if k.endswith(".weight") and len(s) >= 2}


def module_tensors(name: str, shape: tuple[int, ...], i: int, g: torch.Generator, *,
                   dora: bool = False, dtypes: bool = True,
                   lokr_tucker: bool = True) -> dict[str, torch.Tensor]:
    """Tiny factors for a layer weight of `shape`; `i` picks the algorithm and layout so that a
    model's worth of modules uses every suffix: LoRA (k×k conv: Tucker `lora_mid`), LoHa (k×k
    conv: Tucker `hada_t1/t2`), LoKr (`lokr_w1` or `lokr_w1_a/b`; `lokr_w2`, `lokr_w2_a/b` or
    Tucker `lokr_t2` on k×k convs, which ComfyUI cannot apply: `lokr_tucker=False` avoids it)."""
    out_dim, in_dim, kernel = shape[0], shape[1], tuple(shape[2:])
    k = math.prod(kernel)
    tucker = k > 1 and i % 2 == 0
    rank = 2
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    ones = [1] * len(kernel)
    algo = ("loha", "lokr", "lora")[i % 3]
    t: dict[str, torch.Tensor] = {}
    if algo == "lora":
        t["lora_up.weight"] = rnd(out_dim, rank, *ones)
        if tucker:
            t["lora_down.weight"] = rnd(rank, in_dim, *ones)
            t["lora_mid.weight"] = rnd(rank, rank, *kernel)
        else:
            t["lora_down.weight"] = rnd(rank, in_dim, *kernel)
    elif algo == "loha":
        for h in (1, 2):
            if tucker:
                t[f"hada_w{h}_a"], t[f"hada_w{h}_b"] = rnd(rank, out_dim), rnd(rank, in_dim)
                t[f"hada_t{h}"] = rnd(rank, rank, *kernel)
            else:
                t[f"hada_w{h}_a"], t[f"hada_w{h}_b"] = rnd(out_dim, rank), rnd(rank, in_dim * k)
    else:
        a, b = factorization(out_dim, -1)
        c, d = factorization(in_dim, -1)
        if i % 4 == 1:
            t["lokr_w1_a"], t["lokr_w1_b"] = rnd(a, rank), rnd(rank, c)
        else:
            t["lokr_w1"] = rnd(a, c)
        if tucker and lokr_tucker:
            t["lokr_w2_a"], t["lokr_w2_b"] = rnd(rank, b), rnd(rank, d)
            t["lokr_t2"] = rnd(rank, rank, *kernel)
        elif i % 5 == 0:
            t["lokr_w2"] = rnd(b, d, *kernel)
        else:
            t["lokr_w2_a"], t["lokr_w2_b"] = rnd(b, rank), rnd(rank, d * k)
    if dtypes:  # fp32 / fp16 / bf16 storage, float or int64 alpha (SPEC §1)
        dt = (torch.float32, torch.float16, torch.bfloat16)[(i // 3) % 3]
        t = {s: v.to(dt) for s, v in t.items()}
    t["alpha"] = torch.tensor(rank, dtype=torch.int64) if i % 4 == 1 else torch.tensor(1.5 + i % 3)
    if dora:
        t["dora_scale"] = rnd(out_dim, *[1] * (len(shape) - 1)).abs() + 0.5
    return {f"{name}.{s}": v for s, v in t.items()}


def make_adapter(weights: dict[str, tuple[int, ...]], naming=sd_name, seed: int = 0, *,
                 dora_every: int = 0, dtypes: bool = True,
                 lokr_tucker: bool = True) -> dict[str, torch.Tensor]:
    """An adapter with one module on every key of `weights` (keys sorted; algorithm rotates)."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, key in enumerate(sorted(weights)):
        dora = bool(dora_every) and i % dora_every == 0
        tensors.update(module_tensors(naming(key), weights[key], i, g, dora=dora, dtypes=dtypes,
                                      lokr_tucker=lokr_tucker))
    return tensors


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and raw bytes."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


def golden(fixtures_dir: Path, name: str) -> Path:
    return fixtures_dir / f"{name}.safetensors"


def mixed_folder(fixtures_dir: Path, root: Path) -> dict[str, str]:
    """A folder of good and broken files; returns {relative path: expected status}."""
    root.mkdir(parents=True)
    (root / "sub").mkdir()
    shutil.copy(golden(fixtures_dir, "loha_linear"), root / "good_sdxl.safetensors")
    shutil.copy(golden(fixtures_dir, "anima_lokr_llm_adapter"), root / "sub" / "good_anima.safetensors")
    data = golden(fixtures_dir, "lokr_full_w2").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    t, m = load_tensors(golden(fixtures_dir, "lokr_linear_default_factor"))
    save_safetensors({k.replace("lora_unet_output", "lora_unet_outptu"): v for k, v in t.items()},
                     root / "unknown_names.safetensors", m)
    comfy, cm, _ = convert_tensors(t, m, to="comfyui")
    save_safetensors(comfy, root / "already.safetensors", cm)
    (root / "pickle.pt").write_bytes(b"not loaded")
    return {"good_sdxl.safetensors": "converted", "sub/good_anima.safetensors": "converted",
            "truncated.safetensors": "failed", "garbage.safetensors": "failed",
            "unknown_names.safetensors": "failed", "already.safetensors": "skipped",
            "pickle.pt": "skipped"}


@pytest.mark.parametrize("arch", ["sdxl", "anima"])
def test_generated_adapter_fits_every_layer(arch):
    """The generator itself: one module per adaptable weight, each making a ΔW of the layer's size."""
    weights = adapted_weights(manifest(arch))
    tensors = make_adapter(weights, dora_every=7)
    adapter = adapter_from_tensors(tensors, name=arch)
    assert len(adapter.modules) == len(weights)
    assert {m.algo for m in adapter.modules.values()} == {"lora", "loha", "lokr"}
    if arch == "sdxl":  # with k×k convs, every tensor suffix of SPEC §1 appears
        assert {split_key(k)[1] for k in tensors} == set(CANONICAL_SUFFIX.values()) - {"lokr_t1"}
    for key, shape in weights.items():
        adapter.modules[sd_name(key)].resolved_shape(shape)  # raises on a misfit
