"""LyCORISStrengthSchedule at full SDXL size: time per phase and peak extra RSS of each setting,
against ComfyUI's hook keyframes re-patching the same weights. No sampling.

    .venv/bin/python -m bench.bench_schedule_memory [--quick] [--cache-stride N]

Base: the 788 fp16 UNet weights sd-scripts targets, in real ComfyUI layers, as `bench_apply`
builds them (`targets`, `build_model`); adapter: its LoKr, rank 16, on all of them (one file on
disk). Keyframes: strength 1 from 0 %, 0.4 from 50 % (hold), sigmas of a 20-step run.

Contestants, each in a fresh process (`common.child_peak_rss`: the model is built first, then the
peak-RSS count is reset, so the peak is what the contestant adds over the loaded model):

- `hooks`: ComfyUI's weight hook with keyframes — `comfy.lora.load_lora` of the file, a
  `comfy.hooks.WeightHook` with a `HookKeyframeGroup`, `ModelPatcher.add_hook_patches`, hook mode
  MinVram (what ComfyUI's sampler picks with one hook group), then the calls its sampler makes at
  each model evaluation: `prepare_hook_patches_current_keyframe` and `apply_hooks`; restore =
  `unpatch_hooks`;
- `default` (cache_delta off), `cache` (cache_delta on), `bypass`: the pack's schedule
  (`plan_from_file`, `ScheduledAdapter.attach`), driven as its SAMPLER_SAMPLE / CALC_COND_BATCH
  wrappers drive it (`_Run.add`, `_Run.update(sigma)`, `_Run.restore`).

Phases: attach (file → model loaded for sampling with `load_models_gpu`), first write (strength
1 at the first sigma; the cache's ΔW build included), one strength change (1 → 0.4), restore.
Checks in every child: the weights after the change equal W0 + 0.4·ΔW (float64 reference, fp16
rounding: relative error to the change) and are W0 bit for bit after restore.

`cache` holds 4 bytes more per adapted parameter than `default` (10.2 GB at full size), which
with the model itself does not fit this machine's RAM next to other jobs: it runs on every
`--cache-stride`-th weight (default 3), beside `default` on the same subset for the ratio; its
full-size figure is `ScheduleMemory` (the formula the node reports), checked against the
measured peak on the subset. Also measured in the `default` child: one patch of the same
weights by the pack's loader through ComfyUI's `patch_weight_to_device` (the time goal: a
strength change costs at most one patch), and converting every module's factors to float32 (all
that a cache of the factors could save per change). --algo loha: bench_apply's LoHa instead of
its LoKr. --quick: every 20th weight.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import child_peak_rss, format_table, machine_info, row, write_json

SIGMAS = [14.6 * (1 - i / 20) ** 2 for i in range(21)]
"""A 20-step run's sigmas (any decreasing list: both schedules read positions on it)."""
FIRST, CHANGE = 0, 12
"""Sigma indices of the first write (0 %) and of the strength change (60 %, past 50 %)."""
LOW = 0.4
SCHEDULE = f"hold; 0:1, 50%:{LOW}"
KINDS = ("hooks", "default", "cache", "bypass")
BENCH = "schedule at full SDXL size (788 fp16 weights, {algo} r16), no sampling"


def _mods(quick: bool, stride: int, limit: int | None) -> dict:
    from .bench_apply import targets

    mods = targets(quick)
    items = list(mods.items())[::stride]
    return dict(items[:limit] if limit else items)


def write_file(quick: bool, stride: int, limit: int | None, folder: str, algo: str = "lokr") -> str:
    """The adapter file (bench_apply's LoKr or LoHa, rank 16) for the weights a contestant uses."""
    import lycoris_core as lc

    from .bench_apply import make_adapter

    path = str(Path(folder) / f"{algo}_s{stride}_{limit or 0}{'_q' if quick else ''}.safetensors")
    if not os.path.exists(path):
        lc.save_safetensors(make_adapter(_mods(quick, stride, limit), algo, seed=1), path,
                            {"ss_network_module": f"networks.{algo}"})
    return path


