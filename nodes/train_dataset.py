"""TrainLyCORIS's inputs added for real datasets: where the file goes (`save_to`), the
LyCORISDataset training set, epochs. New optional inputs, appended after the original ones, so
workflows saved before them run as they did."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..lycoris_core.paths import safe_output_path
from ..lycoris_core.train.checkpoint import state_path
from ..lycoris_core.train.dataset import EpochSampler, process_caption, steps_for_epochs
from ..lycoris_core.train.loop import TrainConfig, aside, every_n_steps
from ..lycoris_core.train.saves import step_to_remove
from .dataset import TrainingSetType
from .train_data import Objective, encode_tokens

log = logging.getLogger("lycoris_nodes")

SAVE_TO = ("loras", "output")


def extra_inputs() -> list:
    """The optional inputs appended to TrainLyCORIS's schema."""
    return [
        io.Combo.Input("save_to", options=list(SAVE_TO), default="loras", optional=True,
                       tooltip="Where the trained file goes: 'loras' (ComfyUI's first loras "
                       "folder: LoadLyCORIS and the LoRA loaders list it at once, after a refresh "
                       "of the page's lists) or 'output' (ComfyUI's output folder). Workflows "
                       "saved before this option existed keep writing to 'output'."),
        *training_inputs(),
    ]


def save_root(o: dict) -> str:
    """The folder the trained files go to. Without the option (an API prompt made before it
    existed): the output folder, as before."""
    where = o.get("save_to") or "output"
    if where not in SAVE_TO:
        raise ValueError(f"save_to must be one of {SAVE_TO}, got {where!r}")
    if where == "loras":
        return folder_paths.get_folder_paths("loras")[0]
    return folder_paths.get_output_directory()


def save_path(o: dict) -> Path:
    """`<root>/<output_name>_NNNNN_.safetensors`: SaveImage-style counter, never an existing
    file, never outside the chosen folder (a bad name raises ValueError)."""
    return safe_output_path(save_root(o), o["output_name"], ".safetensors", subdirs=True)


def training_inputs() -> list:
    """LyCORISDataset's training set and sd-scripts' epoch options."""
    return [
        TrainingSetType.Input("training_set", optional=True, tooltip="A LyCORISDataset (kohya "
                              "folder, buckets, repeats, caption options, flip_aug). Replaces "
                              "latents / positive / captions; a CLIP connected here still "
                              "trains the text encoders on its captions."),
        io.Int.Input("max_train_epochs", default=0, min=0, max=100_000, optional=True,
                     tooltip="--max_train_epochs: when > 0 it sets the number of steps (epochs "
                     "× ceil(batches per epoch / gradient_accumulation_steps)) instead of steps."),
        io.Int.Input("save_every_n_epochs", default=0, min=0, max=100_000, optional=True,
                     tooltip="--save_every_n_epochs: also save (with the resume sidecar) after "
                     "every N epochs (0 = off). Files end in epochNNNNNN."),
        io.Int.Input("save_last_n_steps", default=0, min=0, max=100_000_000, optional=True,
                     tooltip="--save_last_n_steps: with save_every_n_steps, keep only the saves "
                     "of the last N steps; older step files (and their .train_state sidecars) "
                     "written by this run are removed (0 = keep all)."),
        *validation_input(),
    ]


def epoch_plan(o: dict, ts, latents: list[torch.Tensor], cfg: TrainConfig):
    """(sampler, cfg): with a training set or an epoch option, batches come epoch by epoch as
    in sd-scripts (each item × its repeats, one bucket per batch) and max_train_epochs sets the
    steps; otherwise (None, cfg) and the trainer draws batches as before."""
    epochs, every = int(o.get("max_train_epochs") or 0), int(o.get("save_every_n_epochs") or 0)
    if ts is None and not epochs and not every:
        return None, cfg
    if ts is not None:
        buckets, repeats = list(ts.buckets), list(ts.repeats)
    else:
        buckets, repeats = [tuple(x.shape) for x in latents], [1] * len(latents)
    sampler = EpochSampler(buckets, repeats, cfg.batch_size, seed=cfg.seed)
    if epochs:
        cfg = replace(cfg, steps=steps_for_epochs(epochs, sampler.batches, cfg.grad_accumulation))
        log.info("TrainLyCORIS: %d epoch(s) of %d batch(es) = %d steps", epochs, sampler.batches,
                 cfg.steps)
    return sampler, cfg


