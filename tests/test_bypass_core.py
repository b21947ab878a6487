"""Bypass math in lycoris_core (no ComfyUI): `bypass_diff` of every algorithm and layout equals the
layer's own op with ΔW from `diff_weight` (float64 1e-12, float32 1e-5 of the output's magnitude),
agrees with lycoris-lora 4.1.3's functional `bypass_forward_diff` (its LoKr Tucker defect pinned),
and `BypassPlan` (strength, DoRA, dtypes) equals patching W0 + s·(W' − W0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from lycoris.functional import locon as ly_locon
from lycoris.functional import loha as ly_loha
from lycoris.functional import lokr as ly_lokr

import lycoris_core as lc
from lycoris_core.algos import dora, factorization, loha, lokr, lora
from lycoris_core.algos.bypass import BypassPlan
from lycoris_core.algos.layer import LayerGeometry

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
DTYPES = [torch.float64, torch.float32]
K = 3
_SEED = [100]


def rnd(*shape, dtype=torch.float64, scale=1.0):
    _SEED[0] += 1
    g = torch.Generator().manual_seed(_SEED[0])
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def layer_op(x, w, layer: LayerGeometry):
    """The reference: the layer's own op with the whole ΔW."""
    if not layer.conv:
        return F.linear(x, w.reshape(layer.weight_shape))
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[layer.spatial]
    return conv(x, w.reshape(layer.weight_shape), None, layer.stride, layer.padding, layer.dilation)


GEOMS = {
    "linear": LayerGeometry.linear(40, 48),
    "conv1x1": LayerGeometry.convolution((40, 48, 1, 1)),
    "conv3x3": LayerGeometry.convolution((40, 48, K, K), padding=1),
    "conv3x3_s2": LayerGeometry.convolution((40, 48, K, K), stride=2, padding=1),
    "conv3x3_dil": LayerGeometry.convolution((40, 48, K, K), padding=2, dilation=2),
    "conv1d": LayerGeometry.convolution((40, 48, K), padding=1),
}


def make_input(layer: LayerGeometry, dtype):
    if not layer.conv:
        return rnd(2, 5, layer.in_features, dtype=dtype)
    return rnd(2, layer.in_features, *([9] * layer.spatial), dtype=dtype)


def loha_case(layer: LayerGeometry, tucker: bool, dtype, r=4):
    o, i, k = layer.out_features, layer.in_features, layer.kernel_numel
    if tucker:
        return loha.LoHaFactors(rnd(r, o, dtype=dtype), rnd(r, i, dtype=dtype),
                                rnd(r, o, dtype=dtype), rnd(r + 1, i, dtype=dtype),
                                rnd(r, r, *layer.kernel, dtype=dtype),
                                rnd(r, r + 1, *layer.kernel, dtype=dtype))
    return loha.LoHaFactors(rnd(o, r, dtype=dtype), rnd(r, i * k, dtype=dtype),
                            rnd(o, r + 2, dtype=dtype), rnd(r + 2, i * k, dtype=dtype))


def lokr_case(layer: LayerGeometry, kind: str, dtype, r=4):
    (a, b), (c, d) = factorization(layer.out_features), factorization(layer.in_features)
    f = lokr.LoKrFactors()
    if kind == "decompose_both":
        f.w1_a, f.w1_b = rnd(a, r, dtype=dtype), rnd(r, c, dtype=dtype)
    else:
        f.w1 = rnd(a, c, dtype=dtype)
    kern = layer.kernel
    if kind == "full":
        f.w2 = rnd(b, d, *kern, dtype=dtype)
    elif kind == "tucker":
        f.w2_a, f.w2_b, f.t2 = rnd(r, b, dtype=dtype), rnd(r, d, dtype=dtype), rnd(r, r, *kern, dtype=dtype)
    else:  # low rank (flat for convs)
        f.w2_a, f.w2_b = rnd(b, r, dtype=dtype), rnd(r, d * layer.kernel_numel, dtype=dtype)
    return f