def _peak_since_reset(baseline: int) -> int:
    from .common import _peak_rss

    return _peak_rss(True) - baseline


def _expected(patcher, path: str, keys: list[str]) -> dict:
    """W0 + LOW·ΔW in float64 (ΔW by lycoris_core) of the probe keys, and W0 itself."""
    import comfy.utils

    import lycoris_core as lc

    adapter = lc.load_adapter(path)
    res = adapter.resolve(lc.KeyMap(list(patcher.model.state_dict())))
    names = {key: name for name, key in res.matched.items()}
    out = {}
    for key in keys:
        w0 = comfy.utils.get_attr(patcher.model, key).detach().clone()
        dw = adapter.modules[names[key]].delta(torch.float64, shape=tuple(w0.shape))
        out[key] = (w0, w0.double() + LOW * dw)
    return out


def _error(patcher, expected: dict) -> float:
    """max |W − (W0 + LOW·ΔW)| / max |LOW·ΔW| over the probe keys."""
    import comfy.utils

    err = 0.0
    for key, (w0, want) in expected.items():
        w = comfy.utils.get_attr(patcher.model, key).detach().double()
        err = max(err, float((w - want).abs().max()) / float((want - w0.double()).abs().max()))
    return err


def _restored(patcher, expected: dict) -> bool:
    import comfy.utils

    return all(torch.equal(comfy.utils.get_attr(patcher.model, k), w0) for k, (w0, _) in expected.items())


class _Hooks:
    """ComfyUI's weight hook with keyframes, driven as its sampler drives it."""

    def __init__(self, patcher, path: str, mods: dict):
        import comfy.hooks
        import comfy.lora
        import comfy.lora_convert
        import comfy.utils

        sd = comfy.utils.load_torch_file(path, safe_load=True)
        key_map = {name: key for name, (key, _) in mods.items()}
        patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(sd), key_map)
        hooks = comfy.hooks.HookGroup()
        hook = comfy.hooks.WeightHook()
        group = comfy.hooks.HookKeyframeGroup()
        for strength, percent, index in ((1.0, 0.0, None), (LOW, 0.5, 10)):
            kf = comfy.hooks.HookKeyframe(strength=strength, start_percent=percent)
            # what initialize_timesteps sets from model_sampling.percent_to_sigma
            kf.start_t = 1e9 if index is None else SIGMAS[index]
            group.add(kf)
        hook.hook_keyframe = group
        group.reset()
        hooks.add(hook)
        self.hooks = hooks
        self.model = patcher.clone()
        self.model.set_hook_mode(comfy.hooks.EnumHookMode.MinVram)
        added = self.model.add_hook_patches(hook=hook, patches=patches, strength_patch=1.0)
        assert len(added) == len(mods), (len(added), len(mods))
        self.options = {"transformer_options": {"sample_sigmas": torch.tensor(SIGMAS)}}

    def at(self, index: int) -> None:
        """What ComfyUI's `_calc_cond_batch` does for a hooked cond at SIGMAS[index]."""
        t = torch.tensor([SIGMAS[index]])
        self.model.prepare_hook_patches_current_keyframe(t, self.hooks, self.options)
        self.model.apply_hooks(hooks=self.hooks)

    def restore(self) -> None:
        self.model.unpatch_hooks()


class _Ours:
    """The pack's schedule in one setting, driven as its wrappers drive it."""

    def __init__(self, host, patcher, path: str, kind: str):
        from lycoris_core.schedule import parse_schedule

        sp = host.pack.nodes.patching.scheduled
        mode = "bypass" if kind == "bypass" else "patch"
        entries, _, _ = sp.plan_from_file(patcher, None, path, 1.0, 0.0, "", node="bench", mode=mode)
        self.model = patcher.clone()
        self.adapter = sp.ScheduledAdapter(entries, parse_schedule(SCHEDULE, "hold"), "steps",
                                           cache_delta=kind == "cache", mode=mode)
        self.adapter.attach(self.model)
        self.memory = self.adapter.memory(self.model)
        self.sp = sp
        self.run = None

    def at(self, index: int) -> None:
        if self.run is None:  # SAMPLER_SAMPLE
            self.run = self.sp._Run(self.model.model, self.model.offload_device, SIGMAS)
            self.run.add(self.adapter)
        self.run.update(SIGMAS[index])  # CALC_COND_BATCH

    def restore(self) -> None:
        self.run.restore()


