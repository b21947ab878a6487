"""LoHa: ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), optionally Tucker-chained for k×k convs.

Layouts (O out, I in, R rank, k kernel):
    linear / conv 1×1 / conv flat:  w*_a (O, R), w*_b (R, I·k·k)
    conv Tucker:                    w*_a (R, O) (transposed), w*_b (R, I), t* (R, R, k, k)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import AdapterError
from . import buffers
from .base import AdapterModule, Magnitude, TensorRef
from .layer import LayerGeometry
from .norms import hadamard_norm_sq


@dataclass
class LoHaFactors:
    """The loaded tensors of one LoHa module."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None


_BLOCK_BYTES = 1 << 20
"""Row blocks of the two products are this size (cache-sized), so ΔW is written once and no
ΔW-sized temporary is made."""
_WHOLE_MAX_BYTES = 16 << 20
"""With several threads, a ΔW up to this size is built from the whole products (fewer thread-pool
synchronisations); above it, in row blocks (no second ΔW-sized buffer)."""


def tucker_inner(t: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """Core (R, R', k, k) contracted with w_b (R', I) → (R, I·k·k), ready for `w_a.T @ ·`."""
    return torch.einsum("i j ..., j r -> i r ...", t, w_b).reshape(t.shape[0], -1)


def rebuild_tucker(t: torch.Tensor, w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """(R,R,k,k) core with w_a (R,O) and w_b (R,I) → (O, I, k, k); one GEMM at full size."""
    out = w_a.transpose(0, 1) @ tucker_inner(t, w_b)
    return out.reshape(w_a.shape[1], w_b.shape[1], *t.shape[2:])


def magnitude_bound(scale: float, inner: int, *ts: torch.Tensor | Magnitude) -> float:
    """|scale| · inner · Π max|t|: a bound on every entry of a product chain of the `ts` whose
    contracted dimensions have `inner` terms in all (R for a @ b, R·R' for a Tucker chain).
    ΔW's overflow check is skipped when this is far below the dtype's largest value. A `ts` entry
    may be a `Magnitude` (`AdapterModule.magnitudes`: max|t| known, no tensor read)."""
    return abs(scale) * inner * math.prod(
        t.max_abs if isinstance(t, Magnitude) else float(t.detach().abs().max()) for t in ts)


def needs_grad(*ts: torch.Tensor) -> bool:
    """Whether autograd will record an op on `ts` (then no `out=` / in-place tricks)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def hadamard_of_products(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                         scale: float = 1.0) -> torch.Tensor:
    """scale · (a1 @ b1) ⊙ (a2 @ b2) for a* (O, R), b* (R, N) → (O, N).

    The scale goes on the small a1. With one CPU thread the rows are done in blocks of
    `_BLOCK_BYTES`: each block of a1 @ b1 is written into ΔW and multiplied by the same block of
    a2 @ b2 while that is still in cache, so ΔW is written once and the only temporary is one
    block. With several threads each block is a synchronisation point of the thread pool
    (measured up to 2.6× slower than the whole products on a busy 2-core machine), so a ΔW of up
    to `_WHOLE_MAX_BYTES` is built from the whole products, the second in a ΔW-sized temporary.
    ΔW and that temporary come from `buffers.empty` (pooled): from glibc's heap, freeing both made
    it trim and fault them in again on every call (8192 faults per 2048² ΔW).
    """
    if scale != 1.0:
        a1 = a1 * scale
    if needs_grad(a1, b1, a2, b2):
        return (a1 @ b1) * (a2 @ b2)
    rows = max(1, _BLOCK_BYTES // max(1, b1.shape[1] * b1.element_size()))
    out = buffers.empty((a1.shape[0], b1.shape[1]), b1.dtype, b1.device)
    whole_ok = torch.get_num_threads() > 1 and out.numel() * out.element_size() <= _WHOLE_MAX_BYTES
    if a1.device.type != "cpu" or rows >= a1.shape[0] or whole_ok:
        tmp = buffers.empty((a2.shape[0], b2.shape[1]), b2.dtype, b2.device)
        return torch.mm(a1, b1, out=out).mul_(torch.mm(a2, b2, out=tmp))
    tmp = torch.empty(rows, b2.shape[1], dtype=b2.dtype, device=b2.device)
    for r0 in range(0, a1.shape[0], rows):
        r1 = min(a1.shape[0], r0 + rows)
        block, t = out[r0:r1], tmp[: r1 - r0]
        torch.mm(a1[r0:r1], b1, out=block)
        torch.mm(a2[r0:r1], b2, out=t)
        block.mul_(t)
    return out


def diff_weight(f: LoHaFactors, scale: float = 1.0) -> torch.Tensor:
    """ΔW (Tucker: (O,I,k,k); otherwise (O, I·k·k)). Autograd-friendly: no custom backward."""
    if f.t1 is not None and f.t2 is not None:
        out = hadamard_of_products(f.w1_a.transpose(0, 1), tucker_inner(f.t1, f.w1_b),
                                   f.w2_a.transpose(0, 1), tucker_inner(f.t2, f.w2_b), scale)
        return out.reshape(f.w1_a.shape[1], f.w1_b.shape[1], *f.t1.shape[2:])
    flat = [w.reshape(w.shape[0], -1) for w in (f.w1_a, f.w1_b, f.w2_a, f.w2_b)]
    return hadamard_of_products(*flat, scale)


# --- applying ΔW to activations without forming it (bypass) ------------------------------------

def khatri_rao(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri–Rao product: a1 (N, R1), a2 (N, R2) → (N, R1·R2), row n = a1[n] ⊗ a2[n].

    (a1 @ b1) ⊙ (a2 @ b2) = khatri_rao(a1, a2) @ khatri_rao(b1ᵀ, b2ᵀ)ᵀ: a rank-R1·R2 product."""
    return (a1.unsqueeze(2) * a2.unsqueeze(1)).reshape(a1.shape[0], -1)


STRATEGIES = ("khatri_rao", "dense")
DENSE_BLOCK_ELEMENTS = 1 << 22
"""The dense strategy builds ΔW in blocks of output rows of at most this many values (16 MiB)."""
ELEMENTWISE_COST = 4.0
"""Cost of one element-wise pass (Hadamard product) in multiply-adds of a large GEMM: such passes
are memory-bound. Measured in bench/bench_bypass.py (`loha strategy` cases)."""


def strategy_costs(f: LoHaFactors, layer: LayerGeometry, n_in: int, n_out: int) -> dict[str, float]:
    """Estimated multiply-adds of each LoHa bypass strategy for `n_in` input / `n_out` output
    positions (tokens; batch × spatial for convs).

    khatri_rao: x through the rank-R1·R2 factors (Tucker: pointwise B, the R1·R2-square core with
    the kernel, pointwise A). dense: ΔW built (row blocks), then one op of the layer's size."""
    o, k = layer.out_features, layer.kernel_numel
    i = layer.in_features
    if f.t1 is not None and f.t2 is not None:
        ra, rb = f.t1.shape[0] * f.t2.shape[0], f.t1.shape[1] * f.t2.shape[1]
        build_kr = ra * o + rb * i + ra * rb * k
        kr = build_kr + n_in * rb * i + n_out * ra * rb * k + n_out * ra * o
        build_dense = 2 * (f.t1.shape[0] * f.t1.shape[1] * k * i + o * f.t1.shape[0] * i * k)
    else:
        r = f.w1_b.shape[0] * f.w2_b.shape[0]
        kr = r * (i * k + o) + n_out * r * (i * k + o)
        build_dense = o * i * k * (f.w1_b.shape[0] + f.w2_b.shape[0])
    dense = build_dense + ELEMENTWISE_COST * o * i * k + n_out * o * i * k
    return {"khatri_rao": float(kr), "dense": float(dense)}


def choose_strategy(f: LoHaFactors, layer: LayerGeometry, n_in: int, n_out: int) -> str:
    """The cheaper of `STRATEGIES` for this layer and token count (`strategy_costs`)."""
    costs = strategy_costs(f, layer, n_in, n_out)
    return min(STRATEGIES, key=costs.__getitem__)


def bypass_diff(x: torch.Tensor, f: LoHaFactors, layer: LayerGeometry, scale: float = 1.0,
                strategy: str | None = None) -> torch.Tensor:
    """scale · ΔW x for x in the layer's input layout (Linear (..., I); conv (B, I, *spatial)).

    `strategy` (default: the cheaper by `choose_strategy`):
    - khatri_rao: ΔW = A_kr B_krᵀ with A_kr (O, R1·R2), B_kr (I·k…, R1·R2) (SPEC §5b); x goes
      through B_kr with the layer's kernel, then A_kr pointwise. Tucker: the core is
      t1 ⊗ t2 per kernel position, (R1·R2, R1'·R2', *k), between two pointwise steps.
    - dense: ΔW in blocks of output rows (at most `DENSE_BLOCK_ELEMENTS` values), each applied
      with the layer's own op; no ΔW-sized buffer beyond one block.
    """
    if strategy is None:
        strategy = choose_strategy(f, layer, layer.positions(x), layer.output_positions(x))
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown LoHa bypass strategy {strategy!r}; expected one of {STRATEGIES}")
    tucker = f.t1 is not None and f.t2 is not None
    if strategy == "khatri_rao":
        if tucker:
            a = khatri_rao(f.w1_a.transpose(0, 1), f.w2_a.transpose(0, 1))
            b = khatri_rao(f.w1_b.transpose(0, 1), f.w2_b.transpose(0, 1)).transpose(0, 1)
            core = (f.t1.unsqueeze(1).unsqueeze(3) * f.t2.unsqueeze(0).unsqueeze(2))
            core = core.reshape(a.shape[1], b.shape[0], *f.t1.shape[2:])
            h = layer.kernel_op(layer.pointwise(x, b), core)
        else:
            a = khatri_rao(f.w1_a.reshape(f.w1_a.shape[0], -1), f.w2_a.reshape(f.w2_a.shape[0], -1))
            b1, b2 = (w.reshape(w.shape[0], -1) for w in (f.w1_b, f.w2_b))
            b = (b1.unsqueeze(1) * b2.unsqueeze(0)).reshape(-1, b1.shape[1])
            h = layer.kernel_op(x, b)
        return layer.pointwise(h, a * scale if scale != 1.0 else a)
    if tucker:
        return layer.kernel_op(x, diff_weight(f, scale))
    b1, b2 = (w.reshape(w.shape[0], -1) for w in (f.w1_b, f.w2_b))
    a1, a2 = (w.reshape(w.shape[0], -1) for w in (f.w1_a, f.w2_a))
    rows = max(1, DENSE_BLOCK_ELEMENTS // max(1, b1.shape[1]))
    if rows >= a1.shape[0]:
        return layer.kernel_op(x, hadamard_of_products(a1, b1, a2, b2, scale))
    out = None
    for r0 in range(0, a1.shape[0], rows):
        r1 = min(a1.shape[0], r0 + rows)
        part = layer.kernel_op(x, hadamard_of_products(a1[r0:r1], b1, a2[r0:r1], b2, scale))
        if out is None:
            shape = list(part.shape)
            shape[layer.channel_dim] = a1.shape[0]
            out = part.new_empty(shape)
        out.narrow(layer.channel_dim, r0, r1 - r0).copy_(part)
    return out


def max_abs_bound(f: LoHaFactors, scale: float = 1.0) -> float:
    """An upper bound of max |ΔW| from the factors alone (cheap: no pass over ΔW)."""
    if f.t1 is not None and f.t2 is not None:
        inner = math.prod((*f.t1.shape[:2], *f.t2.shape[:2]))
        return magnitude_bound(scale, inner, f.w1_a, f.w1_b, f.w2_a, f.w2_b, f.t1, f.t2)
    return magnitude_bound(scale, f.w1_b.shape[0] * f.w2_b.shape[0], f.w1_a, f.w1_b, f.w2_a, f.w2_b)


def frobenius_sq(f: LoHaFactors, scale: float = 1.0, method: str | None = None) -> float:
    """‖scale · ΔW‖² by the Khatri–Rao Gram sum (`norms.hadamard_norm_sq`; row blocks of ΔW
    when those are cheaper, or as `method` says). Tucker: each core contracted with its w_b
    first, so ΔW = (w1_aᵀ · inner1) ⊙ (w2_aᵀ · inner2), the same form."""
    if f.t1 is not None and f.t2 is not None:
        parts = (f.w1_a.transpose(0, 1), tucker_inner(f.t1, f.w1_b),
                 f.w2_a.transpose(0, 1), tucker_inner(f.t2, f.w2_b))
    else:
        parts = (f.w1_a, f.w1_b, f.w2_a, f.w2_b)
    return scale * scale * hadamard_norm_sq(*parts, method=method)


@dataclass
class LoHaModule(AdapterModule):
    algo = "loha"
    diff_weight = staticmethod(diff_weight)
    frobenius_sq = staticmethod(frobenius_sq)
    max_abs_bound = staticmethod(max_abs_bound)
    bypass_diff = staticmethod(bypass_diff)
    tensor_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    hada_w1_a: TensorRef | None = None
    hada_w1_b: TensorRef | None = None
    hada_w2_a: TensorRef | None = None
    hada_w2_b: TensorRef | None = None
    hada_t1: TensorRef | None = None
    hada_t2: TensorRef | None = None

    def __post_init__(self) -> None:
        for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            if getattr(self, n) is None:
                raise AdapterError(f"LoHa module '{self.name}' has no {n}", file=self.path,
                                   key=f"{self.name}.{n}")
        if (self.hada_t1 is None) != (self.hada_t2 is None):
            missing = "hada_t2" if self.hada_t2 is None else "hada_t1"
            raise AdapterError(f"Tucker LoHa module '{self.name}' lacks {missing}",
                               file=self.path, key=f"{self.name}.{missing}")
        for half in (1, 2):
            self._check_half(half)
        o1, o2 = self._out(1), self._out(2)
        if o1 != o2:
            raise AdapterError(f"hada_w1 gives {o1} outputs, hada_w2 gives {o2}", file=self.path,
                               key=self.hada_w2_a.key)
        if self._in_numel(1) != self._in_numel(2):
            raise AdapterError("hada_w1_b and hada_w2_b disagree on the input size",
                               file=self.path, key=self.hada_w2_b.key)

    @property
    def tucker(self) -> bool:
        return self.hada_t1 is not None

    def _check_half(self, half: int) -> None:
        a: TensorRef = getattr(self, f"hada_w{half}_a")
        b: TensorRef = getattr(self, f"hada_w{half}_b")
        for ref in (a, b):
            if ref.ndim < 2 or 0 in ref.shape:
                raise AdapterError(f"expected a non-empty matrix, got shape {list(ref.shape)}",
                                   file=self.path, key=ref.key)
        if self.tucker:
            t: TensorRef = getattr(self, f"hada_t{half}")
            if t.ndim < 3 or a.ndim != 2 or b.ndim != 2:
                raise AdapterError(f"Tucker core must be (R,R,k,k), got {list(t.shape)}",
                                   file=self.path, key=t.key)
            if t.shape[0] != a.shape[0] or t.shape[1] != b.shape[0]:
                raise AdapterError(
                    f"Tucker core {list(t.shape)} does not fit {list(a.shape)} / {list(b.shape)}",
                    file=self.path, key=t.key)
        elif a.shape[1] != b.shape[0] or math.prod(a.shape[2:]) != 1:
            raise AdapterError(f"rank mismatch: {a.key} is {list(a.shape)}, {b.key} is "
                               f"{list(b.shape)}", file=self.path, key=b.key)

    def _out(self, half: int) -> int:
        a: TensorRef = getattr(self, f"hada_w{half}_a")
        return a.shape[1] if self.tucker else a.shape[0]

    def _in_numel(self, half: int) -> int:
        b: TensorRef = getattr(self, f"hada_w{half}_b")
        if self.tucker:
            t: TensorRef = getattr(self, f"hada_t{half}")
            return b.shape[1] * math.prod(t.shape[2:])
        return math.prod(b.shape[1:])

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    @property
    def natural_shape(self) -> tuple[int, ...]:
        if self.tucker:
            return (self._out(1), self.hada_w1_b.shape[1], *self.hada_t1.shape[2:])
        b = self.hada_w1_b.shape
        return (self._out(1), *b[1:]) if len(b) > 2 else (self._out(1), b[1])

    def _build_factors(self, ld) -> LoHaFactors:
        return LoHaFactors(ld(self.hada_w1_a), ld(self.hada_w1_b), ld(self.hada_w2_a),
                           ld(self.hada_w2_b), ld(self.hada_t1), ld(self.hada_t2))

    def describe(self) -> dict:
        return {"mode": "tucker" if self.tucker else "flat"}
