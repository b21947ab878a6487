"""The golden fixtures in tests/fixtures are what the references wrote, and the expected ΔW that
goldens.py generates with the lycoris-lora oracle are the ΔW the references stored.

Always: every generated ΔW has the key and shape the references' index records, its max-abs and
RMS equal the index's `delta_stats`, and its fingerprint (8 projections) equals the one taken from
the stored reference file. With the references' folder beside the checkout (../shared/fixtures or
LYCORIS_FIXTURES), also: the generated ΔW equal the stored files element by element, and the
committed files are byte-identical copies of the references'."""

from __future__ import annotations

import gzip
import json

import goldens
import pytest
import torch
from goldens import REFERENCE
from helpers import rel_err
from safetensors.torch import load_file

import lycoris_core as lc

# Generated vs stored, max-abs relative. The oracle evaluates in float64 and rounds once, as the
# references did: measured 0 (bit for bit) on every case; a last-bit flip would be ≤ 6e-8, and the
# same formulas evaluated in float32 land within 4.4e-7 (DoRA; 1.2e-7 for the others). A wrong
# formula is off by 8e-2 or more (DoRA with W0's norm 8.1e-2, DoRA ignored 8.9e-2, a scale applied
# twice 0.5, LoKr factors swapped 1.1, Tucker core transposed 0.9).
TOL = 2e-6
# Fingerprint: projections of ΔW on unit vectors, relative to ‖ΔW‖. A float32 evaluation moves them
# by ≤ 4.4e-9; the wrong formulas above by 3.2e-4 or more (about 1/√numel).
FP_TOL = 1e-6

needs_reference = pytest.mark.skipif(
    not (REFERENCE / "index.json").is_file(),
    reason="no reference fixtures folder (../shared/fixtures beside the checkout, or "
           "LYCORIS_FIXTURES): the generated ΔW are checked against the recorded fingerprints only")


def test_every_case_has_its_files():
    cases = goldens.cases()
    assert len(cases) == 8
    for case in cases:
        info = goldens.index()[case]
        assert goldens.adapter_file(case).stat().st_size == info["files"]["adapter"]["bytes"]
        assert (goldens.base_file(case) is not None) == ("base" in info["files"])
    assert set(goldens.recorded_fingerprints()) == set(cases)


@pytest.mark.parametrize("case", goldens.cases())
def test_generated_delta_matches_the_recorded_facts(case):
    got = goldens.expected(case)
    fps = goldens.recorded_fingerprints()[case]
    mods = goldens.index()[case]["modules"]
    assert sorted(got) == sorted(m["comfyui_key"] for m in mods) == sorted(fps)
    for m in mods:
        dw = got[m["comfyui_key"]]
        assert dw.dtype == torch.float32 and list(dw.shape) == m["weight_shape"]
        stats = m["delta_stats"]
        assert float(dw.abs().max()) == pytest.approx(stats["max_abs"], rel=TOL)
        assert float(dw.double().pow(2).mean().sqrt()) == pytest.approx(stats["rms"], rel=TOL)
        assert goldens.fingerprint_error(dw, fps[m["comfyui_key"]]) < FP_TOL


def test_checks_catch_a_wrong_oracle(monkeypatch):
    """Plausible generator mistakes (each a defect SPEC §5 lists for some reference) fail both the
    reference comparison's tolerance (against the unbroken result) and the fingerprint check, by
    orders of magnitude."""
    from lycoris.functional import general, loha, lokr

    breaks = {
        # lycoris' merge path: alpha/R applied twice
        "loha_linear": (loha, "diff_weight", lambda f: lambda *w, gamma, backend: f(
            *w, gamma=gamma * gamma, backend=backend)),
        # Kronecker factors swapped
        "lokr_linear_default_factor": (lokr, "make_kron", lambda f: lambda w1, w2, s: f(w2, w1, s)),
        # sd-scripts: dora_scale ignored, the plain ΔW added
        "lyco_loha_dora": (general, "weight_decompose", lambda f: lambda w, *args, **kw: w),
    }
    fps = goldens.recorded_fingerprints()
    for case, (module, name, make) in breaks.items():
        info = goldens.index()[case]
        args = (goldens.adapter_file(case), info["modules"], goldens.base_file(case))
        (key, right), = goldens.oracle_delta(*args).items()
        monkeypatch.setattr(module, name, make(getattr(module, name)))
        (wrong,) = goldens.oracle_delta(*args).values()
        monkeypatch.undo()
        assert rel_err(right, goldens.expected(case)[key]) < TOL
        assert goldens.fingerprint_error(right, fps[case][key]) < FP_TOL
        assert rel_err(wrong, right) > 100 * TOL, case
        assert goldens.fingerprint_error(wrong, fps[case][key]) > 100 * FP_TOL, case


@needs_reference
@pytest.mark.parametrize("case", goldens.cases())
def test_generated_delta_equals_the_stored_reference(case):
    ref = load_file(REFERENCE / f"{case}.expected.safetensors")
    got = goldens.expected(case)
    assert sorted(got) == sorted(ref)
    for key, want in ref.items():
        assert got[key].shape == want.shape and got[key].dtype == want.dtype
        err = rel_err(got[key], want)
        print(f"{case}: {key}: max-abs relative {err:.2e}")
        assert err < TOL, (case, key, err)


@needs_reference
def test_committed_files_are_the_references():
    for case in goldens.cases():
        for path in (goldens.adapter_file(case), goldens.base_file(case)):
            if path is not None:
                assert path.read_bytes() == (REFERENCE / path.name).read_bytes(), path.name
    assert (goldens.FIXTURES / "index.json").read_bytes() == (REFERENCE / "index.json").read_bytes()
    with gzip.open(goldens.FIXTURES / "sdscripts_targets.json.gz") as fh:
        assert fh.read() == (REFERENCE / "sdscripts_targets.json").read_bytes()
    unet = json.loads((REFERENCE / "sdxl_unet.json").read_text())
    assert goldens.read_json("sdxl_unet_config.json")["config"] == unet["config"]
    recorded, now = goldens.recorded_fingerprints(), goldens.reference_fingerprints()
    assert sorted(recorded) == sorted(now)
    for case, keys in now.items():
        for key, fp in keys.items():
            assert fp["norm"] == pytest.approx(recorded[case][key]["norm"], rel=1e-12)
            assert max(abs(a - b) for a, b in zip(fp["probes"], recorded[case][key]["probes"],
                                                   strict=True)) < 1e-12 * fp["norm"]


@needs_reference
def test_bundled_manifests_are_the_reference_weight_keys():
    """lycoris_core ships the `.weight` keys of the references' model manifests, shapes and all:
    the suite reads those instead of a second copy of the manifests."""
    parts = {"sdxl": ("sdxl_unet", "sdxl_clip_l", "sdxl_clip_g"), "anima": ("anima_dit", "anima_qwen3_06b")}
    for arch, names in parts.items():
        ref = {}
        for name in names:
            ref.update(json.loads((REFERENCE / f"{name}.json").read_text())["keys"])
        weights = {k: tuple(v) for k, v in ref.items() if k.endswith(".weight")}
        assert dict(lc.manifest(arch)) == weights, arch
