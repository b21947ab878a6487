"""LyCORISDataset: a kohya sd-scripts dataset folder as one training set for TrainLyCORIS.

The rules (layout, buckets, captions, epochs) live in `lycoris_core.train.dataset`; this module
reads the folder under ComfyUI's input directory, decodes, resizes and crops the images, encodes
their latents once with the VAE (the mirrored image too with flip_aug) and hands TrainLyCORIS a
`TrainingSet`. Captions stay text: their variants are drawn at every step and each distinct
variant is encoded once by the frozen CLIP (see `train_dataset.DatasetObjective`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io

from ..lycoris_core.paths import is_within
from ..lycoris_core.train.dataset import (
    BucketOptions,
    CaptionOptions,
    DatasetDescription,
    balance_reg_repeats,
    batches_per_epoch,
    bucket_resolutions,
    crop_box,
    describe_bucket_counts,
    scan_kohya_folder,
    select_bucket,
    validation_indices,
)

log = logging.getLogger("lycoris_nodes")

TrainingSetType = io.Custom("LYCORIS_TRAINING_SET")
MAX_SIDE = 16384


@dataclass
class TrainingSet:
    """What LyCORISDataset hands TrainLyCORIS: per image its latent (1, C, h, w) as the VAE
    encoded it (and the mirrored one with flip_aug), base caption, repeats and bucket (w, h)."""

    names: list[str]
    latents: list[torch.Tensor]
    flipped: list[torch.Tensor] | None
    captions: list[str]
    repeats: list[int]
    buckets: list[tuple[int, int]]
    caption_options: CaptionOptions
    clip: object
    vae: object
    description: DatasetDescription
    report: list[str] = field(default_factory=list)
    validation: TrainingSet | None = None  # held-out images (validation_split)
    is_reg: list[bool] | None = None       # per image: a regularisation image (reg_folder)
    prior_loss_weight: float = 1.0         # the loss weight of regularisation items

    @property
    def flip_aug(self) -> bool:
        return self.flipped is not None

    def batches_per_epoch(self, batch_size: int) -> int:
        return batches_per_epoch(self.buckets, self.repeats, batch_size)


def dataset_folder(name: str) -> Path:
    """The folder `name` inside ComfyUI's input directory (no absolute path, no `..`, symlinks
    resolved inside it). Errors name the folder as the user typed it."""
    name = name.strip().strip("/\\")
    if not name:
        raise ValueError("folder: give the name of a folder inside ComfyUI's input directory")
    if len(name) > 1024 or any(ord(c) < 32 for c in name):
        raise ValueError("folder: the name is too long or holds control characters")
    root = Path(folder_paths.get_input_directory()).resolve()
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"folder {name!r} must be a folder inside ComfyUI's input directory")
    full = (root / p).resolve()
    if not is_within(root, full):
        raise ValueError(f"folder {name!r} leads outside ComfyUI's input directory")
    if not full.is_dir():
        raise ValueError(f"folder {name!r} not found in ComfyUI's input directory")
    return full


def load_image(path: Path, shown: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) of an image file, EXIF orientation applied. ValueError naming the
    file (as `shown`) when it cannot be decoded (corrupt, truncated, too large)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            if max(im.size) > MAX_SIDE:
                raise ValueError(f"{shown}: {im.size[0]}×{im.size[1]} is larger than {MAX_SIDE} px")
            im = ImageOps.exif_transpose(im).convert("RGB")
            return np.asarray(im, dtype=np.uint8).copy()
    except ValueError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        detail = str(e).replace(str(path), shown)  # the user's name, not the absolute path
        raise ValueError(f"{shown}: not a readable image ({type(e).__name__}: {detail})") from None


def fit_to_bucket(pixels: np.ndarray, resized: tuple[int, int], reso: tuple[int, int]) -> torch.Tensor:
    """Scale (area averaging down, Lanczos up, as sd-scripts) and centre-crop to the bucket;
    returns (1, H, W, 3) float in [0, 1], ComfyUI's IMAGE layout."""
    from PIL import Image

    h, w = pixels.shape[:2]
    im = Image.fromarray(pixels)
    if (w, h) != resized:
        up = resized[0] > w or resized[1] > h
        im = im.resize(resized, Image.LANCZOS if up else Image.BOX)
    im = im.crop(crop_box(resized, reso))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)[None]


