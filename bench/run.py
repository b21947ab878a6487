"""Run every benchmark, print one table of ratios and write the JSON to bench/results/.

    .venv/bin/python -m bench.run            # full run (< 15 min on 2 CPU cores)
    .venv/bin/python -m bench.run --quick    # smaller shapes and fewer rounds (< 2 min idle)
    .venv/bin/python -m bench.run --only delta convert --threads 1
    python -m bench.run --device cuda --quick   # on a GPU: ΔW, apply, bypass, schedule, train

Each bench runs in its own child process (memory peaks and ComfyUI state cannot leak from one
bench into the next). A bench module exposes `main(quick=...)` returning {"rows": [...], ...}
(rows built with `bench.common.row`); `bench_apply`'s `run(quick, repeat)` result is turned into
rows here. A bench whose module is not there is reported as missing; one that fails is reported
with its error, and the exit status is then 1.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .common import (
    HOSTS_ENV,
    RESULTS_DIR,
    ROOT,
    check_device,
    default_clock,
    format_table,
    hosts_env,
    hosts_values,
    machine_info,
    row,
    write_json,
)

BENCHES: dict[str, str] = {
    "delta": "bench.bench_delta",
    "apply": "bench.bench_apply",
    "bake": "bench.bench_bake",
    "schedule": "bench.bench_schedule",
    "train": "bench.bench_train",
    "convert": "bench.bench_convert",
    "bypass": "bench.bench_bypass",
    "hardening": "bench.bench_hardening",
    "effectmap": "bench.bench_effectmap",
    "dataset": "bench.bench_dataset",
    "schedule_memory": "bench.bench_schedule_memory",
}
ON_CURRENT_COMFYUI = {"bypass"}
"""Benches that need current ComfyUI (core's bypass adapters): run with the second host's Python
and ComfyUI from `.cache/hosts.env` (written by scripts/bootstrap.sh)."""
PREFER_CURRENT_COMFYUI = {"train"}
"""Benches run on current ComfyUI when it is set up (training adds the tiny real Anima there),
else on this Python's host."""
CHILD_ENV: dict[str, dict[str, str]] = {
    # bench_apply reads peaks from RSS: glibc must hand large frees back to the OS at once
    "apply": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"},
}
TIMEOUT_S = 900
TIMEOUT_OVERRIDE_S = {"schedule_memory": 3600}
"""Benches that build the full SDXL model in several child processes (about 10 GB each)."""
DEVICE_BENCHES = ("delta", "apply", "bypass", "schedule", "train")
"""The benches `--device cuda` runs on the GPU (bake and convert are file work on the CPU)."""


def _train_result(module, quick: bool) -> dict:
    """bench_train's two parts, with the sizes its own `main` uses (its main takes argv)."""
    return {"paired_steps": module.bench_step_paired(steps=4 if quick else 8, rank=4,
                                                     rounds=2 if quick else 5),
            "lokr_bypass": module.bench_lokr_bypass(tokens=1024 if quick else 4096,
                                                    reps=1 if quick else 3),
            "vs_comfyui": module.bench_vs_comfyui(steps=3 if quick else 8, rank=4)}


def _train_rows(result: dict) -> list[dict]:
    """bench_train's result layout → table rows."""
    rows = []
    paired = result.get("paired_steps") or {}
    for r in paired.get("rows", []):
        bench = (f"training step, paired rounds vs ComfyUI TrainLoraNode on the tiny SDXL "
                 f"({paired['host']}, 1 thread)")
        note, case = {}, f"{r['algo']} r{r['rank']} on the tiny {r['kind']} — step time"
        if r["kind"] != "sdxl":
            note["note"] = f"ComfyUI's trainer on the tiny {r['kind']}: {paired['comfyui_on_anima']}"
            if str(paired["comfyui_on_anima"]).startswith("fails"):
                case += " (ComfyUI's trainer fails on Anima: vs its tiny-SDXL step)"
        rows.append(row(bench, case,
                        r["lycoris_step_s"], {"comfyui": r["comfyui_sdxl_step_s"]}, "s",
                        ratios={"pack/comfyui": r["ratio"]},
                        ratio_quartiles=[r["ratio_q1"], r["ratio_q3"]], **note))
    for r in result.get("vs_comfyui", []):
        case = f"{r['algo']} r{r['rank']} on the tiny SDXL"
        bench = "training step vs ComfyUI TrainLoraNode (child processes, 1 thread)"
        rows.append(row(bench, case + " — step time", r["lycoris_step_s"],
                        {"comfyui": r["comfyui_step_s"]}, "s"))
        rows.append(row(bench, case + " — peak extra RSS", r["lycoris_peak_mb"],
                        {"comfyui": r["comfyui_peak_mb"]}, "MB"))
    for r in result.get("lokr_bypass", []):
        rows.append(row("LoKr training forward+backward: bypass vs materialised ΔW",
                        f"{r['layer']}, {r['tokens']} tokens", r["bypass_s"] * 1e3,
                        {"materialised ΔW": r["dense_s"] * 1e3}, "ms"))
    return rows


def _call_entry(module, quick: bool):
    """`main(quick=…)`, else `run(quick=…)` (bench_apply: `run(quick, repeat)`); bench_train
    through its two bench functions."""
    if module.__name__ == BENCHES["train"] and hasattr(module, "bench_lokr_bypass"):
        return _train_result(module, quick)
    for name in ("main", "run"):
        fn = getattr(module, name, None)
        if callable(fn) and "quick" in inspect.signature(fn).parameters:
            params = inspect.signature(fn).parameters
            kw = {"repeat": 1 if quick else 2} if "repeat" in params else {}
            return fn(quick=quick, **kw)
    raise AttributeError(f"{module.__name__} has no main(quick=…) or run(quick=…)")


def _apply_rows(result: dict) -> list[dict]:
    """bench_apply's own result layout → table rows (time in s, peak extra RSS in MiB)."""
    rows = []
    for r in result.get("results", []):
        best = {w: min(runs, key=lambda x: x["total_s"]) for w, runs in r["runs"].items()}
        peak = {w: min(x["peak_extra_bytes"] for x in runs) / 2**20 for w, runs in r["runs"].items()}
        case = f"SDXL {r['algo']} r{r['rank']}, {r['modules']} modules, fp16 base"
        bench = "apply full-size adapter vs ComfyUI LoraLoader path"
        rows.append(row(bench, case + " — load+patch time", best["ours"]["total_s"],
                        {"comfyui": best["comfy"]["total_s"]}, "s",
                        max_abs_diff_fp16=r.get("max_abs_diff_patched_weights_fp16")))
        rows.append(row(bench, case + " — peak extra RSS", peak["ours"], {"comfyui": peak["comfy"]},
                        "MiB"))
    for r in result.get("real_load", []):
        b = r["best"]
        case = f"SDXL {r['algo']} r{r['rank']}, {r['modules']} modules, fp16 base"
        bench = "load for sampling (load_models_gpu): bypass vs patch vs ComfyUI LoraLoader"
        refs = {"patch": b["patch"]["load_s"], "comfyui": b["comfy"]["load_s"]}
        rows.append(row(bench, case + " — load time", b["bypass"]["load_s"], refs, "s"))
        mib = {w: b[w]["peak_extra_bytes"] / 2**20 for w in b}
        mib["bypass"] = r.get("bypass_goal_peak_bytes", b["bypass"]["peak_extra_bytes"]) / 2**20
        rows.append(row(bench, case + " — peak extra RSS", mib["bypass"],
                        {"patch": mib["patch"], "comfyui": mib["comfy"],
                         "file + 64 MiB": r["bypass_goal_bytes"] / 2**20}, "MiB"))
    return rows


def _rows_of(name: str, result) -> list[dict]:
    """The result rows, whatever shape the bench returned them in."""
    if isinstance(result, dict) and isinstance(result.get("rows"), list):
        return result["rows"]
    if isinstance(result, list) and all(isinstance(r, dict) and "bench" in r for r in result):
        return result
    if name == "apply" and isinstance(result, dict):
        return _apply_rows(result)
    if name == "train" and isinstance(result, dict):
        return _train_rows(result)
    return []


def _child(name: str, quick: bool, out: str, device: str = "cpu") -> None:
    """Child process: run one bench, write {"status", "seconds", "result"|"error"} to `out`
    (on a GPU also "peak_vram_bytes": torch.cuda.max_memory_allocated over the whole bench)."""
    from .common import use_device

    use_device(device)
    t0 = time.perf_counter()
    res: dict = {}
    try:
        module = importlib.import_module(BENCHES[name])
        res = {"status": "ok", "result": _call_entry(module, quick)}
    except ModuleNotFoundError as exc:
        missing = exc.name == BENCHES[name]
        res = {"status": "missing" if missing else "failed",
               "error": f"{BENCHES[name]} not found" if missing else traceback.format_exc()}
    except Exception:  # reported by the parent; one broken bench must not hide the others
        res = {"status": "failed", "error": traceback.format_exc()}
    res["seconds"] = time.perf_counter() - t0
    if device == "cuda":
        import torch

        res["peak_vram_bytes"] = torch.cuda.max_memory_allocated()
    write_json(res, Path(out).stem, Path(out).parent)


def current_comfyui() -> tuple[str, dict[str, str]] | str:
    """(python, env) of the current-ComfyUI host from `.cache/hosts.env`, or why there is none."""
    values = hosts_values()
    if not values:
        return f"{HOSTS_ENV} not found: run scripts/bootstrap.sh"
    host = hosts_env(values).get("2")
    if host is None:
        return f"no current-ComfyUI host: {values.get('HOST2_SKIP') or 'see scripts/bootstrap.sh'}"
    python, tree = host
    return python, {"LYCORIS_COMFYUI_DIR": tree}


def run_bench(name: str, quick: bool, threads: int | None, device: str = "cpu") -> dict:
    """One bench in a child process; its status, seconds, result or error."""
    python, host_env = sys.executable, {}
    if name in ON_CURRENT_COMFYUI | PREFER_CURRENT_COMFYUI:
        host = current_comfyui()
        if not isinstance(host, str):
            python, host_env = host
        elif name in ON_CURRENT_COMFYUI:
            return {"status": "missing", "seconds": 0.0, "error": host}
    with tempfile.TemporaryDirectory(prefix="lycoris-bench-run-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [python, "-m", "bench.run", "--child", name, "--out", str(out)]
        cmd += ["--quick"] if quick else []
        cmd += ["--threads", str(threads)] if threads else []
        cmd += ["--device", device] if device != "cpu" else []
        env = {**os.environ, **CHILD_ENV.get(name, {}), **host_env}
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sys.stderr, stderr=sys.stderr,
                                  timeout=TIMEOUT_OVERRIDE_S.get(name, TIMEOUT_S))
        except subprocess.TimeoutExpired:
            limit = TIMEOUT_OVERRIDE_S.get(name, TIMEOUT_S)
            return {"status": "failed", "seconds": limit, "error": f"timed out ({limit} s)"}
        if not out.is_file():
            return {"status": "failed", "seconds": time.perf_counter() - t0,
                    "error": f"child exited with {proc.returncode} and wrote no result"}
        return json.loads(out.read_text())


def target_checks(rows: list[dict]) -> list[str]:
    """The issue's targets, one line per ΔW case: pack ≤ lycoris, patch ≤ ComfyUI, LoKr ≤ 2× bound.

    The ratios are medians of per-round paired ratios (`common.paired_ratio`). `ok` when that
    median is at most 1; `≈` when it is above 1 but its lower quartile is not (in at least a
    quarter of the rounds the pack was as fast: parity within this machine's noise); else `MISS`.
    """
    from .bench_delta import BENCH

    out = []
    for r in rows:
        if r["bench"] != BENCH:
            continue
        quart = r.get("ratio_quartiles", {})
        verdicts = []
        for ref, key in (("lycoris", "pack/lycoris"), ("comfyui", "patch/comfyui")):
            x = r["ratios"].get(key)
            if x is None:
                verdicts.append(f"{ref}: n/a")
            elif x <= 1:
                verdicts.append(f"{ref}: ok {x:.2f}")
            elif key in quart and quart[key][0] <= 1:
                verdicts.append(f"{ref}: ≈ {x:.2f} (IQR {quart[key][0]:.2f}–{quart[key][1]:.2f})")
            else:
                verdicts.append(f"{ref}: MISS {x:.2f}")
        if r["case"].startswith("lokr"):
            b = r["ratios"].get("pack/bound")
            verdicts.append(f"bound: {'ok' if b is not None and b <= 2 else 'MISS'} {b:.2f}")
        out.append(f"{r['case']}: " + ", ".join(verdicts))
    return out


def bypass_checks(rows: list[dict], results: dict) -> list[str]:
    """The bypass goals: forward overhead ≤ core per variant, schedule ≤ 1.02× constant bypass,
    bypass load memory ≤ adapter file + 64 MiB."""
    from .bench_bypass import BENCH as BYPASS_BENCH

    out = []
    for r in rows:
        x = r["ratios"].get("ours/core")
        if r["bench"] == BYPASS_BENCH:
            if x is None or r.get("note"):
                out.append(f"{r['case']}: n/a ({r.get('note') or 'no core figure'})")
            else:
                q = r.get("ratio_quartiles") or [x, x]
                verdict = "ok" if x <= 1 else ("≈" if q[0] <= 1 else "MISS")
                out.append(f"{r['case']}: {verdict} {x:.2f} (IQR {q[0]:.2f}–{q[1]:.2f})")
        elif r["bench"] == "schedule" and r["case"].startswith("bypass:"):
            x = r["ratios"]["pack/bypass constant"]
            out.append(f"{r['case']}: {'ok' if x <= 1.02 else 'MISS'} {x:.3f} (goal ≤ 1.02)")
    for r in ((results.get("apply") or {}).get("result") or {}).get("real_load", []):
        peak = r.get("bypass_goal_peak_bytes", r["best"]["bypass"]["peak_extra_bytes"])
        goal = r["bypass_goal_bytes"]
        out.append(f"apply {r['algo']} bypass peak extra {peak / 2**20:.0f} MiB vs goal "
                   f"{goal / 2**20:.0f} MiB (file + 64): {'ok' if peak <= goal else 'MISS'}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the lycoris-nodes benchmarks.")
    ap.add_argument("--quick", action="store_true", help="small shapes, few rounds (< 2 min)")
    ap.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these benches")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads in every bench (default: torch's own choice)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default=None,
                    help="time by elapsed (wall, default) or process CPU seconds (cpu: for a "
                         "machine busy with other jobs; use with --threads 1)")
    ap.add_argument("--name", default=None,
                    help="JSON file name under bench/results/ (default: latest or quick)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (default) or cuda: the ΔW, apply, bypass, schedule and train benches "
                         "on the GPU (synchronised timers, peak VRAM); an error without a GPU")
    ap.add_argument("--child", choices=sorted(BENCHES), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.clock:
        os.environ["LYCORIS_BENCH_CLOCK"] = args.clock  # read by bench.common in every child
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        _child(args.child, args.quick, args.out, args.device)
        return 0
    try:
        check_device(args.device)
    except RuntimeError as exc:
        print(f"bench.run: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    results, rows = {}, []
    for name in BENCHES:
        if args.only and name not in args.only:
            continue
        if args.device == "cuda" and name not in DEVICE_BENCHES:
            print(f"[bench] {name}: not run on cuda (CPU file work)", file=sys.stderr, flush=True)
            continue
        print(f"[bench] {name} …", file=sys.stderr, flush=True)
        res = run_bench(name, args.quick, args.threads, args.device)
        vram = (f", peak VRAM {res['peak_vram_bytes'] / 2**20:.0f} MiB"
                if "peak_vram_bytes" in res else "")
        print(f"[bench] {name}: {res['status']} in {res['seconds']:.0f} s{vram}", file=sys.stderr,
              flush=True)
        results[name] = res
        rows += _rows_of(name, res.get("result"))
    total = time.perf_counter() - started

    print(format_table(rows))
    bw = (results.get("delta", {}).get("result") or {}).get("bandwidth")
    if bw:
        print(f"\ncopy bandwidth before the ΔW cases: {bw['bytes_per_s'] / 1e9:.1f} GB/s "
              f"({bw['method']}, {bw['buffer_bytes'] >> 20} MiB buffers); each case's bound "
              "uses a 64 MiB copy timed in its own rounds")
    checks = target_checks(rows)
    if checks:
        print("\nΔW targets (pack ≤ lycoris, patch ≤ ComfyUI; LoKr ≤ 2× bound):")
        print("\n".join("  " + c for c in checks))
    bchecks = bypass_checks(rows, results)
    if bchecks:
        print("\nbypass targets (overhead ≤ ComfyUI core's bypass; schedule ≤ 1.02×; memory):")
        print("\n".join("  " + c for c in bchecks))
    if args.device == "cuda":
        print("\npeak VRAM per bench (torch.cuda.max_memory_allocated): " + ", ".join(
            f"{n} {r['peak_vram_bytes'] / 2**20:.0f} MiB" for n, r in results.items()
            if "peak_vram_bytes" in r))
    for name, res in results.items():
        if res["status"] != "ok":
            print(f"\n{name}: {res['status']}: {res['error'].strip().splitlines()[-1]}")
    path = write_json({"machine": machine_info(), "quick": args.quick, "seconds": total,
                       "device": args.device,
                       "threads": args.threads, "clock": default_clock(), "benches": results, "rows": rows,
                       "targets": checks, "bypass_targets": bchecks},
                      args.name or ("quick" if args.quick else "latest"), RESULTS_DIR)
    print(f"\n{len(rows)} rows in {total:.0f} s; JSON: {path}")
    return 1 if any(r["status"] == "failed" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
