"""Anima's DiT through the loaders: the golden Anima block file on a real-size
`blocks.0.adaln_modulation_cross_attn.1`, small files on the tiny DiT, block strengths, the
report's parts. The DiT is the real Anima on current ComfyUI; on 0.3.75, which has no Anima,
Cosmos-Predict2's DiT (Anima's block naming, no LLM adapter) stands in.

The graph builds and patches the model (LycorisTestModel → loader → LycorisTestRecorder → sink);
the sampling step is ComfyUI's own `comfy.sample.sample` with a hand-made Anima conditioning
(`host_nodes.models.dit_conditioning`: Qwen3-width states and the T5 ids of the LLM adapter).
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
    from host_nodes.models import dit_conditioning

    g = torch.Generator().manual_seed(0)
    cond = [dit_conditioning(g)]
    latent = torch.zeros(1, 16, 1, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
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


def _current() -> bool:
    import comfy_host

    return comfy_host.CURRENT


GOLDEN = [
    pytest.param("LoadLoHa", "anima_loha_blocks", "dit", id="blocks"),
    pytest.param("LoadLoKr", "anima_lokr_llm_adapter", "llm_adapter", id="llm_adapter",
                 marks=pytest.mark.skipif(not _current(), reason="0.3.75 has no Anima: its Cosmos "
                                          "stand-in has no llm_adapter layer")),
]


@pytest.fixture(scope="module")
def golden_base(host, fixtures_dir):
    import comfy_host

    cases = ["anima_loha_blocks"] + (["anima_lokr_llm_adapter"] if comfy_host.CURRENT else [])
    keys = [k for c in cases for k in goldens.expected(c)]
    return _run(comfy_host.Executor(host), _graph("golden_dit", None, record=",".join(keys)))


@pytest.mark.parametrize("loader,case,part", GOLDEN)
@pytest.mark.parametrize("strength", [0.6, 0.0])
def test_golden_anima_file_on_the_dit(host, executor, fixtures_dir, golden_base, strength, loader,
                                      case, part):
    """The golden Anima files on layers of their real size: a DiT block's adaLN modulation
    (256 × 2048) and, on the real Anima, an LLM-adapter attention projection (1024 × 1024)."""
    expected = goldens.expected(case)
    name = install_golden(host, fixtures_dir, case)
    res, records, latent = _run(executor, _graph("golden_dit", loader, name, strength,
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
        assert f"matched: 1 of 1 modules — {part} ×1" in res.outputs("2")[2]


def test_tiny_dit_block_weights_and_report_parts(host, executor):
    """Block strengths on the tiny DiT, and the report's parts: the DiT's layers outside the
    blocks (x_embedder, final_layer) are `dit`, never `unet`; on current ComfyUI the real
    Anima's LLM adapter is `llm_adapter` (its block weight is LLM)."""
    import comfy_host

    keys = ["diffusion_model.blocks.0.self_attn.q_proj.weight",
            "diffusion_model.blocks.1.mlp.layer1.weight",
            "diffusion_model.blocks.1.cross_attn.k_proj.weight",
            "diffusion_model.x_embedder.proj.1.weight",
            "diffusion_model.final_layer.linear.weight"]
    llm = "diffusion_model.llm_adapter.blocks.1.cross_attn.v_proj.weight"
    if comfy_host.CURRENT:  # 0.3.75's Cosmos stand-in has no LLM adapter
        keys.append(llm)
    base_res, base_records, _ = _run(comfy_host.Executor(host), _graph("tiny_dit", None,
                                                                       record=",".join(keys)))
    sd = base_res.outputs("1")[0].model.state_dict()
    tensors, deltas = make_adapter({k: tuple(sd[k].shape) for k in keys}, "lokr", seed=5)
    name = write_adapter(host, "tiny_dit_lokr.safetensors", tensors, "lokr")
    res, records, _ = _run(executor, _graph("tiny_dit", "LoadLoKr", name, 0.8,
                                            bw="B1=0.25,LLM=0.5", record=",".join(keys)))
    want = {k: 0.8 for k in keys} | {keys[1]: 0.2, keys[2]: 0.2, llm: 0.4}
    for rec, base in zip(records, base_records, strict=True):
        for key in keys:
            assert rel_err(rec[key].double() - base[key].double(), want[key] * deltas[key]) < TOL, key
    report = res.outputs("2")[2]
    if comfy_host.CURRENT:
        assert "architecture: model anima" in report
        assert f"matched: {len(keys)} of {len(keys)} modules — dit ×5, llm_adapter ×1" in report
        assert "block weights: B1=0.25,LLM=0.5" in report
    else:
        assert "architecture: model cosmos_predict2" in report
        assert f"matched: {len(keys)} of {len(keys)} modules — dit ×5\n" in report
        assert "rules that hit no module: LLM" in report  # no LLM adapter to weight
