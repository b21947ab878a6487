"""MergeLyCORIS / ResizeLyCORIS through real ComfyUI graphs; the files they write are loaded by
ComfyUI's own LoRA path (`comfy.lora.load_lora` with `model_lora_keys_unet/clip`) and must give the
ΔW that lycoris_core computes for them, and the golden sum within the reported error."""

from __future__ import annotations

import json
from pathlib import Path

import goldens
import torch
from helpers import rel_err
from safetensors.torch import load_file
from test_loaders_common import install_golden, loras_dir

import lycoris_core as lc

LOHA_KEY = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
LOKR_KEY = "diffusion_model.output_blocks.3.1.transformer_blocks.1.attn2.to_q.weight"
CONV_KEY = "diffusion_model.input_blocks.1.0.in_layers.2.weight"


def _spec(rank=16, energy=0.0, fmt="lora", prefix="lycoris/test") -> dict:
    return {"format": fmt, "rank": rank, "energy": energy, "factor": -1, "save_dtype": "fp32",
            "precision": "fp32", "filename_prefix": prefix}


def _run(executor, node: dict) -> tuple[str, Path]:
    graph = {"1": {"class_type": "LycorisTestModel", "inputs": {"kind": "golden_sdxl", "seed": 0}},
             "2": node,
             "3": {"class_type": "LycorisTestSink", "inputs": {"text": ["2", 0]}}}
    res = executor.run(graph)
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    report, path = res.outputs("2")
    return report, Path(path)


def _merge_node(slots: list[tuple[str, float]], **spec) -> dict:
    inputs = {"model": ["1", 0], **_spec(**spec)}
    for i in range(1, 5):
        name, w = slots[i - 1] if i <= len(slots) else ("None", 1.0)
        inputs[f"lora_{i}"], inputs[f"weight_{i}"] = name, w
    return {"class_type": "MergeLyCORIS", "inputs": inputs}


def comfy_deltas(path: Path, model) -> dict[str, torch.Tensor]:
    """ΔW per key as ComfyUI's own LoraLoader path computes it (patch applied to a zero weight)."""
    import comfy.lora
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    names = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}
    assert names <= set(key_map), f"ComfyUI cannot map {sorted(names - set(key_map))}"
    patches = comfy.lora.load_lora(sd, key_map)
    weights = model.model.state_dict()
    out = {}
    for key, patch in patches.items():
        zero = torch.zeros(weights[key].shape, dtype=torch.float32)
        out[key] = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], zero, key)
    return out


def _core_deltas(path: Path, model) -> dict[str, torch.Tensor]:
    deltas, unmatched = lc.delta_weights(lc.load_adapter(path), model.model.state_dict())
    assert unmatched == []
    return deltas



def test_merged_file_loads_in_comfyui_exactly(host, executor, fixtures_dir):
    loha = install_golden(host, fixtures_dir, "loha_linear")
    lokr = install_golden(host, fixtures_dir, "lokr_linear_default_factor")
    report, path = _run(executor, _merge_node([(loha, 0.7), (lokr, -1.3)], rank=96))
    assert path.is_file() and Path(host.base_dir / "output") in path.parents
    assert "overall error" in report and "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in report
    model = _model(executor)
    comfy = comfy_deltas(path, model)
    core = _core_deltas(path, model)
    assert set(comfy) == set(core) == {LOHA_KEY, LOKR_KEY}
    for key in comfy:
        assert rel_err(comfy[key], core[key]) < 1e-5, key
    assert rel_err(comfy[LOHA_KEY], 0.7 * goldens.expected("loha_linear")[LOHA_KEY]) < 1e-5
    assert rel_err(comfy[LOKR_KEY], -1.3 * goldens.expected("lokr_linear_default_factor")[LOKR_KEY]) < 1e-5


def test_lossy_merge_on_one_key_within_reported_error(host, executor, fixtures_dir):
    """Two files on the same layer, rank 8: ComfyUI's ΔW is the sum within the file's error."""
    loha = install_golden(host, fixtures_dir, "loha_linear")
    lokr = lc.load_adapter(fixtures_dir / "lokr_linear_default_factor.safetensors")
    moved = loras_dir(host) / "lokr_on_loha_layer.safetensors"
    if not moved.exists():
        lc.save_safetensors({k.replace("output_blocks_3_1_transformer_blocks_1_attn2",
                                       "input_blocks_4_1_transformer_blocks_0_attn1"): lokr.source.get(k)
                             for k in lokr.source.keys()}, moved)
    _, path = _run(executor, _merge_node([(loha, 1.0), (moved.name, 0.5)], rank=8))
    comfy = comfy_deltas(path, _model(executor))[LOHA_KEY]
    want = (goldens.expected("loha_linear")[LOHA_KEY]
            + 0.5 * goldens.expected("lokr_linear_default_factor")[LOKR_KEY])
    actual = float(torch.linalg.vector_norm(comfy.double() - want.double()) / torch.linalg.vector_norm(want.double()))
    reported = float(lc.read_metadata(path)["lycoris_merge_error"])
    assert 1e-2 < actual <= reported * (1 + 1e-4) + 1e-6


