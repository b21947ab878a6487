"""DoRA (LyCORIS `weight_decompose`): rescale the patched weight to a learned magnitude."""

from __future__ import annotations

import torch


def dora_axis(dora_scale: torch.Tensor, weight_shape: tuple[int, ...]) -> int:
    """0 when `dora_scale` holds one magnitude per output row, 1 per input channel."""
    if dora_scale.shape[0] == 1 and dora_scale.numel() == weight_shape[1] and weight_shape[0] != 1:
        return 1
    return 0


def weight_norm(w: torch.Tensor, axis: int) -> torch.Tensor:
    """‖w‖ over every dim except `axis`, kept broadcastable against `w`."""
    dims = [d for d in range(w.dim()) if d != axis]
    return torch.linalg.vector_norm(w, dim=dims, keepdim=True)


def magnitude_ratio(w: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """m / (‖w‖ + eps) along DoRA's axis, broadcastable against `w` (W' = w · this).

    eps is the machine epsilon of w's dtype (the computation dtype)."""
    axis = dora_axis(dora_scale, tuple(w.shape))
    m = dora_scale.to(w.dtype).reshape([-1 if d == axis else 1 for d in range(w.dim())])
    return m / (weight_norm(w, axis) + torch.finfo(w.dtype).eps)


def apply_dora(w0: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor,
               strength: float = 1.0) -> torch.Tensor:
    """W' = (W0 + ΔW) · m / (‖W0 + ΔW‖ + eps), interpolated as W0 + s·(W' − W0).

    The norm is that of the *patched* weight (ComfyUI uses W0's norm on the output axis: a
    known defect, SPEC §5). eps is the machine epsilon of the computation dtype.
    """
    w = w0 + delta
    out = w * magnitude_ratio(w, dora_scale)
    return out if strength == 1.0 else w0 + strength * (out - w0)


def bypass_change(base_out: torch.Tensor, delta_out: torch.Tensor, v: torch.Tensor,
                  strength: float, channel_dim: int) -> torch.Tensor:
    """What output-axis DoRA adds to a layer's output at strength s, without touching W0:
    s·[(v − 1)·(W0 x) + v·(ΔW x)], from `base_out` = W0 x (the output without its bias),
    `delta_out` = ΔW x and v (O,) = m / (‖W0 + ΔW‖ + eps) (`magnitude_ratio`).

    Since W' = v·(W0 + ΔW) per output row, W0 + s·(W' − W0) applied to x is exactly
    W0 x + this."""
    shape = [1] * base_out.dim()
    shape[channel_dim] = -1
    v = v.reshape(shape)
    out = (v - 1.0) * base_out
    out.addcmul_(v, delta_out)
    return out.mul_(strength) if strength != 1.0 else out
