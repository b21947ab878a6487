"""LyCORISDataset + TrainLyCORIS against ComfyUI's dataset nodes + TrainLoraNode, as ratios.

The same kohya folder of 64 images (`2_sks dog`: 2 repeats, each with a .txt caption) is used
by both, with the tests' tiny VAE, tiny SDXL CLIP and tiny SDXL model, one thread:

1. Caching: **pack** = LyCORISDataset (scan, decode, bucket, VAE-encode every image once) plus
   encoding every distinct caption once with the frozen CLIP (what TrainLyCORIS then does at
   its first steps); **comfyui** = LoadImageTextDataSetFromFolder + MakeTrainingDataset (decode,
   VAE-encode, CLIP-encode each entry; its kohya support repeats the file list, so every image
   and caption is encoded `repeats` times). Paired rounds in a seeded random order; the ratio
   is the median of per-round ratios.
2. Step time: TrainLyCORIS on the training set vs TrainLoraNode on MakeTrainingDataset's latents
   and conditionings, batch 1, LoHa rank 4, fp32; median time between consecutive steps (first
   skipped), paired rounds as above.

    .venv/bin/python -m bench.bench_dataset [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = "bench_kohya"
BENCH = "dataset caching and training step vs ComfyUI's dataset nodes + TrainLoraNode (1 thread)"


def _make_folder(input_dir: Path, n: int) -> Path:
    import numpy as np
    from PIL import Image

    sub = input_dir / FOLDER / "2_sks dog"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (64, 96), (96, 64)]
    for i in range(n):
        w, h = sizes[i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(sub / f"img{i:03d}.png")
        (sub / f"img{i:03d}.txt").write_text(f"sks dog, pose {i % 7}, color {i % 5}", encoding="utf-8")
    return sub


def _ds_options() -> dict:
    return dict(resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
                bucket_reso_steps=8, bucket_no_upscale=False, caption_extension=".txt",
                shuffle_caption=False, keep_tokens=0, keep_tokens_separator="",
                caption_separator=",", caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0,
                caption_prefix="", caption_suffix="", flip_aug=False, batch_size=1)


def _pack_cache(comfy_host, vae, clip):
    import torch

    pack = sys.modules[comfy_host.PACK_MODULE + ".nodes.dataset"]
    td = sys.modules[comfy_host.PACK_MODULE + ".nodes.train_data"]
    with torch.inference_mode():
        ts = pack.LyCORISDataset.execute(folder=FOLDER, vae=vae, clip=clip, **_ds_options()).args[0]
        with torch.no_grad():
            for text in sorted(set(ts.captions)):
                td.encode_tokens(clip, clip.tokenize(text))
    return ts


def _comfy_cache(vae, clip):
    import torch
    from comfy_extras.nodes_dataset import LoadImageTextDataSetFromFolderNode, MakeTrainingDataset

    with torch.inference_mode():
        out = LoadImageTextDataSetFromFolderNode.execute(folder=FOLDER)
        images, texts = out.args[0], out.args[1]
        made = MakeTrainingDataset.execute(images=images, vae=[vae], clip=[clip], texts=texts)
    return made.args[0], made.args[1], len(images)


def _step_times(fn, owner, attr) -> float:
    stamps: list[float] = []
    orig = getattr(owner, attr)

    def timed(self, *a, **k):
        stamps.append(time.perf_counter())
        return orig(self, *a, **k)
    setattr(owner, attr, timed)
    try:
        fn()
    finally:
        setattr(owner, attr, orig)
    gaps = sorted(b - a for a, b in zip(stamps[1:], stamps[2:], strict=False))
    return gaps[len(gaps) // 2]


def _pack_train(comfy_host, ts, steps: int) -> float:
    import torch
    from bench_train import _fresh_model
    from test_dataset_graph import TRAIN

    train = sys.modules[comfy_host.PACK_MODULE + ".nodes.train"].train
    loop = sys.modules[comfy_host.PACK_MODULE + ".lycoris_core.train.loop"]
    opts = dict(TRAIN, steps=steps, batch_size=1, output_name="bench/dataset", training_set=ts)

    def run():
        with torch.inference_mode():
            train(_fresh_model("sdxl"), None, None, opts)
    return _step_times(run, loop.Trainer, "train_step")


def _comfy_train(latents, conds, steps: int) -> float:
    import comfy_extras.nodes_train as nt
    import torch
    from bench_train import _comfyui_inputs, _fresh_model

    kw = _comfyui_inputs(steps, 4, "loha")
    kw.update(batch_size=[1], learning_rate=[1e-3])

    def run():
        with torch.inference_mode():
            nt.TrainLoraNode.execute(model=[_fresh_model("sdxl")], latents=latents, positive=conds, **kw)
    return _step_times(run, nt.TrainSampler, "fwd_bwd")


def _paired(names: list[str], fns: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {n: [] for n in names}
    order = random.Random(0)
    for _ in range(rounds):
        for n in order.sample(names, len(names)):
            times[n].append(fns[n]())
    return times


def _ratio(mine: list[float], ref: list[float]) -> tuple[float, float, float]:
    rs = sorted(m / r for m, r in zip(mine, ref, strict=True))
    q = statistics.quantiles(rs, n=4) if len(rs) > 1 else [rs[0]] * 3
    return statistics.median(rs), q[0], q[2]


def main(quick: bool = False, images: int | None = None) -> dict:
    """Both parts in this process (it boots the ComfyUI host of this Python)."""
    import torch

    from bench import common

    torch.set_num_threads(1)
    common.comfy_host()
    import comfy_host
    import folder_paths
    from host_nodes import models

    from bench.common import row

    sys.path.insert(0, str(ROOT / "bench"))
    n = images or (12 if quick else 64)
    rounds, steps = (2, 4) if quick else (5, 12)
    if True:  # the folder goes into the booted host's own (temporary) input directory
        _make_folder(Path(folder_paths.get_input_directory()), n)
        vae, (_, clip) = models.tiny_vae(0), (None, models.sdxl_clip(0))
        state: dict = {}

        def pack_cache():
            t = time.perf_counter()
            state["ts"] = _pack_cache(comfy_host, vae, clip)
            return time.perf_counter() - t

        def comfy_cache():
            t = time.perf_counter()
            state["lat"], state["cond"], state["entries"] = _comfy_cache(vae, clip)
            return time.perf_counter() - t
        fns = {"pack": pack_cache, "comfyui": comfy_cache}
        pack_cache(), comfy_cache()  # warm-up
        cache = _paired(["pack", "comfyui"], fns, rounds)
        ts = state["ts"]
        try:
            fns = {"pack": lambda: _pack_train(comfy_host, ts, steps),
                   "comfyui": lambda: _comfy_train(state["lat"], state["cond"], steps)}
            _pack_train(comfy_host, ts, 3), _comfy_train(state["lat"], state["cond"], 3)
            step = _paired(["pack", "comfyui"], fns, rounds)
            step_error = None
        except Exception as e:  # the reference's limit (e.g. mixed sizes) is reported
            step, step_error = None, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    c = _ratio(cache["pack"], cache["comfyui"])
    host = comfy_host.HOST_NAME
    rows = [row(BENCH, f"{n} images (2 repeats, 3 sizes) on {host} — caching latents + captions",
                statistics.median(cache["pack"]), {"comfyui": statistics.median(cache["comfyui"])},
                "s", ratios={"pack/comfyui": c[0]}, ratio_quartiles=[c[1], c[2]],
                pack_vae_encodes=len(ts.latents), comfyui_vae_encodes=state["entries"])]
    if step is not None:
        s = _ratio(step["pack"], step["comfyui"])
        rows.append(row(BENCH, f"{n} images on {host} — training step, LoHa r4, batch 1",
                        statistics.median(step["pack"]), {"comfyui": statistics.median(step["comfyui"])},
                        "s", ratios={"pack/comfyui": s[0]}, ratio_quartiles=[s[1], s[2]]))
    else:
        rows.append(row(BENCH, f"{n} images on {host} — training step", None, {"comfyui": None},
                        "s", note=f"not measured: {step_error}"))
    return {"rows": rows, "rounds": rounds, "steps": steps, "images": n}


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--images", type=int, default=None)
    a = ap.parse_args()
    res = main(quick=a.quick, images=a.images)
    for r in res["rows"]:
        print(json.dumps(r))
