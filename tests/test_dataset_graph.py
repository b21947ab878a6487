"""LyCORISDataset → TrainLyCORIS through real ComfyUI graphs: a kohya folder made here (mixed
sizes, missing captions, N_name repeats, a truncated image, a non-UTF-8 caption), sd-scripts'
buckets and items per epoch as numbers, epochs and epoch saves, save_to, caption handling of
the old inputs, and the training set's caption/flip draws.

Buckets at resolution 64 (min 32, max 128, steps 8), from sd-scripts' rules (worked out in
test_train_dataset.py): 64×64 → 64×64, 64×96 → 48×80, 96×64 → 80×48.
"""

from __future__ import annotations

import io as pyio
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_train_graph import DEFAULTS

from lycoris_core import load_adapter
from lycoris_core.train.checkpoint import read_state

TRAIN = {**DEFAULTS, "learning_rate": 1e-3, "steps": 1000, "min_timestep": 0, "max_timestep": 1000,
         "output_name": "lycoris/ds"}  # test_train_graph's node inputs, for a dataset run
DATASET = dict(
    resolution=64, enable_bucket=True, min_bucket_reso=32, max_bucket_reso=128,
    bucket_reso_steps=8, bucket_no_upscale=False, caption_extension=".txt", shuffle_caption=True,
    keep_tokens=1, keep_tokens_separator="", caption_separator=",", caption_dropout_rate=0.1,
    caption_tag_dropout_rate=0.2, caption_prefix="", caption_suffix="", flip_aug=True, batch_size=2,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on 1 thread


def _png(w: int, h: int, seed: int) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = pyio.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def kohya_folder(host) -> str:
    """input/acc_train: `2_acc pattern` (64×64 ×2, 64×96, 96×64 without caption, a truncated
    PNG), `1_other` (96×64 with a non-UTF-8 caption → class name), `notes` (no repeat count)."""
    root = host.base_dir / "input" / "acc_train"
    a, b, n = root / "2_acc pattern", root / "1_other", root / "notes"
    for d in (a, b, n):
        d.mkdir(parents=True, exist_ok=True)
    (a / "sq1.png").write_bytes(_png(64, 64, 1))
    (a / "sq1.txt").write_text("acc, red, round, small\n", encoding="utf-8")
    (a / "sq2.png").write_bytes(_png(64, 64, 2))
    (a / "sq2.txt").write_text("acc, blue, square", encoding="utf-8")
    (a / "tall.png").write_bytes(_png(64, 96, 3))
    (a / "tall.txt").write_text("acc, tall, green", encoding="utf-8")
    (a / "wide.png").write_bytes(_png(96, 64, 4))                    # no caption → class name
    (a / "broken.png").write_bytes(_png(64, 64, 5)[:60])              # truncated
    (b / "w2.png").write_bytes(_png(96, 64, 6))
    (b / "w2.txt").write_bytes(b"caf\xe9, latin-1")                  # not UTF-8
    (n / "ignored.png").write_bytes(_png(64, 64, 7))
    return "acc_train"


def graph(folder: str, ds: dict | None = None, **train) -> dict:
    return {
        "1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}},
        "2": {"class_type": "LycorisTestVAE", "inputs": {"seed": 0}},
        "3": {"class_type": "LyCORISDataset", "inputs": {"folder": folder, "vae": ["2", 0],
                                                          "clip": ["1", 1], **DATASET, **(ds or {})}},
        "4": {"class_type": "TrainLyCORIS", "inputs": {"model": ["1", 0], "training_set": ["3", 0],
                                                        **{**TRAIN, **train}}},
        "5": {"class_type": "LycorisTestSink", "inputs": {"model": ["4", 0], "text": ["3", 1]}},
    }


def run_ok(executor, prompt: dict):
    res = executor.run(prompt)
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    return res


def test_kohya_folder_buckets_repeats_epochs(executor, host, kohya_folder):
    res = run_ok(executor, graph(kohya_folder, max_train_epochs=2, save_every_n_epochs=1,
                                 save_to="loras", output_name="lycoris/kohya",
                                 write_sdscripts_config=True))
    ts, report = res.outputs("3")
    # 5 usable images: 4 in `2_acc pattern` (×2) and 1 in `1_other` (×1) → 9 items per epoch
    assert ts.names == ["1_other/w2.png", "2_acc pattern/sq1.png", "2_acc pattern/sq2.png",
                        "2_acc pattern/tall.png", "2_acc pattern/wide.png"]
    assert ts.repeats == [1, 2, 2, 2, 2]
    assert ts.buckets == [(80, 48), (64, 64), (64, 64), (48, 80), (80, 48)]
    assert [tuple(x.shape) for x in ts.latents] == [(1, 4, 6, 10), (1, 4, 8, 8), (1, 4, 8, 8),
                                                    (1, 4, 10, 6), (1, 4, 6, 10)]
    assert ts.captions == ["other", "acc, red, round, small", "acc, blue, square",
                           "acc, tall, green", "acc pattern"]
    # flip_aug: the mirrored latent is the VAE's encoding of the mirrored image, not a flip of
    # the latent (the VAE is not flip-equivariant)
    assert all(f.shape == x.shape and not torch.allclose(f, x)
               for f, x in zip(ts.flipped, ts.latents, strict=True))
    lines = report.splitlines()
    # items per epoch: 64×64: 2 images × 2 = 4; 48×80: 1 × 2 = 2; 80×48: 1×1 + 1×2 = 3; batch 2
    # → ceil(4/2) + ceil(2/2) + ceil(3/2) = 2 + 1 + 2 = 5 batches per epoch
    assert lines[0] == "5 image(s) in 2 subset(s), 9 item(s) per epoch (5 batch(es) of 2)"
    assert "bucket 48×80: 1 image(s), 2 item(s) per epoch" in lines
    assert "bucket 64×64: 2 image(s), 4 item(s) per epoch" in lines
    assert "bucket 80×48: 2 image(s), 3 item(s) per epoch" in lines
    assert any("broken.png" in x and "not a readable image" in x for x in lines)
    assert any("w2.txt" in x and "not UTF-8" in x for x in lines)
    assert any("wide.png" in x and "class name 'acc pattern'" in x for x in lines)
    assert any("'notes'" in x for x in lines)
    assert str(host.base_dir) not in report  # names as the user knows them, no absolute paths
    # 2 epochs × 5 batches (batch_size 2, no accumulation) = 10 steps, saved into loras
    path = Path(res.outputs("4")[1])
    assert path.parent == (host.base_dir / "models" / "loras" / "lycoris").resolve()
    info = read_state(path)[1]
    assert len(info["losses"]) == 10 and info["sampler"]["epoch"] == 2
    assert load_adapter(path).metadata["ss_steps"] == "10"
    epoch1 = sorted(path.parent.glob("kohya_*epoch000001.safetensors"))
    assert len(epoch1) == 1 and read_state(epoch1[0])[1]["step"] == 5
    assert not list(path.parent.glob("kohya_*epoch000002.safetensors"))  # the end: the final file
    # the sd-scripts export: the same folders, repeats, buckets and caption options
    import tomllib

    from lycoris_core.train.sdscripts import description_from_toml

    stem = path.name[: -len(".safetensors")]
    doc = tomllib.loads((path.parent / f"{stem}.dataset.toml").read_text(encoding="utf-8"))
    back = description_from_toml(doc)
    assert back.image_dir == str(host.base_dir / "input" / "acc_train")
    assert [(s.folder, s.num_repeats, s.class_tokens) for s in back.subsets] == [
        ("1_other", 1, "other"), ("2_acc pattern", 2, "acc pattern")]
    # (the pack's classes are those of ComfyUI's module copy: compare the fields)
    assert asdict(back.buckets) == asdict(ts.description.buckets)
    assert asdict(back.captions) == asdict(ts.description.captions)
    assert back.flip_aug and back.batch_size == 2
    sh = (path.parent / f"{stem}.sdscripts.sh").read_text()
    assert "--max_train_epochs 2 --save_every_n_epochs 1" in sh and "--max_train_steps 10" in sh


def test_resume_mid_epoch_through_the_graph(executor, host, kohya_folder):
    from safetensors.torch import load_file

    full = run_ok(executor, graph(kohya_folder, steps=7, save_every_n_steps=3,
                                  output_name="lycoris/ds_full"))
    full_path = Path(full.outputs("4")[1])
    mid = sorted(full_path.parent.glob(f"{full_path.name[:-len('.safetensors')]}step000003.safetensors"))
    assert len(mid) == 1 and read_state(mid[0])[1]["sampler"]["position"] == 3  # mid-epoch (of 5)
    resumed = run_ok(executor, graph(kohya_folder, steps=7, resume_from=str(mid[0]),
                                     output_name="lycoris/ds_resumed"))
    a, b = load_file(full_path), load_file(resumed.outputs("4")[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_state(full_path)[1]["losses"] == read_state(resumed.outputs("4")[1])[1]["losses"]


def test_caption_and_flip_draws_encode_each_variant_once(executor, host, kohya_folder):
    import comfy.model_management as mm
    import comfy_host

    res = run_ok(executor, {k: v for k, v in graph(kohya_folder).items() if k in ("1", "2", "3")}
                 | {"5": {"class_type": "LycorisTestSink", "inputs": {"text": ["3", 1]}}})
    ts = res.outputs("3")[0]
    model = res.outputs("1")[0]
    tr = sys.modules[comfy_host.PACK_MODULE + ".nodes.train_dataset"]
    mm.load_models_gpu([model, ts.clip.patcher], force_full_load=True)
    ob = tr.DatasetObjective(model, ts, torch.device("cpu"), torch.float32, 0, 1000)
    flips, captions = [], []
    with torch.inference_mode(False), torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(12):
            loss = ob([1, 2, 3, 1])
            assert torch.isfinite(loss)
            flips += [f for _, f, _ in ob.drawn]
            captions += [c for _, _, c in ob.drawn]
    assert 0.25 < sum(flips) / len(flips) < 0.75       # p = ½ of 48 draws
    assert "" in captions                               # caption_dropout_rate 0.1 of 48 draws
    assert all(c == "" or c.startswith("acc") for c in captions)   # keep_tokens = 1
    assert len(set(captions)) > 6                       # shuffled / tag-dropped variants
    assert ob.encoded == len(set(captions)) == len(ob.text_cache)   # each variant once


def test_bad_folders_give_clear_errors(executor, host):
    empty = host.base_dir / "input" / "empty_set" / "3_x"
    empty.mkdir(parents=True, exist_ok=True)
    (empty / "bad.png").write_bytes(b"not a png")
    for folder, message in [("empty_set", "no usable image"), ("../output", "input directory"),
                            ("missing_folder", "not found")]:
        res = executor.run(graph(folder))
        assert not res.ok
        err = str(res.execution_error or res.node_errors)
        assert message in err, err
        assert str(host.base_dir) not in err
    res = executor.run(graph("empty_set"))
    assert "bad.png" in str(res.execution_error)


def test_single_item_caption_with_line_breaks_and_empty_captions(executor, host):
    import comfy_host

    td = sys.modules[comfy_host.PACK_MODULE + ".nodes.train_data"]
    assert td.split_captions(["a", "", "c"], 3) == ["a", "", "c"]       # a list keeps empties
    assert td.split_captions(["line one\nline two"], 1) == ["line one\nline two"]
    assert td.split_captions(["a\n\nc\n"], 3) == ["a", "", "c"]
    assert td.split_captions(["  \n "], 2) == [] and td.split_captions(["", ""], 2) == ["", ""]
    prompt = {
        "1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}},
        "2": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "TrainLyCORIS", "inputs": {
            "model": ["1", 0], "latents": ["2", 0], "clip": ["1", 1],
            "captions": "a caption\nover two lines", **{**TRAIN, "steps": 1, "batch_size": 1,
                                                          "output_name": "lycoris/multiline"}}},
        "5": {"class_type": "LycorisTestSink", "inputs": {"model": ["4", 0]}},
    }
    res = run_ok(executor, prompt)  # was "1 training latents but 2 captions"
    path = Path(res.outputs("4")[1])
    assert path.parent == (host.base_dir / "output" / "lycoris").resolve()  # no save_to: output


def test_samples_appear_at_the_requested_steps(executor, host, kohya_folder):
    """sample_every_n_steps 2 over 5 steps: previews at steps 2 and 4 (two prompts each), the
    samples output holds the 4 images in order; sampling does not change the training."""
    import comfy.utils

    previews: list[tuple[int, tuple]] = []

    def hook(value, total, preview, node_id=None):
        if preview is not None:
            previews.append((int(value), preview[1].size))
    prompts = "# two prompts\na tiny dog --w 64 --h 48 --s 2 --l 4 --d 1\nanother dog --n blurry --w 64 --h 48 --s 2"
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        res = run_ok(executor, graph(kohya_folder, steps=5, sample_every_n_steps=2,
                                     sample_prompts=prompts, output_name="lycoris/sampled"))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert previews == [(2, (64, 48)), (2, (64, 48)), (4, (64, 48)), (4, (64, 48))]
    samples = res.outputs("4")[4]
    assert tuple(samples.shape) == (4, 48, 64, 3) and float(samples.std()) > 0
    # the same prompt and seed after 2 more steps: the trained network changed the image
    assert not torch.equal(samples[0], samples[2])
    # without samples: the same training (sampling runs in a forked random state) and no images
    plain = run_ok(executor, graph(kohya_folder, steps=5, output_name="lycoris/unsampled"))
    assert read_state(res.outputs("4")[1])[1]["losses"] == read_state(plain.outputs("4")[1])[1]["losses"]
    assert plain.outputs("4")[4].shape[0] == 0
    # bad prompt options are a clear error naming the line
    bad = executor.run(graph(kohya_folder, steps=2, sample_every_n_steps=1,
                             sample_prompts="ok\nx --w huge", output_name="lycoris/bad"))
    assert not bad.ok and "sample_prompts line 2" in str(bad.execution_error)


def test_validation_split_and_loss(executor, host, kohya_folder):
    """validation_split 0.4 of 5 images holds 2 out (validation_seed picks which); the validation
    loss is measured every 2 steps with the same draws, drawn in red on the loss chart."""
    res = run_ok(executor, graph(kohya_folder, {"validation_split": 0.4, "validation_seed": 3},
                                 steps=4, validate_every_n_steps=2, learning_rate=0.02,
                                 output_name="lycoris/validated", write_sdscripts_config=True))
    ts, report = res.outputs("3")
    import tomllib

    from lycoris_core.train.sdscripts import description_from_toml

    path = Path(res.outputs("4")[1])
    doc = tomllib.loads(path.with_name(path.name[: -len(".safetensors")] + ".dataset.toml")
                        .read_text(encoding="utf-8"))
    assert doc["datasets"][0]["validation_split"] == 0.4 and doc["datasets"][0]["validation_seed"] == 3
    back = description_from_toml(doc)   # the export round-trips the split
    assert (back.validation_split, back.validation_seed) == (0.4, 3)
    assert [s.folder for s in back.subsets] == ["1_other", "2_acc pattern"] and not back.reg_dir
    held = ts.validation.names
    assert len(held) == 2 and len(ts.names) == 3 and not set(held) & set(ts.names)
    assert sorted(held + ts.names) == ["1_other/w2.png", "2_acc pattern/sq1.png",
                                       "2_acc pattern/sq2.png", "2_acc pattern/tall.png",
                                       "2_acc pattern/wide.png"]
    assert report.splitlines()[0].startswith("validation: 2 image(s) held out")
    assert ts.validation.flipped is None and ts.validation.caption_options.caption_dropout_rate == 0
    # the chart: red validation marks at steps 2 and 4, none without validation
    chart = res.outputs("4")[2][0]
    red = (chart[..., 0] > 0.8) & (chart[..., 1] < 0.2) & (chart[..., 2] < 0.2)
    cols = sorted({int(c) for c in red.nonzero()[:, 1]})
    # x of step s: 25 + (s − 1) · 590 / 3 → step 2 at 222, step 4 at 615 (marks 5 px wide)
    assert any(218 <= c <= 226 for c in cols) and any(611 <= c <= 619 for c in cols), cols
    assert all(218 <= c <= 226 or 611 <= c <= 619 for c in cols), cols
    plain = run_ok(executor, graph(kohya_folder, {"validation_split": 0.4, "validation_seed": 3},
                                   steps=4, learning_rate=0.02, output_name="lycoris/unvalidated"))
    chart0 = plain.outputs("4")[2][0]
    assert not ((chart0[..., 0] > 0.8) & (chart0[..., 1] < 0.2)).any()
    # validation does not change the training (forked random state)
    assert read_state(res.outputs("4")[1])[1]["losses"] == read_state(plain.outputs("4")[1])[1]["losses"]


def test_training_set_with_a_trained_clip(executor, host, kohya_folder):
    """A CLIP on TrainLyCORIS with a training set: the captions (drawn per step) are encoded
    through it with gradients, so the text encoders train too; the samples use it."""
    res = run_ok(executor, graph(kohya_folder, steps=2, clip=["1", 1], text_encoder_lr=0.01,
                                 sample_every_n_steps=2, sample_prompts="a dog --w 64 --h 64 --s 2",
                                 output_name="lycoris/ds_te"))
    path = res.outputs("4")[1]
    te = [m for m in load_adapter(path).modules if m.startswith("lora_te")]
    assert te and res.outputs("4")[3] is not None
    assert res.outputs("4")[4].shape[0] == 1


@pytest.fixture(scope="module")
def reg_folders(host) -> tuple[str, str]:
    """input/acc_reg_few: `1_person` with 3 images (3 reg items < 9 training items);
    input/acc_reg_many: `5_person` with 3 images (15 reg items > 9)."""
    names = []
    for name, sub in (("acc_reg_few", "1_person"), ("acc_reg_many", "5_person")):
        d = host.base_dir / "input" / name / sub
        d.mkdir(parents=True, exist_ok=True)
        for k in range(3):
            (d / f"r{k}.png").write_bytes(_png(64, 64, 20 + k))
        names.append(name)
    return names[0], names[1]


def test_regularisation_images_balanced_and_weighted(executor, host, kohya_folder, reg_folders,
                                                     monkeypatch):
    """reg_folder as sd-scripts' reg_data_dir: reg items per epoch balanced to the 9 training
    items (fewer: repeats raised in turn; more: the first images only), is_reg subsets and
    --prior_loss_weight in the export, and each item's loss × prior_loss_weight if is_reg."""
    import comfy.model_management as mm
    import comfy_host
    import tomllib

    few, many = reg_folders
    plain = {"shuffle_caption": False, "caption_dropout_rate": 0.0, "caption_tag_dropout_rate": 0.0,
             "flip_aug": False}
    res = run_ok(executor, graph(kohya_folder, {**plain, "reg_folder": few, "prior_loss_weight": 0.5},
                                 steps=1, output_name="lycoris/ds_reg", write_sdscripts_config=True))
    ts, report = res.outputs("3")
    # 9 training items (see test_kohya_folder_buckets_repeats_epochs); 3 reg images × 1 = 3 < 9:
    # all registered, then +1 each in turn → 3 + 6 = 9 → repeats [3, 3, 3]
    assert ts.names[5:] == ["reg:1_person/r0.png", "reg:1_person/r1.png", "reg:1_person/r2.png"]
    assert ts.repeats == [1, 2, 2, 2, 2, 3, 3, 3] and ts.is_reg == [False] * 5 + [True] * 3
    assert sum(ts.repeats) == 18 and ts.prior_loss_weight == 0.5
    # 64×64: 4 + 9 = 13 items → 7 batches of 2; 48×80: 1; 80×48: 2 → 10 batches per epoch
    assert ts.batches_per_epoch(2) == 10
    assert report.splitlines()[0].startswith(
        "regularisation: 3 of 3 image(s) used, 9 item(s) per epoch against 9 training item(s)")
    path = Path(res.outputs("4")[1])
    stem = path.name[: -len(".safetensors")]
    doc = tomllib.loads((path.parent / f"{stem}.dataset.toml").read_text(encoding="utf-8"))
    subs = doc["datasets"][0]["subsets"]
    assert [(Path(s["image_dir"]).name, s["num_repeats"], s.get("is_reg", False)) for s in subs] == [
        ("1_other", 1, False), ("2_acc pattern", 2, False), ("1_person", 1, True)]
    assert Path(subs[2]["image_dir"]).parent == host.base_dir / "input" / few
    assert "--prior_loss_weight 0.5" in (path.parent / f"{stem}.sdscripts.sh").read_text()

    # 3 reg images × 5 = 15 > 9: r0 (5), r1 (5 → 10 ≥ 9) used, r2 unused
    res2 = run_ok(executor, {k: v for k, v in graph(kohya_folder, {**plain, "reg_folder": many}).items()
                             if k in ("1", "2", "3")}
                  | {"5": {"class_type": "LycorisTestSink", "inputs": {"text": ["3", 1]}}})
    ts2 = res2.outputs("3")[0]
    assert ts2.names[5:] == ["reg:5_person/r0.png", "reg:5_person/r1.png"]
    assert ts2.repeats[5:] == [5, 5] and sum(ts2.repeats) == 19

    # the loss: (Σ train losses + w × Σ reg losses) / batch, from the parts actually computed
    tr = sys.modules[comfy_host.PACK_MODULE + ".nodes.train_dataset"]
    td = sys.modules[comfy_host.PACK_MODULE + ".nodes.train_data"]
    model = res.outputs("1")[0]
    mm.load_models_gpu([model, ts.clip.patcher], force_full_load=True)
    parts: list[tuple[int, float]] = []
    inner = td.Objective.__call__

    def spy(self, idx):
        out = inner(self, idx)
        parts.append((len(idx), float(out.detach())))
        return out
    monkeypatch.setattr(td.Objective, "__call__", spy)
    param = next(p for p in model.model.diffusion_model.parameters() if p.dim() > 1)
    was = param.requires_grad
    try:
        with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
            for w in (0.5, 0.0, 2.0):
                ts.prior_loss_weight = w
                ob = tr.DatasetObjective(model, ts, torch.device("cpu"), torch.float32, 0, 1000)
                torch.manual_seed(3)
                parts.clear()
                loss = float(ob([1, 5, 2, 6]))            # 2 train (64×64) + 2 reg items
                assert len(parts) == 2                      # reg part, train part
                (n_reg, l_reg), (n_train, l_train) = parts
                assert n_reg == n_train == 2 and l_reg > 0 and l_train > 0
                assert loss == pytest.approx((2 * l_train + w * 2 * l_reg) / 4, rel=1e-6)
            # prior_loss_weight 0: a reg-only batch gives a zero loss and no gradient
            param.requires_grad_(True)
            for w, zero in ((0.0, True), (1.0, False)):
                ts.prior_loss_weight = w
                ob = tr.DatasetObjective(model, ts, torch.device("cpu"), torch.float32, 0, 1000)
                param.grad = None
                torch.manual_seed(4)
                loss = ob([5, 6, 7])
                loss.backward()
                g = param.grad.abs().max().item() if param.grad is not None else 0.0
                assert (float(loss) == 0.0 and g == 0.0) if zero else (float(loss) > 0 and g > 0)
    finally:
        param.requires_grad_(was)
        param.grad = None
        ts.prior_loss_weight = 0.5


def test_save_last_n_steps_removes_only_this_runs_old_saves(executor, host, kohya_folder):
    """save_every_n_steps 2, save_last_n_steps 3 over 9 steps: saves at 2, 4, 6, 8; sd-scripts'
    rule removes step 2's at step 6 and step 4's at step 8 (with their sidecars). Files this
    run did not write, even with a matching name, stay."""
    folder = host.base_dir / "models" / "loras" / "lycoris"
    folder.mkdir(parents=True, exist_ok=True)
    decoy = folder / "lastn_step000002.safetensors"  # same name, no run counter
    decoy.write_bytes(b"not ours")
    res = run_ok(executor, graph(kohya_folder, steps=9, save_every_n_steps=2, save_last_n_steps=3,
                                 save_to="loras", output_name="lycoris/lastn",
                                 write_sdscripts_config=True))
    path = Path(res.outputs("4")[1])
    stem = path.name[: -len(".safetensors")]
    left = sorted(p.name[len(stem):] for p in path.parent.glob(f"{stem}step*"))
    assert left == ["step000006.safetensors", "step000006.train_state.safetensors",
                    "step000008.safetensors", "step000008.train_state.safetensors"]
    assert path.is_file() and read_state(path)[1]["step"] == 9
    assert decoy.read_bytes() == b"not ours"
    assert "--save_last_n_steps 3" in (path.parent / f"{stem}.sdscripts.sh").read_text()
