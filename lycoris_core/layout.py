"""The readers' LoKr layout rule (SPEC §5), decided in one place for every writer.

sd-scripts and LyCORIS 4.1.3 do not read a LoKr module's layout from the file: they rebuild it
from the rank R and the factor shapes, then copy the tensors in. With
`(a, b) = factorization(O)`, `(c, d) = factorization(I)`:

- W2 (b, d[, k, k]) is a full `lokr_w2` when `R >= max(b, d) / 2`, else `lokr_w2_a/_b`
  (or the Tucker triple). For k×k convs the same test, ignoring the kernel size.
- W1 (a, c) is a full `lokr_w1` unless decompose_both and `R < max(a, c) / 2`. LyCORIS only
  recognises decompose_both when W2 is decomposed too, so a decomposed W1 beside a full W2 is
  never written (it cannot occur with `factorization`'s smaller-first split anyway).

A file that stores low-rank W2 where the rule says full fails to load in LyCORIS (the whole
file) and loads as ΔW = 0 for that module in sd-scripts. Storing a full half where the rule says
low rank is read right by both (a file whose halves are both full is "full matrix" mode, scale 1).
Every writer (training save, merge, resize, portable convert) asks `lokr_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .algos.lokr import LoKrModule, factorization


@dataclass(frozen=True)
class LoKrLayout:
    """Which halves of a LoKr module are stored as full matrices."""

    w1_full: bool
    w2_full: bool

    @property
    def both_full(self) -> bool:
        """Both halves full: readers use scale 1 whatever alpha says."""
        return self.w1_full and self.w2_full


@dataclass(frozen=True)
class LoKrDims:
    """The Kronecker split of a layer: O = a·b, I = c·d (kernel k×k kept apart)."""

    a: int
    b: int
    c: int
    d: int

    @classmethod
    def of(cls, out_dim: int, in_dim: int, factor: int = -1) -> LoKrDims:
        (a, b), (c, d) = factorization(out_dim, factor), factorization(in_dim, factor)
        return cls(a, b, c, d)


def w2_full_required(rank: int, b: int, d: int) -> bool:
    """The readers' W2 test: full when `R >= max(b, d) / 2` (integer-exact: 2R ≥ max)."""
    return 2 * rank >= max(b, d)


def w2_full_shape(b: int, d: int, kernel: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Shape of a full `lokr_w2`: (b, d, k, k) for a k×k conv, (b, d) for Linear and 1×1 conv.

    1×1 convs are where the two readers disagree: sd-scripts builds them like Linear, (b, d), and
    fails to load (b, d, 1, 1); LyCORIS 4.1.3 builds (b, d, 1, 1) and cannot copy (b, d) into it.
    The pack writes sd-scripts' layout (its training format); `readers` reports the LyCORIS gap.
    """
    return (b, d, *kernel) if any(k != 1 for k in kernel) else (b, d)


def lokr_layout(dims: LoKrDims, rank: int, decompose_both: bool = False) -> LoKrLayout:
    """The layout readers rebuild for rank `rank` (SPEC §5): see the module docstring."""
    w2_full = w2_full_required(rank, dims.b, dims.d)
    w1_full = not decompose_both or 2 * rank >= max(dims.a, dims.c) or w2_full
    return LoKrLayout(w1_full, w2_full)


def module_dims(m: LoKrModule) -> LoKrDims:
    """(a, b, c, d) as stored in a file's module (W1 (a, c), W2 (b, d, …))."""
    (a, c), (b, d) = m.w1_shape[:2], m.w2_shape[:2]
    return LoKrDims(a, b, c, d)  # a flat conv's 2-D W2 gives d·k·k here (see layout_violation)


def reader_rank(m: LoKrModule) -> int | None:
    """The rank sd-scripts / LyCORIS build the module with: W1's when it is decomposed, else
    W2's (Tucker: `w2_a (R, b)`), None in full-matrix mode."""
    if not m.w1_full:
        return m.lokr_w1_a.shape[1]
    if not m.w2_full:
        return m.lokr_w2_a.shape[0] if m.lokr_t2 is not None else m.lokr_w2_a.shape[1]
    return None


def layout_violation(m: LoKrModule, layer_shape: tuple[int, ...] | None = None) -> str | None:
    """Why a file's LoKr module breaks the readers' layout rule, or None when it follows it.

    `layer_shape` (the patched weight's shape) gives the true d of a flat conv, whose `w2_b` holds
    d·k·k columns; without it a 2-D `w2_b` is taken as a Linear one.
    """
    r = reader_rank(m)
    if r is None:
        return None
    dims = module_dims(m)
    if layer_shape is not None and len(layer_shape) > 2 and len(m.w2_shape) == 2:
        dims = LoKrDims(dims.a, dims.b, dims.c, layer_shape[1] // dims.c)
    want = lokr_layout(dims, r, decompose_both=not m.w1_full and not m.w2_full)
    if not m.w2_full and want.w2_full:
        return (f"low-rank lokr_w2_a/_b at rank {r}, where readers expect a full lokr_w2 "
                f"(R ≥ max({dims.b}, {dims.d})/2)")
    if not m.w1_full and want.w1_full:
        return (f"decomposed lokr_w1_a/_b at rank {r}, where readers expect a full lokr_w1 "
                f"(R ≥ max({dims.a}, {dims.c})/2 or W2 full)")
    if not m.w1_full and not m.w2_full and m.lokr_w2_b.shape[0] != r:
        return f"lokr_w1 rank {r} and lokr_w2 rank {m.lokr_w2_b.shape[0]} differ"
    return None

