"""Merging golden files: Σ wᵢ·ΔWᵢ per model key, re-factorised as LoRA (SVD) or LoKr (nearest
Kronecker product), with an honest reported error. Oracle: the golden expected ΔW files."""

from __future__ import annotations

import json

import goldens
import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file

import lycoris_core as lc
from lycoris_core import cli
from lycoris_core import merge as merge_mod
from lycoris_core.keymap import TE_INNER_PREFIX
from lycoris_core.merge import FactorSpec, merge_adapters, output_name, save_result

EXACT = 1e-5
LOHA_KEY = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
LOKR_KEY = "diffusion_model.output_blocks.3.1.transformer_blocks.1.attn2.to_q.weight"
LOHA_NAME = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"



def _deltas_of(result) -> dict[str, torch.Tensor]:
    """ΔW of the written tensors, resolved against the full-size SDXL manifest."""
    deltas, unmatched = lc.delta_weights(lc.adapter_from_tensors(result.tensors), lc.manifest("sdxl"))
    assert unmatched == []
    return deltas


def _renamed(adapter: lc.Adapter, new_name: str) -> lc.Adapter:
    """The same tensors under another module name (a second adapter on another key)."""
    (old,) = adapter.modules
    tensors = {f"{new_name}.{k.split('.', 1)[1]}": adapter.source.get(k) for k in adapter.source.keys()}
    assert all(k.startswith(old) for k in adapter.source.keys())
    return lc.adapter_from_tensors(tensors, name=f"{adapter.path}→{new_name}")


def _fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


@pytest.fixture()
def pair(fixtures_dir):
    return (lc.load_adapter(fixtures_dir / "loha_linear.safetensors"),
            lc.load_adapter(fixtures_dir / "lokr_linear_default_factor.safetensors"))


def test_two_golden_files_full_rank_exact(fixtures_dir, pair):
    """rank ≥ true rank (LoHa 4·4 = 16, LoKr 20·4 = 80) → Σ wᵢ·ΔWᵢ to 1e-5."""
    loha, lokr = pair
    result = merge_adapters([(loha, 0.7), (lokr, -1.3)], FactorSpec("lora", rank=96))
    got = _deltas_of(result)
    want = {LOHA_KEY: 0.7 * goldens.expected("loha_linear")[LOHA_KEY],
            LOKR_KEY: -1.3 * goldens.expected("lokr_linear_default_factor")[LOKR_KEY]}
    assert set(got) == set(want)
    for k in want:
        assert rel_err(got[k], want[k]) < EXACT, k
    assert result.overall_error < EXACT
    assert {m.name for m in result.modules} == {
        LOHA_NAME, "lora_unet_output_blocks_3_1_transformer_blocks_1_attn2_to_q"}


def test_two_adapters_same_key_sum(fixtures_dir, pair):
    """Two files on one key: the written file's ΔW is the weighted sum, within the reported error,
    and exact once the rank reaches the sum's rank (16 + 80)."""
    loha, lokr = pair
    lokr_here = _renamed(lokr, LOHA_NAME)
    want = (0.5 * goldens.expected("loha_linear")[LOHA_KEY]
            + 2.0 * goldens.expected("lokr_linear_default_factor")[LOKR_KEY])
    exact = merge_adapters([(loha, 0.5), (lokr_here, 2.0)], FactorSpec("lora", rank=96))
    assert len(exact.modules) == 1
    assert rel_err(_deltas_of(exact)[LOHA_KEY], want) < EXACT
    for rank in (8, 40):
        lossy = merge_adapters([(loha, 0.5), (lokr_here, 2.0)], FactorSpec("lora", rank=rank))
        actual = _fro(_deltas_of(lossy)[LOHA_KEY], want)
        reported = lossy.modules[0].error
        assert actual > 1e-2  # truncation really loses something here …
        assert abs(actual - reported) <= 1e-6 + 1e-4 * actual  # … and the report says exactly what
        assert lossy.overall_error == pytest.approx(reported, rel=1e-9)


