"""Shared pieces of the loader tests: graphs, golden files in the host's loras folder, small
adapter files written in sd-scripts naming for the tiny models, and an independent ΔW oracle.

The oracle below is written from SPEC §3 only (no pack code), so the loader is checked against a
separate implementation; the golden files are checked against the references' own ΔW.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

import lycoris_core as lc

SAMPLER = {"seed": 3, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
           "denoise": 1.0}


def loras_dir(host) -> Path:
    return host.base_dir / "models" / "loras"


def install_golden(host, fixtures: Path, case: str) -> str:
    """Copy a golden adapter file into the host's loras folder; returns its lora_name."""
    name = f"golden_{case}.safetensors"
    dst = loras_dir(host) / name
    if not dst.exists():
        shutil.copyfile(fixtures / f"{case}.safetensors", dst)
    return name


def sampler_graph(kind: str, loader: str | None, lora_name: str = "", strength_model: float = 1.0,
                  strength_clip: float = 1.0, block_weights: str = "", record: str = "",
                  seed: int = 0, mode: str | None = None) -> dict:
    """Model → [loader] → recorder → KSampler (SDXL kinds: conditioning from the model's CLIP);
    `mode` ("patch" / "bypass") is set on the pack's loaders when given."""
    g = {
        "1": {"class_type": "LycorisTestModel", "inputs": {"kind": kind, "seed": seed}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                           "batch_size": 1}},
    }
    model, clip = ["1", 0], ["1", 1]
    if loader is not None:
        g["2"] = {"class_type": loader, "inputs": {
            "model": model, "clip": clip, "lora_name": lora_name, "strength_model": strength_model,
            "strength_clip": strength_clip}}
        if loader != "LoraLoader":
            g["2"]["inputs"]["block_weights"] = block_weights
            if mode is not None:
                g["2"]["inputs"]["mode"] = mode
        model, clip = ["2", 0], ["2", 1]
    g["4"] = {"class_type": "LycorisTestRecorder", "inputs": {"model": model, "keys": record}}
    g["5"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": clip}}
    g["6"] = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["3", 0],
        **SAMPLER}}
    g["7"] = {"class_type": "LycorisTestSink", "inputs": {"latent": ["6", 0]}}
    return g


def run_recorded(executor, graph: dict) -> tuple[object, list[dict]]:
    """Run a graph; returns (RunResult, the weight records the sampler's model calls made)."""
    records = _records()
    records.clear()
    res = executor.run(graph)
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    return res, list(records)


def _records() -> list:
    """`RECORDS` of the test host nodes, as ComfyUI's loader imported them."""
    import sys

    for name, mod in list(sys.modules.items()):
        if name.endswith("host_nodes") and hasattr(mod, "RECORDS"):
            return mod.RECORDS
    raise RuntimeError("test host nodes not loaded")


def module_name(key: str) -> str:
    """sd-scripts module name of a ComfyUI weight key (tiny SDXL: UNet, CLIP-L, CLIP-G)."""
    base = key[: -len(".weight")]
    if base.startswith("diffusion_model."):
        return "lora_unet_" + base[len("diffusion_model."):].replace(".", "_")
    te, _, rest = base.partition(".")
    rest = rest[len("transformer."):]
    return {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}[te] + rest.replace(".", "_")


def make_adapter(shapes: dict[str, tuple[int, ...]], algo: str, rank: int = 4, alpha: float = 2.0,
                 seed: int = 0, lokr_full: bool = False, module_names=module_name
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Random LoHa/LoKr factors for `shapes` ({ComfyUI key: weight shape}).

    Returns (file tensors in sd-scripts naming, oracle ΔW per key at strength 1, float64).
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: 0.3 * torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    tensors: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        name = module_name(key) if module_names is module_name else module_names(key)
        out_f, in_f = shape[0], int(torch.Size(shape[1:]).numel())
        if algo == "loha":
            f = {"hada_w1_a": rnd(out_f, rank), "hada_w1_b": rnd(rank, in_f),
                 "hada_w2_a": rnd(out_f, rank), "hada_w2_b": rnd(rank, in_f)}
        else:
            a, b = lc.factorization(out_f, -1)
            c, d = lc.factorization(in_f, -1)
            if lokr_full:
                f = {"lokr_w1": rnd(a, c), "lokr_w2": rnd(b, d)}
            else:
                f = {"lokr_w1": rnd(a, c), "lokr_w2_a": rnd(b, rank), "lokr_w2_b": rnd(rank, d)}
        for k, v in f.items():
            tensors[f"{name}.{k}"] = v.float()
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
        # the oracle uses the float32-rounded factors that the file really holds
        deltas[key] = _oracle(f, algo, alpha, rank, lokr_full).reshape(shape)
    return tensors, deltas


def _oracle(f: dict, algo: str, alpha: float, rank: int, lokr_full: bool) -> torch.Tensor:
    """SPEC §3: LoHa (w1a·w1b)⊙(w2a·w2b)·α/R; LoKr kron(w1, w2)·α/R, scale 1 when both full."""
    f = {k: v.float().double() for k, v in f.items()}
    if algo == "loha":
        return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * (alpha / rank)
    if lokr_full:
        return torch.kron(f["lokr_w1"], f["lokr_w2"])
    return torch.kron(f["lokr_w1"], f["lokr_w2_a"] @ f["lokr_w2_b"]) * (alpha / rank)


def write_adapter(host, name: str, tensors: dict, algo: str) -> str:
    """Save in the loras folder (sd-scripts metadata); returns the lora_name."""
    path = loras_dir(host) / name
    if not path.exists():
        module = "lycoris.kohya" if algo == "lycoris" else f"networks.{algo}"
        meta = {"ss_network_module": module, "ss_network_dim": "4",
                "ss_network_alpha": "2.0"}
        lc.save_safetensors(tensors, path, meta)
    return name


def loaded_weights(patcher, keys) -> dict[str, torch.Tensor]:
    """Weights of a ModelPatcher (MODEL, or CLIP's patcher) as ComfyUI loads them for use."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    sd = patcher.model.state_dict()
    out = {k: sd[k].detach().double().clone() for k in keys}
    mm.unload_all_models()
    return out
