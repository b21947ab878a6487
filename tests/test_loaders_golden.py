"""LoadLoKr / LoadLoHa → KSampler on real-size golden SDXL layers: the weights the sampler used are
`base + strength·ΔW` for the references' golden files; the latent moves; strength 0 is the base."""

from __future__ import annotations

import goldens
import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file
from test_loaders_common import install_golden, run_recorded, sampler_graph

TOL = 1e-5  # max-abs relative on the change; a wrong scale/formula is off by ≥ 1e-2
STRENGTH = 0.7

CASES = [
    ("LoadLoKr", "lokr_linear_default_factor"),
    ("LoadLoKr", "lokr_full_w2"),
    ("LoadLoKr", "lyco_lokr_decompose_both"),
    ("LoadLoHa", "loha_linear"),
    ("LoadLoHa", "loha_conv_tucker"),
]


@pytest.fixture(scope="module")
def base_run(host, fixtures_dir):
    """Base run (no loader) recording every golden key, shared by the cases."""
    import comfy_host

    keys = sorted({k for _, case in CASES
                   for k in goldens.expected(case)})
    graph = sampler_graph("golden_sdxl", None, record=",".join(keys))
    res, records = run_recorded(comfy_host.Executor(host), graph)
    return res.outputs("6")[0]["samples"].clone(), records


STRENGTHS = [0.7, 0.5, -0.6, 1.2, 0.3]


def test_sampler_uses_base_plus_strength_delta(host, executor, fixtures_dir, base_run):
    """All golden SDXL cases as one chain of loaders (they patch different layers), each at its
    own strength, so one sampler run checks every file and that loaders stack."""
    graph = sampler_graph("golden_sdxl", None, record="")
    model, clip, want = ["1", 0], ["1", 1], {}
    for n, ((loader, case), s) in enumerate(zip(CASES, STRENGTHS, strict=True)):
        expected = goldens.expected(case)
        want.update({k: s * v.double() for k, v in expected.items()})
        node = f"2{n}"
        graph[node] = {"class_type": loader, "inputs": {
            "model": model, "clip": clip, "lora_name": install_golden(host, fixtures_dir, case),
            "strength_model": s, "strength_clip": 1.0, "block_weights": ""}}
        model, clip = [node, 0], [node, 1]
    graph["4"]["inputs"] |= {"model": model, "keys": ",".join(want)}
    res, records = run_recorded(executor, graph)
    base_latent, base_records = base_run
    assert len(records) >= 2 and len(records) == len(base_records)
    for rec, base in zip(records, base_records, strict=True):
        for key, change in want.items():
            assert rel_err(rec[key].double() - base[key].double(), change) < TOL, key
    assert not torch.equal(res.outputs("6")[0]["samples"], base_latent)
    for n in range(len(CASES)):
        report = res.outputs(f"2{n}")[2]
        assert "matched: 1 of 1 modules" in report and "WARNING" not in report
        assert res.ui[f"2{n}"]["text"][0] == report  # shown on the node


def test_strength_zero_reproduces_base_exactly(host, executor, fixtures_dir, base_run):
    case = "lokr_linear_default_factor"
    expected = goldens.expected(case)
    name = install_golden(host, fixtures_dir, case)
    graph = sampler_graph("golden_sdxl", "LoadLoKr", name, strength_model=0.0,
                          record=",".join(expected))
    res, records = run_recorded(executor, graph)
    base_latent, base_records = base_run
    assert torch.equal(res.outputs("6")[0]["samples"], base_latent)
    for rec, base in zip(records, base_records, strict=True):
        for key in expected:
            assert torch.equal(rec[key], base[key])


def test_dora_uses_norm_of_patched_weight(host, executor, fixtures_dir):
    """DoRA's change depends on W0: put the fixture's W0 in place with a ComfyUI 'set' patch that
    runs before ours, then the loaded weight must be W0 + s·(W' − W0) with LyCORIS' norm; ComfyUI's
    own LoraLoader normalises by ‖W0‖ and is pinned as ~8 % off."""
    from test_loaders_common import loaded_weights

    case = "lyco_loha_dora"
    expected = goldens.expected(case)
    w0 = {k: v.float() for k, v in load_file(fixtures_dir / f"{case}.base.safetensors").items()}
    name = install_golden(host, fixtures_dir, case)
    results = {}
    for loader in ("LoadLoHa", "LoraLoader"):
        graph = sampler_graph("golden_sdxl", loader, name, strength_model=1.0, record="")
        res = executor.run({k: v for k, v in graph.items() if k in ("1", "2")}
                           | {"9": {"class_type": "LycorisTestSink", "inputs": {"model": ["2", 0]}}})
        assert res.ok, res.execution_error
        patched = res.outputs("2")[0].clone()
        for key, w in w0.items():
            patched.patches[key] = [(1.0, ("set", (w,)), 1.0, None, None)] + patched.patches[key]
        results[loader] = loaded_weights(patched, list(w0))
    for key, dw in expected.items():
        ours = results["LoadLoHa"][key] - w0[key].double()
        assert rel_err(ours, dw.double()) < TOL
        comfy = results["LoraLoader"][key] - w0[key].double()
        assert 0.02 < rel_err(comfy, dw.double()) < 0.2  # ComfyUI's DoRA norm defect (SPEC §5)
