"""Baking adapters into a model file: peak memory of the pack's streaming bake vs the whole-model way.

Both contestants do the same job on the same synthetic fp16 "checkpoint" (N layers of D×D under
`model.diffusion_model.`) with a LoKr and a LoHa adapter on every layer, each in a fresh Python
process (peak = the process' VmHWM at the end minus its VmRSS when the job starts):

- pack      `lycoris_core.bake.bake_file`: read one tensor, add Σ sᵢ·ΔWᵢ in fp32, cast, write it,
            next tensor (`save_safetensors_streaming`).
- whole     the usual way (and ComfyUI's checkpoint save): load every tensor, patch each one in
            place with the same fp32 formula, then `safetensors.torch.save_file` the whole dict.

Both outputs are compared tensor by tensor before any figure is reported (they must be equal), so
a fast or lean wrong answer cannot win. Run: `python -m bench.bench_bake [--quick]`.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import torch

from .common import child_peak_rss, format_table, ratio, row, write_json

BENCH = "bake into a model file (peak RSS above baseline, MiB; wall s)"
STRENGTHS = (0.8, -0.5)


def _layer_key(i: int) -> str:
    return f"diffusion_model.blocks.{i}.mlp.layer1.weight"


def make_inputs(folder: str, layers: int, dim: int, rank: int = 8) -> dict:
    """Write the synthetic model and two adapters (LoKr + LoHa on every layer); returns paths."""
    from safetensors.torch import save_file

    import lycoris_core as lc

    g = torch.Generator().manual_seed(0)
    model = {"model." + _layer_key(i): (0.02 * torch.randn(dim, dim, generator=g)).half()
             for i in range(layers)}
    model["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3, generator=g)
    folder_p = Path(folder)
    save_file(model, folder_p / "model.safetensors")
    (a, b), (c, d) = lc.factorization(dim), lc.factorization(dim)
    lokr, loha = {}, {}
    for i in range(layers):
        name = "lora_unet_" + _layer_key(i)[len("diffusion_model."):-len(".weight")].replace(".", "_")
        lokr.update({f"{name}.lokr_w1": torch.randn(a, c, generator=g),
                     f"{name}.lokr_w2_a": torch.randn(b, rank, generator=g) * 0.1,
                     f"{name}.lokr_w2_b": torch.randn(rank, d, generator=g) * 0.1,
                     f"{name}.alpha": torch.tensor(float(rank))})
        loha.update({f"{name}.hada_w1_a": torch.randn(dim, rank, generator=g) * 0.1,
                     f"{name}.hada_w1_b": torch.randn(rank, dim, generator=g) * 0.1,
                     f"{name}.hada_w2_a": torch.randn(dim, rank, generator=g) * 0.1,
                     f"{name}.hada_w2_b": torch.randn(rank, dim, generator=g) * 0.1,
                     f"{name}.alpha": torch.tensor(float(rank))})
    lc.save_safetensors(lokr, folder_p / "lokr.safetensors")
    lc.save_safetensors(loha, folder_p / "loha.safetensors")
    return {"model": str(folder_p / "model.safetensors"),
            "adapters": [str(folder_p / "lokr.safetensors"), str(folder_p / "loha.safetensors")]}


def _status_mib(field: str) -> float:
    """VmRSS / VmHWM of this process from /proc (VmHWM is per address space, so unlike
    `ru_maxrss` it does not carry the parent's high-water mark over fork + exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def stream_bake(model: str, adapters: list[str], out: str) -> dict:
    """Child: the pack's streaming bake."""
    import lycoris_core as lc
    from lycoris_core.bake import bake_file

    start = _status_mib("VmRSS")
    report = bake_file(model, [(lc.load_adapter(p), s) for p, s in zip(adapters, STRENGTHS, strict=True)], out)
    return {"patched": report.patched, "start_mib": start, "hwm_mib": _status_mib("VmHWM")}


def whole_bake(model: str, adapters: list[str], out: str) -> dict:
    """Child: load the whole model, patch in place with the same fp32 formula, save_file it all."""
    from safetensors.torch import save_file

    import lycoris_core as lc
    from lycoris_core.bake import model_keys_of_file, patched, plan_bake

    start = _status_mib("VmRSS")
    tensors, meta = lc.load_tensors(model)
    plan, _ = plan_bake({k: tuple(v.shape) for k, v in tensors.items()}, model_keys_of_file(list(tensors)),
                        [(lc.load_adapter(p), s) for p, s in zip(adapters, STRENGTHS, strict=True)])
    for key, members in plan.items():
        tensors[key] = patched(tensors[key], members)
    save_file(tensors, out, metadata=meta)
    return {"patched": len(plan), "start_mib": start, "hwm_mib": _status_mib("VmHWM")}


def _digest(path: str) -> str:
    """Hash of every tensor's bytes in key order (header layout may differ between writers)."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(path, "pt") as fh:
        for k in sorted(fh.keys()):
            t = fh.get_tensor(k).contiguous().reshape(-1)
            h.update(k.encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def main(quick: bool = False) -> dict:
    layers, dim = (24, 1536) if quick else (48, 2048)
    with tempfile.TemporaryDirectory(prefix="lycoris-bench-bake-") as tmp:
        paths = make_inputs(tmp, layers, dim)
        model_mib = Path(paths["model"]).stat().st_size / 2**20
        runs = {}
        for name, fn in (("pack", "stream_bake"), ("whole", "whole_bake")):
            out = str(Path(tmp) / f"{name}.safetensors")
            runs[name] = child_peak_rss(f"bench.bench_bake:{fn}", {**paths, "out": out})
            runs[name]["digest"] = _digest(out)
        if runs["pack"]["digest"] != runs["whole"]["digest"]:
            raise AssertionError("streaming bake and whole-model bake wrote different weights")
    mib = {k: r["result"]["hwm_mib"] - r["result"]["start_mib"] for k, r in runs.items()}
    case = f"{layers}×{dim}² fp16 ({model_mib:.0f} MiB), LoKr+LoHa on every layer"
    rows = [
        row(BENCH, case, mib["pack"], {"whole": mib["whole"]}, unit="MiB",
            layer_mib=dim * dim * 2 / 2**20, model_mib=model_mib),
        row(BENCH, case + " — wall", runs["pack"]["wall_s"], {"whole": runs["whole"]["wall_s"]},
            unit="s", ratios={"pack/whole": ratio(runs["pack"]["wall_s"], runs["whole"]["wall_s"])}),
    ]
    return {"rows": rows, "runs": runs}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="24 layers of 1536² (under a minute)")
    args = ap.parse_args()
    res = main(quick=args.quick)
    print(format_table(res["rows"]))
    print(f"\nJSON: {write_json(res, 'bake_quick' if args.quick else 'bake')}")