def contestant(kind: str, path: str, quick: bool = False, stride: int = 1,
               limit: int | None = None, extras: bool = False) -> dict:
    """In a fresh process: build the model, then attach / first write / change / restore of one
    contestant; seconds per phase, peak extra RSS over the built model, checks."""
    from .bench_apply import build_model, ours_load, patch_all
    from .common import _reset_peak_rss, comfy_host, rss_bytes

    host = comfy_host()
    import comfy.model_management as mm

    torch.set_num_threads(1)  # 2 shared cores: the figures are CPU seconds of one thread
    mods = _mods(quick, stride, limit)
    patcher = build_model(mods)
    keys = [k for k, _ in list(mods.values())[:: max(1, len(mods) // 4)]]
    expected = _expected(patcher, path, keys)
    gc.collect()
    baseline = rss_bytes()
    _reset_peak_rss()
    times = {}
    with torch.inference_mode():
        t = time.process_time()
        who = _Hooks(patcher, path, mods) if kind == "hooks" else _Ours(host, patcher, path, kind)
        mm.load_models_gpu([who.model], force_full_load=True)
        times["attach"] = time.process_time() - t
        for phase, index in (("first", FIRST), ("change", CHANGE)):
            t = time.process_time()
            who.at(index)
            times[phase] = time.process_time() - t
        err = _error(who.model, expected) if kind != "bypass" else None
        t = time.process_time()
        who.restore()
        times["restore"] = time.process_time() - t
    peak = _peak_since_reset(baseline)
    restored = _restored(who.model, expected)
    memory = getattr(who, "memory", None)
    mm.unload_all_models()
    out = {"kind": kind, "weights": len(mods), "params": sum(math.prod(s) for _, s in mods.values()),
           "cpu_s": times, "peak_extra_bytes": peak, "change_rel_err": err, "restored": restored,
           "memory": None if memory is None else {
               "base_bytes": memory.base_bytes, "delta_bytes": memory.delta_bytes,
               "block_bytes": memory.block_bytes, "extra_bytes": memory.extra_bytes}}
    if extras:
        del who
        gc.collect()
        with torch.inference_mode():
            loaded = ours_load(host.pack.nodes.patching, patcher, path, mods)
            t = time.process_time()
            patch_all(loaded)
            out["one_patch_cpu_s"] = time.process_time() - t
            adapter, _ = host.pack.nodes.patching.cached_adapter(path)
            t = time.process_time()
            for module in adapter.modules.values():
                module.factors(torch.device("cpu"), torch.float32)
            out["factors_fp32_cpu_s"] = time.process_time() - t
    return out


def _child(kind: str, path: str, **kw) -> dict:
    res = child_peak_rss("bench.bench_schedule_memory:contestant", {"kind": kind, "path": path, **kw},
                         timeout=3600)
    r = res["result"]
    print(f"  {kind} ({r['weights']} weights): " + ", ".join(f"{p} {s:.2f}s" for p, s in
          r["cpu_s"].items()) + f"; peak extra {r['peak_extra_bytes'] / 1e9:.2f} GB"
          + (f"; one patch {r['one_patch_cpu_s']:.2f}s" if "one_patch_cpu_s" in r else ""),
          file=sys.stderr, flush=True)
    if not r["restored"]:
        raise AssertionError(f"{kind}: weights not restored bit for bit")
    # fp16 rounding of W0 + 0.4·ΔW reads ~0.03; strength 1 instead of 0.4 would read 1.5
    if r["change_rel_err"] is not None and r["change_rel_err"] > 0.25:
        raise AssertionError(f"{kind}: weights after the change are not W0 + {LOW}·ΔW "
                             f"({r['change_rel_err']:.2e})")
    return r


def main(quick: bool = False, cache_stride: int = 3, limit: int | None = None,
         algo: str = "lokr") -> dict:
    """All contestants (each in its own process) and the rows: times against hooks, peaks."""
    # large frees must go back to the OS at once, or the children's RSS cannot show a peak
    os.environ.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    folder = tempfile.mkdtemp(prefix="bench_sched_mem_")
    full = write_file(quick, 1, limit, folder, algo)
    sub = write_file(quick, cache_stride, limit, folder, algo)
    res = {"hooks": _child("hooks", full, quick=quick, limit=limit),
           "default": _child("default", full, quick=quick, limit=limit, extras=True),
           "bypass": _child("bypass", full, quick=quick, limit=limit),
           "cache_subset": _child("cache", sub, quick=quick, stride=cache_stride, limit=limit),
           "default_subset": _child("default", sub, quick=quick, stride=cache_stride, limit=limit)}
    gb = 1e9
    n = res["default"]["weights"]
    rows = []
    bench = BENCH.format(algo={"lokr": "LoKr", "loha": "LoHa"}[algo])
    hooks = res["hooks"]
    for kind in ("default", "bypass"):
        r = res[kind]
        for phase, s in r["cpu_s"].items():
            rows.append(row(bench, f"{kind}: {phase} ({n} weights)", s,
                            {"hooks": hooks["cpu_s"][phase]}, "cpu_s"))
        rows.append(row(bench, f"{kind}: peak extra RSS ({n} weights)", r["peak_extra_bytes"] / gb,
                        {"hooks": hooks["peak_extra_bytes"] / gb}, "GB"))
    d = res["default"]
    rows.append(row(bench, "default: strength change vs one patch by the loader", d["cpu_s"]["change"],
                    {"one patch": d["one_patch_cpu_s"]}, "cpu_s", goal="≤ 1"))
    rows.append(row(bench, "default: all factors to float32 (the most a factor cache saves per change)",
                    d["factors_fp32_cpu_s"], {"change": d["cpu_s"]["change"]}, "cpu_s"))
    rows.append(row(bench, "default: peak extra RSS vs its formula (W_base + one row block)",
                    d["peak_extra_bytes"] / gb, {"formula": d["memory"]["extra_bytes"] / gb}, "GB"))
    c, ds = res["cache_subset"], res["default_subset"]
    m = c["weights"]
    for phase, s in c["cpu_s"].items():
        rows.append(row(bench, f"cache on: {phase} (every {cache_stride}th weight, {m})", s,
                        {"default": ds["cpu_s"][phase]}, "cpu_s"))
    rows.append(row(bench, f"cache on: peak extra RSS (every {cache_stride}th weight, {m})",
                    c["peak_extra_bytes"] / gb, {"default": ds["peak_extra_bytes"] / gb,
                                                 "formula": c["memory"]["extra_bytes"] / gb}, "GB"))
    full_cache = d["memory"]["base_bytes"] + d["memory"]["delta_bytes"]
    rows.append(row(bench, f"cache on at full size ({n} weights): formula", full_cache / gb,
                    {"default formula": d["memory"]["extra_bytes"] / gb}, "GB",
                    note="cache on's measured peak / formula on the subset: "
                         f"{c['peak_extra_bytes'] / c['memory']['extra_bytes']:.2f}"))
    return {"rows": rows, "contestants": res, "cache_stride": cache_stride, "quick": quick, "algo": algo,
            "sigmas": SIGMAS, "schedule": SCHEDULE, "machine": machine_info()}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="every 20th weight")
    ap.add_argument("--algo", choices=("lokr", "loha"), default="lokr")
    ap.add_argument("--cache-stride", type=int, default=3,
                    help="cache_delta on runs on every Nth weight (default 3: it would not fit)")
    args = ap.parse_args()
    out = main(quick=args.quick, cache_stride=args.cache_stride, algo=args.algo)
    print(format_table(out["rows"]))
    print(json.dumps({k: {x: v[x] for x in ("peak_extra_bytes", "cpu_s", "memory")}
                      for k, v in out["contestants"].items()}, indent=1))
    name = ("schedule_memory_quick" if args.quick else "schedule_memory") + f"_{args.algo}"
    print("written:", write_json(out, name), file=sys.stderr)
