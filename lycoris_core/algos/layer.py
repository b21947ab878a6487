"""The layer an adapter is applied to at forward time (bypass): Linear or ConvNd geometry.

Bypass computes `scale · ΔW x` from the factors without forming ΔW: a chain of small ops on the
activations, exactly one of which carries the layer's kernel, stride, padding and dilation (the
others are pointwise: a matrix over the channel axis). `LayerGeometry` holds what those ops need.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class LayerGeometry:
    """A layer applying a weight of `weight_shape`: Linear (O, I), or ConvNd (O, I, *k) with its
    stride / padding / dilation (groups 1). Inputs: Linear (..., I); ConvNd (B, I, *spatial)."""

    weight_shape: tuple[int, ...]
    conv: bool = False
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.weight_shape) < 2:
            raise ValueError(f"a layer weight has at least 2 dims, got {list(self.weight_shape)}")
        if self.conv and self.spatial not in _CONV:
            raise ValueError(f"conv weights have 3 to 5 dims, got {list(self.weight_shape)}")
        if not self.conv and len(self.weight_shape) != 2:
            raise ValueError(f"a Linear weight is 2-D, got {list(self.weight_shape)}")

    @classmethod
    def linear(cls, out_features: int, in_features: int) -> LayerGeometry:
        return cls((out_features, in_features))

    @classmethod
    def convolution(cls, weight_shape: tuple[int, ...], stride=1, padding=0,
                    dilation=1) -> LayerGeometry:
        """ConvNd geometry; int arguments are repeated over the spatial dims."""
        n = len(weight_shape) - 2
        rep = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n  # noqa: E731
        pad = padding if isinstance(padding, str) else rep(padding)
        return cls(tuple(weight_shape), True, rep(stride), pad, rep(dilation))

    @property
    def out_features(self) -> int:
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        return self.weight_shape[1]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight_shape[2:])

    @property
    def spatial(self) -> int:
        """Number of spatial dims (0 for Linear)."""
        return len(self.weight_shape) - 2

    @property
    def channel_dim(self) -> int:
        """The output's channel axis: 1 for convs, -1 for Linear."""
        return 1 if self.conv else -1

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel)

    def pointwise(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x through a (O', I') channel matrix: Linear, or a 1×1 conv with stride 1."""
        if not self.conv:
            return F.linear(x, w)
        return _CONV[self.spatial](x, w.reshape(*w.shape, *([1] * self.spatial)))

    def kernel_op(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x through a kernel with the layer's stride / padding / dilation: w (O', I', *k), or a
        2-D w (O', I·k…) of the layer's own input size and kernel. Linear: F.linear(x, w)."""
        if not self.conv:
            return F.linear(x, w)
        if w.dim() == 2:
            w = w.reshape(w.shape[0], self.in_features, *self.kernel)
        return _CONV[self.spatial](x, w, None, self.stride, self.padding, self.dilation)

    def positions(self, x: torch.Tensor) -> int:
        """Input positions per channel in `x` (tokens for Linear; batch × spatial for convs)."""
        if not self.conv:
            return x.numel() // max(1, x.shape[-1])
        return x.numel() // max(1, x.shape[1])

    def output_positions(self, x: torch.Tensor) -> int:
        """Output positions per channel that applying this layer to `x` gives."""
        if not self.conv:
            return self.positions(x)
        n = x.shape[0]
        for d in range(self.spatial):
            size = x.shape[2 + d]
            if isinstance(self.padding, str):
                if self.padding == "valid":
                    size = size - self.dilation[d] * (self.kernel[d] - 1)
                # "same" keeps the size (stride 1 only, as torch requires)
            else:
                size = (size + 2 * self.padding[d] - self.dilation[d] * (self.kernel[d] - 1) - 1) \
                    // self.stride[d] + 1
            n *= max(0, size)
        return n
