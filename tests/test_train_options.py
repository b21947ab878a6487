"""LyCORISTrainingOptions → TrainLyCORIS in real ComfyUI graphs on the tiny SDXL and tiny DiT:
the options reach the loss, the optimizer and the exported sd-scripts command; options that do
not apply to the model are errors naming them; zero_terminal_snr equals ComfyUI's own rescale."""

from __future__ import annotations

import math
import shlex
import sys
from pathlib import Path

import pytest
import torch
from test_train_graph import data_node, graph  # noqa: F401  (fixtures)

from lycoris_core import load_adapter
from lycoris_core.train.checkpoint import read_state
from lycoris_core.train.sd_objective import ObjectiveOptions

pytestmark = pytest.mark.usefixtures("one_thread", "data_node")

OPTION_DEFAULTS = {f: getattr(ObjectiveOptions(), f) for f in ObjectiveOptions.__dataclass_fields__}
OPTION_DEFAULTS.update(optimizer_args="", lr_scheduler_num_cycles=1, lr_scheduler_power=1.0)


def options_graph(kind: str, options: dict, **train) -> dict:
    g = graph(kind, **train)
    g["6"] = {"class_type": "LyCORISTrainingOptions", "inputs": {**OPTION_DEFAULTS, **options}}
    g["4"]["inputs"]["training_options"] = ["6", 0]
    return g


def _pack(host, module: str):
    import comfy_host

    return sys.modules[f"{comfy_host.PACK_MODULE}.{module}"]


def test_schema_names_every_option_with_its_sdscripts_name(host):
    info = host.nodes.NODE_CLASS_MAPPINGS["LyCORISTrainingOptions"].GET_NODE_INFO_V1()
    inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    assert set(inputs) == set(OPTION_DEFAULTS)
    for name, spec in inputs.items():
        opts = spec[1]
        assert f"--{name}" in opts["tooltip"], name
        if spec[0] == "FLOAT":
            assert "min" in opts and "max" in opts, name
        if "default" in opts:
            assert opts["default"] == OPTION_DEFAULTS[name], name
    train = host.nodes.NODE_CLASS_MAPPINGS["TrainLyCORIS"].GET_NODE_INFO_V1()
    assert list(train["input"]["optional"])[-1] == "training_options"
    assert info["output"] == [train["input"]["optional"]["training_options"][0]]