def lora_case(layer: LayerGeometry, tucker: bool, dtype, r=4):
    o, i = layer.out_features, layer.in_features
    if tucker:
        return lora.LoRAFactors(rnd(o, r, 1, 1, dtype=dtype), rnd(r, i, 1, 1, dtype=dtype),
                                rnd(r, r, *layer.kernel, dtype=dtype))
    return lora.LoRAFactors(rnd(o, r, dtype=dtype), rnd(r, i * layer.kernel_numel, dtype=dtype))


def cases():
    """(id, algo module, layer, factors maker) for every layout on every geometry it fits."""
    out = []
    for g, layer in GEOMS.items():
        kxk = layer.conv and layer.kernel_numel > 1
        out.append((f"loha-{g}", loha, layer, lambda L, dt: loha_case(L, False, dt)))
        out.append((f"lora-{g}", lora, layer, lambda L, dt: lora_case(L, False, dt)))
        for kind in ("full", "low", "decompose_both"):
            out.append((f"lokr-{kind}-{g}", lokr, layer, lambda L, dt, kind=kind: lokr_case(L, kind, dt)))
        if kxk and layer.spatial == 2:
            out.append((f"loha-tucker-{g}", loha, layer, lambda L, dt: loha_case(L, True, dt)))
            out.append((f"lora-tucker-{g}", lora, layer, lambda L, dt: lora_case(L, True, dt)))
            out.append((f"lokr-tucker-{g}", lokr, layer, lambda L, dt: lokr_case(L, "tucker", dt)))
    return out


CASES = cases()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,algo,layer,make", CASES, ids=[c[0] for c in CASES])
def test_bypass_equals_layer_op_with_delta(name, algo, layer, make, dtype):
    f = make(layer, dtype)
    x = make_input(layer, dtype)
    want = layer_op(x, algo.diff_weight(f, 0.6), layer)
    options = loha.STRATEGIES if algo is loha else (None,)
    for strategy in options:
        kw = {"strategy": strategy} if strategy else {}
        got = algo.bypass_diff(x, f, layer, 0.6, **kw)
        assert got.shape == want.shape and got.dtype == dtype
        assert rel_err(got, want) < TOL[dtype], strategy


def test_loha_dense_row_blocks(monkeypatch):
    """ΔW built a few output rows at a time (large layers) gives the same result."""
    monkeypatch.setattr(loha, "DENSE_BLOCK_ELEMENTS", 200)
    for g in ("linear", "conv3x3_s2"):
        layer = GEOMS[g]
        f, x = loha_case(layer, False, torch.float64), make_input(layer, torch.float64)
        want = layer_op(x, loha.diff_weight(f, 0.5), layer)
        assert rel_err(loha.bypass_diff(x, f, layer, 0.5, "dense"), want) < 1e-12


def test_loha_strategy_cost_model():
    """Khatri–Rao (rank R²) where R² (I + O) ≪ I·O; the dense ΔW where it is not: SDXL 1280² at
    rank 8/16 vs 32 for 4096 tokens (bench_bypass measures the crossover). Few tokens (text
    encoders) favour Khatri–Rao, which builds nothing of ΔW's size."""
    layer = GEOMS["linear"].linear(1280, 1280)

    def factors(r):
        return loha.LoHaFactors(torch.zeros(1280, r), torch.zeros(r, 1280), torch.zeros(1280, r),
                                torch.zeros(r, 1280))

    assert loha.choose_strategy(factors(8), layer, 4096, 4096) == "khatri_rao"
    assert loha.choose_strategy(factors(16), layer, 4096, 4096) == "khatri_rao"
    assert loha.choose_strategy(factors(32), layer, 4096, 4096) == "dense"
    assert loha.choose_strategy(factors(32), layer, 77, 77) == "khatri_rao"
    with pytest.raises(ValueError, match="strategy"):
        loha.bypass_diff(torch.zeros(2, 1280), factors(4), layer, 1.0, "sparse")


def test_khatri_rao_identity():
    """(a1 b1) ⊙ (a2 b2) = KR(a1, a2) · KR(b1ᵀ, b2ᵀ)ᵀ (SPEC §5b), exactly (float64)."""
    a1, a2, b1, b2 = rnd(7, 3), rnd(7, 2), rnd(3, 5), rnd(2, 5)
    lhs = (a1 @ b1) * (a2 @ b2)
    rhs = loha.khatri_rao(a1, a2) @ loha.khatri_rao(b1.T, b2.T).T
    assert rel_err(rhs, lhs) < 1e-14