def build_training_set(folder: str, vae, clip, buckets: BucketOptions, captions: CaptionOptions,
                       flip_aug: bool, batch_size: int = 1) -> TrainingSet:
    """Scan, bucket and encode a kohya folder. Bad files are reported and skipped; an error
    when nothing is left."""
    root = dataset_folder(folder)
    scan = scan_kohya_folder(root, captions.caption_extension)
    report = list(scan.report)
    predefined = bucket_resolutions(buckets) if buckets.enable_bucket and not \
        buckets.bucket_no_upscale else None
    names, lat, flipped, caps, reps, resos = [], [], [], [], [], []
    for e in scan.entries:
        try:
            pixels = load_image(root / e.path, e.path)
            choice = select_bucket(pixels.shape[1], pixels.shape[0], buckets, predefined)
        except ValueError as err:
            report.append(f"skipped {err}")
            continue
        img = fit_to_bucket(pixels, choice.resized, choice.reso)
        with torch.inference_mode(False), torch.no_grad():
            lat.append(vae.encode(img).float().cpu().clone())
            if flip_aug:
                flipped.append(vae.encode(torch.flip(img, dims=[2])).float().cpu().clone())
        names.append(e.path)
        caps.append(e.caption)
        reps.append(e.num_repeats)
        resos.append(choice.reso)
        if e.caption_source != "file":
            report.append(f"{e.path}: no caption file, captioned with "
                          + (f"the class name {e.caption!r}" if e.caption else "an empty caption"))
    if not names:
        raise ValueError(f"folder {folder!r}: no usable image (kohya layout: subfolders named "
                         "N_name with images and captions)" + (": " + "; ".join(report) if report else ""))
    used = {n.split("/", 1)[0] for n in names}
    subsets = [s for s in scan.subsets if s.folder in used]
    for s in subsets:
        s.images = sum(1 for n in names if n.split("/", 1)[0] == s.folder)
    desc = DatasetDescription(str(root), subsets, buckets, captions, flip_aug, batch_size)
    ts = TrainingSet(names, lat, flipped if flip_aug else None, caps, reps, resos, captions, clip,
                     vae, desc, report)
    items = sum(reps)
    summary = [f"{len(names)} image(s) in {len(subsets)} subset(s), {items} item(s) per epoch "
               f"({ts.batches_per_epoch(batch_size)} batch(es) of {batch_size})",
               *describe_bucket_counts(resos, reps)]
    ts.report = summary + report
    for line in ts.report:
        log.info("LyCORISDataset: %s", line)
    return ts


