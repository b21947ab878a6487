"""BakeLyCORIS through a real ComfyUI graph on the tiny SDXL: the saved diffusion model holds
`W0 + Σ sᵢ·ΔWᵢ` (ΔW from an oracle written from SPEC §3 only), loads with ComfyUI's own
diffusion-model loader, and every weight no adapter touches is unchanged."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from test_loaders_common import make_adapter, write_adapter

LINEAR = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
CONV = "diffusion_model.input_blocks.1.0.in_layers.2.weight"
FF = "diffusion_model.output_blocks.3.1.transformer_blocks.0.ff.net.0.proj.weight"


def _graph(slots, save_dtype="keep", prefix="lycoris/bake_test") -> dict:
    inputs = {"model": ["1", 0], "save_dtype": save_dtype, "filename_prefix": prefix}
    for i in range(1, 5):
        name, s = slots[i - 1] if i <= len(slots) else ("None", 1.0)
        inputs[f"lora_{i}"], inputs[f"strength_{i}"] = name, s
    return {"1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}},
            "2": {"class_type": "BakeLyCORIS", "inputs": inputs},
            "3": {"class_type": "LycorisTestSink", "inputs": {"text": ["2", 0]}}}


def test_bake_node_writes_base_plus_weighted_deltas(host, executor):
    probe = executor.run({"1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}},
                          "3": {"class_type": "LycorisTestSink", "inputs": {"model": ["1", 0]}}})
    assert probe.ok
    base = {k: v.detach().clone() for k, v in probe.outputs("1")[0].model.state_dict().items()
            if k.startswith("diffusion_model.")}
    shapes = {k: tuple(base[k].shape) for k in (LINEAR, CONV, FF)}
    loha_t, loha_d = make_adapter({LINEAR: shapes[LINEAR], CONV: shapes[CONV]}, "loha", seed=11)
    lokr_t, lokr_d = make_adapter({LINEAR: shapes[LINEAR], FF: shapes[FF]}, "lokr", seed=12)
    loha = write_adapter(host, "bake_loha.safetensors", loha_t, "loha")
    lokr = write_adapter(host, "bake_lokr.safetensors", lokr_t, "lokr")

    res = executor.run(_graph([(loha, 0.7), (lokr, -0.4)]))
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    report, path = res.outputs("2")
    path = Path(path)
    assert Path(host.base_dir / "output") in path.parents
    assert "bake_loha.safetensors × 0.7: 2 modules applied" in report
    saved = load_file(path)
    assert set(saved) == {"model." + k for k in base}
    want = {LINEAR: 0.7 * loha_d[LINEAR] - 0.4 * lokr_d[LINEAR], CONV: 0.7 * loha_d[CONV],
            FF: -0.4 * lokr_d[FF]}
    for key, change in want.items():
        got = saved["model." + key].double() - base[key].double()
        assert float((got - change).abs().max() / change.abs().max()) < 1e-5, key
    untouched = [k for k in base if k not in want]
    assert untouched and all(torch.equal(saved["model." + k], base[k]) for k in untouched)

    # ComfyUI's "Load Diffusion Model" finds the prefix and every key/shape of the model class
    # is there (its config detection does not know the tiny test config; see the full-size test).
    import comfy.model_detection

    prefix = comfy.model_detection.unet_prefix_from_state_dict(saved)
    assert prefix == "model.diffusion_model."
    expected = {k: tuple(v.shape) for k, v in probe.outputs("1")[0].model.diffusion_model.state_dict().items()}
    assert {k[len(prefix):]: tuple(v.shape) for k, v in saved.items()} == expected


def test_bake_key_layout_is_detected_as_sdxl_by_comfyui(host):
    """The node writes `model.` + ComfyUI key; on the full-size SDXL key set ComfyUI's own model
    detection (used by Load Diffusion Model) recognises that layout as SDXL."""
    import comfy.model_detection
    import comfy.supported_models

    import lycoris_core as lc

    sd = {"model." + k: torch.empty(shape, device="meta") for k, shape in lc.manifest("sdxl").items()
          if k.startswith("diffusion_model.")}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    assert prefix == "model.diffusion_model."
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    assert type(config) is comfy.supported_models.SDXL


def test_bake_node_dtype_and_bad_adapter(host, executor, fixtures_dir):
    import shutil

    from test_loaders_common import loras_dir

    shutil.copyfile(fixtures_dir / "anima_loha_blocks.safetensors", loras_dir(host) / "bake_anima.safetensors")
    res = executor.run(_graph([("bake_anima.safetensors", 1.0)], prefix="lycoris/bad"))
    assert not res.ok and "matches a weight" in res.execution_error["exception_message"]
    assert not list((host.base_dir / "output" / "lycoris").glob("bad*"))