def test_spellings_of_one_layer_are_grouped(fixtures_dir, pair):
    """A `lycoris_` and a `lora_unet_` module of the same layer sum into one output module."""
    loha, _ = pair
    twin = _renamed(loha, "lycoris_" + LOHA_NAME[len("lora_unet_"):])
    result = merge_adapters([(loha, 1.0), (twin, 1.0)], FactorSpec("lora", rank=16))
    assert [m.name for m in result.modules] == [LOHA_NAME]
    want = 2.0 * goldens.expected("loha_linear")[LOHA_KEY]
    assert rel_err(_deltas_of(result)[LOHA_KEY], want) < EXACT


def test_energy_threshold_picks_smallest_rank(fixtures_dir):
    src = lc.load_adapter(fixtures_dir / "anima_loha_blocks.safetensors")  # 256×2048, rank ≤ 16
    result = merge_adapters([(src, 1.0)], FactorSpec("lora", energy=0.9))
    dw = src.modules[next(iter(src.modules))].delta(torch.float64, shape=(256, 2048))
    s = torch.linalg.svdvals(dw)
    share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    r = result.modules[0].rank
    assert share[r - 1] >= 0.9 > share[r - 2]
    assert result.modules[0].error == pytest.approx(float((1 - share[r - 1]).sqrt()), rel=1e-3)
    capped = merge_adapters([(src, 1.0)], FactorSpec("lora", rank=3, energy=0.9))
    assert capped.modules[0].rank == 3


def test_lokr_output_resizes_lokr_exactly(fixtures_dir):
    """A LoKr's ΔW is one Kronecker product: the LoKr writer gets it back exactly at rank 4."""
    src = lc.load_adapter(fixtures_dir / "lokr_linear_default_factor.safetensors")
    result = merge_adapters([(src, 1.0)], FactorSpec("lokr", rank=4))
    (m,) = result.modules
    assert m.rank == 4 and m.kron_energy == pytest.approx(1.0, abs=1e-6)
    name = m.name
    assert result.tensors[f"{name}.lokr_w1"].shape == (20, 20)
    assert result.tensors[f"{name}.lokr_w2_a"].shape == (32, 4)
    assert result.tensors[f"{name}.lokr_w2_b"].shape == (4, 32)
    want = goldens.expected("lokr_linear_default_factor")[LOKR_KEY]
    assert rel_err(_deltas_of(result)[LOKR_KEY], want) < EXACT


def test_lokr_output_of_a_sum_reports_its_error(fixtures_dir, pair):
    """LoHa + LoKr on one key is not one Kronecker product: the error is large and reported."""
    loha, lokr = pair
    result = merge_adapters([(loha, 1.0), (_renamed(lokr, LOHA_NAME), 1.0)], FactorSpec("lokr", rank=32))
    want = (goldens.expected("loha_linear")[LOHA_KEY]
            + goldens.expected("lokr_linear_default_factor")[LOKR_KEY])
    actual = _fro(_deltas_of(result)[LOHA_KEY], want)
    assert actual == pytest.approx(result.modules[0].error, rel=1e-4)
    assert result.modules[0].kron_energy < 1.0


def test_nearest_kronecker_is_optimal():
    """The rearrangement + SVD beats nearby Kronecker products (Van Loan's theorem)."""
    g = torch.Generator().manual_seed(0)
    dw = torch.randn(12, 20, generator=g, dtype=torch.float64)
    out, _, _ = merge_mod.lokr_factors(dw, FactorSpec("lokr", rank=0, energy=1.0))
    best = torch.kron(out["lokr_w1"], out["lokr_w2"]) if "lokr_w2" in out else None
    assert best is not None and best.shape == dw.shape
    err = float(torch.linalg.norm(dw - best))
    for _ in range(20):
        w1 = out["lokr_w1"] + 0.01 * torch.randn(out["lokr_w1"].shape, generator=g, dtype=torch.float64)
        assert float(torch.linalg.norm(dw - torch.kron(w1, out["lokr_w2"]))) > err


def test_conv_tucker_to_lora_full_rank(fixtures_dir):
    src = lc.load_adapter(fixtures_dir / "loha_conv_tucker.safetensors")
    key = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
    result = merge_adapters([(src, 1.0)], FactorSpec("lora", rank=16))  # LoHa Tucker R=4: rank ≤ 16
    name = result.modules[0].name
    assert result.tensors[f"{name}.lora_down.weight"].shape == (16, 320, 3, 3)
    assert result.tensors[f"{name}.lora_up.weight"].shape == (320, 16, 1, 1)
    assert rel_err(_deltas_of(result)[key], goldens.expected("loha_conv_tucker")[key]) < EXACT