def _inputs() -> list:
    Int, F, B, S = io.Int.Input, io.Float.Input, io.Boolean.Input, io.String.Input
    return [
        S("folder", default="", tooltip="A folder inside ComfyUI's input directory in kohya's "
          "layout: subfolders named N_name (N = num_repeats, name = class_tokens, the caption "
          "of images without a caption file), holding the images and their caption files."),
        io.Vae.Input("vae", tooltip="Encodes every image once into its latent (cache_latents)."),
        io.Clip.Input("clip", tooltip="Encodes the captions (frozen: each distinct caption "
                      "variant is encoded once). To train the text encoders, connect a CLIP to "
                      "TrainLyCORIS as well."),
        Int("resolution", default=1024, min=64, max=8192, step=8, tooltip="resolution: the "
            "bucket area is resolution²."),
        B("enable_bucket", default=True, tooltip="enable_bucket: aspect-ratio buckets (else "
          "every image is scaled and centre-cropped to resolution × resolution)."),
        Int("min_bucket_reso", default=256, min=8, max=8192, step=8, tooltip="min_bucket_reso."),
        Int("max_bucket_reso", default=1024, min=8, max=16384, step=8, tooltip="max_bucket_reso."),
        Int("bucket_reso_steps", default=64, min=8, max=1024, step=8, tooltip="bucket_reso_steps "
            "(a multiple of 8, the VAE's factor)."),
        B("bucket_no_upscale", default=False, tooltip="bucket_no_upscale: buckets follow each "
          "image's own size, shrunk to the area when larger; small images are never enlarged."),
        S("caption_extension", default=".txt", tooltip="caption_extension."),
        B("shuffle_caption", default=False, tooltip="shuffle_caption: shuffle the tags (split on "
          "caption_separator) at every step."),
        Int("keep_tokens", default=0, min=0, max=255, tooltip="keep_tokens: the first N tags stay "
            "in front, unshuffled and never dropped."),
        S("keep_tokens_separator", default="", tooltip="keep_tokens_separator: tags before it are "
          "kept in front (and after a second one, at the end); overrides keep_tokens."),
        S("caption_separator", default=",", tooltip="caption_separator between tags."),
        F("caption_dropout_rate", default=0.0, min=0.0, max=1.0, step=0.01,
          tooltip="caption_dropout_rate: probability of an empty caption for an item at a step."),
        F("caption_tag_dropout_rate", default=0.0, min=0.0, max=1.0, step=0.01,
          tooltip="caption_tag_dropout_rate: probability of dropping each (non-kept) tag."),
        S("caption_prefix", default="", tooltip="caption_prefix, added before every caption."),
        S("caption_suffix", default="", tooltip="caption_suffix, added after every caption."),
        B("flip_aug", default=False, tooltip="flip_aug: each item is mirrored at random (p = ½) at "
          "every step; both latents are encoded once."),
        Int("batch_size", default=1, min=1, max=1024, tooltip="batch_size: only for the report "
            "and the exported TOML; TrainLyCORIS's batch_size is what trains."),
        F("validation_split", default=0.0, min=0.0, max=0.5, step=0.01, optional=True,
          tooltip="validation_split: this share of the images is held out (not trained on); "
          "TrainLyCORIS's validate_every_n_steps measures the loss on them."),
        Int("validation_seed", default=0, min=0, max=0xFFFFFFFF, optional=True,
            tooltip="validation_seed: which images are held out."),
        S("reg_folder", default="", optional=True, tooltip="reg_data_dir: a folder inside "
          "ComfyUI's input directory in kohya's layout (N_name subfolders) with regularisation "
          "images (is_reg). As in sd-scripts, their items per epoch are balanced to the training "
          "items: the first ones are used, or their repeats raised in turn. Empty = none."),
        F("prior_loss_weight", default=1.0, min=0.0, max=100.0, step=0.05, optional=True,
          tooltip="--prior_loss_weight: the loss of each regularisation item is multiplied by "
          "this (training items by 1)."),
    ]


class LyCORISDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LyCORISDataset",
            display_name="LyCORIS Dataset (kohya folder)",
            category="LyCORIS/training",
            description="Reads a kohya sd-scripts dataset folder (N_name subfolders, caption "
                        "files) from ComfyUI's input directory with sd-scripts' dataset options: "
                        "buckets, repeats, caption options, flip_aug. Latents are encoded once.",
            inputs=_inputs(),
            outputs=[
                TrainingSetType.Output(display_name="training_set", tooltip="Connect to "
                                       "TrainLyCORIS's training_set input."),
                io.String.Output(display_name="report", tooltip="Images, items per epoch, "
                                 "buckets, and every file that was skipped or had no caption."),
            ],
        )

    @classmethod
    def execute(cls, folder, vae, clip, resolution, enable_bucket, min_bucket_reso,
                max_bucket_reso, bucket_reso_steps, bucket_no_upscale, caption_extension,
                shuffle_caption, keep_tokens, keep_tokens_separator, caption_separator,
                caption_dropout_rate, caption_tag_dropout_rate, caption_prefix, caption_suffix,
                flip_aug, batch_size, validation_split=0.0, validation_seed=0, reg_folder="",
                prior_loss_weight=1.0) -> io.NodeOutput:
        ext = caption_extension.strip()
        if not ext or len(ext) > 32 or "/" in ext or "\\" in ext:
            raise ValueError(f"caption_extension {caption_extension!r}: give an extension such as .txt")
        buckets = BucketOptions((resolution, resolution), enable_bucket, min_bucket_reso,
                                max_bucket_reso, bucket_reso_steps, bucket_no_upscale)
        caps = CaptionOptions(ext if ext.startswith(".") else "." + ext, shuffle_caption,
                              keep_tokens, keep_tokens_separator, caption_separator,
                              caption_dropout_rate, caption_tag_dropout_rate, caption_prefix,
                              caption_suffix)
        ts = build_training_set(folder, vae, clip, buckets, caps, flip_aug, batch_size)
        ts = split_validation(ts, validation_split, validation_seed)
        if (reg_folder or "").strip():
            reg = build_training_set(reg_folder, vae, clip, buckets, caps, flip_aug, batch_size)
            ts = add_regularisation(ts, reg, prior_loss_weight)
        return io.NodeOutput(ts, "\n".join(ts.report))


