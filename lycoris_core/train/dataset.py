"""kohya sd-scripts' dataset rules, pure (no ComfyUI): folder layout, buckets, captions, epochs.

- Folder layout (DreamBooth style): `<root>/<N>_<name>/` holds images trained N times per epoch
  (`num_repeats`) whose class name is `<name>`; each image's caption is the first line of the
  file with the same stem and `caption_extension`, or the class name when there is none.
  Folders whose name does not start with a repeat count ≥ 1 are skipped, as sd-scripts does.
- Buckets (`BucketManager`): with upscaling allowed, the predefined resolutions of
  `make_bucket_resolutions` (area ≤ resolution², sides in [min_bucket_reso, max_bucket_reso] on
  `bucket_reso_steps`) and the one of the nearest aspect ratio; with `bucket_no_upscale` a bucket
  of the image's own size (shrunk to the area if larger). The image is scaled to cover the bucket
  and centre-cropped.
- Captions (`process_caption`), drawn anew at every step: prefix/suffix, caption dropout, then
  (with shuffle or tag dropout) tags split on the separator, the first `keep_tokens` (or the
  part before `keep_tokens_separator`) fixed, the rest shuffled and/or dropped.
- Epochs: every image counts `num_repeats` times; each bucket's items are shuffled and cut into
  batches of `batch_size`, the batch order is shuffled; an epoch has as many micro-batches as
  that gives (sd-scripts' `len(dataset)`).

All randomness goes through the caller's torch generator (the trainer's global CPU generator,
whose state is saved with the run) so that a resumed run draws the same values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
"""Image files sd-scripts and Pillow both read (case-insensitive)."""
MAX_IMAGES = 100_000
MAX_CAPTION_BYTES = 64 * 1024


@dataclass(frozen=True)
class BucketOptions:
    """sd-scripts' resolution / bucketing options (dataset TOML names)."""

    resolution: tuple[int, int] = (1024, 1024)   # (width, height)
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    def __post_init__(self) -> None:
        w, h = self.resolution
        if min(w, h, self.bucket_reso_steps) < 1:
            raise ValueError("resolution and bucket_reso_steps must be ≥ 1")
        if self.min_bucket_reso < self.bucket_reso_steps:
            raise ValueError(f"min_bucket_reso ({self.min_bucket_reso}) is below "
                             f"bucket_reso_steps ({self.bucket_reso_steps})")
        if self.max_bucket_reso < self.min_bucket_reso:
            raise ValueError(f"max_bucket_reso ({self.max_bucket_reso}) is below min_bucket_reso "
                             f"({self.min_bucket_reso})")

    @property
    def max_area(self) -> int:
        return self.resolution[0] * self.resolution[1]


@dataclass(frozen=True)
class CaptionOptions:
    """sd-scripts' caption options of a subset (dataset TOML names)."""

    caption_extension: str = ".txt"
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_separator: str = ","
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""

    def __post_init__(self) -> None:
        for n in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            v = getattr(self, n)
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ValueError(f"{n} must be in [0, 1], got {v}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be ≥ 0, got {self.keep_tokens}")
        if not self.caption_separator:
            raise ValueError("caption_separator must not be empty")

    @property
    def is_random(self) -> bool:
        """Whether the caption of an item changes from step to step."""
        return (self.shuffle_caption or self.caption_dropout_rate > 0
                or self.caption_tag_dropout_rate > 0)


# --- folder layout ------------------------------------------------------------------------------


def parse_subset_name(name: str) -> tuple[int, str] | None:
    """`"2_acc pattern"` → (2, "acc pattern"); None when the name has no repeat count ≥ 1
    (sd-scripts ignores such folders)."""
    head, _, rest = name.partition("_")
    if not head.isdigit():
        return None
    n = int(head)
    return (n, rest) if n >= 1 else None


@dataclass
class ImageEntry:
    """One image of the folder: path relative to the dataset root (POSIX), its subset, caption."""

    path: str
    subset: str
    num_repeats: int
    caption: str
    caption_source: str  # "file", "class" (no caption file) or "empty"


@dataclass
class SubsetInfo:
    folder: str
    num_repeats: int
    class_tokens: str
    images: int = 0
    is_reg: bool = False  # a regularisation subset (sd-scripts' reg_data_dir / is_reg)


@dataclass
class FolderScan:
    entries: list[ImageEntry] = field(default_factory=list)
    subsets: list[SubsetInfo] = field(default_factory=list)
    report: list[str] = field(default_factory=list)


