"""Cosmos-Predict2 DiT (Anima's block naming) through the loaders: the golden Anima block file on a
real-size `blocks.0.adaln_modulation_cross_attn.1`, small files on the tiny DiT, block strengths.

The graph builds and patches the model (LycorisTestModel → loader → LycorisTestRecorder → sink);
the 0.3.75 test host has no text encoder for this DiT, so the sampling step is ComfyUI's own
`comfy.sample.sample` called with a hand-made cross-attention context (width 32).
"""

from __future__ import annotations

import goldens
import pytest
import torch
from helpers import rel_err
from test_loaders_common import _records, install_golden, make_adapter, write_adapter

TOL = 1e-5


def _graph(kind: str, loader: str | None, name: str = "", strength: float = 1.0, bw: str = "",
           record: str = "") -> dict:
    g = {"1": {"class_type": "LycorisTestModel", "inputs": {"kind": kind, "seed": 0}}}
    model = ["1", 0]
    if loader:
        g["2"] = {"class_type": loader, "inputs": {"model": model, "lora_name": name,
                                                   "strength_model": strength, "strength_clip": 1.0,
                                                   "block_weights": bw}}
        model = ["2", 0]
    g["4"] = {"class_type": "LycorisTestRecorder", "inputs": {"model": model, "keys": record}}
    g["7"] = {"class_type": "LycorisTestSink", "inputs": {"model": ["4", 0]}}
    return g


def _sample(model) -> torch.Tensor:
    import comfy.sample

    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 6, 32, generator=g)
    latent = torch.zeros(1, 16, 1, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    cond = [[ctx, {}]]
    with torch.inference_mode():
        out = comfy.sample.sample(model, noise, 2, 1.0, "euler", "normal", cond, cond, latent,
                                  disable_pbar=True, seed=0)
    import comfy.model_management as mm

    mm.unload_all_models()
    return out


def _run(executor, graph) -> tuple[object, list, torch.Tensor]:
    records = _records()
    records.clear()
    res = executor.run(graph)
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    latent = _sample(res.outputs("4")[0])
    return res, list(records), latent


@pytest.fixture(scope="module")
def golden_base(host, fixtures_dir):
    import comfy_host

    keys = list(goldens.expected("anima_loha_blocks"))
    return _run(comfy_host.Executor(host), _graph("golden_dit", None, record=",".join(keys)))


@pytest.mark.parametrize("strength", [0.6, 0.0])
def test_golden_anima_block_file_on_the_dit(host, executor, fixtures_dir, golden_base, strength):
    expected = goldens.expected("anima_loha_blocks")
    name = install_golden(host, fixtures_dir, "anima_loha_blocks")
    res, records, latent = _run(executor, _graph("golden_dit", "LoadLoHa", name, strength,
                                                 record=",".join(expected)))
    _, base_records, base_latent = golden_base
    assert len(records) == len(base_records) >= 2
    for rec, base in zip(records, base_records, strict=True):
        for key, dw in expected.items():
            if strength == 0.0:
                assert torch.equal(rec[key], base[key])
            else:
                assert rel_err(rec[key].double() - base[key].double(), strength * dw.double()) < TOL
    if strength == 0.0:
        assert torch.equal(latent, base_latent)
        assert res.outputs("2")[0] is res.outputs("1")[0]
    else:
        assert not torch.equal(latent, base_latent)
        assert "dit ×1" in res.outputs("2")[2]


def test_tiny_dit_block_weights(host, executor):
    import comfy_host

    keys = ["diffusion_model.blocks.0.self_attn.q_proj.weight",
            "diffusion_model.blocks.1.mlp.layer1.weight",
            "diffusion_model.blocks.1.cross_attn.k_proj.weight"]
    base_res, base_records, _ = _run(comfy_host.Executor(host), _graph("tiny_dit", None,
                                                                       record=",".join(keys)))
    sd = base_res.outputs("1")[0].model.state_dict()
    tensors, deltas = make_adapter({k: tuple(sd[k].shape) for k in keys}, "lokr", seed=5)
    name = write_adapter(host, "tiny_dit_lokr.safetensors", tensors, "lokr")
    res, records, _ = _run(executor, _graph("tiny_dit", "LoadLoKr", name, 0.8, bw="B1=0.25",
                                            record=",".join(keys)))
    want = {keys[0]: 0.8, keys[1]: 0.2, keys[2]: 0.2}
    for rec, base in zip(records, base_records, strict=True):
        for key, s in want.items():
            assert rel_err(rec[key].double() - base[key].double(), s * deltas[key]) < TOL, key
    assert "block weights: B1=0.25" in res.outputs("2")[2]