def test_conv_to_lokr_keeps_kernel(fixtures_dir):
    src = lc.load_adapter(fixtures_dir / "lyco_lokr_decompose_both.safetensors")
    key = "diffusion_model.input_blocks.4.0.skip_connection.weight"
    result = merge_adapters([(src, 1.0)], FactorSpec("lokr", rank=4))
    want = goldens.expected("lyco_lokr_decompose_both")[key]
    assert rel_err(_deltas_of(result)[key], want) < EXACT


def test_dora_needs_model_then_matches(fixtures_dir):
    src = lc.load_adapter(fixtures_dir / "lyco_loha_dora.safetensors")
    with pytest.raises(lc.AdapterError, match="dora_scale"):
        merge_adapters([(src, 1.0)], FactorSpec("lora", rank=8))
    weights = dict(lc.manifest("sdxl"))
    weights.update({k: v.float() for k, v in load_file(fixtures_dir / "lyco_loha_dora.base.safetensors").items()})
    key = "diffusion_model.output_blocks.6.0.skip_connection.weight"
    result = merge_adapters([(src, 1.0)], FactorSpec("lora", rank=320), weights)
    assert rel_err(_deltas_of(result)[key], goldens.expected("lyco_loha_dora")[key]) < EXACT


def test_metadata_is_honest(tmp_path, pair):
    loha, lokr = pair
    result = merge_adapters([(loha, 0.25), (lokr, 1.5)], FactorSpec("lora", rank=8, save_dtype=torch.float16))
    path = save_result(result, tmp_path / "m.safetensors")
    meta = lc.read_metadata(path)
    sources = json.loads(meta["lycoris_merge_sources"])
    assert [(s["file"], s["weight"]) for s in sources] == [
        ("loha_linear.safetensors", 0.25), ("lokr_linear_default_factor.safetensors", 1.5)]
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "8"
    assert float(meta["lycoris_merge_error"]) == pytest.approx(result.overall_error, rel=1e-5)
    errors = json.loads(meta["lycoris_merge_module_errors"])
    assert errors == {m.name: pytest.approx(m.error, rel=1e-5) for m in result.modules}
    written = lc.load_adapter(path)
    assert all(m.algo == "lora" and m.rank == 8 and m.scale == 1.0 for m in written.modules.values())
    assert all(t.dtype == torch.float16 for k, t in result.tensors.items() if not k.endswith("alpha"))
    with pytest.raises(FileExistsError):
        save_result(result, path)


def test_fp16_error_measured_after_cast(pair):
    """The reported error includes the save-dtype rounding (not just the SVD truncation)."""
    _, lokr = pair
    fp32 = merge_adapters([(lokr, 1.0)], FactorSpec("lora", rank=80))
    fp16 = merge_adapters([(lokr, 1.0)], FactorSpec("lora", rank=80, save_dtype=torch.float16))
    assert fp32.overall_error < 1e-5 < fp16.overall_error < 1e-2


def test_bad_specs_and_mixed_architectures(fixtures_dir, pair):
    with pytest.raises(ValueError, match="rank"):
        merge_adapters([(pair[0], 1.0)], FactorSpec("lora"))
    with pytest.raises(ValueError, match="format"):
        merge_adapters([(pair[0], 1.0)], FactorSpec("svd", rank=4))
    anima = lc.load_adapter(fixtures_dir / "anima_loha_blocks.safetensors")
    with pytest.raises(lc.AdapterError, match="different models"):
        merge_adapters([(pair[0], 1.0), (anima, 1.0)], FactorSpec("lora", rank=4))


@pytest.mark.parametrize("arch", ["sdxl", "anima"])
def test_written_names_resolve_back(arch):
    """Every adaptable key's sd-scripts name maps back to the same key through KeyMap."""
    keys = lc.manifest(arch)
    keymap = lc.KeyMap(keys)
    tes = {k.split(".", 1)[0] for k in keys} & set(TE_INNER_PREFIX)
    n = 0
    for key, shape in keys.items():
        if key.endswith(".weight") and len(shape) >= 2:
            assert keymap.resolve(output_name(key, tes)) == key
            n += 1
    assert n > 300


