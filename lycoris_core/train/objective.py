"""The diffusion training objective and the torch plumbing a host model needs for training.

No ComfyUI import: the host passes its model's `apply_model` (returns the denoised x0 estimate)
and `model_sampling` (sigmas and noise scaling), which is how ComfyUI's models work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

PERCENT_EPS = 1e-3
"""Timesteps are kept inside (0.1 %, 99.9 %) so that sigma is never exactly 0 or the maximum."""


def sample_sigmas(model_sampling, batch: int, min_timestep: int = 0,
                  max_timestep: int = 1000) -> torch.Tensor:
    """sd-scripts' uniform timestep in [min_timestep, max_timestep) out of 1000, as a sigma of the
    host's schedule (`percent_to_sigma`, 0 % = most noise). Uses the global CPU generator."""
    lo, hi = min_timestep / 1000.0, max_timestep / 1000.0
    u = lo + (hi - lo) * torch.rand(batch, dtype=torch.float64)
    percent = (1.0 - u).clamp(PERCENT_EPS, 1.0 - PERCENT_EPS)
    return torch.tensor([float(model_sampling.percent_to_sigma(float(p))) for p in percent],
                        dtype=torch.float32)


def diffusion_loss(apply_model: Callable[..., torch.Tensor], model_sampling, x0: torch.Tensor,
                   noise: torch.Tensor, sigma: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """MSE in the model's noise space: ε for ε-models (SDXL), n − x0 for flow models (Anima).

    x_t = noise_scaling(σ, n, x0); the model's x0 estimate d gives the prediction (x_t − d)/σ and
    the target (x_t − x0)/σ. For ε-prediction that is sd-scripts' ε-MSE; for rectified flow its
    velocity MSE.
    """
    shape = (-1,) + (1,) * (x0.dim() - 1)
    s = sigma.to(x0.device, torch.float32).reshape(shape)
    xt = model_sampling.noise_scaling(s, noise, x0, False)
    denoised = apply_model(xt, sigma.to(x0.device), **model_kwargs)
    pred = (xt - denoised.float()) / s
    target = (xt - x0) / s
    return torch.nn.functional.mse_loss(pred, target)


@contextlib.contextmanager
def gradient_checkpointing(blocks: Iterable[nn.Module], enabled: bool = True) -> Iterator[None]:
    """Run each block's forward under non-reentrant activation checkpointing (RNG replayed), and
    restore the original forwards on exit."""
    saved: list[tuple[nn.Module, object]] = []
    try:
        if enabled:
            for blk in blocks:
                orig = blk.forward

                def fwd(*args, _orig=orig, **kwargs):
                    if not torch.is_grad_enabled():
                        return _orig(*args, **kwargs)
                    return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
                saved.append((blk, blk.__dict__.get("forward")))
                blk.forward = fwd
        yield
    finally:
        for blk, prev in saved:
            if prev is None:
                del blk.forward
            else:
                blk.forward = prev


def release_inference_tensors(module: nn.Module) -> int:
    """Replace parameters/buffers created under `torch.inference_mode` (which autograd cannot
    save) with normal copies of the same values. Returns how many were replaced."""
    n = 0
    with torch.inference_mode(False):
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None and p.is_inference():
                    m._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                    n += 1
            for name, b in list(m._buffers.items()):
                if b is not None and b.is_inference():
                    m._buffers[name] = b.clone()
                    n += 1
    return n


def loss_curve_image(losses: list[float], width: int = 640, height: int = 320) -> torch.Tensor:
    """A plot of the loss per step (grey) and its running mean (blue), (1, H, W, 3) in [0, 1]."""
    img = np.ones((height, width, 3), dtype=np.float32)
    m = 24
    img[m:height - m, m] = 0.0
    img[height - m, m:width - m] = 0.0
    if losses:
        y = np.asarray(losses, dtype=np.float64)
        y = np.where(np.isfinite(y), y, np.nan)
        k = max(1, len(y) // 20)
        smooth = np.convolve(np.nan_to_num(y), np.ones(k) / k, mode="valid")
        lo, hi = np.nanmin(y), np.nanmax(y)
        span = hi - lo if hi > lo else 1.0

        def draw(vals: np.ndarray, offset: int, color: tuple[float, float, float], thick: int):
            n = max(len(y) - 1, 1)
            xs = m + 1 + (np.arange(len(vals)) + offset) * (width - 2 * m - 2) / n
            ys = height - m - 1 - (vals - lo) / span * (height - 2 * m - 2)
            for i in range(len(vals) - 1 if len(vals) > 1 else 1):
                j = min(i + 1, len(vals) - 1)
                steps = int(max(abs(xs[j] - xs[i]), abs(ys[j] - ys[i]), 1)) + 1
                px = np.linspace(xs[i], xs[j], steps).round().astype(int)
                py = np.linspace(ys[i], ys[j], steps)
                for dy in range(thick):
                    rows = np.clip(np.nan_to_num(py).round().astype(int) + dy, 0, height - 1)
                    img[rows, np.clip(px, 0, width - 1)] = color
        draw(np.nan_to_num(y, nan=lo), 0, (0.6, 0.6, 0.6), 1)
        draw(smooth, (k - 1) // 2, (0.1, 0.3, 0.9), 2)
    return torch.from_numpy(img)[None]
