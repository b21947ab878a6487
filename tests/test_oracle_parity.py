"""ΔW for random factors of every variant equals lycoris-lora 4.1.3's functional `diff_weight`
(float64: 1e-10, float32: 1e-5 relative), except where SPEC §5 lists a defect of that library:
there the test states the correct value and pins the library's deviation."""

from __future__ import annotations

import pytest
import torch
from helpers import rel_err
from lycoris.functional import general as ly_general
from lycoris.functional import locon as ly_locon
from lycoris.functional import loha as ly_loha
from lycoris.functional import lokr as ly_lokr

from lycoris_core.algos import dora, factorization, loha, lokr, lora

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [torch.float64, torch.float32]


_SEED = [0]


def rnd(*shape, dtype):
    """Seeded normal values (a new seed per call), made in float64 then cast."""
    _SEED[0] += 1
    g = torch.Generator().manual_seed(_SEED[0])
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def oracle(fn, *args, **kw):
    """Run the oracle on its eager torch path (no fused kernels)."""
    return fn(*args, backend="torch", **kw)


# ---------------------------------------------------------------------------------------- LoHa
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 48), (32, 16, 1, 1), (24, 20, 3, 3)], ids=["linear", "conv1x1", "conv_flat"])
def test_loha_flat(dtype, shape):
    o, i, *k = shape
    r, scale = 4, 0.75
    ksz = 1 if not k else k[0] * k[1]
    w1a, w1b = rnd(o, r, dtype=dtype), rnd(r, i * ksz, dtype=dtype)
    w2a, w2b = rnd(o, r, dtype=dtype), rnd(r, i * ksz, dtype=dtype)
    ours = loha.diff_weight(loha.LoHaFactors(w1a, w1b, w2a, w2b), scale).reshape(shape)
    ref = oracle(ly_loha.diff_weight, w1b.reshape(r, i, *k), w1a, w2b.reshape(r, i, *k), w2a, None, None, gamma=scale)
    assert ref.shape == ours.shape
    assert rel_err(ours, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_loha_tucker(dtype):
    o, i, r, k = 20, 12, 4, 3
    f = loha.LoHaFactors(rnd(r, o, dtype=dtype), rnd(r, i, dtype=dtype), rnd(r, o, dtype=dtype),
                         rnd(r, i, dtype=dtype), rnd(r, r, k, k, dtype=dtype), rnd(r, r, k, k, dtype=dtype))
    ours = loha.diff_weight(f, 0.5)
    ref = oracle(ly_loha.diff_weight, f.w1_b, f.w1_a, f.w2_b, f.w2_a, f.t1, f.t2, gamma=0.5)
    assert ours.shape == (o, i, k, k)
    assert rel_err(ours, ref) < TOL[dtype]


# ---------------------------------------------------------------------------------------- LoKr
def lokr_case(kind: str, dtype, r: int = 4):
    """Factors for (O, I[, k, k]) = (40, 48[, 3, 3]) at the default factorization."""
    (a, b), (c, d), k = factorization(40), factorization(48), 3
    f = lokr.LoKrFactors()
    if kind == "decompose_both":
        f.w1_a, f.w1_b = rnd(a, r, dtype=dtype), rnd(r, c, dtype=dtype)
    else:
        f.w1 = rnd(a, c, dtype=dtype)
    if kind in ("w2_low", "decompose_both"):
        f.w2_a, f.w2_b = rnd(b, r, dtype=dtype), rnd(r, d, dtype=dtype)
    elif kind == "both_full":
        f.w2 = rnd(b, d, dtype=dtype)
    elif kind == "conv_full":
        f.w2 = rnd(b, d, k, k, dtype=dtype)
    elif kind == "conv_flat":
        f.w2_a, f.w2_b = rnd(b, r, dtype=dtype), rnd(r, d * k * k, dtype=dtype)
    elif kind == "conv_tucker":
        f.w2_a, f.w2_b, f.t2 = rnd(r, b, dtype=dtype), rnd(r, d, dtype=dtype), rnd(r, r, k, k, dtype=dtype)
    return f, (a, b, c, d, k)


def _oracle_lokr(f: lokr.LoKrFactors, alpha, dims):
    a, b, c, d, k = dims
    w2b = f.w2_b
    if w2b is not None and f.t2 is None and w2b.shape[1] == d * k * k:  # lycoris keeps conv w2_b 4-D
        w2b = w2b.reshape(w2b.shape[0], d, k, k)
    return oracle(ly_lokr.diff_weight, f.w1, f.w1_a, f.w1_b, f.w2, f.w2_a, w2b, f.t2, gamma=alpha)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["w2_low", "decompose_both", "both_full", "conv_full", "conv_flat"])