def read_caption(path: Path, shown: str) -> str:
    """sd-scripts' caption: the first line of the file, stripped. Raises ValueError naming the
    file (as `shown`) when it is too large or not UTF-8."""
    data = path.read_bytes()[: MAX_CAPTION_BYTES + 1]
    if len(data) > MAX_CAPTION_BYTES:
        raise ValueError(f"{shown}: caption file larger than {MAX_CAPTION_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{shown}: caption file is not UTF-8 ({e.reason} at byte {e.start})") from None
    lines = text.splitlines()
    return lines[0].strip() if lines else ""


def scan_kohya_folder(root: str | Path, caption_extension: str = ".txt") -> FolderScan:
    """The images of a kohya folder `root` (subfolders `N_name`), with captions and repeats.

    Unreadable caption files are reported and the image uses the class name; images directly
    in `root` (no repeat count) and folders without a count are reported and skipped.
    """
    root = Path(root)
    out = FolderScan()
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        parsed = parse_subset_name(sub.name)
        if parsed is None:
            out.report.append(f"skipped folder {sub.name!r}: its name does not start with a "
                              "repeat count (N_name)")
            continue
        repeats, cls = parsed
        info = SubsetInfo(sub.name, repeats, cls)
        for img in sorted(p for p in sub.iterdir() if p.is_file()
                          and p.suffix.lower() in IMAGE_EXTENSIONS):
            if len(out.entries) >= MAX_IMAGES:
                raise ValueError(f"more than {MAX_IMAGES} images in {root.name!r}")
            rel = f"{sub.name}/{img.name}"
            cap_file = img.with_suffix(ext)
            caption, source = cls, "class"
            if cap_file.is_file():
                try:
                    caption, source = read_caption(cap_file, f"{sub.name}/{cap_file.name}"), "file"
                except (ValueError, OSError) as e:
                    out.report.append(f"{e}; using the class name {cls!r}" if isinstance(e, ValueError)
                                      else f"{sub.name}/{cap_file.name}: unreadable; using the "
                                      f"class name {cls!r}")
            if source == "class" and not cls:
                source = "empty"
            out.entries.append(ImageEntry(rel, sub.name, repeats, caption, source))
            info.images += 1
        out.subsets.append(info)
    loose = [p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        out.report.append(f"skipped {len(loose)} image(s) directly in the dataset folder: kohya's "
                          "layout puts them in subfolders named N_name (N = repeats)")
    return out


# --- buckets ------------------------------------------------------------------------------------


def _round_to_steps(x: float, steps: int) -> int:
    v = int(x + 0.5)
    return v - v % steps


def bucket_resolutions(opts: BucketOptions) -> list[tuple[int, int]]:
    """sd-scripts' predefined buckets (`make_bucket_resolutions`), sorted: the square of the
    area's side, and for every width from min to max bucket reso (by the step) the largest height
    on the step whose area fits (capped at max_bucket_reso), both ways round."""
    d = opts.bucket_reso_steps
    w, h = opts.resolution
    area_units = (w // d) * (h // d)
    resos = {(int(math.sqrt(area_units)) * d,) * 2}
    size = opts.min_bucket_reso
    while size <= opts.max_bucket_reso:
        other = min(opts.max_bucket_reso, (area_units // (size // d)) * d)
        resos.add((size, other))
        resos.add((other, size))
        size += d
    return sorted(resos)


@dataclass(frozen=True)
class BucketChoice:
    reso: tuple[int, int]        # bucket (width, height)
    resized: tuple[int, int]     # the image is scaled to this size, then centre-cropped to reso
    ar_error: float


def select_bucket(width: int, height: int, opts: BucketOptions,
                  predefined: Sequence[tuple[int, int]] | None = None) -> BucketChoice:
    """The bucket of an image of `width`×`height` (sd-scripts' `select_bucket`)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}×{height}")
    if not opts.enable_bucket:
        reso = opts.resolution
        scale = max(reso[0] / width, reso[1] / height)
        return BucketChoice(reso, (max(reso[0], int(width * scale + 0.5)),
                                   max(reso[1], int(height * scale + 0.5))), 0.0)
    ar = width / height
    steps = opts.bucket_reso_steps
    if not opts.bucket_no_upscale:
        resos = list(predefined) if predefined is not None else bucket_resolutions(opts)
        reso = (width, height)
        if reso not in resos:
            errors = [abs(r[0] / r[1] - ar) for r in resos]
            reso = resos[errors.index(min(errors))]  # first minimum, as numpy's argmin
        scale = reso[1] / height if ar > reso[0] / reso[1] else reso[0] / width
        resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    else:
        if width * height > opts.max_area:
            rw = math.sqrt(opts.max_area * ar)
            rh = opts.max_area / rw
            bw = _round_to_steps(rw, steps)
            bh_w = _round_to_steps(bw / ar, steps)
            bh = _round_to_steps(rh, steps)
            bw_h = _round_to_steps(bh * ar, steps)
            err_w = abs(bw / bh_w - ar) if bh_w else math.inf
            err_h = abs(bw_h / bh - ar) if bh else math.inf
            if err_w < err_h:
                resized = (bw, int(bw / ar + 0.5))
            else:
                resized = (int(bh * ar + 0.5), bh)
        else:
            resized = (width, height)
        reso = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        if min(reso) < 1:
            raise ValueError(f"an image of {width}×{height} is smaller than one bucket step "
                             f"({steps})")
    return BucketChoice(reso, resized, reso[0] / reso[1] - ar)


def crop_box(resized: tuple[int, int], reso: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred `reso` crop of an image of size `resized`."""
    left = (resized[0] - reso[0]) // 2
    top = (resized[1] - reso[1]) // 2
    return left, top, left + reso[0], top + reso[1]


# --- captions -----------------------------------------------------------------------------------


def _tags(text: str, sep: str) -> list[str]:
    return [t.strip() for t in text.split(sep) if t.strip()]


def process_caption(caption: str, opts: CaptionOptions,
                    gen: torch.Generator | None = None) -> str:
    """One draw of an item's caption, as sd-scripts builds it for a step.

    Random numbers come from `gen` (or the global torch generator): one for caption dropout
    (when its rate > 0), a permutation for the shuffle, one per tag for tag dropout.
    """
    def rand() -> float:
        return float(torch.rand((), generator=gen, dtype=torch.float64))

    if opts.caption_prefix:
        caption = f"{opts.caption_prefix} {caption}"
    if opts.caption_suffix:
        caption = f"{caption} {opts.caption_suffix}"
    if opts.caption_dropout_rate > 0 and rand() < opts.caption_dropout_rate:
        return ""
    if not (opts.shuffle_caption or opts.caption_tag_dropout_rate > 0):
        return caption
    sep, kts = opts.caption_separator, opts.keep_tokens_separator
    suffix: list[str] = []
    if kts and kts in caption:
        fixed_part, flex_part = caption.split(kts, 1)
        if kts in flex_part:
            flex_part, suffix_part = flex_part.split(kts, 1)
            suffix = _tags(suffix_part, sep)
        fixed, flex = _tags(fixed_part, sep), _tags(flex_part, sep)
    else:
        tokens = [t.strip() for t in caption.strip().split(sep)]
        fixed, flex = tokens[: opts.keep_tokens], tokens[opts.keep_tokens:]
    if opts.shuffle_caption and len(flex) > 1:
        flex = [flex[i] for i in torch.randperm(len(flex), generator=gen).tolist()]
    if opts.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rand() >= opts.caption_tag_dropout_rate]
    return ", ".join(fixed + flex + suffix)


# --- epochs -------------------------------------------------------------------------------------


def epoch_batches(buckets: Sequence[object], repeats: Sequence[int], batch_size: int,
                  gen: torch.Generator | None = None) -> list[list[int]]:
    """One epoch's micro-batches of item indices: item i (in bucket `buckets[i]`) appears
    `repeats[i]` times; each bucket's list is shuffled and cut into batches of `batch_size`
    (the last one may be shorter), and the batches are shuffled."""
    if len(buckets) != len(repeats):
        raise ValueError("one bucket and one repeat count per item")
    by_bucket: dict[object, list[int]] = {}
    for i, (b, r) in enumerate(zip(buckets, repeats, strict=True)):
        by_bucket.setdefault(b, []).extend([i] * int(r))
    batches: list[list[int]] = []
    for b in sorted(by_bucket, key=repr):
        items = by_bucket[b]
        order = torch.randperm(len(items), generator=gen).tolist()
        items = [items[j] for j in order]
        batches += [items[k: k + batch_size] for k in range(0, len(items), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[j] for j in order]


def batches_per_epoch(buckets: Sequence[object], repeats: Sequence[int], batch_size: int) -> int:
    """sd-scripts' `len(train_dataset)`: Σ over buckets of ceil(items × repeats / batch_size)."""
    counts: dict[object, int] = {}
    for b, r in zip(buckets, repeats, strict=True):
        counts[b] = counts.get(b, 0) + int(r)
    return sum(math.ceil(n / batch_size) for n in counts.values())


def steps_for_epochs(epochs: int, batches: int, grad_accumulation: int) -> int:
    """Optimizer steps of `epochs` epochs (sd-scripts: max_train_epochs ×
    ceil(len(dataloader) / gradient_accumulation_steps), one process)."""
    return epochs * math.ceil(batches / grad_accumulation)


@dataclass
class EpochSampler:
    """Micro-batches epoch after epoch. Epoch e's order is drawn from its own generator seeded
    with (seed, e), so the state is just (epoch, position): a resumed run continues exactly."""

    buckets: list
    repeats: list[int]
    batch_size: int
    seed: int = 0
    epoch: int = 0            # epochs completed
    position: int = 0         # micro-batches taken in the current epoch
    on_epoch_end: Callable[[int], None] | None = field(default=None, repr=False)
    _order: list[list[int]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.buckets or self.batch_size < 1:
            raise ValueError("the training set is empty")

    def _epoch_order(self) -> list[list[int]]:
        if self._order is None:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % (2 ** 63))
            self._order = epoch_batches(self.buckets, self.repeats, self.batch_size, g)
        return self._order

    @property
    def batches(self) -> int:
        return batches_per_epoch(self.buckets, self.repeats, self.batch_size)

    def next_batch(self) -> list[int]:
        order = self._epoch_order()
        batch = order[self.position]
        self.position += 1
        if self.position == len(order):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
            if self.on_epoch_end is not None:
                self.on_epoch_end(self.epoch)
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batches": self.batches}

    def load_state(self, state: dict) -> None:
        if state.get("batches") != self.batches:
            raise ValueError(f"the saved run had {state.get('batches')} batches per epoch, this "
                             f"dataset has {self.batches}: resume with the same dataset options")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._order = None


# --- the description of a dataset (for sd-scripts' TOML) ----------------------------------------


@dataclass
class DatasetDescription:
    """What sd-scripts' dataset TOML says about a kohya folder: root, subsets, options."""

    image_dir: str
    subsets: list[SubsetInfo]
    buckets: BucketOptions
    captions: CaptionOptions
    flip_aug: bool = False
    batch_size: int = 1
    reg_dir: str = ""               # root of the regularisation subsets (is_reg), if any
    validation_split: float = 0.0   # sd-scripts' dataset options validation_split / _seed
    validation_seed: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["buckets"]["resolution"] = list(self.buckets.resolution)
        return d


def describe_bucket_counts(resos: Sequence[tuple[int, int]], repeats: Sequence[int]) -> list[str]:
    """'W×H: n images (m items per epoch)' per bucket, sorted by size."""
    counts: dict[tuple[int, int], list[int]] = {}
    for r, n in zip(resos, repeats, strict=True):
        c = counts.setdefault(tuple(r), [0, 0])
        c[0] += 1
        c[1] += int(n)
    return [f"bucket {w}×{h}: {a} image(s), {b} item(s) per epoch"
            for (w, h), (a, b) in sorted(counts.items())]



def validation_indices(n: int, fraction: float, seed: int) -> list[int]:
    """The images held out for validation (sd-scripts' validation_split / validation_seed):
    round(n × fraction) of them, at least 1 when fraction > 0, always leaving one to train on;
    drawn with their own generator, sorted."""
    if not (math.isfinite(fraction) and 0.0 <= fraction < 1.0):
        raise ValueError(f"validation_split must be in [0, 1), got {fraction}")
    if fraction == 0.0 or n < 2:
        return []
    k = min(n - 1, max(1, round(n * fraction)))
    g = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(n, generator=g)[:k].tolist())


def balance_reg_repeats(train_items: int, reg_repeats: Sequence[int]) -> list[int]:
    """Repeats per epoch of each regularisation image, as sd-scripts' DreamBoothDataset
    balances them against the `train_items` (Σ images × num_repeats of the training subsets).

    In order, each reg image is registered with its own num_repeats until the reg items reach
    `train_items` (the rest get 0: unused); if all are registered and still short, one more
    repeat is given to each image in turn until the counts are equal. Without training items
    nothing is registered (all 0), as in sd-scripts."""
    out = [0] * len(reg_repeats)
    if not reg_repeats or train_items <= 0:
        return out
    if any(int(r) < 1 for r in reg_repeats):
        raise ValueError("every regularisation image needs num_repeats ≥ 1")
    n = 0
    for i, r in enumerate(reg_repeats):       # first pass: register with the folder's repeats
        out[i] = int(r)
        n += int(r)
        if n >= train_items:
            return out
    while n < train_items:                    # later passes: +1 per image in turn
        for i in range(len(out)):
            out[i] += 1
            n += 1
            if n >= train_items:
                break
    return out