# ------------------------------------------------------------------ lycoris-lora 4.1.3 as oracle
def _ly(fn, *args, **kw):
    return fn(*args, backend="torch", **kw)


def _conv_args(layer):
    return {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation} \
        if layer.conv else {}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g,tucker", [("linear", False), ("conv3x3_s2", False),
                                      ("conv3x3_s2", True)])
def test_loha_matches_lycoris(g, tucker, dtype):
    layer = GEOMS[g]
    f, x = loha_case(layer, tucker, dtype), make_input(layer, dtype)
    if tucker:
        w = (f.w1_b, f.w1_a, f.w2_b, f.w2_a, f.t1, f.t2)
    else:
        kern = layer.kernel
        w = (f.w1_b.reshape(f.w1_b.shape[0], layer.in_features, *kern), f.w1_a,
             f.w2_b.reshape(f.w2_b.shape[0], layer.in_features, *kern), f.w2_a, None, None)
    ref = _ly(ly_loha.bypass_forward_diff, x, None, *w, gamma=0.6, extra_args=_conv_args(layer))
    for strategy in loha.STRATEGIES:
        assert rel_err(loha.bypass_diff(x, f, layer, 0.6, strategy), ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g,kind", [("linear", "full"), ("linear", "low"),
                                    ("linear", "decompose_both"), ("conv3x3_s2", "full"),
                                    ("conv3x3_s2", "low"), ("conv1x1", "low")])
def test_lokr_matches_lycoris(g, kind, dtype):
    layer = GEOMS[g]
    f, x = lokr_case(layer, kind, dtype), make_input(layer, dtype)
    alpha = 3.0
    rank = f.w2_b.shape[0] if f.w2 is None else f.w1_b.shape[0] if f.w1 is None else None
    scale = alpha / rank if rank else 1.0
    w2b = f.w2_b
    if w2b is not None and layer.conv:  # lycoris keeps a conv w2_b with its kernel dims
        w2b = w2b.reshape(w2b.shape[0], -1, *layer.kernel)
    ref = _ly(ly_lokr.bypass_forward_diff, x, None, f.w1, f.w1_a, f.w1_b, f.w2, f.w2_a, w2b, None,
              gamma=alpha, extra_args=_conv_args(layer))
    assert rel_err(lokr.bypass_diff(x, f, layer, scale), ref) < TOL[dtype]


def test_lokr_tucker_lycoris_bypass_is_wrong():
    """SPEC §5: lycoris 4.1.3 uses the Tucker `w2_a` (R, b) as a (R ← b) 1×1 conv; the contraction
    needs (b ← R). With R ≠ b its bypass fails; with R = b it runs but gives another result.
    Ours equals the layer op with ΔW (test above) and the entry-wise definition of SPEC §3."""
    layer = GEOMS["conv3x3"]
    f = lokr_case(layer, "tucker", torch.float64)
    x = make_input(layer, torch.float64)
    args = (x, None, f.w1, None, None, None, f.w2_a, f.w2_b, f.t2)
    with pytest.raises(RuntimeError):
        _ly(ly_lokr.bypass_forward_diff, *args, gamma=4.0, extra_args=_conv_args(layer))
    b, d = f.w2_a.shape[1], f.w2_b.shape[1]
    f = lokr.LoKrFactors(w1=f.w1, w2_a=rnd(b, b), w2_b=rnd(b, d), t2=rnd(b, b, K, K))
    ours = lokr.bypass_diff(x, f, layer, 4.0 / b)
    ref = _ly(ly_lokr.bypass_forward_diff, x, None, f.w1, None, None, None, f.w2_a, f.w2_b, f.t2,
              gamma=4.0, extra_args=_conv_args(layer))
    assert rel_err(ours, layer_op(x, lokr.diff_weight(f, 4.0 / b), layer)) < 1e-12
    assert rel_err(ref, ours) > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g,tucker", [("linear", False), ("conv3x3_s2", False),
                                      ("conv3x3_dil", True)])