def epoch_saves(on_step: Callable[[int, float], None], sampler, o: dict,
                save: Callable[[Path], None], base: Path, total: int) -> Callable[[int, float], None]:
    """`on_step` that also saves after every save_every_n_epochs-th epoch (not at the end: the
    final file is saved by the caller)."""
    every = int(o.get("save_every_n_epochs") or 0)
    if sampler is None or not every:
        return on_step
    done: list[int] = []
    sampler.on_epoch_end = done.append

    def step(n: int, loss: float) -> None:
        on_step(n, loss)
        while done:
            epoch = done.pop(0)
            if epoch % every == 0 and n < total:
                save(Path(f"{base}epoch{epoch:06d}.safetensors"))
    return step


def step_saves(save: Callable[[Path], None], base: Path, o: dict,
               every: int) -> Callable[[int], None]:
    """`on_save(step)`: save `<base>stepNNNNNN.safetensors`; with save_last_n_steps, then remove
    the save sd-scripts would remove (`step_to_remove`), only if this run wrote it."""
    last_n = int(o.get("save_last_n_steps") or 0)
    written: dict[int, Path] = {}

    def on_save(step: int) -> None:
        path = Path(f"{base}step{step:06d}.safetensors")
        save(path)
        written[step] = path
        old = step_to_remove(step, last_n, every)
        if old is not None and old != step and old in written:
            gone = written.pop(old)
            for p in (gone, state_path(gone)):
                p.unlink(missing_ok=True)
            log.info("TrainLyCORIS: save_last_n_steps %d: removed %s", last_n, gone.name)
    return on_save


def caption_models(ts, trained_clip) -> list:
    """The frozen CLIP of a training set, loaded with the model for the whole run (its captions
    are encoded while training)."""
    if ts is None or trained_clip is not None or ts.clip is None:
        return []
    return [ts.clip.patcher]


class DatasetObjective(Objective):
    """The loss on a LyCORISDataset's items: per batch position, a flip draw (flip_aug, p = ½)
    and a caption draw (sd-scripts' caption options), from the run's generator (so resuming
    draws the same). A trained CLIP encodes the caption at every step with gradients; otherwise
    the training set's frozen CLIP encodes each distinct caption once (cached)."""

    def __init__(self, patcher, ts, device, dtype, min_t: int, max_t: int, trained_clip=None,
                 **kwargs):
        self.ts = ts
        self.trained_clip = trained_clip
        self.clip = trained_clip if trained_clip is not None else ts.clip
        if self.clip is None:
            raise ValueError("the training set has no CLIP to encode its captions")
        self.text_cache: dict[str, list] = {}
        self.token_cache: dict[str, object] = {}
        self.encoded = 0  # CLIP runs (distinct captions with a frozen CLIP)
        self.drawn: list[tuple[int, bool, str]] = []  # (item, flipped, caption) of the last call
        super().__init__(patcher, ts.latents, None, device, dtype, min_t, max_t,
                         encoder=self._encode, **kwargs)  # kwargs: a cooperating subclass's
        self.plain = self.x0
        self.mirrored = None if ts.flipped is None else \
            [self.base.process_latent_in(x.to(device, torch.float32)) for x in ts.flipped]

    def _tokens(self, text: str):
        if text not in self.token_cache:
            self.token_cache[text] = self.clip.tokenize(text)
        return self.token_cache[text]

    def _encode(self, pos: int) -> list:
        text = self.drawn[pos][2]
        if self.trained_clip is not None:
            self.encoded += 1
            return encode_tokens(self.clip, self._tokens(text))
        if text not in self.text_cache:
            with torch.no_grad(), torch.autocast(self.device.type if hasattr(self.device, "type")
                                                 else str(self.device), enabled=False):
                self.text_cache[text] = encode_tokens(self.clip, self._tokens(text))
            self.encoded += 1
        return self.text_cache[text]

    def __call__(self, idx: list[int]) -> torch.Tensor:
        opts = self.ts.caption_options
        drawn = []
        for i in idx:
            flip = self.mirrored is not None and float(torch.rand(())) < 0.5
            drawn.append((i, flip, process_caption(self.ts.captions[i], opts)))
        self.drawn = drawn
        self.x0 = [(self.mirrored if f else self.plain)[i] for i, f, _ in drawn]
        reg = getattr(self.ts, "is_reg", None)
        try:
            if not reg or not any(reg[i] for i in idx):
                return super().__call__(list(range(len(drawn))))
            # sd-scripts: each item's loss × (prior_loss_weight if is_reg else 1), batch mean
            plain = [p for p, i in enumerate(idx) if not reg[i]]
            regs = [p for p, i in enumerate(idx) if reg[i]]
            total = self.ts.prior_loss_weight * super().__call__(regs) * (len(regs) / len(idx))
            if plain:
                total = super().__call__(plain) * (len(plain) / len(idx)) + total
            return total
        finally:
            self.x0 = self.plain