def test_lokr(dtype, kind):
    r, alpha = 4, 2.0
    f, dims = lokr_case(kind, dtype, r)
    a, b, c, d, k = dims
    both_full = f.w1 is not None and f.w2 is not None
    scale = 1.0 if both_full else alpha / r
    ours = lokr.diff_weight(f, scale)
    if kind.startswith("conv"):
        ours = ours.reshape(a * b, c * d, k, k)
    ref = _oracle_lokr(f, alpha, dims)
    assert ref.shape == ours.shape
    assert rel_err(ours, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_lokr_tucker_oracle_reads_rank_from_wrong_axis(dtype):
    """SPEC §5: lycoris 4.1.3 takes the LoKr Tucker rank from `w2_a.shape[1]` (= b in the Tucker
    layout (R, b)), so its scale is alpha/b instead of alpha/R. Correct: alpha/R."""
    r, alpha = 4, 2.0
    f, (a, b, c, d, k) = lokr_case("conv_tucker", dtype, r)
    assert b != r
    ours = lokr.diff_weight(f, alpha / r)
    ref = _oracle_lokr(f, alpha, (a, b, c, d, k))
    # The shapes and the Kronecker structure agree; only the scale differs, by exactly b / R.
    assert rel_err(ours, ref * (b / r)) < TOL[dtype]
    assert rel_err(ours, ref) > 0.1
    # Independently of the oracle: entry-wise definition ΔW[i·b+j, p·d+q] = s·W1[i,p]·W2[j,q].
    w2 = torch.einsum("i j ..., i p, j r -> p r ...", f.t2, f.w2_a, f.w2_b)
    i, j, p, q = 1, 2, 3, 1
    assert float(ours[i * b + j, p * d + q, 1, 2]) == pytest.approx(
        alpha / r * float(f.w1[i, p] * w2[j, q, 1, 2]), rel=1e-5)


def test_lokr_bypass_equals_materialised():
    f, (a, b, c, d, k) = lokr_case("w2_low", torch.float64)
    x = rnd(3, 7, c * d, dtype=torch.float64)
    dw = lokr.diff_weight(f, 0.5)
    assert rel_err(lokr.bypass_linear(x, f, 0.5), x @ dw.T) < 1e-12


# ---------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["linear", "conv", "tucker"])
def test_lora(dtype, kind):
    o, i, r, k = 24, 16, 4, 3
    if kind == "linear":
        up, down, mid = rnd(o, r, dtype=dtype), rnd(r, i, dtype=dtype), None
    elif kind == "conv":
        up, down, mid = rnd(o, r, 1, 1, dtype=dtype), rnd(r, i, k, k, dtype=dtype), None
    else:
        up, down = rnd(o, r, 1, 1, dtype=dtype), rnd(r, i, 1, 1, dtype=dtype)
        mid = rnd(r, r, k, k, dtype=dtype)
    ours = lora.diff_weight(lora.LoRAFactors(up, down, mid), 0.25)
    ref = oracle(ly_locon.diff_weight, down, up, mid, gamma=0.25)
    assert rel_err(ours.reshape(ref.shape), ref) < TOL[dtype]


# ---------------------------------------------------------------------------------------- DoRA
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("on_out", [True, False])
@pytest.mark.parametrize("shape", [(24, 16), (24, 16, 3, 3)])
def test_dora(dtype, on_out, shape):
    w0, dw = rnd(*shape, dtype=dtype), 0.1 * rnd(*shape, dtype=dtype)
    axis_len = shape[0] if on_out else shape[1]
    mshape = [axis_len if d == (0 if on_out else 1) else 1 for d in range(len(shape))]
    m = (1 + 0.1 * rnd(*mshape, dtype=dtype)).abs()
    ours = dora.apply_dora(w0, dw, m)
    ref = oracle(ly_general.weight_decompose, w0 + dw, m, 1, on_out)
    assert rel_err(ours, ref) < TOL[dtype]


def test_dora_strength_interpolates():
    w0, dw = rnd(8, 6, dtype=torch.float64), 0.1 * rnd(8, 6, dtype=torch.float64)
    m = rnd(8, 1, dtype=torch.float64).abs() + 0.5
    full = dora.apply_dora(w0, dw, m)
    assert rel_err(dora.apply_dora(w0, dw, m, 0.3) - w0, 0.3 * (full - w0)) < 1e-12


def test_factorization_table():
    """SPEC §2 values."""
    table = {320: (16, 20), 640: (20, 32), 768: (24, 32), 1024: (32, 32), 1280: (32, 40),
             2048: (32, 64), 3072: (48, 64), 8192: (64, 128), 68: (4, 17), 127: (1, 127)}
    for dim, pair in table.items():
        assert factorization(dim) == pair == ly_general.factorization(dim, -1)
    assert factorization(512, 4) == (4, 128)
    assert factorization(64, 16) == (4, 16)
    for dim in range(1, 400):
        for fac in (-1, 2, 3, 4, 8, 16, 7):
            assert factorization(dim, fac) == ly_general.factorization(dim, fac), (dim, fac)


def test_lycoris_merge_path_scales_twice():
    """SPEC §5: lycoris 4.1.3's `get_diff_weight`/`get_merged_weight` apply alpha/R twice; its forward
    pass is right. We match the forward; the merge helpers are off by exactly the scale (0.5 here)."""
    from lycoris.modules.lokr import LokrModule

    torch.manual_seed(0)
    layer = torch.nn.Linear(640, 320, bias=False).double()
    mod = LokrModule("lora_unet_x", layer, lora_dim=4, alpha=2, decompose_both=True).double()
    with torch.no_grad():
        for p in mod.parameters():
            if p is not layer.weight:
                p.normal_()
    mod.apply_to()
    f = lokr.LoKrFactors(w1_a=mod.lokr_w1_a.detach(), w1_b=mod.lokr_w1_b.detach(),
                         w2_a=mod.lokr_w2_a.detach(), w2_b=mod.lokr_w2_b.detach())
    ours = lokr.diff_weight(f, 2 / 4)
    x = rnd(5, 640, dtype=torch.float64)
    with torch.no_grad():
        forward_delta = mod.forward(x) - x @ layer.weight.T
        merged = mod.get_merged_weight()[0] - layer.weight
    assert rel_err(x @ ours.T, forward_delta) < 1e-10      # forward: same as ours
    assert rel_err(merged, 0.5 * ours) < 1e-10              # merge: scale applied twice