def split_validation(ts: TrainingSet, fraction: float, seed: int) -> TrainingSet:
    """`ts` without its held-out images, which become `ts.validation` (no flips, captions
    without random options: the validation loss is measured the same way every time)."""
    held = validation_indices(len(ts.names), fraction, seed)
    if not held:
        return ts
    keep = [i for i in range(len(ts.names)) if i not in set(held)]

    def pick(idx: list[int]) -> dict:
        return {"names": [ts.names[i] for i in idx], "latents": [ts.latents[i] for i in idx],
                "captions": [ts.captions[i] for i in idx], "repeats": [ts.repeats[i] for i in idx],
                "buckets": [ts.buckets[i] for i in idx]}
    fixed = replace(ts.caption_options, shuffle_caption=False, caption_dropout_rate=0.0,
                    caption_tag_dropout_rate=0.0)
    val = TrainingSet(**pick(held), flipped=None, caption_options=fixed, clip=ts.clip, vae=ts.vae,
                      description=ts.description)
    train = replace(ts, **pick(keep), flipped=None if ts.flipped is None else
                    [ts.flipped[i] for i in keep], validation=val)
    train.report = [f"validation: {len(held)} image(s) held out ({', '.join(val.names)}); "
                    f"{len(keep)} trained on, {sum(train.repeats)} item(s) per epoch", *ts.report]
    train.description = replace(ts.description, validation_split=float(fraction),
                                validation_seed=int(seed))
    return train


def add_regularisation(ts: TrainingSet, reg: TrainingSet, prior_loss_weight: float) -> TrainingSet:
    """`ts` with the regularisation images of `reg` appended (is_reg), their repeats balanced to
    the training items as sd-scripts does (`balance_reg_repeats`); unused ones are left out."""
    w = float(prior_loss_weight)
    if not (0.0 <= w <= 100.0):  # also rejects NaN
        raise ValueError(f"prior_loss_weight must be in [0, 100], got {prior_loss_weight}")
    train_items = sum(ts.repeats)
    reps = balance_reg_repeats(train_items, reg.repeats)
    use = [i for i, r in enumerate(reps) if r > 0]
    flipped = None if ts.flipped is None else ts.flipped + [reg.flipped[i] for i in use]
    reg_subsets = [replace(s, is_reg=True) for s in reg.description.subsets]
    desc = replace(ts.description, subsets=ts.description.subsets + reg_subsets,
                   reg_dir=reg.description.image_dir)
    out = replace(ts, names=ts.names + [f"reg:{reg.names[i]}" for i in use],
                  latents=ts.latents + [reg.latents[i] for i in use], flipped=flipped,
                  captions=ts.captions + [reg.captions[i] for i in use],
                  repeats=ts.repeats + [reps[i] for i in use],
                  buckets=ts.buckets + [reg.buckets[i] for i in use],
                  is_reg=[False] * len(ts.names) + [True] * len(use),
                  prior_loss_weight=w, description=desc)
    reg_items = sum(reps)
    out.report = [f"regularisation: {len(use)} of {len(reg.names)} image(s) used, {reg_items} "
                  f"item(s) per epoch against {train_items} training item(s) (prior_loss_weight "
                  f"{w:g}); {sum(out.repeats)} item(s), {out.batches_per_epoch(ts.description.batch_size)}"
                  f" batch(es) of {ts.description.batch_size} per epoch",
                  *ts.report, *(f"reg: {line}" for line in reg.report)]
    for line in out.report[:1]:
        log.info("LyCORISDataset: %s", line)
    return out


DATASET_NODES = [LyCORISDataset]