def epoch_args(o: dict) -> str:
    """sd-scripts flags for the epoch options (appended to the written command line)."""
    out = ""
    for k in ("max_train_epochs", "save_every_n_epochs", "save_last_n_steps"):
        if int(o.get(k) or 0):
            out += f" --{k} {int(o[k])}"
    ts = o.get("training_set")
    if ts is not None and getattr(ts, "is_reg", None):
        out += f" --prior_loss_weight {float(ts.prior_loss_weight)!r}"
    return out


def validation_input() -> list:
    return [io.Int.Input("validate_every_n_steps", default=0, min=0, max=1_000_000, optional=True,
                         tooltip="--validate_every_n_steps: the loss on the training set's held-out "
                         "images (LyCORISDataset validation_split) every N steps, with the same "
                         "noise and timesteps each time; drawn in red on the loss chart (0 = off).")]


class Validation:
    """The validation loss of a run: the held-out images of the training set, fixed draws
    (seeded), network in eval mode, no gradients, in a forked random state."""

    DRAWS = 2

    def __init__(self, o: dict, ts, patcher, device, dtype, min_t: int, max_t: int, trained_clip,
                 network, node_id, total: int, seed: int, batch_size: int):
        self.every = int(o.get("validate_every_n_steps") or 0)
        val = getattr(ts, "validation", None)
        if self.every and val is None:
            log.warning("TrainLyCORIS: validate_every_n_steps is set but the training set has no "
                        "held-out images (LyCORISDataset validation_split): no validation")
            self.every = 0
        self.objective = DatasetObjective(patcher, val, device, dtype, min_t, max_t,
                                          trained_clip=trained_clip) if self.every else None
        self.network, self.node_id, self.total = network, node_id, total
        self.seed, self.batch_size = seed, batch_size
        self.points: list[tuple[int, float]] = []

    def loss(self) -> float:
        n = len(self.objective.x0)
        with aside(self.network):
            torch.manual_seed(self.seed + 1)
            total, count = 0.0, 0
            for _ in range(self.DRAWS):
                for k in range(0, n, self.batch_size):
                    idx = list(range(k, min(n, k + self.batch_size)))
                    total += float(self.objective(idx)) * len(idx)
                    count += len(idx)
        return total / count

    def validate(self, n: int, loss: float) -> None:
        v = self.loss()
        self.points.append((n, v))
        log.info("TrainLyCORIS: validation loss %.5f at step %d", v, n)
        try:
            from server import PromptServer
            PromptServer.instance.send_progress_text(
                f"step {n}/{self.total}  loss {loss:.5f}  val_loss {v:.5f}", self.node_id)
        except Exception:  # no server (scripts, tests)
            pass

    def wrap(self, on_step):
        return every_n_steps(on_step, self.every, self.validate)


def draw_validation(image: torch.Tensor, losses: list[float], points: list[tuple[int, float]],
                    width: int = 640, height: int = 320) -> torch.Tensor:
    """The loss chart (`loss_curve_image`, same axes) with the validation losses as red marks."""
    if not points or not losses:
        return image
    img = image.clone()
    m = 24
    y = [v for v in losses if v == v]
    lo, hi = min(y), max(y)
    span = hi - lo if hi > lo else 1.0
    n = max(len(losses) - 1, 1)
    for step, v in points:
        x = int(round(m + 1 + (step - 1) * (width - 2 * m - 2) / n))
        yy = int(round(height - m - 1 - (v - lo) / span * (height - 2 * m - 2)))
        yy = min(max(yy, 2), height - 3)
        img[0, yy - 2: yy + 3, max(x - 2, 0): x + 3] = torch.tensor([0.85, 0.1, 0.1])
    return img
