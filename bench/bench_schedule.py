"""Scheduled strength vs constant strength vs ComfyUI's hook keyframes, same process, real graphs.

    .venv/bin/python -m bench.bench_schedule [--quick]

One LoKr (rank 4) on every ≥2-D weight of the tiny SDXL UNet (sd-scripts names, so ComfyUI's
hooks load the same file). Each contestant is one ComfyUI graph run through the real executor
(model → adapter → CLIPTextEncode → KSampler, euler, 20 steps, cfg 2, 512×512, a new seed each
run so the sampler really runs; the upstream nodes stay cached, as in a user's queue):

- constant: LoadLyCORIS at strength 1 (the reference);
- schedule_hold: LyCORISStrengthSchedule, 3 keyframes `0:1, 50%:0.4, 80%:0.1`, hold, timing
  sigma (ComfyUI's percent, as hooks use) — the strength changes 3 times;
- schedule_linear: the same keyframes, linear — the strength changes at every step;
- hooks: CreateHookLora → 3 × CreateHookKeyframe (the same keyframes) → SetHookKeyframes →
  ConditioningSetProperties on the prompt (ComfyUI re-patches the hooked weights per keyframe).

Two settings, both with the ratios pack / constant and pack / hooks:

- cold: ComfyUI's smart memory off (as in the tests): every run loads and patches the model;
  contestants interleaved round by round (order rotating), median;
- warm: smart memory on, each contestant's runs back to back: the constant loader's patched model
  stays loaded between runs, while the schedule builds ΔW and restores the weights every run.

Bypass mode (`mode` = bypass on both nodes): `bypass_schedule_linear` / `bypass_schedule_hold`
against `bypass_constant` (the loader in bypass mode), run back to back in each round (order
alternating) for 9 rounds (quick 3); the figure is the median of the per-round paired ratios of CPU
time (goal ≤ 1.02: a schedule in bypass mode only sets the strength its hooks read).

Also reported: max |latent(schedule_hold) − latent(hooks)| (same schedule, two implementations;
0 when ComfyUI's LoKr arithmetic happens to match ours bit for bit) and max |latent(schedule constant) −
latent(loader)| (must be 0). Medians of wall and of CPU time (process_time; torch on 1 thread,
so CPU time is the figure that other load on the machine disturbs least). --quick: 4 steps,
128×128, 1 round.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import torch

from .common import comfy_host, format_table, machine_info, row, write_json

KEYFRAMES = [(0.0, 1.0), (0.5, 0.4), (0.8, 0.1)]
FILE = "bench_schedule_lokr.safetensors"


def _adapter_file(host) -> str:
    """LoKr on every ≥2-D UNet weight of the tiny SDXL, written to the host's loras folder."""
    from host_nodes import models
    from test_loaders_common import make_adapter, write_adapter

    sd = models.sdxl_model("tiny", 0).model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()
              if k.startswith("diffusion_model.") and k.endswith(".weight") and v.ndim >= 2}
    tensors, _ = make_adapter(shapes, "lokr", rank=4, seed=1)
    return write_adapter(host, FILE, tensors, "lokr"), len(shapes)


