"""TrainLyCORIS speed and memory, as ratios against references measured in the same run.

1. Step time, paired rounds in one process (1 thread): TrainLyCORIS on the tiny SDXL and, on
   current ComfyUI, on the tiny real Anima (DiT + LLM adapter), against ComfyUI's own
   TrainLoraNode on the tiny SDXL at the same rank and algorithm. Each round runs every
   contestant once (a short training run; its step time is the median time between consecutive
   steps, first step skipped), in a new seeded order; ratios are medians of the per-round ratios
   to the round's ComfyUI run. ComfyUI's trainer cannot train Anima on current ComfyUI (the
   DiT's fused `rms_rope_split_half` has no backward): it is tried once and its error reported.
2. Step time and peak memory vs ComfyUI's TrainLoraNode on the tiny SDXL (LoHa and LoKr), each
   trainer in its own child process (1 thread) so that peak RSS is its own; peak memory is the
   rise of peak RSS over the loaded model.
   Note the work differs by design: ComfyUI trains every weight of the model (plus bias/norm
   diffs), TrainLyCORIS trains sd-scripts' default targets.
3. LoKr applied to activations (bypass) vs materialising ΔW, forward + backward, at real SDXL /
   Anima layer shapes and 4096 tokens (a 1024² SDXL latent).

The ComfyUI host is the one of the venv that runs this (`bench.common.select_host`):

    .venv/bin/python -m bench.bench_train [--quick]        ComfyUI 0.3.75
    .venv-host2/bin/python -m bench.bench_train [--quick]  current ComfyUI (0.28): adds Anima
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _boot():
    """Boot the selected ComfyUI in this (child) process, one thread; returns tests' comfy_host."""
    import torch

    from bench import common

    torch.set_num_threads(1)
    common.use_device(common.bench_device().type)  # a GPU run: synchronised timers here too
    common.comfy_host()
    import comfy_host

    return comfy_host