def test_cli_merge(tmp_path, fixtures_dir, capsys):
    out = tmp_path / "cli.safetensors"
    code = cli.main(["merge", f"{fixtures_dir / 'loha_linear.safetensors'}:0.5",
                        str(fixtures_dir / "lokr_linear_default_factor.safetensors"),
                        "--rank", "96", "-o", str(out), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["overall_error"] < EXACT
    got, _ = lc.delta_weights(lc.load_adapter(out), lc.manifest("sdxl"))
    assert rel_err(got[LOKR_KEY], goldens.expected("lokr_linear_default_factor")[LOKR_KEY]) < EXACT
    assert rel_err(got[LOHA_KEY], 0.5 * goldens.expected("loha_linear")[LOHA_KEY]) < EXACT
    assert cli.main(["merge", str(fixtures_dir / "loha_linear.safetensors"), "--rank", "4",
                        "-o", str(out)]) == 2  # refuses to overwrite


def test_cli_resize_dora_with_model_file(tmp_path, fixtures_dir):
    """`--model` resolves names against a model file and gives DoRA its W0 (read lazily)."""
    out = tmp_path / "dora.safetensors"
    assert cli.main(["resize", str(fixtures_dir / "lyco_loha_dora.safetensors"), "--rank", "320",
                     "--model", str(fixtures_dir / "lyco_loha_dora.base.safetensors"), "-o", str(out)]) == 0
    key = "diffusion_model.output_blocks.6.0.skip_connection.weight"
    got, _ = lc.delta_weights(lc.load_adapter(out), lc.manifest("sdxl"))
    assert rel_err(got[key], goldens.expected("lyco_loha_dora")[key]) < EXACT
    assert cli.main(["resize", str(fixtures_dir / "lyco_loha_dora.safetensors"), "--rank", "8",
                     "-o", str(tmp_path / "no_model.safetensors")]) == 2  # DoRA without a model


def test_unresolved_modules_merge_by_name():
    """Names no model key explains are summed by their own spelling and kept, with a note."""
    g = torch.Generator().manual_seed(1)
    t = {"lora_unet_not_a_layer.lora_up.weight": torch.randn(6, 2, generator=g),
         "lora_unet_not_a_layer.lora_down.weight": torch.randn(2, 5, generator=g)}
    a, b = lc.adapter_from_tensors(t, name="a"), lc.adapter_from_tensors(t, name="b")
    result = merge_adapters([(a, 1.0), (b, 2.0)], FactorSpec("lora", rank=2))
    assert [m.name for m in result.modules] == ["lora_unet_not_a_layer"]
    assert any("merged by name" in n for n in result.notes)
    got = lc.adapter_from_tensors(result.tensors).modules["lora_unet_not_a_layer"].delta()
    want = 3.0 * t["lora_unet_not_a_layer.lora_up.weight"] @ t["lora_unet_not_a_layer.lora_down.weight"]
    assert rel_err(got, want) < EXACT


def test_lokr_factor_option(fixtures_dir):
    """factor 8 on 640×640: W1 is 8×8, W2 80×80; the (large) error is the honest one."""
    src = lc.load_adapter(fixtures_dir / "loha_linear.safetensors")
    result = merge_adapters([(src, 1.0)], FactorSpec("lokr", rank=16, factor=8))
    name = result.modules[0].name
    assert result.tensors[f"{name}.lokr_w1"].shape == (8, 8)
    assert result.tensors[f"{name}.lokr_w2_a"].shape == (80, 16)
    want = goldens.expected("loha_linear")[LOHA_KEY]
    assert _fro(_deltas_of(result)[LOHA_KEY], want) == pytest.approx(result.modules[0].error, rel=1e-4)
    assert json.loads(result.metadata["ss_network_args"])["factor"] == "8"


def test_same_inputs_write_the_same_tensors(pair):
    """The randomized SVD is seeded: a merge is reproducible bit for bit."""
    loha, lokr = pair
    spec = FactorSpec("lora", rank=8)
    torch.manual_seed(123)
    a = merge_adapters([(loha, 1.0), (lokr, 0.5)], spec).tensors
    torch.manual_seed(456)
    b = merge_adapters([(loha, 1.0), (lokr, 0.5)], spec).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