def test_resized_files_load_in_comfyui_exactly(host, executor, fixtures_dir):
    lokr = install_golden(host, fixtures_dir, "lokr_linear_default_factor")
    tucker = install_golden(host, fixtures_dir, "loha_conv_tucker")
    cases = [(lokr, "lokr", 4, "lokr_linear_default_factor", LOKR_KEY),
             (tucker, "lora", 16, "loha_conv_tucker", CONV_KEY)]  # LoHa Tucker: rank ≤ 4·4
    for name, fmt, rank, case, key in cases:
        node = {"class_type": "ResizeLyCORIS",
                "inputs": {"lora_name": name, "model": ["1", 0], **_spec(rank=rank, fmt=fmt)}}
        report, path = _run(executor, node)
        model = _model(executor)
        comfy = comfy_deltas(path, model)
        assert rel_err(comfy[key], _core_deltas(path, model)[key]) < 1e-5, case
        assert rel_err(comfy[key], goldens.expected(case)[key]) < 1e-5, case
        meta = lc.read_metadata(path)
        assert meta["lycoris_merge_operation"] == "resize"
        assert meta["ss_network_module"] == f"networks.{fmt}"


def test_output_counter_and_errors_in_ui(host, executor, fixtures_dir):
    loha = install_golden(host, fixtures_dir, "loha_linear")
    _, first = _run(executor, _merge_node([(loha, 1.0)], rank=4, prefix="lycoris/counter"))
    _, second = _run(executor, _merge_node([(loha, 0.5)], rank=4, prefix="lycoris/counter"))
    assert first != second and first.exists() and second.exists()
    assert json.loads(lc.read_metadata(second)["lycoris_merge_sources"])[0]["weight"] == 0.5
    dora = install_golden(host, fixtures_dir, "lyco_loha_dora")
    node = _merge_node([(dora, 1.0)], rank=4)
    del node["inputs"]["model"]
    res = executor.run({"2": node, "3": {"class_type": "LycorisTestSink", "inputs": {"text": ["2", 0]}}})
    assert not res.ok and "dora_scale" in res.execution_error["exception_message"]
    res = executor.run({"1": {"class_type": "LycorisTestModel", "inputs": {"kind": "golden_sdxl", "seed": 0}},
                        "2": _merge_node([(loha, 1.0)], rank=0),
                        "3": {"class_type": "LycorisTestSink", "inputs": {"text": ["2", 0]}}})
    assert not res.ok and "rank" in res.execution_error["exception_message"]


_MODEL: list = []


def _model(executor):
    """The golden SDXL test model (same seed as the graphs), built once."""
    if not _MODEL:
        res = executor.run({"1": {"class_type": "LycorisTestModel", "inputs": {"kind": "golden_sdxl", "seed": 0}},
                            "3": {"class_type": "LycorisTestSink", "inputs": {"model": ["1", 0]}}})
        assert res.ok
        _MODEL.append(res.outputs("1")[0])
    return _MODEL[0]


def test_merge_with_text_encoders_on_tiny_sdxl(host, executor):
    """UNet + CLIP-L + CLIP-G modules: written as lora_unet_/lora_te1_/lora_te2_, mapped by ComfyUI's
    own key maps, with ΔW = w·ΔW_oracle (oracle written from SPEC §3 only)."""
    import comfy.lora
    from test_loaders_common import make_adapter, write_adapter

    graph_model = {"1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}},
                   "3": {"class_type": "LycorisTestSink", "inputs": {"model": ["1", 0], "clip": ["1", 1]}}}
    probe = executor.run(graph_model)
    assert probe.ok
    model, clip = probe.outputs("1")
    keys = {"diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": None,
            "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": None,
            "clip_g.transformer.text_model.encoder.layers.1.mlp.fc1.weight": None}
    sd = {**model.model.state_dict(), **clip.cond_stage_model.state_dict()}
    shapes = {k: tuple(sd[k].shape) for k in keys}
    tensors, oracle = make_adapter(shapes, "loha", rank=2, seed=21)
    name = write_adapter(host, "merge_tiny_te.safetensors", tensors, "loha")
    node = _merge_node([(name, -0.6)], rank=64)  # ≥ min(out, in) of every layer: exact
    node["inputs"]["clip"] = ["1", 1]
    graph = {**graph_model, "2": node, "3": {"class_type": "LycorisTestSink", "inputs": {"text": ["2", 0]}}}
    res = executor.run(graph)
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    path = Path(res.outputs("2")[1])
    written = lc.load_adapter(path)
    assert sorted(n.split("_")[1] for n in written.modules) == ["te1", "te2", "unet"]
    file_sd = load_file(path)
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, comfy.lora.model_lora_keys_unet(model.model, {}))
    patches = comfy.lora.load_lora(file_sd, key_map)
    assert set(patches) == set(keys)
    for key, patch in patches.items():
        zero = torch.zeros(shapes[key], dtype=torch.float32)
        got = comfy.lora.calculate_weight([(1.0, patch, 1.0, None, None)], zero, key)
        assert rel_err(got, -0.6 * oracle[key]) < 1e-5, key