def _data(kind: str):
    """The tiny models' overfit set of tests/test_train_graph: two latents, their conditionings."""
    import torch
    from host_nodes import models

    g = torch.Generator().manual_seed(1)
    if kind == "anima":
        lats = [{"samples": torch.randn(1, 16, 1, 8, 8, generator=g)} for _ in range(2)]
        return lats, [[models.dit_conditioning(g)] for _ in range(2)]
    lats = [{"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(2)]
    conds = [[[torch.randn(1, 77, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
             for _ in range(2)]
    return lats, conds


def _fresh_model(kind: str, seed: int = 0, disable_dynamic: bool = False):
    """The tiny model of `kind` (a ModelPatcher); also its `cached_patcher_init` factory, which
    current ComfyUI's TrainLoraNode calls to deep-copy a model (core loaders register one; these
    hand-built test models need it set)."""
    import torch
    from host_nodes import models

    with torch.inference_mode():
        mp = models.sdxl_model("tiny", seed) if kind == "sdxl" else models.dit_model("tiny", seed)
    mp.cached_patcher_init = (_fresh_model, (kind, seed))
    return mp


def _comfyui_inputs(steps: int, rank: int, algo: str) -> dict:
    """TrainLoraNode's inputs (lists: it takes input lists): its schema defaults for options this
    host's version has and 0.3.75 has not, then the settings of this bench."""
    from comfy_extras.nodes_train import TrainLoraNode

    schema = TrainLoraNode.GET_SCHEMA()
    kw = {i.id: [i.default] for i in schema.inputs if getattr(i, "default", None) is not None}
    kw.update(batch_size=[2], steps=[steps], grad_accumulation_steps=[1], learning_rate=[1e-3],
              rank=[rank], optimizer=["AdamW"], loss_function=["MSE"], seed=[0],
              training_dtype=["fp32"], lora_dtype=["fp32"], gradient_checkpointing=[False],
              algorithm=[{"loha": "LoHa", "lokr": "LoKr"}[algo]], existing_lora=["[None]"])
    return kw


def _run_trainer(which: str, kind: str, algo: str, steps: int, rank: int, comfy_host,
                 measure_peak: bool = False) -> dict:
    """One training run; {step_s: median seconds between consecutive steps (first skipped),
    peak_mb: rise of peak RSS (when measured)}."""
    import torch

    mp = _fresh_model(kind)
    lats, conds = _data(kind)
    stamps: list[float] = []
    if which == "comfyui":
        import comfy_extras.nodes_train as nt

        owner, attr = nt.TrainSampler, "fwd_bwd"
    else:
        owner, attr = sys.modules[comfy_host.PACK_MODULE + ".lycoris_core.train.loop"].Trainer, "train_step"
    orig = getattr(owner, attr)

    def timed(self, *a, **k):
        stamps.append(time.perf_counter())
        return orig(self, *a, **k)
    setattr(owner, attr, timed)
    if measure_peak:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    base = _rss_kb("VmRSS")
    try:
        with torch.inference_mode():
            if which == "comfyui":
                from comfy_extras.nodes_train import TrainLoraNode

                TrainLoraNode.execute(model=[mp], latents=lats, positive=conds,
                                      **_comfyui_inputs(steps, rank, algo))
            else:
                train = sys.modules[comfy_host.PACK_MODULE + ".nodes.train"].train
                from test_train_graph import DEFAULTS

                opts = dict(DEFAULTS, algorithm=algo, network_dim=rank, network_alpha=1.0,
                            steps=steps, learning_rate=1e-3, output_name=f"bench/{kind}_{algo}")
                train(mp, lats, list(conds), opts)
    finally:
        setattr(owner, attr, orig)
    peak = (_rss_kb("VmHWM") - base) / 1024
    steps_s = sorted(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False))  # skip warm-up
    return {"step_s": steps_s[len(steps_s) // 2], "peak_mb": peak}


def _child(which: str, algos: list[str], steps: int, rank: int) -> dict:
    """Runs inside a child process: one SDXL training run per algorithm, {algo: {step_s, peak_mb}}."""
    comfy_host = _boot()
    return {algo: _run_trainer(which, "sdxl", algo, steps, rank, comfy_host, measure_peak=True)
            for algo in algos}


def _paired_child(steps: int, rank: int, rounds: int) -> dict:
    """Runs inside a child process: paired rounds of step times (see the module docstring)."""
    import random
    import statistics
    import traceback

    comfy_host = _boot()
    from host_nodes import models

    kinds = ["sdxl"] + (["anima"] if models.has_anima() else [])
    out = {"host": comfy_host.HOST_NAME, "steps": steps, "rank": rank, "rounds": rounds,
           "comfyui_on_anima": None}
    if "anima" in kinds:  # ComfyUI's own trainer on the tiny Anima: expected to fail here
        try:
            _run_trainer("comfyui", "anima", "loha", 3, rank, comfy_host)
            out["comfyui_on_anima"] = "trains"
        except Exception as e:  # reported, not raised: it is the reference's limit
            out["comfyui_on_anima"] = f"fails: {type(e).__name__}: {str(e).splitlines()[0]}"
            out["comfyui_on_anima_trace"] = traceback.format_exc()[-1500:]
    names = [(w, k, a) for a in ("loha", "lokr")
             for w, k in [("comfyui", "sdxl")] + [("lycoris", k) for k in kinds]]
    for name in names:  # warm-up: imports, first-call allocations
        _run_trainer(*name, 3, rank, comfy_host)
    times: dict[tuple, list[float]] = {n: [] for n in names}
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(names, len(names)):
            times[name].append(_run_trainer(*name, steps, rank, comfy_host)["step_s"])
    rows = []
    for which, kind, algo in names:
        if which == "comfyui":
            continue
        ref = times[("comfyui", "sdxl", algo)]
        mine = times[(which, kind, algo)]
        ratios = sorted(m / r for m, r in zip(mine, ref, strict=True))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        rows.append({"kind": kind, "algo": algo, "rank": rank, "lycoris_step_s": statistics.median(mine),
                     "comfyui_sdxl_step_s": statistics.median(ref), "ratio": statistics.median(ratios),
                     "ratio_q1": q[0], "ratio_q3": q[2]})
    out["rows"] = rows
    return out


def _run_child(mode: str, *args) -> dict:
    from bench import common

    common.select_host()  # the child boots the same ComfyUI as this process
    cmd = [sys.executable, "-m", "bench.bench_train", "--child", mode, *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"child {mode} {args} failed:\n{out.stderr[-3000:]}")


def bench_step_paired(steps: int, rank: int, rounds: int) -> dict:
    """Part 1: TrainLyCORIS step time on the tiny SDXL (and Anima, current ComfyUI) / ComfyUI's
    TrainLoraNode step time on the tiny SDXL, paired rounds in one child process."""
    return _run_child("paired", steps, rank, rounds)


def bench_vs_comfyui(steps: int, rank: int) -> list[dict]:
    """Part 2: step time and peak RSS, each trainer in its own process (tiny SDXL)."""
    rows = []
    for algo in ("loha", "lokr"):  # one process per run: peak RSS must not see another run's
        res = {which: _run_child(which, algo, steps, rank)[algo] for which in ("comfyui", "lycoris")}
        rows.append({"algo": algo, "rank": rank, **{f"{w}_{k}": v for w in res for k, v in res[w].items()},
                     "step_time_ratio": res["lycoris"]["step_s"] / res["comfyui"]["step_s"],
                     "peak_mem_ratio": res["lycoris"]["peak_mb"] / max(res["comfyui"]["peak_mb"], 1e-9)})
    return rows


def bench_lokr_bypass(tokens: int, reps: int) -> list[dict]:
    import torch

    sys.path.insert(0, str(ROOT))
    from lycoris_core.train.modules import LayerSpec, make_module

    torch.set_num_threads(1)
    shapes = [("sdxl attn 640", (640, 640)), ("sdxl attn 1280", (1280, 1280)),
              ("sdxl ff proj 1280→10240", (10240, 1280)), ("anima attn 2048", (2048, 2048)),
              ("anima mlp 2048→8192", (8192, 2048))]
    rows = []
    for label, shape in shapes:
        times = {}
        for bypass in (True, False):
            torch.manual_seed(0)
            m = make_module("lokr", "x", LayerSpec("linear", shape), 8, 1.0, bypass=bypass)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            from bench.common import bench_device

            m = m.to(bench_device())
            x = torch.randn(1, tokens, shape[1], device=bench_device(), requires_grad=True)
            best = float("inf")
            for _ in range(reps + 1):
                t = time.perf_counter()
                y = m.adapter_output(x)
                y.sum().backward()
                best = min(best, time.perf_counter() - t)
            times[bypass] = best
        rows.append({"layer": label, "shape": list(shape), "tokens": tokens, "bypass_s": times[True],
                     "dense_s": times[False], "speedup": times[False] / times[True]})
    return rows


def print_paired(res: dict) -> None:
    for r in res["rows"]:
        print(f"{r['algo']} rank {r['rank']}: TrainLyCORIS on tiny {r['kind']} "
              f"{r['lycoris_step_s'] * 1e3:.0f} ms/step vs ComfyUI TrainLoraNode on tiny SDXL "
              f"{r['comfyui_sdxl_step_s'] * 1e3:.0f} ms/step: ratio {r['ratio']:.2f} "
              f"[{r['ratio_q1']:.2f}–{r['ratio_q3']:.2f}] ({res['rounds']} paired rounds, {res['host']})")
    if res.get("comfyui_on_anima"):
        print(f"ComfyUI TrainLoraNode on tiny Anima ({res['host']}): {res['comfyui_on_anima']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in a few minutes")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        mode, *rest = a.child
        if mode == "paired":
            print(json.dumps(_paired_child(*map(int, rest))))
        else:
            algo, steps, rank = rest
            print(json.dumps(_child(mode, algo.split(","), int(steps), int(rank))))
        return 0
    from bench import common

    print(f"ComfyUI: {common.select_host()}")
    t0 = time.perf_counter()
    paired = bench_step_paired(steps=4 if a.quick else 8, rank=4, rounds=2 if a.quick else 5)
    print_paired(paired)
    lokr = bench_lokr_bypass(tokens=1024 if a.quick else 4096, reps=1 if a.quick else 3)
    for r in lokr:
        print(f"LoKr {r['layer']:<22} {r['tokens']} tokens: bypass {r['bypass_s'] * 1e3:7.1f} ms, "
              f"materialised ΔW {r['dense_s'] * 1e3:7.1f} ms  → bypass {r['speedup']:.2f}× faster")
    rows = bench_vs_comfyui(steps=5 if a.quick else 12, rank=4)
    for r in rows:
        print(f"{r['algo']} rank {r['rank']} on tiny SDXL: step {r['lycoris_step_s'] * 1e3:.0f} ms vs "
              f"ComfyUI TrainLoraNode {r['comfyui_step_s'] * 1e3:.0f} ms (ratio "
              f"{r['step_time_ratio']:.2f}); peak +{r['lycoris_peak_mb']:.0f} MB vs "
              f"+{r['comfyui_peak_mb']:.0f} MB (ratio {r['peak_mem_ratio']:.2f})")
    print(json.dumps({"paired_steps": paired, "lokr_bypass": lokr, "vs_comfyui": rows,
                      "seconds": time.perf_counter() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
