"""Issue 21's loss-drop question, answered on the tiny SDXL overfit set (tests/test_train_graph).

ComfyUI's TrainLoraNode puts an adapter on every layer with a weight (every Linear / Conv2d of
the model, plus full diffs of every bias and norm weight); TrainLyCORIS trains sd-scripts'
targets (attention / feed-forward / proj Linears; the ResBlock convs only with conv_dim). Both
are run here with the same data, steps, rank, learning rate, batch and seed, and their training
set loss is measured the same way (paired: the same noise and timesteps before and after).
With TrainLoraNode's target set (the same weight layers), TrainLyCORIS's step (the pack's
Trainer and loss) lowers the loss at least as much as ComfyUI's trainer.
"""

from __future__ import annotations

import sys

import pytest
import torch
from test_train_graph import TEST_DATA

STEPS, RANK, LR = 30, 4, 0.02

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on 1 thread


def _pack(module: str):
    import comfy_host

    return sys.modules[f"{comfy_host.PACK_MODULE}.{module}"]


def _fresh():
    """The tiny SDXL, with the factory current ComfyUI's trainer deep-copies a model with."""
    from bench.bench_train import _fresh_model

    return _fresh_model("sdxl")


def paired_loss(model, draws: int = 24, net=None) -> float:
    """Mean loss of `model` (with `net` attached, if given) on the overfit set at fixed noise and
    timesteps uniform over the whole schedule."""
    import comfy.model_management as mm

    data = _pack("nodes.train_data")
    lat, cond = TEST_DATA["sdxl"]()
    mm.unload_all_models()
    mm.load_models_gpu([model], force_full_load=True)
    ob = data.Objective(model, data.flatten_latents([lat]), data.flatten_conds([cond]), "cpu",
                        torch.float32, 0, 1000)
    named = list(model.model.named_modules())
    if net is not None:
        net.attach(named)
    try:
        with torch.inference_mode(False), torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(123)
            return sum(float(ob([0, 1])) for _ in range(draws)) / draws
    finally:
        if net is not None:
            net.detach()


def comfyui_drop(algo: str) -> float:
    """1 − after/before of ComfyUI's TrainLoraNode (its LoRA applied by ComfyUI's loader)."""
    import comfy.sd
    from comfy_extras.nodes_train import TrainLoraNode

    from bench.bench_train import _comfyui_inputs, _data

    lats, conds = _data("sdxl")
    kw = _comfyui_inputs(STEPS, RANK, algo)
    kw["learning_rate"] = [LR]
    before = paired_loss(_fresh())
    with torch.inference_mode():
        out = TrainLoraNode.execute(model=[_fresh()], latents=lats, positive=conds, **kw)
    result = getattr(out, "result", out)
    lora = next(v for v in result if isinstance(v, dict) and any(isinstance(t, torch.Tensor)
                                                                for t in v.values()))
    patched, _ = comfy.sd.load_lora_for_models(_fresh(), None, lora, 1.0, 0)
    return 1.0 - paired_loss(patched) / before


def all_weight_targets(model, dim: int, alpha: float) -> list:
    """TrainLoraNode's weight layers (every Linear / Conv2d of the diffusion model) as targets."""
    net_mod, targets = _pack("lycoris_core.train.network"), _pack("lycoris_core.train.targets")
    from lycoris_core.convert import sdscripts_name

    out = []
    for key, (shape, kind) in net_mod.layers_of(model.model.named_modules()).items():
        if not key.startswith("diffusion_model."):
            continue
        name = sdscripts_name(key, set())
        out.append(targets.Target(name, key[len("diffusion_model."):-len(".weight")], key, kind,
                                  shape, dim, alpha))
    return out


def lycoris_drop(algo: str, target_set: str) -> tuple[float, int]:
    """(1 − after/before, number of modules) of the pack's training step on `target_set`:
    'comfyui' (TrainLoraNode's weight layers), 'sdscripts' (sd-scripts' defaults) or
    'sdscripts_conv' (sd-scripts' defaults with conv_dim 4: the ResBlock convs too)."""
    import comfy.model_management as mm

    net_mod, loop = _pack("lycoris_core.train.network"), _pack("lycoris_core.train.loop")
    targets, data = _pack("lycoris_core.train.targets"), _pack("nodes.train_data")
    objective_mod = _pack("lycoris_core.train.objective")
    mp = _fresh()
    before = paired_loss(mp)
    mm.load_models_gpu([mp], force_full_load=True)
    objective_mod.release_inference_tensors(mp.model)
    mp.model.requires_grad_(False)
    conv = {"conv_dim": RANK, "conv_alpha": 1.0} if target_set == "sdscripts_conv" else {}
    cfg = net_mod.NetworkConfig(algo, targets.TargetOptions(network_dim=RANK, network_alpha=1.0,
                                                            **conv))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if target_set == "comfyui":
            net = net_mod.LycorisNetwork(all_weight_targets(mp, RANK, 1.0), cfg)
        else:
            net = net_mod.LycorisNetwork.for_model(mp.model.named_modules(), cfg, "sdxl")
    lat, cond = TEST_DATA["sdxl"]()
    ob = data.Objective(mp, data.flatten_latents([lat]), data.flatten_conds([cond]), "cpu",
                        torch.float32, 0, 1000)
    trainer = loop.Trainer(net, loop.TrainConfig(steps=STEPS, learning_rate=LR, batch_size=2,
                                                 seed=0), ob, 2)
    net.attach(list(mp.model.named_modules()))
    try:
        with torch.inference_mode(False), torch.enable_grad():
            trainer.run()
    finally:
        net.detach()
    return 1.0 - paired_loss(mp, net=net) / before, len(net.targets)


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_loss_drop_with_trainloranode_targets_is_at_least_comfyui(host, algo):
    core = comfyui_drop(algo)
    same, n_same = lycoris_drop(algo, "comfyui")
    sd, n_sd = lycoris_drop(algo, "sdscripts")
    conv, n_conv = lycoris_drop(algo, "sdscripts_conv")
    print(f"[loss drop] {algo}: ComfyUI TrainLoraNode {core:.3f}; TrainLyCORIS on its "
          f"{n_same} weight layers {same:.3f}; on sd-scripts' {n_sd} default targets {sd:.3f}; "
          f"with conv_dim 4 ({n_conv} modules) {conv:.3f}")
    assert same >= core
    # sd-scripts' defaults leave out the ResBlock convs, which carry the tiny random model's
    # denoising: without them the drop is far smaller, with conv_dim it comes back
    assert conv > 2 * sd