def test_lora_matches_lycoris(g, tucker, dtype):
    layer = GEOMS[g]
    f, x = lora_case(layer, tucker, dtype), make_input(layer, dtype)
    down = f.down if tucker or not layer.conv else f.down.reshape(f.down.shape[0],
                                                                  layer.in_features, *layer.kernel)
    up = f.up if tucker or not layer.conv else f.up.reshape(*f.up.shape, 1, 1)
    ref = _ly(ly_locon.bypass_forward_diff, x, None, down, up, f.mid, gamma=0.6,
              extra_args=_conv_args(layer))
    assert rel_err(lora.bypass_diff(x, f, layer, 0.6), ref) < TOL[dtype]


# ---------------------------------------------------------------------- BypassPlan on modules
def _module(tensors: dict, dtype=torch.float32):
    adapter = lc.adapter_from_tensors({k: v.to(dtype) if v.is_floating_point() and v.dim() else v
                                       for k, v in tensors.items()})
    (module,) = adapter.modules.values()
    return module


def _loha_tensors(o, i, r=4, dora_shape=None, scale=0.3):
    t = {"m.hada_w1_a": rnd(o, r, scale=scale), "m.hada_w1_b": rnd(r, i, scale=scale),
         "m.hada_w2_a": rnd(o, r, scale=scale), "m.hada_w2_b": rnd(r, i, scale=scale),
         "m.alpha": torch.tensor(2.0)}
    if dora_shape is not None:
        t["m.dora_scale"] = 1 + 0.1 * rnd(*dora_shape)
    return t


@pytest.mark.parametrize("strength", [1.0, 0.35, -0.8])
def test_plan_change_is_strength_times_delta(strength):
    module = _module(_loha_tensors(24, 20), torch.float16)  # stored fp16, computed in fp32
    layer = LayerGeometry.linear(24, 20)
    plan = module.bypass_plan(layer)
    x = rnd(3, 20, dtype=torch.float32)
    out = rnd(3, 24, dtype=torch.float32)
    dw = module.delta(torch.float64, shape=(24, 20))
    got = plan.apply(x, out.clone(), strength)
    assert rel_err(got.double() - out.double(), strength * F.linear(x.double(), dw)) < 1e-5
    # factors stay in their stored dtype on the device (no float32 copy kept)
    assert all(t.dtype == torch.float16 for t in vars(plan.factors_on(x.device)).values()
               if isinstance(t, torch.Tensor))
    inplace = out.clone()
    assert plan.apply(x, inplace, strength, inplace=True) is inplace
    assert torch.equal(inplace, got)


@pytest.mark.parametrize("strength", [1.0, 0.4, -0.5])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_plan_dora_equals_patched_weight(kind, strength):
    """Output-axis DoRA at forward time: f(x) + s·[(v − 1)(f(x) − b) + v·ΔW x] with v from the norm
    of W0 + ΔW equals the layer with the patched weight W0 + s·(W' − W0) (float64, 1e-12)."""
    if kind == "linear":
        shape, layer = (24, 20), LayerGeometry.linear(24, 20)
        module = _module(_loha_tensors(24, 20, dora_shape=(24, 1)), torch.float64)
    else:
        shape = (12, 6, K, K)
        layer = LayerGeometry.convolution(shape, stride=2, padding=1)
        module = _module(_loha_tensors(12, 6 * K * K, dora_shape=(12, 1, 1, 1)), torch.float64)
    w0, bias = rnd(*shape), rnd(shape[0])
    x = make_input(layer, torch.float64)
    plan = module.bypass_plan(layer, module.dora_output_scale(w0))
    patched = w0 + strength * (dora.apply_dora(w0, module.raw_delta(torch.float64, shape=shape),
                                               module.dora_ref.load("cpu", torch.float64)) - w0)
    conv = layer.conv

    def run(w):
        return (F.conv2d(x, w, bias, layer.stride, layer.padding) if conv
                else F.linear(x, w, bias))

    base_out, want = run(w0), run(patched)
    got = plan.apply(x, base_out.clone(), strength, bias=bias)
    assert rel_err(got - base_out, want - base_out) < 1e-12
    # W0 + s·(W' − W0) is what the patch path (module.delta with base) gives at strength 1
    assert rel_err(w0 + module.delta(torch.float64, base=w0), w0 + (patched - w0) / strength) < 1e-12
    # a wrong bias handling (f(x) instead of f(x) − b) is visible at this tolerance
    wrong = plan.apply(x, base_out.clone(), strength, bias=None)
    assert rel_err(wrong - base_out, want - base_out) > 1e-3


