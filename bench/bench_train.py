"""TrainLyCORIS speed and memory, as ratios against references measured in the same run.

1. Step time and peak memory vs ComfyUI's own TrainLoraNode on the tiny SDXL at the same rank
   (LoHa and LoKr). Each trainer runs in its own child process (1 thread) so that peak RSS is its
   own; step time is the median time between consecutive steps (first step skipped), peak
   memory the rise of peak RSS over the loaded model.
   Note the work differs by design: ComfyUI trains every weight of the model (plus bias/norm
   diffs), TrainLyCORIS trains sd-scripts' default targets.
2. LoKr applied to activations (bypass) vs materialising ΔW, forward + backward, at real SDXL /
   Anima layer shapes and 4096 tokens (a 1024² SDXL latent).

    .venv/bin/python bench/bench_train.py [--quick]      (--quick: under a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _child(which: str, algos: list[str], steps: int, rank: int) -> dict:
    """Runs inside a child process: one training run per algorithm, {algo: {step_s, peak_mb}}."""
    import torch

    torch.set_num_threads(1)
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
    import comfy_host

    host = comfy_host.boot(Path(tempfile.mkdtemp(prefix="bench_train_")))
    from host_nodes import models

    g = torch.Generator().manual_seed(1)
    lats = [{"samples": torch.randn(1, 4, 8, 8, generator=g)} for _ in range(2)]
    conds = [[[torch.randn(1, 77, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
             for _ in range(2)]
    out = {}
    for algo in algos:
        with torch.inference_mode():
            mp = models.sdxl_model("tiny", 0)
        out[algo] = _one(which, algo, steps, rank, mp, lats, conds, comfy_host)
    del host
    return out


def _one(which, algo, steps, rank, mp, lats, conds, comfy_host) -> dict:
    import torch

    stamps: list[float] = []
    if which == "comfyui":
        import comfy_extras.nodes_train as nt

        orig = nt.TrainSampler.fwd_bwd

        def timed(self, *a, **k):
            stamps.append(time.perf_counter())
            return orig(self, *a, **k)
        nt.TrainSampler.fwd_bwd = timed
        restore = (nt.TrainSampler, "fwd_bwd", orig)
    else:
        loop = sys.modules[comfy_host.PACK_MODULE + ".lycoris_core.train.loop"]
        orig = loop.Trainer.train_step

        def timed(self):
            stamps.append(time.perf_counter())
            return orig(self)
        loop.Trainer.train_step = timed
        restore = (loop.Trainer, "train_step", orig)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    base = _rss_kb("VmRSS")
    with torch.inference_mode():
        if which == "comfyui":
            from comfy_extras.nodes_train import TrainLoraNode

            TrainLoraNode.execute(
                model=[mp], latents=lats, positive=conds, batch_size=[2], steps=[steps],
                grad_accumulation_steps=[1], learning_rate=[1e-3], rank=[rank], optimizer=["AdamW"],
                loss_function=["MSE"], seed=[0], training_dtype=["fp32"], lora_dtype=["fp32"],
                algorithm=[{"loha": "LoHa", "lokr": "LoKr"}[algo]], gradient_checkpointing=[False],
                existing_lora=["[None]"])
        else:
            train = sys.modules[comfy_host.PACK_MODULE + ".nodes.train"].train
            from test_train_graph import DEFAULTS

            opts = dict(DEFAULTS, algorithm=algo, network_dim=rank, network_alpha=1.0, steps=steps,
                        learning_rate=1e-3, output_name=f"bench/{algo}")
            train(mp, lats, list(conds), opts)
    peak = (_rss_kb("VmHWM") - base) / 1024
    setattr(*restore)
    steps_s = sorted(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False))  # skip warm-up
    return {"step_s": steps_s[len(steps_s) // 2], "peak_mb": peak}


def _run_child(which: str, algos: list[str], steps: int, rank: int) -> dict:
    cmd = [sys.executable, __file__, "--child", which, ",".join(algos), str(steps), str(rank)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=1800)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"child {which} failed:\n{out.stderr[-3000:]}")


def bench_vs_comfyui(steps: int, rank: int) -> list[dict]:
    rows = []
    for algo in ("loha", "lokr"):  # one process per run: peak RSS must not see another run's
        res = {which: _run_child(which, [algo], steps, rank)[algo] for which in ("comfyui", "lycoris")}
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
            x = torch.randn(1, tokens, shape[1], requires_grad=True)
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: finishes in under a minute")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        which, algo, steps, rank = a.child
        print(json.dumps(_child(which, algo.split(","), int(steps), int(rank))))
        return 0
    t0 = time.perf_counter()
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
    print(json.dumps({"lokr_bypass": lokr, "vs_comfyui": rows,
                      "seconds": time.perf_counter() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
