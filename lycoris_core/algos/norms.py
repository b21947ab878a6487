"""‖ΔW‖² from an adapter's factors without forming ΔW (the effect map, `lycoris_core.effect`).

Two identities, in float64 (the Gram entries have both signs; float64 keeps the sum exact to
far below the 1e-5 the map is checked at):

- low-rank product, a (O, R), b (R, N): ‖a b‖² = tr(aᵀa · b bᵀ) = Σ (aᵀa) ⊙ (b bᵀ), cost (O + N)·R².
- Hadamard of two products (LoHa), a1 (O, R1), b1 (R1, N), a2 (O, R2), b2 (R2, N):
  entry (o, n) of ΔW is (a1ₒ·b1ₙ)(a2ₒ·b2ₙ), so ΔW = KA KBᵀ with the row-wise Khatri–Rao products
  KA = [a1ₒ ⊗ a2ₒ] (O, R1·R2) and KB = [b1ₙ ⊗ b2ₙ] (N, R1·R2), and
  ‖ΔW‖² = Σ_{(i,j),(k,l)} GA[(i,j),(k,l)] · GB[(i,j),(k,l)] with the R1·R2-square Grams
  GA = KAᵀKA, GA[(i,j),(k,l)] = Σₒ a1[o,i] a1[o,k] a2[o,j] a2[o,l], and GB = KBᵀKB likewise
  over n. (Not (a1ᵀa1)⊗(a2ᵀa2): the rows pair a1ₒ with a2ₒ of the same o, so the Gram does
  not split.) GA is symmetric in i↔k and in j↔l, so only i ≤ k, j ≤ l are computed: with
  P[o, (i≤k)] = a1[o,i]·a1[o,k] and Q[o, (j≤l)] = a2[o,j]·a2[o,l], GA' = PᵀQ is one GEMM of
  O·s1·s2 (s = R(R+1)/2), the off-diagonal pairs weighted 2. Cost (O + N)·s1·s2.

Forming ΔW costs O·N·(R1 + R2) plus passes over O·N values, so for a high LoHa rank and a small
layer the Gram sum (in float64) can cost more than ΔW: `hadamard_norm_sq` then builds ΔW in row
blocks that stay in cache, in float32 like every ΔW of the pack, and adds up their norms (ΔW is
never whole in memory). At rank 16 on SDXL's layers the two routes cost about the same.
"""

from __future__ import annotations

import torch

GRAM_DTYPE = torch.float64
ROW_BLOCK = 1 << 18
"""Values per row block of the dense route (1 MiB in float32: the block stays in cache)."""


def product_norm_sq(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a b‖² for a (O, R), b (R, N) (further dims of b flattened), from the two R×R Grams."""
    a = a.reshape(a.shape[0], -1).to(GRAM_DTYPE)
    b = b.reshape(b.shape[0], -1).to(GRAM_DTYPE)
    return float(((a.T @ a) * (b @ b.T)).sum())


def _pair_products(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """m (N, R) → (P (N, s), w (s,)): P[:, (i≤k)] = m[:, i]·m[:, k], w = 1 on i = k, 2 off it."""
    r = m.shape[1]
    i, k = torch.triu_indices(r, r, device=m.device)
    w = torch.where(i == k, 1.0, 2.0).to(GRAM_DTYPE)
    return m[:, i] * m[:, k], w


def _symmetric_gram(x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x1 (N, R1), x2 (N, R2) → (G (s1, s2), weights (s1, s2)): G = Σₙ P1ₙ ⊗ P2ₙ over i≤k, j≤l."""
    p, w1 = _pair_products(x1)
    q, w2 = _pair_products(x2)
    return p.T @ q, w1[:, None] * w2[None, :]


GRAM_WEIGHT = 20.0
"""What one multiply-add of the Gram route costs in float32 ΔW multiply-adds: float64, and the
pair products are gathers. Measured on 2-core AVX-512 CPUs at 1 thread (R 2–16, 640² and
1280×11520 layers): the routes cost the same where this weight makes their costs equal."""


def gram_cost(o: int, n: int, r1: int, r2: int) -> float:
    """Cost of the Gram route of `hadamard_norm_sq`, in float32 ΔW multiply-adds."""
    return GRAM_WEIGHT * (o + n) * (r1 * (r1 + 1) // 2) * (r2 * (r2 + 1) // 2)


def dense_cost(o: int, n: int, r1: int, r2: int) -> float:
    """Cost of the row-block route in float32 multiply-adds: the two products plus the
    element-wise passes (each counted as 4, memory-bound)."""
    return float(o * n * (r1 + r2 + 8))


def hadamard_norm_sq(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                     method: str | None = None) -> float:
    """‖(a1 b1) ⊙ (a2 b2)‖² for a* (O, R*), b* (R*, N) (module docstring).

    `method`: "gram" (the Khatri–Rao Gram sum, float64), "dense" (ΔW in row blocks of
    `ROW_BLOCK` values in the factors' dtype, float32 or better, each row's norm added in
    float64) or None: the cheaper by `gram_cost` / `dense_cost`."""
    a1, a2, b1, b2 = (t.reshape(t.shape[0], -1) for t in (a1, a2, b1, b2))
    o, n, r1, r2 = a1.shape[0], b1.shape[1], a1.shape[1], a2.shape[1]
    if method is None:
        method = "gram" if gram_cost(o, n, r1, r2) <= dense_cost(o, n, r1, r2) else "dense"
    if method == "gram":
        a1, a2, b1, b2 = (t.to(GRAM_DTYPE) for t in (a1, a2, b1, b2))
        ga, weights = _symmetric_gram(a1, a2)
        gb, _ = _symmetric_gram(b1.T, b2.T)
        return float((ga * gb * weights).sum())
    if method != "dense":
        raise ValueError(f"unknown method {method!r}; expected 'gram' or 'dense'")
    dtype = torch.promote_types(a1.dtype, torch.float32)
    a1, a2, b1, b2 = (t.to(dtype) for t in (a1, a2, b1, b2))
    rows = max(1, ROW_BLOCK // max(1, n))
    block = torch.empty(min(rows, o), n, dtype=dtype, device=a1.device)
    tmp = torch.empty_like(block)
    total = 0.0
    for r0 in range(0, o, rows):
        r1_ = min(o, r0 + rows)
        x, t = block[: r1_ - r0], tmp[: r1_ - r0]
        torch.mm(a1[r0:r1_], b1, out=x)
        torch.mm(a2[r0:r1_], b2, out=t)
        rows_sq = torch.linalg.vector_norm(x.mul_(t), dim=1).to(GRAM_DTYPE).square_()
        total += float(rows_sq.sum())  # rows summed in float64: float32 drifts by ~1e-5 here
    return total
