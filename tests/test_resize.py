"""Resizing every golden file to LoRA / LoKr: exact at full rank, honest error below it."""

from __future__ import annotations

import json

import goldens
import pytest
import torch
from helpers import golden_model_weights, rel_err

import lycoris_core as lc
from lycoris_core import cli
from lycoris_core.merge import FactorSpec
from lycoris_core.resize import resize_adapter


def _written_delta(result, weights):
    deltas, unmatched = lc.delta_weights(lc.adapter_from_tensors(result.tensors), weights)
    assert unmatched == []
    return deltas


@pytest.mark.parametrize("case", goldens.cases())
def test_resize_to_full_rank_lora_is_exact(fixtures_dir, case):
    weights = golden_model_weights(case)
    (key, want), = goldens.expected(case).items()
    full = min(want.shape[0], want[0].numel())
    # ≥ the true rank: LoHa R² (Tucker too), LoKr rank(W1)·rank(W2); both-full LoKr and DoRA: full
    rank = full if case in ("lokr_full_w2", "lyco_loha_dora") else min(full, 160)
    result = resize_adapter(fixtures_dir / f"{case}.safetensors", FactorSpec("lora", rank=rank), weights)
    # float32 SVDs (the default): ‖error‖/‖ΔW‖ 1.1e-6..1.6e-6 (README: exact to 1e-5); their largest
    # entry error, 1.5e-6..5e-6 of max|ΔW|, moves with the LAPACK path and the thread count
    got = _written_delta(result, weights)[key].double()
    assert float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want.double())) < 1e-5
    # float64 SVDs: the truncation itself loses nothing, entry by entry (≤ 7e-7: the float32 file)
    exact = resize_adapter(fixtures_dir / f"{case}.safetensors",
                           FactorSpec("lora", rank=rank, precision=torch.float64), weights)
    assert rel_err(_written_delta(exact, weights)[key], want) < 1e-5
    assert json.loads(result.metadata["lycoris_merge_sources"])[0]["file"] == f"{case}.safetensors"
    assert result.metadata["lycoris_merge_operation"] == "resize"


@pytest.mark.parametrize("case", ["loha_linear", "loha_conv_tucker", "anima_loha_blocks",
                                  "lyco_lokr_decompose_both", "lyco_loha_dora"])
def test_resize_lower_rank_error_is_what_was_written(fixtures_dir, case):
    weights = golden_model_weights(case)
    (key, want), = goldens.expected(case).items()
    for spec in (FactorSpec("lora", rank=2), FactorSpec("lokr", rank=2)):
        result = resize_adapter(fixtures_dir / f"{case}.safetensors", spec, weights)
        got = _written_delta(result, weights)[key]
        actual = float(torch.linalg.vector_norm(got.double() - want.double())
                       / torch.linalg.vector_norm(want.double()))
        # the golden ΔW itself is float32-rounded (≤ 3e-7); the report must match to that level
        assert abs(actual - result.modules[0].error) < 2e-6 + 1e-4 * actual, (case, spec.fmt)


def test_resize_lokr_to_lokr_exact_at_its_rank(fixtures_dir):
    for case in ("lokr_linear_default_factor", "anima_lokr_llm_adapter", "lyco_lokr_decompose_both"):
        weights = golden_model_weights(case)
        (key, want), = goldens.expected(case).items()
        result = resize_adapter(fixtures_dir / f"{case}.safetensors", FactorSpec("lokr", rank=4), weights)
        assert rel_err(_written_delta(result, weights)[key], want) < 1e-5, case
        assert result.metadata["ss_network_module"] == "networks.lokr"


def test_cli_resize(tmp_path, fixtures_dir, capsys):
    out = tmp_path / "r.safetensors"
    assert cli.main(["resize", str(fixtures_dir / "anima_loha_blocks.safetensors"), "--energy", "0.999",
                     "--rank", "16", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "overall error" in text and "lora_unet_blocks_0_adaln_modulation_cross_attn_1" in text
    adapter = lc.load_adapter(out)
    (m,) = adapter.modules.values()
    assert m.algo == "lora" and 1 <= m.rank <= 16
    assert adapter.guess_architecture()[0] == "anima"
