"""LoRA / LoCon: ΔW = scale · up @ down, with an optional Tucker `mid` for k×k convs.

up (O, R[,1,1]), down (R, I[,k,k]) or (R, I·k·k), mid (R, R, k, k) with down/up 1×1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import AdapterError
from . import buffers
from .base import AdapterModule, TensorRef
from .layer import LayerGeometry
from .loha import magnitude_bound, needs_grad, tucker_inner
from .norms import product_norm_sq


@dataclass
class LoRAFactors:
    up: torch.Tensor
    down: torch.Tensor
    mid: torch.Tensor | None = None


def diff_weight(f: LoRAFactors, scale: float = 1.0) -> torch.Tensor:
    """ΔW: (O, I, k, k) with `mid`, else (O, I·k·k) (reshape to the layer afterwards).

    One GEMM at full size: the scale goes on `up` and `mid` is contracted with `down` first.
    """
    up = f.up.reshape(f.up.shape[0], -1)
    down = f.down.reshape(f.down.shape[0], -1)
    if scale != 1.0:
        up = up * scale
    right = tucker_inner(f.mid, down) if f.mid is not None else down
    if buffers.is_large(up.shape[0] * right.shape[1], right.dtype) and not needs_grad(up, right):
        out = torch.mm(up, right, out=buffers.empty((up.shape[0], right.shape[1]), right.dtype,
                                                    right.device))
    else:
        out = up @ right
    if f.mid is not None:
        return out.reshape(up.shape[0], down.shape[1], *f.mid.shape[2:])
    return out


def bypass_diff(x: torch.Tensor, f: LoRAFactors, layer: LayerGeometry,
                scale: float = 1.0) -> torch.Tensor:
    """scale · ΔW x without ΔW: `down` with the layer's kernel (Tucker: `down` pointwise, then
    `mid` with the kernel), then `up` pointwise (the scale goes on `up`)."""
    up = f.up.reshape(f.up.shape[0], -1)
    if scale != 1.0:
        up = up * scale
    down = f.down.reshape(f.down.shape[0], -1)
    if f.mid is not None:
        h = layer.kernel_op(layer.pointwise(x, down), f.mid)
    else:
        h = layer.kernel_op(x, down)
    return layer.pointwise(h, up)


def max_abs_bound(f: LoRAFactors, scale: float = 1.0) -> float:
    """An upper bound of max |ΔW| from the factors alone (cheap: no pass over ΔW)."""
    rank = math.prod(f.up.shape[1:])
    if f.mid is not None:
        return magnitude_bound(scale, rank * f.mid.shape[1], f.up, f.mid, f.down)
    return magnitude_bound(scale, rank, f.up, f.down)


def frobenius_sq(f: LoRAFactors, scale: float = 1.0) -> float:
    """‖scale · ΔW‖² from the two Grams (`norms.product_norm_sq`); Tucker: `mid` contracted
    with `down` first (R, I·k·k), ΔW never formed."""
    down = f.down.reshape(f.down.shape[0], -1)
    right = tucker_inner(f.mid, down) if f.mid is not None else down
    return scale * scale * product_norm_sq(f.up.reshape(f.up.shape[0], -1), right)


@dataclass
class LoRAModule(AdapterModule):
    algo = "lora"
    diff_weight = staticmethod(diff_weight)
    frobenius_sq = staticmethod(frobenius_sq)
    max_abs_bound = staticmethod(max_abs_bound)
    bypass_diff = staticmethod(bypass_diff)
    tensor_names = ("lora_up", "lora_down", "lora_mid")

    lora_up: TensorRef | None = None
    lora_down: TensorRef | None = None
    lora_mid: TensorRef | None = None

    def __post_init__(self) -> None:
        for n in ("lora_up", "lora_down"):
            if getattr(self, n) is None:
                raise AdapterError(f"LoRA module '{self.name}' has no {n}", file=self.path,
                                   key=f"{self.name}.{n}.weight")
        up, down, mid = self.lora_up, self.lora_down, self.lora_mid
        for ref in (up, down):
            if ref.ndim < 2 or 0 in ref.shape:
                raise AdapterError(f"bad shape {list(ref.shape)}", file=self.path, key=ref.key)
        if mid is not None:
            if mid.ndim < 3 or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0]:
                raise AdapterError(f"lora_mid {list(mid.shape)} does not fit up {list(up.shape)} "
                                   f"/ down {list(down.shape)}", file=self.path, key=mid.key)
        elif up.shape[1] != down.shape[0] or math.prod(up.shape[2:]) != 1:
            raise AdapterError(f"rank mismatch: lora_up is {list(up.shape)}, lora_down is "
                               f"{list(down.shape)}", file=self.path, key=down.key)

    @property
    def rank(self) -> int:
        return self.lora_down.shape[0]

    @property
    def natural_shape(self) -> tuple[int, ...]:
        o = self.lora_up.shape[0]
        if self.lora_mid is not None:
            return (o, self.lora_down.shape[1], *self.lora_mid.shape[2:])
        d = self.lora_down.shape
        return (o, *d[1:]) if len(d) > 2 else (o, d[1])

    def _build_factors(self, ld) -> LoRAFactors:
        return LoRAFactors(ld(self.lora_up), ld(self.lora_down), ld(self.lora_mid))

    def describe(self) -> dict:
        return {"mode": "tucker" if self.lora_mid is not None else "flat"}
