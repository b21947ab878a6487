"""Baking adapters into model files: every written weight is `W0 + Σ sᵢ·ΔWᵢ` (oracle: the golden
expected ΔW), every other tensor is copied byte for byte, the write is streamed and atomic."""

from __future__ import annotations

import json

import goldens
import pytest
import torch
from helpers import rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lycoris_core as lc
from lycoris_core import cli
from lycoris_core.bake import bake_file, model_keys_of_file
from lycoris_core.safetensors_io import TensorInfo, save_safetensors_streaming

LOHA_KEY = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
LOKR_KEY = "diffusion_model.output_blocks.3.1.transformer_blocks.1.attn2.to_q.weight"
CONV_KEY = "diffusion_model.input_blocks.1.0.in_layers.2.weight"



@pytest.fixture()
def model_file(tmp_path):
    """A checkpoint-style file holding the golden layers at full size plus untouched tensors.

    Weights at a real model's scale (std 1/√fan_in): float32 stores W0 + ΔW to ulp(|W0|), so
    unit-scale weights alone would put the check's error at ~5e-6 of max|ΔW|, against 1e-5."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        "model." + LOHA_KEY: (torch.randn(640, 640, generator=g) / 640 ** 0.5).to(torch.float16),
        "model." + LOKR_KEY: (torch.randn(640, 640, generator=g) / 640 ** 0.5).to(torch.float16),
        "model." + CONV_KEY: (torch.randn(320, 320, 3, 3, generator=g) / 2880 ** 0.5).to(torch.float16),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.bias": torch.randn(320, generator=g),
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3, generator=g),
        "model.diffusion_model.step_counter": torch.arange(5, dtype=torch.int64),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"modelspec.title": "test model"})
    return path, tensors


def test_baked_weights_equal_base_plus_weighted_deltas(tmp_path, fixtures_dir, model_file):
    path, base = model_file
    loha = lc.load_adapter(fixtures_dir / "loha_linear.safetensors")
    lokr = lc.load_adapter(fixtures_dir / "lokr_linear_default_factor.safetensors")
    tucker = lc.load_adapter(fixtures_dir / "loha_conv_tucker.safetensors")
    loha_on_lokr_key = lc.adapter_from_tensors(
        {k.replace("input_blocks_4_1_transformer_blocks_0_attn1", "output_blocks_3_1_transformer_blocks_1_attn2"):
         loha.source.get(k) for k in loha.source.keys()})
    strengths = [(loha, 0.8), (lokr, -0.6), (tucker, 1.5), (loha_on_lokr_key, 0.3)]
    out = tmp_path / "baked.safetensors"
    report = bake_file(path, strengths, out, save_dtype=torch.float32)
    assert report.patched == 3 and all(not u.unmatched for u in report.adapters)
    got = load_file(out)
    e_loha = goldens.expected("loha_linear")[LOHA_KEY]
    want = {
        LOHA_KEY: base["model." + LOHA_KEY].float() + 0.8 * e_loha,
        LOKR_KEY: base["model." + LOKR_KEY].float() - 0.6 * goldens.expected("lokr_linear_default_factor")[
            LOKR_KEY] + 0.3 * e_loha,
        CONV_KEY: base["model." + CONV_KEY].float() + 1.5 * goldens.expected("loha_conv_tucker")[CONV_KEY],
    }
    for key, w in want.items():
        assert got["model." + key].dtype == torch.float32
        change = got["model." + key].double() - base["model." + key].double()
        assert rel_err(change, w.double() - base["model." + key].double()) < 1e-5, key
    assert torch.equal(got["first_stage_model.decoder.conv_in.weight"],
                       base["first_stage_model.decoder.conv_in.weight"])
    assert torch.equal(got["model.diffusion_model.step_counter"], base["model.diffusion_model.step_counter"])
    meta = lc.read_metadata(out)
    assert meta["modelspec.title"] == "test model"
    applied = json.loads(meta["lycoris_bake_adapters"])
    assert [(a["file"], a["strength"]) for a in applied][:3] == [
        ("loha_linear.safetensors", 0.8), ("lokr_linear_default_factor.safetensors", -0.6),
        ("loha_conv_tucker.safetensors", 1.5)]


def test_bake_keeps_dtype_and_casts_once(tmp_path, fixtures_dir, model_file):
    """fp16 weights stay fp16: W0 + s·ΔW is formed in fp32 and rounded once."""
    path, base = model_file
    loha = lc.load_adapter(fixtures_dir / "loha_linear.safetensors")
    out = tmp_path / "fp16.safetensors"
    bake_file(path, [(loha, 2.0)], out)
    got = load_file(out)["model." + LOHA_KEY]
    assert got.dtype == torch.float16
    # the pack's own float32 ΔW (its agreement with the golden file is checked above): equality
    # with another implementation's ΔW would hang on which fp16 ties its last bit tips
    (module,) = loha.modules.values()
    dw = module.delta(torch.float32, shape=tuple(got.shape))
    want = (base["model." + LOHA_KEY].float() + 2.0 * dw).half()
    assert torch.equal(got, want)


def test_bake_is_streamed_one_tensor_at_a_time(tmp_path, fixtures_dir, model_file, monkeypatch):
    """Each tensor is read once, just before it is written; no whole-file load."""
    path, base = model_file
    reads: list[str] = []
    original = lc.SafetensorsFile.get

    def spy(self, key, device="cpu"):
        reads.append(key)
        return original(self, key, device)

    monkeypatch.setattr(lc.SafetensorsFile, "get", spy)
    bake_file(path, [(lc.load_adapter(fixtures_dir / "loha_linear.safetensors"), 1.0)], tmp_path / "s.safetensors")
    model_reads = [k for k in reads if k in base]
    assert sorted(model_reads) == sorted(base)  # every model tensor read exactly once


def test_bake_refuses_bad_input_and_never_clobbers(tmp_path, fixtures_dir, model_file):
    path, _ = model_file
    anima = lc.load_adapter(fixtures_dir / "anima_loha_blocks.safetensors")
    with pytest.raises(lc.AdapterError, match="anima_loha_blocks"):
        bake_file(path, [(anima, 1.0)], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert not list(tmp_path.glob(".*tmp"))
    loha = lc.load_adapter(fixtures_dir / "loha_linear.safetensors")
    with pytest.raises(FileExistsError):
        bake_file(path, [(loha, 1.0)], path, overwrite=True)
    with pytest.raises(FileExistsError):
        bake_file(path, [(loha, 1.0)], path)


def test_streaming_writer_checks_and_matches_safetensors(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.tensor(2.5, dtype=torch.bfloat16),
               "c": torch.arange(6, dtype=torch.int64).reshape(2, 3), "empty": torch.zeros(0, 3)}
    specs = [TensorInfo(k, {torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}[v.dtype],
                        tuple(v.shape)) for k, v in tensors.items()]
    out = save_safetensors_streaming(tmp_path / "s.safetensors", specs, iter(tensors.items()), {"m": "1"})
    with safe_open(out, "pt") as fh:
        assert fh.metadata() == {"m": "1"}
        for k, v in tensors.items():
            assert torch.equal(fh.get_tensor(k), v)
    wrong = [("a", tensors["a"]), ("b", tensors["b"].float())]
    with pytest.raises(ValueError, match="header says BF16"):
        save_safetensors_streaming(tmp_path / "w.safetensors", specs, iter(wrong))
    assert not (tmp_path / "w.safetensors").exists() and not list(tmp_path.glob(".*tmp"))


def test_file_key_prefixes():
    assert model_keys_of_file(["model.diffusion_model.x.weight", "first_stage_model.y"]) == {
        "model.diffusion_model.x.weight": "diffusion_model.x.weight"}
    assert model_keys_of_file(["blocks.0.self_attn.q_proj.weight"]) == {
        "blocks.0.self_attn.q_proj.weight": "diffusion_model.blocks.0.self_attn.q_proj.weight"}
    assert model_keys_of_file(["net.blocks.0.mlp.layer1.weight"])["net.blocks.0.mlp.layer1.weight"] == \
        "diffusion_model.blocks.0.mlp.layer1.weight"
    assert model_keys_of_file(["conditioner.embedders.0.transformer.text_model.x.weight"]) == {
        "conditioner.embedders.0.transformer.text_model.x.weight": "clip_l.transformer.text_model.x.weight"}


def test_cli_bake(tmp_path, fixtures_dir, model_file, capsys):
    path, base = model_file
    out = tmp_path / "cli.safetensors"
    code = cli.main(["bake", str(path), "-a", f"{fixtures_dir / 'lokr_linear_default_factor.safetensors'}:0.5",
                     "-o", str(out), "--dtype", "fp32"])
    assert code == 0
    assert "1 modules applied" in capsys.readouterr().out
    change = load_file(out)["model." + LOKR_KEY] - base["model." + LOKR_KEY].float()
    assert rel_err(change, 0.5 * goldens.expected("lokr_linear_default_factor")[LOKR_KEY]) < 1e-5


def test_bake_state_dict_leaves_the_model_untouched(tmp_path, fixtures_dir):
    """In-memory fp32 weights (the node's case) are read, never modified in place."""
    from lycoris_core.bake import bake_state_dict

    g = torch.Generator().manual_seed(5)
    state = {LOHA_KEY: torch.randn(640, 640, generator=g) / 640 ** 0.5,  # a real layer's scale
             "diffusion_model.other.weight": torch.randn(3, 3)}
    before = {k: v.clone() for k, v in state.items()}
    loha = lc.load_adapter(fixtures_dir / "loha_linear.safetensors")
    bake_state_dict(state, {k: k for k in state}, [(loha, 1.0)], tmp_path / "m.safetensors")
    assert all(torch.equal(state[k], before[k]) for k in state)
    change = load_file(tmp_path / "m.safetensors")[LOHA_KEY] - before[LOHA_KEY]
    assert rel_err(change, goldens.expected("loha_linear")[LOHA_KEY]) < 1e-5