def test_sdxl_options_reach_the_run_and_the_sdscripts_command(executor, host):
    options = dict(noise_offset=0.05, adaptive_noise_scale=0.01, multires_noise_iterations=4,
                   multires_noise_discount=0.25, ip_noise_gamma=0.1, min_snr_gamma=5.0,
                   debiased_estimation_loss=True, v_pred_like_loss=0.2, loss_type="huber",
                   huber_schedule="exponential", huber_c=0.2, zero_terminal_snr=True,
                   optimizer_args="weight_decay=0.05 betas=0.9,0.99 eps=1e-7",
                   lr_scheduler_power=2.0)
    res = executor.run(options_graph("sdxl", options, steps=3, lr_scheduler="polynomial",
                                     write_sdscripts_config=True, output_name="lycoris/opts_sdxl"))
    assert res.ok, (res.node_errors, res.execution_error)
    path = Path(res.outputs("4")[1])
    tensors, info = read_state(path)
    assert len(info["losses"]) == 3 and all(math.isfinite(x) for x in info["losses"])
    assert info["config"]["optimizer_args"] == {"weight_decay": 0.05, "betas": [0.9, 0.99],
                                                "eps": 1e-7}
    groups = info["optimizer_param_groups"]
    assert all(g["weight_decay"] == 0.05 and list(g["betas"]) == [0.9, 0.99] and g["eps"] == 1e-7
               for g in groups)
    md = load_adapter(path).metadata
    assert md["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.05,betas=0.9,0.99,eps=1e-07)"
    stem = path.name[: -len(".safetensors")]
    sh = shlex.split((path.parent / f"{stem}.sdscripts.sh").read_text().splitlines()[1])
    for name, value in options.items():
        if name == "optimizer_args":
            i = sh.index("--optimizer_args")
            assert sh[i + 1: i + 4] == ["weight_decay=0.05", "betas=0.9,0.99", "eps=1e-07"]
        elif name == "lr_scheduler_power":
            assert sh[sh.index("--lr_scheduler_power") + 1] == "2.0"
        elif isinstance(value, bool):
            assert f"--{name}" in sh, name
        else:
            got = sh[sh.index(f"--{name}") + 1]
            assert (float(got) == value) if isinstance(value, (int, float)) else got == value, name
    assert "--timestep_sampling" not in sh and "--v_parameterization" not in sh


def test_dit_options_and_anima_defaults_in_the_command(executor, host):
    options = dict(timestep_sampling="shift", discrete_flow_shift=3.0, sigmoid_scale=1.5,
                   weighting_scheme="cosmap", loss_type="smooth_l1", huber_schedule="constant",
                   ip_noise_gamma=0.05)
    res = executor.run(options_graph("dit", options, steps=2, write_sdscripts_config=True,
                                     min_timestep=0, max_timestep=1000,
                                     output_name="lycoris/opts_dit"))
    assert res.ok, (res.node_errors, res.execution_error)
    path = Path(res.outputs("4")[1])
    assert all(math.isfinite(x) for x in read_state(path)[1]["losses"])
    sh = (path.parent / f"{path.name[:-len('.safetensors')]}.sdscripts.sh").read_text()
    for part in ("--timestep_sampling shift", "--discrete_flow_shift 3", "--sigmoid_scale 1.5",
                 "--weighting_scheme cosmap", "--loss_type smooth_l1", "--huber_schedule constant",
                 "--ip_noise_gamma 0.05"):
        assert part in sh, part
    # defaults: sd-scripts' Anima trainer (sigmoid, shift 1, scale 1, no weighting) written out
    res = executor.run(options_graph("dit", {}, steps=1, write_sdscripts_config=True,
                                     min_timestep=0, max_timestep=1000,
                                     output_name="lycoris/opts_dit_default"))
    assert res.ok, (res.node_errors, res.execution_error)
    path = Path(res.outputs("4")[1])
    sh = (path.parent / f"{path.name[:-len('.safetensors')]}.sdscripts.sh").read_text()
    for part in ("--timestep_sampling sigmoid", "--discrete_flow_shift 1", "--sigmoid_scale 1",
                 "--weighting_scheme none"):
        assert part in sh, part


@pytest.mark.parametrize("kind,options,train,name", [
    ("sdxl", {"timestep_sampling": "sigmoid"}, {}, "timestep_sampling"),
    ("sdxl", {"discrete_flow_shift": 3.0}, {}, "discrete_flow_shift"),
    ("sdxl", {"scale_v_pred_loss_like_noise_pred": True}, {}, "scale_v_pred_loss_like_noise_pred"),
    ("sdxl", {"masked_loss": True}, {}, "masked_loss"),
    ("sdxl", {"optimizer_args": "momentum=0.9"}, {}, "momentum"),
    ("sdxl", {"optimizer_args": "betas=0.9,1.5"}, {}, "betas"),
    ("dit", {"min_snr_gamma": 5.0}, {"min_timestep": 0, "max_timestep": 1000}, "min_snr_gamma"),
    ("dit", {"noise_offset": 0.05}, {"min_timestep": 0, "max_timestep": 1000}, "noise_offset"),
    ("dit", {"zero_terminal_snr": True}, {"min_timestep": 0, "max_timestep": 1000},
     "zero_terminal_snr"),
    ("dit", {}, {"min_timestep": 300, "max_timestep": 700}, "min_timestep"),
])
def test_options_that_do_not_apply_are_errors_naming_them(executor, host, kind,
                                                          options, train, name):
    res = executor.run(options_graph(kind, options, steps=1, output_name="lycoris/opts_err",
                                     **train))
    assert not res.ok
    assert name in str(res.execution_error or res.node_errors), (res.execution_error, res.node_errors)


def test_zero_terminal_snr_equals_comfyui_rescale(host):
    import comfy.model_sampling as cms
    from host_nodes import models

    opts = _pack(host, "nodes.train_options")
    with torch.inference_mode():
        mp = models.sdxl_model("tiny", 0)
    before = mp.get_model_object("model_sampling")
    patcher = mp.clone()
    opts.prepare_patcher(patcher, opts.TrainingOptions(ObjectiveOptions(zero_terminal_snr=True)))
    after = patcher.get_model_object("model_sampling")
    assert after is not before and torch.equal(mp.get_model_object("model_sampling").sigmas,
                                               before.sigmas)
    ref = cms.rescale_zero_terminal_snr_sigmas(before.sigmas.double().clone())
    torch.testing.assert_close(after.sigmas.double(), ref.float().double(), rtol=1e-6, atol=0)
    # the timestep of a sigma follows the rescaled table (consistent noise level ↔ timestep)
    assert float(after.timestep(after.sigmas[500:501])) == pytest.approx(500, abs=1e-3)
    assert opts.model_kind(after) == "eps"


def test_masked_loss_reads_the_latent_mask(executor, host):
    """masked_loss with ComfyUI's own SolidMask → SetLatentNoiseMask: a zero mask gives a zero
    loss; a mask of ones gives exactly the unmasked run's losses."""
    def run(value, masked):
        g = options_graph("sdxl", {"masked_loss": masked}, steps=2,
                          output_name=f"lycoris/masked_{value}_{masked}")
        if value is not None:
            g["7"] = {"class_type": "SolidMask", "inputs": {"value": value, "width": 64,
                                                            "height": 64}}
            g["8"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["2", 0],
                                                                     "mask": ["7", 0]}}
            g["4"]["inputs"]["latents"] = ["8", 0]
        res = executor.run(g)
        assert res.ok, (res.node_errors, res.execution_error)
        return read_state(Path(res.outputs("4")[1]))[1]["losses"]
    assert run(0.0, True) == [0.0, 0.0]
    plain = run(None, False)
    assert run(1.0, True) == plain and all(x > 0 for x in plain)
