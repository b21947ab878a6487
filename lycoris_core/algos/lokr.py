"""LoKr: ΔW = scale · kron(W1, W2).

W1 (a, c) is `lokr_w1` or `lokr_w1_a (a,R) @ lokr_w1_b (R,c)`; W2 (b, d[, k, k]) is `lokr_w2`,
`lokr_w2_a (b,R) @ lokr_w2_b (R, d[·k·k])`, or Tucker `t2 (R,R,k,k)` with `w2_a (R,b)`,
`w2_b (R,d)`. With O = a·b and I = c·d. Scale is alpha / R, and 1 when both halves are full.
Applying LoKr never needs ΔW: `kron(W1, W2) x = vec(W1 · X · W2ᵀ)` (see `bypass_diff`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import AdapterError
from . import buffers
from .base import AdapterModule, TensorRef
from .layer import LayerGeometry
from .loha import magnitude_bound, needs_grad, rebuild_tucker, tucker_inner
from .norms import GRAM_DTYPE, product_norm_sq


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m ≤ n, as LyCORIS/sd-scripts do.

    A positive `factor` dividing the dimension gives (min(f, dim/f), max(...)); otherwise the
    divisor pair with m ≤ √dim and m ≤ factor that is closest to square.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    best = 1
    for m in range(1, math.isqrt(dimension) + 1):
        if m > limit:
            break
        if dimension % m == 0:
            best = m
    return best, dimension // best


@dataclass
class LoKrFactors:
    """The loaded tensors of one LoKr module (exactly one form per half is set)."""

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    t1: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None


def _half(full, a, b, t) -> torch.Tensor:
    if full is not None:
        return full
    if t is not None:
        return rebuild_tucker(t, a, b)
    r = b.shape[0]
    return (a @ b.reshape(r, -1)).reshape(a.shape[0], *b.shape[1:])


def rebuild_w1(f: LoKrFactors) -> torch.Tensor:
    return _half(f.w1, f.w1_a, f.w1_b, f.t1)


def rebuild_w2(f: LoKrFactors) -> torch.Tensor:
    return _half(f.w2, f.w2_a, f.w2_b, f.t2)


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """torch.kron(w1, w2) with w1 broadcast over w2's kernel dims: (a,c) ⊗ (b,d[,k,k]).

    w2 is made contiguous first (SPEC §5: Tucker w2). A result of 32 MiB or more (no autograd)
    is one broadcast product (w1 (a,1,c,1,…) · w2 (1,b,1,d,…)) written into a huge-page
    buffer (`buffers.empty`), which saves most of the page-fault cost of a fresh allocation.
    """
    w2 = w2.contiguous()
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    w1 = w1.contiguous()
    dtype = torch.promote_types(w1.dtype, w2.dtype)
    if w1.dim() != w2.dim() or not buffers.is_large(w1.numel() * w2.numel(), dtype) \
            or needs_grad(w1, w2):
        return torch.kron(w1, w2)
    left = w1.reshape([s for n in w1.shape for s in (n, 1)])
    right = w2.reshape([s for n in w2.shape for s in (1, n)])
    out = buffers.empty([s for m, n in zip(w1.shape, w2.shape, strict=True) for s in (m, n)],
                        dtype, w1.device)
    return torch.mul(left, right, out=out).reshape([m * n for m, n in zip(w1.shape, w2.shape,
                                                                          strict=True)])


def diff_weight(f: LoKrFactors, scale: float = 1.0) -> torch.Tensor:
    """ΔW = scale · kron(W1, W2): (a·b, c·d[, k, k]) or (a·b, c·d·k·k) for flat convs.

    The scale multiplies the smaller half before the product (no extra pass over ΔW).
    """
    w1, w2 = rebuild_w1(f), rebuild_w2(f)
    if scale != 1.0:
        if w1.numel() <= w2.numel():
            w1 = w1 * scale
        else:
            w2 = w2 * scale
    return kron(w1, w2)


def _half_terms(full, a, b, t) -> tuple[int, tuple[torch.Tensor, ...]]:
    """(terms summed per entry, tensors) of one half: W, a @ b, or the Tucker chain."""
    if full is not None:
        return 1, (full,)
    if t is not None:
        return t.shape[0] * t.shape[1], (a, t, b)
    return b.shape[0], (a, b)


def max_abs_bound(f: LoKrFactors, scale: float = 1.0) -> float:
    """An upper bound of max |ΔW| = |scale| · max|W1| · max|W2| from the factors alone."""
    (n1, ts1), (n2, ts2) = _half_terms(f.w1, f.w1_a, f.w1_b, f.t1), \
        _half_terms(f.w2, f.w2_a, f.w2_b, f.t2)
    return magnitude_bound(scale, n1 * n2, *ts1, *ts2)


def bypass_diff(x: torch.Tensor, f: LoKrFactors, layer: LayerGeometry,
                scale: float = 1.0) -> torch.Tensor:
    """scale · (W1 ⊗ W2) x without forming the Kronecker product (SPEC §3 cost note).

    Linear, x (..., c·d) seen as X (n, c, d): (W1 ⊗ W2) vec(X) = vec(W1 · X · W2ᵀ), two products
    in the cheaper order (one is a single large GEMM over the d axis, the other a batch over n).
    Conv, x (B, c·d, *spatial): the c groups of d channels go through W2 (b, d, *k) with the
    layer's kernel as a batch of B·c, then W1 mixes the groups: (B, a·b, *spatial'). (A file
    whose W1 does not split the input channels gets the Kronecker product applied as a weight.)
    W2 is rebuilt from its factors (full, a @ b, or Tucker: small) and the scale goes on the
    smaller half.
    """
    w1, w2 = rebuild_w1(f), rebuild_w2(f)
    if scale != 1.0:
        if w1.numel() <= w2.numel():
            w1 = w1 * scale
        else:
            w2 = w2 * scale
    (a, c), b = w1.shape[:2], w2.shape[0]
    w1 = w1.reshape(a, c)
    if layer.conv:
        d = layer.in_features // c
        if d * c != layer.in_features or w2[0].numel() != d * layer.kernel_numel:
            # W1's columns do not split the input channels (a flat ΔW factorised across the
            # kernel): not a grouped convolution, so apply the Kronecker product itself
            return layer.kernel_op(x, kron(w1, w2.reshape(b, -1)))
        batch, spatial = x.shape[0], x.shape[2:]
        h = layer.kernel_op(x.reshape(batch * c, d, *spatial), w2.reshape(b, d, *layer.kernel))
        out_spatial = h.shape[2:]
        z = torch.matmul(w1, h.reshape(batch, c, -1))
        return z.reshape(batch, a * b, *out_spatial)
    w2 = w2.reshape(b, -1)
    d = w2.shape[1]
    lead = x.shape[:-1]
    n = x.numel() // (c * d)
    xs = x.reshape(n, c, d)
    if c * b * (d + a) <= a * d * (c + b):  # W2 over d first, then W1 over c
        y = torch.matmul(xs.reshape(n * c, d), w2.transpose(0, 1)).reshape(n, c, b)
        z = torch.matmul(w1, y)
    else:  # W1 over c first, then W2 over d
        y = torch.matmul(w1, xs)
        z = torch.matmul(y.reshape(n * a, d), w2.transpose(0, 1))
    return z.reshape(*lead, a * b)


def bypass_linear(x: torch.Tensor, f: LoKrFactors, scale: float = 1.0) -> torch.Tensor:
    """ΔW x for a Linear layer without building ΔW: x (..., c·d) → (..., a·b) (`bypass_diff`)."""
    w1_shape, w2_shape = _half_shape(f.w1, f.w1_a, f.w1_b), _half_shape(f.w2, f.w2_a, f.w2_b)
    layer = LayerGeometry.linear(w1_shape[0] * w2_shape[0], w1_shape[1] * w2_shape[1])
    return bypass_diff(x, f, layer, scale)


def _half_shape(full, a, b) -> tuple[int, int]:
    return tuple(full.shape[:2]) if full is not None else (a.shape[0], b.shape[1])


def _half_norm_sq(full, a, b, t) -> float:
    """‖W‖² of one half: full, a @ b (two R×R Grams) or Tucker (aᵀ · core-with-b), unformed."""
    if full is not None:
        return float(full.to(GRAM_DTYPE).square().sum())
    if t is not None:
        return product_norm_sq(a.transpose(0, 1), tucker_inner(t, b))
    return product_norm_sq(a, b)


def frobenius_sq(f: LoKrFactors, scale: float = 1.0) -> float:
    """‖scale · W1 ⊗ W2‖² = scale² · ‖W1‖² · ‖W2‖² (Kronecker), each half from its factors."""
    return scale * scale * _half_norm_sq(f.w1, f.w1_a, f.w1_b, f.t1) \
        * _half_norm_sq(f.w2, f.w2_a, f.w2_b, f.t2)


@dataclass
class LoKrModule(AdapterModule):
    algo = "lokr"
    diff_weight = staticmethod(diff_weight)
    frobenius_sq = staticmethod(frobenius_sq)
    max_abs_bound = staticmethod(max_abs_bound)
    bypass_diff = staticmethod(bypass_diff)
    tensor_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_t1",
                    "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    lokr_w1: TensorRef | None = None
    lokr_w1_a: TensorRef | None = None
    lokr_w1_b: TensorRef | None = None
    lokr_t1: TensorRef | None = None
    lokr_w2: TensorRef | None = None
    lokr_w2_a: TensorRef | None = None
    lokr_w2_b: TensorRef | None = None
    lokr_t2: TensorRef | None = None

    def __post_init__(self) -> None:
        self._w1_shape = self._check_half(1)
        self._w2_shape = self._check_half(2)

    def _check_half(self, i: int) -> tuple[int, ...]:
        full: TensorRef | None = getattr(self, f"lokr_w{i}")
        a: TensorRef | None = getattr(self, f"lokr_w{i}_a")
        b: TensorRef | None = getattr(self, f"lokr_w{i}_b")
        t: TensorRef | None = getattr(self, f"lokr_t{i}")
        key = f"{self.name}.lokr_w{i}"
        if full is not None:
            if a is not None or b is not None or t is not None:
                raise AdapterError(f"both lokr_w{i} and its factors are present", file=self.path,
                                   key=key)
            if full.ndim < 2 or 0 in full.shape:
                raise AdapterError(f"bad shape {list(full.shape)}", file=self.path, key=full.key)
            return full.shape
        if a is None or b is None:
            missing = f"lokr_w{i}_a" if a is None else f"lokr_w{i}_b"
            raise AdapterError(f"LoKr module '{self.name}' has neither lokr_w{i} nor {missing}",
                               file=self.path, key=f"{self.name}.{missing}")
        for ref in (a, b):
            if ref.ndim < 2 or 0 in ref.shape:
                raise AdapterError(f"bad shape {list(ref.shape)}", file=self.path, key=ref.key)
        if t is not None and i == 1:
            raise AdapterError("a Tucker W1 (lokr_t1) is not supported", file=self.path, key=t.key)
        if t is not None:
            if t.ndim < 3 or a.ndim != 2 or b.ndim != 2 or t.shape[0] != a.shape[0] \
                    or t.shape[1] != b.shape[0]:
                raise AdapterError(f"Tucker core {list(t.shape)} does not fit {list(a.shape)} / "
                                   f"{list(b.shape)}", file=self.path, key=t.key)
            return (a.shape[1], b.shape[1], *t.shape[2:])
        if a.ndim != 2 or a.shape[1] != b.shape[0]:
            raise AdapterError(f"rank mismatch: {a.key} is {list(a.shape)}, {b.key} is "
                               f"{list(b.shape)}", file=self.path, key=b.key)
        return (a.shape[0], *b.shape[1:])

    @property
    def w1_full(self) -> bool:
        return self.lokr_w1 is not None

    @property
    def w2_full(self) -> bool:
        return self.lokr_w2 is not None

    @property
    def tucker(self) -> bool:
        return self.lokr_t2 is not None or self.lokr_t1 is not None

    @property
    def rank(self) -> int | None:
        """R of the decomposed half (w2 first); None when both halves are full (scale 1)."""
        if not self.w2_full:
            return self.lokr_w2_b.shape[0]
        if not self.w1_full:
            return self.lokr_w1_b.shape[0]
        return None

    @property
    def w1_shape(self) -> tuple[int, ...]:
        return self._w1_shape

    @property
    def w2_shape(self) -> tuple[int, ...]:
        return self._w2_shape

    @property
    def natural_shape(self) -> tuple[int, ...]:
        (a, c, *_), w2 = self._w1_shape, self._w2_shape
        b = w2[0]
        if len(w2) > 2:
            return (a * b, c * w2[1], *w2[2:])
        return (a * b, c * math.prod(w2[1:]))

    def factor_hint(self) -> int | str:
        """The sd-scripts `factor` that explains W1's shape: -1 when it is the default split."""
        a, c = self._w1_shape[:2]
        out = a * self._w2_shape[0]
        if factorization(out, -1)[0] == a:
            return -1
        return a if a == c else f"{a}x{c}"

    def _build_factors(self, ld) -> LoKrFactors:
        return LoKrFactors(*(ld(getattr(self, n)) for n in self.tensor_names))

    def describe(self) -> dict:
        return {
            "w1": "full" if self.w1_full else "decomposed",
            "w2": "full" if self.w2_full else ("tucker" if self.lokr_t2 is not None else "decomposed"),
            "w1_shape": list(self._w1_shape[:2]),
            "w2_shape": list(self._w2_shape),
            "factor": self.factor_hint(),
        }
