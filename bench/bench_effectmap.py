"""The effect map of a full-size SDXL adapter: from the factors vs forming every ΔW.

    .venv/bin/python -m bench.bench_effectmap [--quick]

Adapters: the LoHa and LoKr files of `bench_apply` (788 UNet modules at the real SDXL shapes,
sd-scripts' default targets, rank 16, fp16 factors, LoKr with sd-scripts' full-matrix rule),
written once to a temporary file. Contestants per file, interleaved round by round in one process
(`common.interleaved`), both starting from the file on disk:

- pack map      `load_adapter(file)` + `effect.effect_map(adapter)`: ‖ΔW‖ per block and layer
                kind from the factors (LoHa: Khatri–Rao Gram sum, LoKr: ‖W1‖·‖W2‖), in float64 —
                what `inspect --map`, the LyCORISEffectMap node and the loaders' panel run;
- materialise   `load_adapter(file)` + every module's `delta(float32)` (the pack's fast ΔW) and
                its norm, summed per block: the same map by forming every ΔW.

Before timing, the two maps agree per block within 1e-4 relative (the materialised ΔW is float32).
Goal: the map under 2 s on this machine (2 CPU cores). 3 rounds (--quick: every 20th module, 2).
"""

from __future__ import annotations

import math
import os
import tempfile

import torch

from lycoris_core import load_adapter, save_safetensors
from lycoris_core.blocks import block_label
from lycoris_core.effect import effect_map

from .bench_apply import make_adapter, targets
from .common import interleaved, row

BENCH = "effect map of a full-size SDXL adapter (s)"
TOL = 1e-4
GOAL_S = 2.0


def materialised_map(path: str) -> dict[str, float]:
    """{block: ‖ΔW‖} by forming every module's ΔW (float32) — the reference."""
    adapter = load_adapter(path)
    _, res = adapter.guess_architecture()
    sq: dict[str, float] = {}
    for name, key in res.matched.items():
        dw = adapter.modules[name].delta(torch.float32)
        b = block_label(key)
        sq[b] = sq.get(b, 0.0) + float(torch.linalg.vector_norm(dw, dtype=torch.float64)) ** 2
    return {b: math.sqrt(v) for b, v in sq.items()}


def pack_map(path: str) -> dict[str, float]:
    return {b: v["delta_norm"] for b, v in effect_map(load_adapter(path)).blocks().items()}


def agreement(path: str) -> float:
    """Largest relative difference of a block norm between the two maps (asserted < TOL)."""
    ours, ref = pack_map(path), materialised_map(path)
    assert set(ours) == set(ref), (sorted(ours), sorted(ref))
    worst = max(abs(ours[b] - ref[b]) / ref[b] for b in ref)
    assert worst < TOL, f"the maps disagree: {worst:.2e} relative"
    return worst


def run(mods: dict, repeats: int, algos=("loha", "lokr")) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for algo in algos:
            path = os.path.join(tmp, f"sdxl_{algo}.safetensors")
            save_safetensors(make_adapter(mods, algo, seed=1), path, {})
            worst = agreement(path)
            stats = interleaved({"pack map": lambda p=path: pack_map(p),
                                 "materialise": lambda p=path: materialised_map(p)},
                                repeats=repeats, warmup=0, target_s=0.0)  # warmed up by `agreement`
            pack, ref = stats["pack map"].median, stats["materialise"].median
            rows.append(row(BENCH, f"{algo} r16, {len(mods)} modules ({os.path.getsize(path) >> 20} MiB)",
                            pack, {"materialise": ref}, "s", modules=len(mods), agreement=worst,
                            goal_s=GOAL_S, goal_met=pack < GOAL_S,
                            quartiles={k: [s.q1, s.q3] for k, s in stats.items()}))
    return {"rows": rows}


def main(quick: bool = False) -> dict:
    """The 788-module files (3 rounds), or every 20th module and 2 rounds with `quick`."""
    return run(targets(quick), repeats=2 if quick else 3)


if __name__ == "__main__":
    import argparse

    from .common import format_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    print(format_table(main(quick=ap.parse_args().quick)["rows"]))