def _graph(kind: str, seed: int, steps: int, size: int) -> dict:
    g = {
        "1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size,
                                                           "batch_size": 1}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "7": {"class_type": "LycorisTestSink", "inputs": {"latent": ["6", 0]}},
    }
    model, cond = ["1", 0], ["5", 0]
    text = ", ".join(f"{p}:{s}" for p, s in KEYFRAMES)
    mode = "bypass" if kind.startswith("bypass_") else "patch"
    kind = kind.removeprefix("bypass_")
    if kind == "constant":
        g["2"] = {"class_type": "LoadLyCORIS", "inputs": {
            "model": model, "lora_name": FILE, "strength_model": 1.0, "strength_clip": 0.0,
            "block_weights": "", "mode": mode}}
        model = ["2", 0]
    elif kind.startswith("schedule"):
        interp = {"schedule_hold": "hold", "schedule_linear": "linear",
                  "schedule_constant": "hold"}[kind]
        g["2"] = {"class_type": "LyCORISStrengthSchedule", "inputs": {
            "model": model, "lora_name": FILE, "strength_model": 1.0, "strength_clip": 0.0,
            "schedule": "constant" if kind == "schedule_constant" else text,
            "interpolation": interp, "timing": "sigma", "block_weights": "", "preview_steps": 0,
            "cache_delta": True, "mode": mode}}
        model = ["2", 0]
    elif kind == "hooks":
        g["10"] = {"class_type": "CreateHookLora", "inputs": {
            "lora_name": FILE, "strength_model": 1.0, "strength_clip": 0.0}}
        prev = None
        for i, (p, s) in enumerate(KEYFRAMES):
            inputs = {"strength_mult": s, "start_percent": p}
            if prev is not None:
                inputs["prev_hook_kf"] = prev
            g[f"1{i + 1}"] = {"class_type": "CreateHookKeyframe", "inputs": inputs}
            prev = [f"1{i + 1}", 0]
        g["15"] = {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["10", 0], "hook_kf": prev}}
        g["16"] = {"class_type": "ConditioningSetProperties", "inputs": {
            "cond_NEW": cond, "strength": 1.0, "set_cond_area": "default", "hooks": ["15", 0]}}
        cond = ["16", 0]
    else:
        raise ValueError(kind)
    g["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": cond, "negative": cond, "latent_image": ["3", 0], "seed": seed,
        "steps": steps, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    return g


def _timed(run, kinds: list[str], rounds: int, warm: bool) -> dict[str, dict[str, float]]:
    """Median wall and CPU seconds per run of each contestant.

    cold (warm=False): smart memory off, contestants interleaved round by round (order rotating).
    warm: smart memory on, each contestant's runs back to back after one untimed run, so the
    constant loader's patched model stays loaded. CPU time (this process, torch on 1 thread) is
    the robust figure on a shared machine; wall time is also kept.
    """
    import comfy.model_management as mm

    saved = mm.DISABLE_SMART_MEMORY
    mm.DISABLE_SMART_MEMORY = not warm
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}

    def one(kind: str) -> None:
        w0, c0 = time.perf_counter(), time.process_time()
        run(kind)
        samples[kind].append((time.perf_counter() - w0, time.process_time() - c0))

    try:
        if warm:
            for kind in kinds:
                run(kind)
                for _ in range(rounds):
                    one(kind)
                mm.unload_all_models()
        else:
            for r in range(rounds):
                for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                    one(kind)
    finally:
        mm.DISABLE_SMART_MEMORY = saved
    return {k: {"wall_s": statistics.median(x[0] for x in v), "cpu_s": statistics.median(x[1] for x in v)}
            for k, v in samples.items()}


BYPASS_KINDS = ["bypass_constant", "bypass_schedule_linear", "bypass_schedule_hold"]


