"""ΔW reconstruction at real SDXL / Anima layer shapes: the pack against its references.

Contestants, per case (all in float32, CPU, interleaved round by round in one process):
- pack            `lycoris_core.algos.<algo>.diff_weight(factors, scale)`, called again and again:
                  the steady state of building ΔW one layer at a time for layers of one shape
                  (baking, merging, `AdapterModule.delta()` over a model's blocks). A ΔW of 32 MiB
                  or more then gets the huge-page mapping the previous one freed
                  (`algos.buffers` pool); a smaller one gets glibc's reused heap block.
- pack cold       (ΔW ≥ 32 MiB only) the same with the pool emptied before each call: the first
                  layer of its size, on fresh memory that the kernel must fault in and zero.
- pack .delta()   `AdapterModule.delta(shape=layer)` on an in-memory adapter (reads the factors,
                  checks them for NaN/Inf and ΔW for overflow, reshapes)
- lycoris         lycoris-lora 4.1.3 functional `diff_weight(..., backend="torch")`
- pack patch      `nodes.patching.LycorisPatch.calculate_weight(W, …)`: what ComfyUI calls to
                  patch a weight with this pack (ΔW built in row blocks of ≤ 16 MiB and added into
                  W in float32), compared with ComfyUI's own adapter doing the same job:
- comfyui ΔW+add  ComfyUI 0.3.75 `comfy.weight_adapter.<X>Adapter.load(...)
                  .calculate_weight(W, ...)`, which builds ΔW and adds it into W
- bound           (bytes of ΔW written + bytes of factors read) / copy bandwidth, measured by a
                  64 MiB `dst.copy_(src)` timed in the same rounds (read + written bytes)
- floor           allocating a ΔW-sized float32 output (`algos.buffers.empty`, steady state like
                  `pack`) and writing it once (`fill_`)

Ratios pack/lycoris, patch/comfyui and pack/bound are the medians of per-round ratios (each pair measured
seconds apart, see `common.paired_ratio`); their quartiles are kept in the JSON.
Before timing, every case checks that the contestants agree (relative error 1e-5), so a fast
wrong answer cannot win.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lycoris_core import adapter_from_tensors
from lycoris_core.algos import buffers
from lycoris_core.algos import loha as loha_algo
from lycoris_core.algos import lokr as lokr_algo
from lycoris_core.algos import lora as lora_algo

from .common import (
    bench_device,
    comfy_host,
    copy_bandwidth,
    interleaved,
    paired_ratio,
    peak_vram,
    ratio,
    row,
    summarise,
)

BENCH = "ΔW reconstruction (ms, float32)"
MODULE = "lora_unet_bench_layer"
TOL = 1e-5

ALGOS = {"loha": loha_algo, "lokr": lokr_algo, "lora": lora_algo}
COPY_BYTES = 64 << 20
"""Buffer size of the in-round copy that sets the bound (out of a 32 MiB L3 cache)."""
PAIRS = (("pack/lycoris", "pack", "lycoris"), (".delta()/lycoris", "pack .delta()", "lycoris"),
         ("patch/comfyui", "pack patch", "comfyui ΔW+add"))
"""Paired per-round ratios reported (name, contestant, reference)."""


@dataclass(frozen=True)
class Case:
    """One adapted layer: its weight shape and the file tensors (suffix → shape)."""

    name: str
    algo: str
    shape: tuple[int, ...]
    parts: dict[str, tuple[int, ...]] = field(hash=False)
    alpha: float
    quick: bool = True  # part of `--quick`


def _loha(name, o, i, r, k=None, tucker=False, quick=True) -> Case:
    if k is None:
        parts = {"hada_w1_a": (o, r), "hada_w1_b": (r, i), "hada_w2_a": (o, r), "hada_w2_b": (r, i)}
        return Case(name, "loha", (o, i), parts, r / 2, quick)
    if tucker:
        parts = {"hada_w1_a": (r, o), "hada_w1_b": (r, i), "hada_t1": (r, r, k, k),
                 "hada_w2_a": (r, o), "hada_w2_b": (r, i), "hada_t2": (r, r, k, k)}
    else:
        parts = {"hada_w1_a": (o, r), "hada_w1_b": (r, i * k * k), "hada_w2_a": (o, r),
                 "hada_w2_b": (r, i * k * k)}
    return Case(name, "loha", (o, i, k, k), parts, r / 2, quick)


def _lokr(name, o, i, w1, w2, alpha=4.0, k=None, quick=True) -> Case:
    shape = (o, i) if k is None else (o, i, k, k)
    return Case(name, "lokr", shape, {**w1, **w2}, alpha, quick)


def cases() -> list[Case]:
    """The benchmarked layers (SDXL widths 320/640/1280, Anima 2048 and its 8192 MLP)."""
    f = lokr_algo.factorization
    (a12, b12), (a20, b20), (a81, b81) = f(1280), f(2048), f(8192)
    a32, b32 = f(320)
    a8, b8 = f(1280, 8)
    return [
        _loha("loha linear 640² r16", 640, 640, 16),
        _loha("loha linear 1280² r16", 1280, 1280, 16),
        _loha("loha linear 2048² r16 (Anima)", 2048, 2048, 16),
        _loha("loha linear 8192×2048 r16 (Anima mlp)", 8192, 2048, 16, quick=False),
        _loha("loha conv 320²×3×3 flat r8", 320, 320, 8, k=3),
        _loha("loha conv 320²×3×3 tucker r8", 320, 320, 8, k=3, tucker=True),
        _lokr("lokr linear 1280² w1 full + w2 r8", 1280, 1280, {"lokr_w1": (a12, a12)},
              {"lokr_w2_a": (b12, 8), "lokr_w2_b": (8, b12)}),
        _lokr("lokr linear 2048² w1 full + w2 r16 (Anima)", 2048, 2048, {"lokr_w1": (a20, a20)},
              {"lokr_w2_a": (b20, 16), "lokr_w2_b": (16, b20)}),
        _lokr("lokr linear 8192×2048 w1 full + w2 r16 (Anima mlp)", 8192, 2048,
              {"lokr_w1": (a81, a20)}, {"lokr_w2_a": (b81, 16), "lokr_w2_b": (16, b20)},
              quick=False),
        _lokr("lokr linear 1280² decompose_both r8", 1280, 1280,
              {"lokr_w1_a": (a12, 8), "lokr_w1_b": (8, a12)},
              {"lokr_w2_a": (b12, 8), "lokr_w2_b": (8, b12)}),
        _lokr("lokr linear 1280² both full (factor 8)", 1280, 1280, {"lokr_w1": (a8, a8)},
              {"lokr_w2": (b8, b8)}, alpha=1.0),
        _lokr("lokr conv 320²×3×3 w2 full", 320, 320, {"lokr_w1": (a32, a32)},
              {"lokr_w2": (b32, b32, 3, 3)}, alpha=1.0, k=3),
        _lokr("lokr conv 320²×3×3 flat r8", 320, 320, {"lokr_w1": (a32, a32)},
              {"lokr_w2_a": (b32, 8), "lokr_w2_b": (8, b32 * 9)}, k=3),
        _lokr("lokr conv 320²×3×3 tucker r8", 320, 320, {"lokr_w1": (a32, a32)},
              {"lokr_w2_a": (8, b32), "lokr_w2_b": (8, b32), "lokr_t2": (8, 8, 3, 3)}, k=3),
        Case("lora linear 1280² r32", "lora", (1280, 1280),
             {"lora_up.weight": (1280, 32), "lora_down.weight": (32, 1280)}, 16.0),
        Case("lora conv 320²×3×3 tucker r16", "lora", (320, 320, 3, 3),
             {"lora_up.weight": (320, 16, 1, 1), "lora_mid.weight": (16, 16, 3, 3),
              "lora_down.weight": (16, 320, 1, 1)}, 8.0),
    ]


def tiny_cases() -> list[Case]:
    """Every variant at toy size (for the smoke test: proves the code paths run)."""
    return [
        _loha("loha linear", 24, 20, 4), _loha("loha conv flat", 8, 6, 2, k=3),
        _loha("loha conv tucker", 8, 6, 2, k=3, tucker=True),
        _lokr("lokr w2 low", 24, 20, {"lokr_w1": (4, 4)}, {"lokr_w2_a": (6, 2), "lokr_w2_b": (2, 5)}),
        _lokr("lokr decompose_both", 24, 20, {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4)},
              {"lokr_w2_a": (6, 2), "lokr_w2_b": (2, 5)}),
        _lokr("lokr both full", 24, 20, {"lokr_w1": (4, 4)}, {"lokr_w2": (6, 5)}, alpha=1.0),
        _lokr("lokr conv full", 8, 6, {"lokr_w1": (2, 2)}, {"lokr_w2": (4, 3, 3, 3)}, k=3),
        _lokr("lokr conv tucker", 8, 6, {"lokr_w1": (2, 2)},
              {"lokr_w2_a": (2, 4), "lokr_w2_b": (2, 3), "lokr_t2": (2, 2, 3, 3)}, k=3),
        Case("lora linear", "lora", (24, 20), {"lora_up.weight": (24, 4), "lora_down.weight": (4, 20)},
             2.0),
        Case("lora tucker", "lora", (8, 6, 3, 3), {"lora_up.weight": (8, 2, 1, 1),
             "lora_mid.weight": (2, 2, 3, 3), "lora_down.weight": (2, 6, 1, 1)}, 1.0),
    ]


# ------------------------------------------------------------------------------- contestants
def file_tensors(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """The case's tensors as a file holds them (float32, seeded, ΔW entries around 1e-2), on the
    bench device (`--device`: the factors of a loaded adapter sit where its weights are)."""
    g = torch.Generator().manual_seed(seed)
    dev = bench_device()
    out = {f"{MODULE}.{k}": (torch.randn(*s, generator=g) * 0.1).to(dev)
           for k, s in case.parts.items()}
    out[f"{MODULE}.alpha"] = torch.tensor(case.alpha)
    return out


def _lycoris_fn(case: Case, f, scale: float) -> tuple[Callable[[], torch.Tensor], float]:
    """lycoris-lora's functional call and the factor that corrects its known LoKr-Tucker scale
    defect (SPEC §5: rank read from w2_a's wrong axis), for the agreement check only."""
    from lycoris.functional import locon, loha, lokr

    if case.algo == "loha":
        return (lambda: loha.diff_weight(f.w1_b, f.w1_a, f.w2_b, f.w2_a, f.t1, f.t2,
                                         gamma=scale, backend="torch")), 1.0
    if case.algo == "lora":
        return (lambda: locon.diff_weight(f.down, f.up, f.mid, gamma=scale,
                                          backend="torch")), 1.0
    fix = f.w2_a.shape[1] / f.t2.shape[0] if f.t2 is not None else 1.0
    return (lambda: lokr.diff_weight(f.w1, f.w1_a, f.w1_b, f.w2, f.w2_a, f.w2_b, f.t2,
                                     gamma=case.alpha, backend="torch")), fix


def _comfy_adapter(case: Case, tensors: dict[str, torch.Tensor]):
    comfy_host()
    from comfy import weight_adapter

    cls = {"loha": weight_adapter.LoHaAdapter, "lokr": weight_adapter.LoKrAdapter,
           "lora": weight_adapter.LoRAAdapter}[case.algo]
    adapter = cls.load(MODULE, tensors, case.alpha, None)
    if adapter is None:
        raise RuntimeError(f"ComfyUI's {cls.__name__} did not load the '{case.name}' tensors")
    return adapter


def _identity(x):
    return x


def _patch_class():
    """`LycorisPatch` of the pack as ComfyUI loaded it (nodes/ imports comfy: booted first)."""
    import importlib

    return importlib.import_module(f"{comfy_host().pack.__name__}.nodes.patching").LycorisPatch


def _cold(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    def call():
        buffers.clear_pool()
        return fn()
    return call


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().reshape(-1), want.double().reshape(-1)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def contestants(case: Case, with_comfy: bool = True) -> tuple[dict[str, Callable], dict]:
    """The timed callables of one case, and the agreement check's results."""
    tensors = file_tensors(case)
    module = adapter_from_tensors(tensors).modules[MODULE]
    dev = bench_device()
    algo, f, scale = ALGOS[case.algo], module.factors(dev), module.scale
    ly, ly_fix = _lycoris_fn(case, f, scale)

    want = algo.diff_weight(f, scale).reshape(case.shape)
    check = {"pack .delta()": _rel_err(module.delta(shape=case.shape, device=dev), want),
             "lycoris": _rel_err(ly() * ly_fix, want)}
    fns: dict[str, Callable] = {
        "pack": lambda: algo.diff_weight(f, scale),
        "pack .delta()": lambda: module.delta(shape=case.shape, device=dev),
        "lycoris": ly,
        "floor": lambda: buffers.empty(case.shape, device=dev).fill_(0.0),
    }
    if buffers.is_large(math.prod(case.shape), torch.float32) and dev.type == "cpu":
        fns["pack cold"] = _cold(fns["pack"])
    if with_comfy:
        patch = _patch_class()(module, "bench")
        w_pack = torch.zeros(case.shape, device=dev)
        check["pack patch"] = _rel_err(patch.calculate_weight(w_pack, "bench", 1.0, 1.0, None,
                                                              None), want)
        fns["pack patch"] = lambda: patch.calculate_weight(w_pack, "bench", 1.0, 1.0, None, None)
        comfy = _comfy_adapter(case, tensors)
        w_comfy = torch.zeros(case.shape, device=dev)
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.CRITICAL)  # ComfyUI logs (not raises) its LoKr-Tucker failure
        try:
            got = comfy.calculate_weight(w_comfy, "bench", 1.0, 1.0, None, _identity)
        finally:
            logger.setLevel(level)
        if bool(got.abs().max() > 0):
            check["comfyui ΔW+add"] = _rel_err(got, want)
            fns["comfyui ΔW+add"] = lambda: comfy.calculate_weight(w_comfy, "bench", 1.0, 1.0,
                                                                   None, _identity)
        else:
            check["comfyui ΔW+add"] = "fails (weight left unpatched, SPEC §5)"
    bad = {k: v for k, v in check.items() if isinstance(v, float) and not v < TOL}
    if bad:
        raise AssertionError(f"{case.name}: contestants disagree with the pack: {bad}")
    return fns, check


def moved_bytes(case: Case) -> int:
    """ΔW written plus every factor read, float32."""
    return 4 * (math.prod(case.shape) + sum(math.prod(s) for s in case.parts.values()))


# ------------------------------------------------------------------------------------- driver
def run(case_list: list[Case], *, repeats: int = 25, target_s: float = 0.01,
        bandwidth: dict | None = None, with_comfy: bool = True) -> dict:
    """Time every case; returns {"rows": [...], "bandwidth": {...}}.

    The bound of each case comes from a `copy` contestant timed in the same rounds: `dst.copy_(src)`
    of touched float32 buffers of `bandwidth["buffer_bytes"]` (at most 64 MiB: twice the L3 cache
    of the machine bench/README.md quotes), i.e. this round's copy bandwidth, so pack/bound is a paired
    per-round ratio like the others. `bandwidth` (the separately measured 256 MiB copy) is kept in
    the result for reference.
    """
    bandwidth = bandwidth or copy_bandwidth()
    n = min(bandwidth["buffer_bytes"], COPY_BYTES) // 4
    src, dst = torch.ones(n, device=bench_device()), torch.zeros(n, device=bench_device())
    rows = []
    for case in case_list:
        fns, check = contestants(case, with_comfy)
        fns["copy"] = lambda: dst.copy_(src)
        st = interleaved(fns, repeats=repeats, target_s=target_s)
        per_byte = [c / (8 * n) for c in st.pop("copy").values]  # read + written: 2 · 4n bytes
        bound_st = summarise([moved_bytes(case) * c for c in per_byte])
        ms = {k: v.median * 1e3 for k, v in st.items()}
        refs = {k: ms.get(k) for k in ("pack cold", "pack .delta()", "lycoris", "pack patch",
                                       "comfyui ΔW+add")}
        refs["bound"] = bound_st.median * 1e3
        refs["floor"] = ms["floor"]
        paired = {name: paired_ratio(st[a], st[b]) for name, a, b in PAIRS if a in st and b in st}
        paired["pack/bound"] = paired_ratio(st["pack"], bound_st)
        if "pack cold" in st:
            paired["cold/bound"] = paired_ratio(st["pack cold"], bound_st)
        ratios = {
            **{name: p.median if p else None for name, p in paired.items()},
            "pack/floor": ratio(ms["pack"], ms["floor"]),
        }
        vram = {k: peak_vram(fns[k]) for k in ("pack", "lycoris", "pack patch", "comfyui ΔW+add")
                if k in fns} if bench_device().type == "cuda" else None
        rows.append(row(BENCH, case.name, ms["pack"], refs, "ms", ratios, agreement=check,
                        device=bench_device().type, peak_vram_bytes=vram,
                        quartiles_ms={k: (v.q1 * 1e3, v.q3 * 1e3) for k, v in st.items()},
                        faults_per_call={k: v.faults for k, v in st.items()},
                        ratio_quartiles={k: (p.q1, p.q3) for k, p in paired.items() if p},
                        copy_bytes_per_s=1 / statistics.median(per_byte),
                        samples=st["pack"].samples, bytes_moved=moved_bytes(case)))
    return {"rows": rows, "bandwidth": bandwidth}


def main(quick: bool = False) -> dict:
    """The ΔW benchmark at real layer shapes (`quick`: fewer layers and rounds)."""
    case_list = [c for c in cases() if c.quick or not quick]
    if quick:
        return run(case_list, repeats=5, target_s=0.004, bandwidth=copy_bandwidth(64 << 20, 3))
    return run(case_list)


if __name__ == "__main__":
    import argparse

    from .common import format_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    res = main(quick=ap.parse_args().quick)
    print(format_table(res["rows"]))
    print(f"\ncopy bandwidth: {res['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s")