def test_plan_dora_input_axis_is_refused():
    module = _module(_loha_tensors(24, 20, dora_shape=(1, 20)), torch.float32)
    assert not module.dora_on_output_axis((24, 20))
    with pytest.raises(lc.AdapterError, match="per input channel"):
        module.dora_output_scale(rnd(24, 20, dtype=torch.float32))
    with pytest.raises(ValueError, match="DoRA"):
        module.bypass_plan(LayerGeometry.linear(24, 20))


def test_plan_computes_in_float32_for_fp16_inputs():
    """fp16 factors whose products overflow fp16 (|ΔW| ≫ 65504): the change is computed in float32
    and rounded once into the fp16 output; ComfyUI-style fp16 products would give Inf."""
    t = _loha_tensors(16, 12, scale=30.0)
    module = _module(t, torch.float16)
    plan = module.bypass_plan(LayerGeometry.linear(16, 12))
    x = rnd(4, 12, dtype=torch.float16, scale=0.001)
    out = torch.zeros(4, 16, dtype=torch.float16)
    got = plan.apply(x, out, 1.0)
    want = F.linear(x.double(), module.delta(torch.float64, shape=(16, 12)))
    assert got.dtype == torch.float16 and bool(torch.isfinite(got).all())
    assert rel_err(got, want) < 2e-3  # one fp16 rounding of the result
    f16 = module.factors("cpu", None)
    assert not bool(torch.isfinite((f16.w1_a @ f16.w1_b) * (f16.w2_a @ f16.w2_b)).all())


def test_plan_unbatched_conv_input_and_shape_errors():
    shape = (12, 6, K, K)
    layer = LayerGeometry.convolution(shape, padding=1)
    module = _module({"m.lora_up.weight": rnd(12, 2, 1, 1), "m.lora_down.weight": rnd(2, 6, K, K),
                      "m.alpha": torch.tensor(1.0)}, torch.float64)
    plan = module.bypass_plan(layer)
    x = rnd(6, 7, 7)
    want = F.conv2d(x, module.delta(torch.float64, shape=shape), padding=1)
    assert rel_err(plan.delta_out(x), want) < 1e-12
    with pytest.raises(lc.AdapterError, match="layer weight"):
        module.bypass_plan(LayerGeometry.linear(12, 7))


def test_plan_refuses_an_overflowing_delta():
    """The same error as the patch path when ΔW overflows float32 (factors finite but huge)."""
    module = _module(_loha_tensors(8, 8, scale=1e12), torch.float32)
    with pytest.raises(lc.AdapterError, match="overflows"):
        module.check_delta_finite((8, 8))
    with pytest.raises(lc.AdapterError, match="overflows"):
        module.delta(torch.float32, shape=(8, 8))
    _module(_loha_tensors(8, 8), torch.float32).check_delta_finite((8, 8))  # a normal one passes


def test_bypass_plan_is_a_dataclass_of_the_module():
    module = _module(_loha_tensors(8, 8))
    plan = module.bypass_plan(LayerGeometry.linear(8, 8))
    assert isinstance(plan, BypassPlan) and plan.module is module and plan.scale == 0.5


def test_lokr_conv_whose_w1_does_not_split_the_channels():
    """A LoKr conv file factorised over I·k·k instead of I (w1 (a, c) with c ∤ I): its ΔW is still a
    valid (O, I, k, k) weight (the patch path reshapes it); bypass applies it exactly too."""
    layer = LayerGeometry.convolution((40, 48, K, K), padding=1)
    (a, b), (c, d) = factorization(40), factorization(48 * K * K)
    assert 48 % c != 0
    f = lokr.LoKrFactors(w1=rnd(a, c), w2_a=rnd(b, 4), w2_b=rnd(4, d))
    x = make_input(layer, torch.float64)
    want = layer_op(x, lokr.diff_weight(f, 0.5), layer)
    assert rel_err(lokr.bypass_diff(x, f, layer, 0.5), want) < 1e-12