def _paired(run, kinds: list[str], rounds: int) -> dict:
    """Bypass: each round runs every kind back to back (order rotating); per kind its CPU / wall
    seconds per round, and the per-round paired ratios of CPU time against kinds[0]."""
    import comfy.model_management as mm

    saved = mm.DISABLE_SMART_MEMORY
    mm.DISABLE_SMART_MEMORY = True
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    try:
        for r in range(rounds):
            for kind in kinds[r % len(kinds):] + kinds[:r % len(kinds)]:
                w0, c0 = time.perf_counter(), time.process_time()
                run(kind)
                samples[kind].append((time.perf_counter() - w0, time.process_time() - c0))
    finally:
        mm.DISABLE_SMART_MEMORY = saved
    ref = [c for _, c in samples[kinds[0]]]
    out = {}
    for k, v in samples.items():
        ratios = [c / r for (_, c), r in zip(v, ref, strict=True)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[k] = {"cpu_s": statistics.median(c for _, c in v), "wall_s": statistics.median(w for w, _ in v),
                  "cpu_ratio": statistics.median(ratios), "cpu_ratio_iqr": [q[0], q[2]]}
    return out


def main(quick: bool = False, steps: int | None = None, size: int | None = None,
         bypass_rounds: int | None = None) -> dict:
    host = comfy_host()
    import comfy_host as host_mod  # on sys.path once the host is booted

    torch.set_num_threads(1)  # 2 shared cores: spinning OpenMP threads only add noise
    _, n_weights = _adapter_file(host)
    d_steps, d_size, rounds = (4, 128, 1) if quick else (20, 512, 3)
    steps, size = steps or d_steps, size or d_size
    kinds = ["constant", "schedule_hold", "schedule_linear", "hooks"]
    extra = ["schedule_constant", *BYPASS_KINDS, "bypass_schedule_constant"]
    executors = {k: host_mod.Executor(host) for k in [*kinds, *extra]}
    seeds = itertools.count(100)

    def run(kind: str, seed: int | None = None) -> torch.Tensor:
        res = executors[kind].run(_graph(kind, next(seeds) if seed is None else seed, steps, size))
        if not res.ok:
            raise RuntimeError(f"{kind}: {res.validation_error or res.node_errors or res.execution_error}")
        return res.outputs("6")[0]["samples"]

    latents = {k: run(k, seed=7) for k in [*kinds, *extra]}  # also the warm-up
    timings = {"cold": _timed(run, kinds, rounds, warm=False),
               "warm": _timed(run, kinds, rounds, warm=True)}
    bypass = _paired(run, BYPASS_KINDS, bypass_rounds or (3 if quick else 9))
    rows = []
    for mode, t in timings.items():
        for k in kinds[1:]:
            for what in ("cpu_s", "wall_s"):
                refs = {"constant": t["constant"][what],
                        **({"hooks": t["hooks"][what]} if k != "hooks" else {})}
                rows.append(row("schedule", f"{mode}: {k}", t[k][what], refs, unit=what))
    for k in BYPASS_KINDS[1:]:
        b = bypass[k]
        rows.append(row("schedule", f"bypass: {k.removeprefix('bypass_')} vs bypass constant",
                        b["cpu_s"], {"bypass constant": bypass["bypass_constant"]["cpu_s"]},
                        unit="cpu_s", ratios={"pack/bypass constant": b["cpu_ratio"]},
                        ratio_quartiles=b["cpu_ratio_iqr"], goal="≤ 1.02"))
    checks = {
        "max_abs(schedule_hold - hooks)": float((latents["schedule_hold"] - latents["hooks"]).abs().max()),
        "max_abs(hooks - constant)": float((latents["hooks"] - latents["constant"]).abs().max()),
        "max_abs(schedule_constant - constant)":
            float((latents["schedule_constant"] - latents["constant"]).abs().max()),
        "max_abs(bypass schedule_constant - bypass constant)":
            float((latents["bypass_schedule_constant"] - latents["bypass_constant"]).abs().max()),
        "max_abs(bypass constant - constant)":
            float((latents["bypass_constant"] - latents["constant"]).abs().max()),
        "max_abs(bypass schedule_hold - schedule_hold)":
            float((latents["bypass_schedule_hold"] - latents["schedule_hold"]).abs().max()),
    }
    return {"rows": rows, "timings": timings, "bypass": bypass, "checks": checks, "steps": steps,
            "size": size,
            "rounds": rounds, "lokr_weights": n_weights, "machine": machine_info()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, help="sampling steps (default 20, quick 4)")
    ap.add_argument("--size", type=int, help="image side in pixels (default 512, quick 128)")
    args = ap.parse_args()
    out = main(quick=args.quick, steps=args.steps, size=args.size)
    print(format_table(out["rows"]))
    print(json.dumps(out["checks"], indent=1))
    name = "schedule_quick" if args.quick else "schedule"
    if args.steps or args.size:
        name += f"_{out['steps']}steps_{out['size']}px"
    print("written:", write_json(out, name), file=sys.stderr)
