"""The training loop: optimizer, LR schedule with warmup, batches, gradient accumulation, seed.

The loop knows nothing about diffusion models: it calls `loss_fn(indices)` for a batch of dataset
indices and backpropagates. All randomness of a run (batch choice, noise, timesteps, dropouts)
comes from the global CPU generator inside a forked RNG context, seeded once; its state is part
of the saved training state, so N steps + save + resume + M steps equals N+M steps exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from . import optimizers
from .network import LycorisNetwork

OPTIMIZERS = ("AdamW", "Adam", "SGD", "Adafactor")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
              "polynomial")


@dataclass
class TrainConfig:
    """Optimisation settings with sd-scripts' names and defaults where it has them."""

    steps: int = 100                    # sd-scripts --max_train_steps (optimizer steps)
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None
    optimizer: str = "AdamW"
    weight_decay: float = 0.01          # torch AdamW default, as sd-scripts passes no override
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    batch_size: int = 1
    grad_accumulation: int = 1
    max_grad_norm: float = 1.0          # sd-scripts default; 0 disables clipping
    seed: int = 0
    save_every: int = 0                 # sd-scripts --save_every_n_steps; 0: only at the end
    optimizer_args: dict = field(default_factory=dict)  # --optimizer_args (optimizers.parse_…)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS + tuple(optimizers.EXTRA_OPTIMIZERS):
            raise ValueError(f"optimizer must be one of {optimizers.available_optimizers()}, "
                             f"got {self.optimizer!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        for n in ("steps", "batch_size", "grad_accumulation"):
            if getattr(self, n) < 1:
                raise ValueError(f"{n} must be >= 1, got {getattr(self, n)}")

    def to_json(self) -> dict:
        return asdict(self)


def lr_lambda(name: str, warmup: int, total: int, num_cycles: int = 1,
              power: float = 1.0) -> Callable[[int], float]:
    """LR multiplier per optimizer step, as diffusers' `get_scheduler` (used by sd-scripts)."""
    warmup = max(0, int(warmup))

    def f(step: int) -> float:
        if name == "constant":
            return 1.0
        if step < warmup:
            return float(step) / float(max(1, warmup))
        if name == "constant_with_warmup":
            return 1.0
        progress = float(step - warmup) / float(max(1, total - warmup))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if name == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((num_cycles * progress) % 1.0))))
        if name == "polynomial":
            return max(0.0, 1.0 - progress) ** power
        raise ValueError(name)
    return f


def build_optimizer(cfg: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    clean = [{k: v for k, v in g.items() if k != "name"} | {"name": g.get("name", "")}
             for g in groups]
    defaults = {"weight_decay": cfg.weight_decay} if cfg.optimizer in ("AdamW", "Adafactor") else {}
    return optimizers.build(cfg.optimizer, clean, cfg.learning_rate, defaults, cfg.optimizer_args)


def nan_hint(dtype: torch.dtype) -> str:
    """What to try when the loss is not finite, for training in `dtype` (autocast)."""
    if dtype == torch.float32:
        return "lower the learning rate (training already runs in float32)"
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    return f"lower the learning rate, or train in fp32 (training_dtype; this run used {name})"


LossFn = Callable[[list[int]], torch.Tensor]


class Trainer:
    """Runs optimizer steps of `network` on `loss_fn` over a dataset of `dataset_size` items."""

    def __init__(self, network: LycorisNetwork, cfg: TrainConfig, loss_fn: LossFn,
                 dataset_size: int):
        if dataset_size < 1:
            raise ValueError("the training set is empty")
        self.network = network
        self.cfg = cfg
        self.loss_fn = loss_fn
        self.dataset_size = dataset_size
        self.optimizer = build_optimizer(cfg, network.param_groups(cfg.learning_rate,
                                                                   cfg.text_encoder_lr))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.steps,
                                      cfg.lr_scheduler_num_cycles, cfg.lr_scheduler_power))
        self.step = 0
        self.losses: list[float] = []
        self.rng_state: torch.Tensor | None = None  # CPU generator state after the last step
        self.nan_hint = nan_hint(torch.float32)  # the caller sets it for its training dtype
        self.sampler = None  # an EpochSampler (dataset.py) gives the batches when set

    def _batch(self) -> list[int]:
        if self.sampler is not None:
            return self.sampler.next_batch()
        perm = torch.randperm(self.dataset_size)
        return perm[: self.cfg.batch_size].tolist()

    def train_step(self) -> float:
        """One optimizer step (grad_accumulation micro-batches); returns the mean loss."""
        acc = self.cfg.grad_accumulation
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(acc):
            loss = self.loss_fn(self._batch())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {self.step + 1}; "
                                         f"{self.nan_hint}")
            (loss / acc).backward()
            total += float(loss.detach())
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        self.losses.append(total / acc)
        return self.losses[-1]

    def run(self, until: int | None = None, *,
            on_step: Callable[[int, float], None] | None = None,
            should_stop: Callable[[], bool] | None = None,
            on_save: Callable[[int], None] | None = None) -> bool:
        """Train until step `until` (default cfg.steps). Returns False if `should_stop` ended it.

        `on_save(step)` is called every cfg.save_every steps (not at the last step: the caller
        saves the final result itself).
        """
        until = self.cfg.steps if until is None else until
        self.network.train()
        with torch.random.fork_rng(devices=[]):
            if self.rng_state is None:
                torch.manual_seed(self.cfg.seed)
            else:
                torch.set_rng_state(self.rng_state)
            try:
                while self.step < until:
                    if should_stop is not None and should_stop():
                        return False
                    loss = self.train_step()
                    self.rng_state = torch.get_rng_state()
                    if on_step is not None:
                        on_step(self.step, loss)
                    every = self.cfg.save_every
                    if on_save is not None and every and self.step % every == 0 and self.step < until:
                        on_save(self.step)
            finally:
                self.network.eval()
        return True


def every_n_steps(on_step: Callable[[int, float], None], every: int,
                  action: Callable[[int, float], None]) -> Callable[[int, float], None]:
    """`Trainer.run`'s `on_step` that also calls `action(step, loss)` after every `every`-th step
    (`on_step` itself when `every` is 0)."""
    if not every:
        return on_step

    def step(n: int, loss: float) -> None:
        on_step(n, loss)
        if n % every == 0:
            action(n, loss)
    return step


@contextlib.contextmanager
def aside(network: torch.nn.Module) -> Iterator[None]:
    """Work beside training (validation losses, sample images): the network in eval mode, no
    gradients, the global RNG forked so the run's own random stream is untouched; the network's
    mode restored after."""
    was_training = network.training
    network.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            yield
    finally:
        network.train(was_training)
