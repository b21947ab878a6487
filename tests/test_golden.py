"""Golden files written by sd-scripts and lycoris-lora: every module maps to the expected ComfyUI
key and its ΔW is within 1e-5 (max-abs relative) of the expected ΔW: the lycoris-lora oracle's,
which equals the ΔW the references stored (test_goldens.py)."""

from __future__ import annotations

import goldens
import pytest
import torch
from helpers import golden_model_weights, rel_err

import lycoris_core as lc
from lycoris_core.algos import lokr as lokr_algo

TOL = 1e-5


def _check_case(fixtures, case: str) -> float:
    adapter = lc.load_adapter(fixtures / f"{case}.safetensors")
    want = goldens.expected(case)
    deltas, unmatched = lc.delta_weights(adapter, golden_model_weights(case))
    assert unmatched == []
    assert set(deltas) == set(want), "module mapped to a different model key"
    return max(rel_err(deltas[k], want[k]) for k in want)


def test_visible_cases_present():
    assert len(goldens.cases()) >= 8


@pytest.mark.parametrize("case", goldens.cases())
def test_golden_delta(fixtures_dir, case):
    err = _check_case(fixtures_dir, case)
    assert err < TOL, f"{case}: rel error {err:.3g}"


@pytest.mark.parametrize("case", goldens.cases())
def test_golden_module_facts(fixtures_dir, case):
    """rank / alpha / scale read from shapes and tensors agree with what the reference recorded."""
    index = goldens.index()[case]
    adapter = lc.load_adapter(fixtures_dir / f"{case}.safetensors")
    for rec in index["modules"]:
        m = adapter.modules[rec["lora_name"]]
        assert m.algo == index["algo"]
        assert m.scale == pytest.approx(rec["scale"], rel=1e-12)
        if m.rank is not None:  # both-full LoKr has no rank in the file
            assert m.rank == rec["rank"]
            assert m.alpha == pytest.approx(rec["alpha_saved"], rel=1e-12)


def test_tolerance_catches_wrong_formulas(fixtures_dir, monkeypatch):
    """The 1e-5 tolerance is tight enough to reject plausible mistakes (each breaks a golden case)."""
    # 1. Kronecker factors in the wrong order.
    monkeypatch.setattr(lokr_algo, "kron", lambda w1, w2: torch.kron(w2.contiguous(), w1.contiguous()))
    with pytest.raises((AssertionError, lc.AdapterError, RuntimeError)):
        assert _check_case(fixtures_dir, "lokr_linear_default_factor") < TOL
    monkeypatch.undo()
    # 2. alpha/R scale forgotten.
    monkeypatch.setattr(lc.AdapterModule, "scale", property(lambda self: 1.0))
    assert _check_case(fixtures_dir, "loha_linear") > TOL
    monkeypatch.undo()
    # 3. ComfyUI's DoRA norm (of W0 instead of W0 + ΔW), SPEC §5.
    from lycoris_core.algos import base as base_mod

    def dora_w0_norm(w0, delta, scale, strength=1.0):
        from lycoris_core.algos.dora import dora_axis, weight_norm
        w = w0 + delta
        axis = dora_axis(scale, tuple(w.shape))
        m = scale.reshape([-1 if d == axis else 1 for d in range(w.dim())])
        return w * (m / (weight_norm(w0, axis) + torch.finfo(w.dtype).eps))

    monkeypatch.setattr(base_mod, "apply_dora", dora_w0_norm)
    assert _check_case(fixtures_dir, "lyco_loha_dora") > 1e-2
    monkeypatch.undo()
    # And unbroken, everything passes again.
    assert _check_case(fixtures_dir, "lyco_loha_dora") < TOL


def test_dora_needs_base_values(fixtures_dir):
    adapter = lc.load_adapter(fixtures_dir / "lyco_loha_dora.safetensors")
    key = "diffusion_model.output_blocks.6.0.skip_connection.weight"
    with pytest.raises(lc.AdapterError, match="dora_scale"):
        lc.delta_weights(adapter, {key: (320, 960, 1, 1)})
