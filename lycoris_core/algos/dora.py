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


def apply_dora(w0: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor,
               strength: float = 1.0) -> torch.Tensor:
    """W' = (W0 + ΔW) · m / (‖W0 + ΔW‖ + eps), interpolated as W0 + s·(W' − W0).

    The norm is that of the *patched* weight (ComfyUI uses W0's norm on the output axis: a
    known defect, SPEC §5). eps is the machine epsilon of the computation dtype.
    """
    w = w0 + delta
    axis = dora_axis(dora_scale, tuple(w.shape))
    m = dora_scale.to(w.dtype).reshape([-1 if d == axis else 1 for d in range(w.dim())])
    out = w * (m / (weight_norm(w, axis) + torch.finfo(w.dtype).eps))
    return out if strength == 1.0 else w0 + strength * (out - w0)
