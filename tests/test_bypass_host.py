"""Bypass mode (`mode` = "bypass") inside the real ComfyUI: the adapter runs at forward time.

What is checked, on both hosts:
- every golden case at the layer (a real ComfyUI op under a real ModelPatcher, against the
  references' own ΔW) and, where the test models hold the layer, through a sampler: the bypass
  sample equals the patch-mode sample to `TOL` of the adapter's own effect
  (|bypass − patch| ≤ TOL · |patch − base|, max-abs on the latent);
- per-block strengths and text encoders, DoRA (and its per-module patch fallback), a strength
  schedule and the take-over of a bypass loader, stacking with ComfyUI's LoraLoader and with a
  second bypass adapter (and core's own bypass on current ComfyUI), fp16/bf16/fp8 base weights,
  ComfyUI's low-VRAM partial loading;
- after sampling the weights are bit-identical to the base and the patcher holds no backup;
  the hooks leave with the injection (eject, or the patchers that injected them being gone).

TOL: the typical |bypass − patch| / |patch − base| here is 2e-6 … 3e-4 (float32 rounding of
latents of magnitude ~400 against effects of 0.7 … 40; the same with 1 thread and
ATEN_CPU_CAPABILITY=default), so 1e-2 keeps ≥ 30× margin; a wrong strength (0.8 → 0.75) gives
5.4e-2, over 5× TOL (test_tolerance_catches_a_wrong_strength), and a bypass 5 % low, the DoRA
norm of W0 instead of W0 + ΔW (ComfyUI's defect) or a schedule whose strength the hooks ignore
fail these tests.
"""

from __future__ import annotations

import gc
import sys

import goldens
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from test_loaders_common import (
    install_golden,
    loras_dir,
    make_adapter,
    run_recorded,
    sampler_graph,
    write_adapter,
)

from bench.bench_apply import place

TOL = 1e-2
EXACT = 1e-5
"""Layer level, against the references' ΔW: the float32 rounding of W0 x + b against the effect
s·ΔW x at s = 2 measures 0.5e-6 … 1.6e-6 (2 threads AVX512; 1 thread, AVX512 and default
kernels): ≥ 6× margin (at s = 0.8 it was up to 3.1e-6). A wrong formula gives O(1)."""


def ratio(base, patch, bypass) -> float:
    """|bypass − patch| / |patch − base| (max-abs), the measure every comparison here uses."""
    base, patch, bypass = base.double(), patch.double(), bypass.double()
    effect = float((patch - base).abs().max())
    assert effect > 0, "the adapter changed nothing: the comparison would be empty"
    return float((bypass - patch).abs().max()) / effect


def _models():
    return next(m for n, m in sys.modules.items()
                if n.endswith("host_nodes.models") and hasattr(m, "sdxl_model"))


@pytest.fixture(scope="module")
def patching(host):
    return host.pack.nodes.patching


# ------------------------------------------------------------------------- golden, layer level
def _golden_layer(case_key: str, shape: tuple[int, ...], w0: torch.Tensor):
    """A ModelPatcher over a module tree holding one real ComfyUI op at the golden key's path."""
    import comfy.model_patcher
    import comfy.ops

    ops = comfy.ops.disable_weight_init
    path = case_key[: -len(".weight")]
    if len(shape) == 2:
        layer = ops.Linear(shape[1], shape[0], bias=True)
    else:
        layer = ops.Conv2d(shape[1], shape[0], shape[2:], padding=shape[2] // 2, bias=True)
    with torch.no_grad():
        layer.weight = torch.nn.Parameter(w0.clone(), requires_grad=False)
        layer.bias = torch.nn.Parameter(0.1 * torch.randn(shape[0], generator=torch.Generator()
                                                           .manual_seed(1)), requires_grad=False)
    root = torch.nn.Module()
    place(root, path, layer)
    import comfy_host  # the test device (LYCORIS_TEST_DEVICE): loaded there, offloaded to the CPU

    return comfy.model_patcher.ModelPatcher(root, load_device=comfy_host.DEVICE,
                                            offload_device=torch.device("cpu")), layer


def _run_layer(patcher, layer, x):
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        with torch.inference_mode():
            y = layer(x.to(layer.weight.device)).cpu().clone()
        backups = len(patcher.backup)
    finally:
        mm.unload_all_models()
    return y, backups


@pytest.mark.parametrize("case", goldens.cases())
def test_golden_layer_bypass_equals_references(host, patching, case):
    """Each golden file on a real ComfyUI op of its layer's shape: the bypass output is
    W0 x + b + s·ΔW_reference x (the references' own ΔW), equal to patch mode; the weight is
    bit-identical afterwards, no backup is held while loaded, and the hooks are gone."""
    (key, dw), = goldens.expected(case).items()
    g = torch.Generator().manual_seed(0)
    w0 = goldens.base_weights(case).get(key)
    w0 = 0.02 * torch.randn(dw.shape, generator=g) if w0 is None else w0
    x = torch.randn(3, 7, dw.shape[1], generator=g) if dw.dim() == 2 else \
        torch.randn(2, dw.shape[1], 8, 8, generator=g)
    s = 2.0  # a strong adapter effect against float32 rounding of W0 x (see EXACT)
    outs, injections = {}, None
    for mode in ("base", "patch", "bypass"):
        patcher, layer = _golden_layer(key, tuple(dw.shape), w0)
        if mode != "base":
            patcher, _, result = patching.apply_adapter(patcher, None, str(goldens.adapter_file(case)),
                                                        s, 1.0, "", mode=mode)
            assert result.mode == mode and len(result.applied) == 1 and not result.fallback
        outs[mode], backups = _run_layer(patcher, layer, x)
        assert backups == (1 if mode == "patch" else 0)
        assert torch.equal(layer.weight, w0)  # restored (patch) / never written (bypass)
        if mode == "bypass":
            injections = patching.injections_of(patcher)
            assert len(injections) == 1 and next(iter(injections.values())).hooked(patcher) == 0
            assert not layer._forward_hooks
    op = F.linear if dw.dim() == 2 else (lambda x, w, b: F.conv2d(x, w, b, padding=dw.shape[2] // 2))
    want = op(x.double(), w0.double() + s * dw.double(), layer.bias.double())
    assert rel_err(outs["bypass"].double() - outs["base"].double(),
                   want - outs["base"].double()) < EXACT
    assert ratio(outs["base"], outs["patch"], outs["bypass"]) < EXACT


# ------------------------------------------------------------------------ golden, sampling
SAMPLED = {  # case → (test model kind, loader)
    "loha_linear": ("golden_sdxl", "LoadLoHa"),
    "loha_conv_tucker": ("golden_sdxl", "LoadLoHa"),
    "lokr_linear_default_factor": ("golden_sdxl", "LoadLoKr"),
    "lokr_full_w2": ("golden_sdxl", "LoadLoKr"),
    "lyco_lokr_decompose_both": ("golden_sdxl", "LoadLoKr"),
    "lyco_loha_dora": ("golden_sdxl", "LoadLoHa"),
}


def _latent(res) -> torch.Tensor:
    return res.outputs("6")[0]["samples"].clone()


@pytest.fixture(scope="module")
def golden_ex(host):
    """One executor for the golden SDXL runs (the full-size test model is built once), and the
    base latent."""
    import comfy_host

    ex = comfy_host.Executor(host)
    g = sampler_graph("golden_sdxl", None)
    g["6"]["inputs"]["steps"] = 1
    res, _ = run_recorded(ex, g)
    return ex, _latent(res)


@pytest.mark.parametrize("case", sorted(SAMPLED))
def test_golden_sample_bypass_equals_patch(host, golden_ex, fixtures_dir, case):
    executor, golden_base = golden_ex
    kind, loader = SAMPLED[case]
    name = install_golden(host, fixtures_dir, case)
    (key,) = goldens.expected(case)
    latents = {}
    for mode in ("patch", "bypass"):
        g = sampler_graph(kind, loader, name, strength_model=0.8, mode=mode, record=key)
        g["6"]["inputs"]["steps"] = 1
        res, records = run_recorded(executor, g)
        latents[mode] = _latent(res)
        report = res.outputs("2")[2]
        assert f"mode: {mode}" in report and "matched: 1 of 1" in report
        if mode == "bypass":  # the sampler ran with the base weight, and no backup was made
            base_w = res.outputs("1")[0].model.state_dict()[key]
            assert records and all(torch.equal(r[key], base_w.float()) for r in records)
            assert res.outputs("2")[0].backup == {} and res.outputs("2")[0].patches == {}
    assert ratio(golden_base, latents["patch"], latents["bypass"]) < TOL


def test_golden_anima_block_file_sampled_on_the_dit(host, executor, fixtures_dir):
    from test_loaders_dit import _graph, _run

    name = install_golden(host, fixtures_dir, "anima_loha_blocks")
    latents = {}
    for mode in (None, "patch", "bypass"):
        g = _graph("golden_dit", "LoadLoHa" if mode else None, name, 0.6)
        if mode:
            g["2"]["inputs"]["mode"] = mode
        _, _, latents[mode] = _run(executor, g)
    assert ratio(latents[None], latents["patch"], latents["bypass"]) < TOL


# --------------------------------------------------------- tiny SDXL: whole model, blocks, CLIP
@pytest.fixture(scope="module")
def tiny(host):
    """LoHa and LoKr files for the tiny SDXL: `files_all` on every ≥2-D weight of the UNet and of
    both CLIPs' encoder layers, `files` on every 4th of them (linear and conv layers alike)."""
    import comfy_host

    res, _ = run_recorded(comfy_host.Executor(host), sampler_graph("tiny_sdxl", None))
    model, clip = res.outputs("1")[0], res.outputs("1")[1]
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()
              if k.startswith("diffusion_model.") and k.endswith(".weight") and v.dim() >= 2}
    shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()
                   if ".encoder.layers." in k and k.endswith(".weight") and v.dim() == 2})
    some = dict(list(shapes.items())[::4])
    assert any(len(s) == 4 and s[2] > 1 for s in some.values())  # 3×3 convs among them
    files, files_all = {}, {}
    for algo in ("loha", "lokr"):
        tensors, _ = make_adapter(shapes, algo, seed=11)
        files_all[algo] = write_adapter(host, f"bypass_all_{algo}.safetensors", tensors, algo)
        tensors, _ = make_adapter(some, algo, seed=12)
        files[algo] = write_adapter(host, f"bypass_some_{algo}.safetensors", tensors, algo)
    return {"files": files, "files_all": files_all, "shapes": shapes, "some": some,
            "latent": _latent(res), "cond": res.outputs("5")[0][0][0].clone(),
            "base": {k: v.clone() for k, v in model.model.state_dict().items() if k in shapes}}


def _pair(executor, make_graph, extra_check=None):
    """(patch result, bypass result) of the same graph in both modes."""
    out = {}
    for mode in ("patch", "bypass"):
        res, records = run_recorded(executor, make_graph(mode))
        out[mode] = res
        if extra_check is not None:
            extra_check(mode, res, records)
    return out["patch"], out["bypass"]


@pytest.mark.parametrize("algo,loader", [("loha", "LoadLoHa"), ("lokr", "LoadLyCORIS")])
def test_whole_model_with_block_weights_and_clip(host, executor, tiny, algo, loader):
    """Every UNet layer (linear and conv) and the CLIP layers, per-block strengths: bypass =
    patch for the sample and for the text conditioning; no UNet weight ever changes."""
    keys = ",".join(list(tiny["base"])[:6])

    def check(mode, res, records):
        report = res.outputs("2")[2]
        if mode == "bypass":
            assert "mode: bypass" in report and "patched instead" not in report
            for r in records:
                assert all(torch.equal(r[k], tiny["base"][k]) for k in keys.split(","))
            model, clip = res.outputs("2")[0], res.outputs("2")[1]
            assert model.backup == {} and model.patches == {} and clip.patcher.patches == {}
            assert len(patching_of(host).injections_of(clip.patcher)) == 1

    patch, bypass = _pair(executor, lambda mode: sampler_graph(
        "tiny_sdxl", loader, tiny["files_all"][algo], strength_model=0.9, strength_clip=0.7,
        block_weights="OUT0-8=0.5, MID=0, IN4=1.5, TE2=0.3", mode=mode, record=keys), check)
    assert ratio(tiny["latent"], _latent(patch), _latent(bypass)) < TOL
    cond = [r.outputs("5")[0][0][0] for r in (patch, bypass)]
    assert ratio(tiny["cond"], *cond) < TOL


def patching_of(host):
    return host.pack.nodes.patching


def test_tolerance_catches_a_wrong_strength(host, executor, tiny):
    """The tolerance is not loose: a bypass at 0.75 against a patch at 0.8 (a 6 % error in the
    change) is far outside it."""
    name = tiny["files"]["lokr"]
    latents = {}
    for mode, s in (("patch", 0.8), ("bypass", 0.75)):
        res, _ = run_recorded(executor, sampler_graph("tiny_sdxl", "LoadLoKr", name, s, mode=mode))
        latents[mode] = _latent(res)
    assert ratio(tiny["latent"], latents["patch"], latents["bypass"]) > TOL  # measured 5.4e-2


# ------------------------------------------------------------------------------------- DoRA
def _dora_file(host, shapes: dict, axis_of: dict, name: str) -> str:
    """A LoHa with dora_scale on each key: output rows (O, 1, …) or input channels (1, I)."""
    tensors, _ = make_adapter(shapes, "loha", seed=21)
    g = torch.Generator().manual_seed(3)
    from test_loaders_common import module_name

    for key, shape in shapes.items():
        n = module_name(key)
        if axis_of[key] == "out":
            m = torch.ones(shape[0], *([1] * (len(shape) - 1)))
        else:
            m = torch.ones(1, shape[1], *([1] * (len(shape) - 2)))
        tensors[f"{n}.dora_scale"] = m * (1 + 0.2 * torch.rand(m.shape, generator=g))
    return write_adapter(host, name, tensors, "lycoris")


def test_dora_bypass_and_input_axis_fallback(host, executor, tiny):
    """Output-axis DoRA on linear and conv layers with biases runs in bypass; an input-axis DoRA
    module is patched instead, and the report names it with the reason. Sample = patch mode."""
    keys = {"diffusion_model.input_blocks.1.0.in_layers.2.weight": "out",        # conv 3×3, bias
            "diffusion_model.middle_block.1.proj_in.weight": "out",              # linear, bias
            "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_out.0.weight": "out",
            "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": "in"}
    name = _dora_file(host, {k: tiny["shapes"][k] for k in keys}, keys, "bypass_dora.safetensors")

    def check(mode, res, records):
        report = res.outputs("2")[2]
        if mode == "bypass":
            assert "mode: bypass (3 weights applied at forward time" in report
            assert "patched instead of bypass: 1 modules — input-axis DoRA" in report
            assert "attn2_to_k" in report.split("patched instead of bypass")[1]
            assert set(res.outputs("2")[0].patches) == {k for k, a in keys.items() if a == "in"}

    patch, bypass = _pair(executor, lambda mode: sampler_graph(
        "tiny_sdxl", "LoadLyCORIS", name, 1.3, mode=mode), check)
    assert ratio(tiny["latent"], _latent(patch), _latent(bypass)) < TOL


# ------------------------------------------------------------------------ schedule, take-over
def _schedule_graph(name, mode, schedule="0:1, 50%:0.2, 1:0.6", loader=None, lora_name=None,
                    strength=0.8):
    from test_schedule_host import _graph

    node = {"lora_name": lora_name or name, "strength_model": strength, "schedule": schedule,
            "mode": mode}
    return _graph(node, steps=4, loader=loader)


def test_schedule_bypass_equals_schedule_patch(host, executor, tiny):
    """Keyframed strength in bypass mode = the patch-mode schedule (exact per step, tested in
    test_schedule_host); no weight is written during sampling; a constant schedule differs."""
    name = tiny["files"]["loha"]
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    latents = {}
    for mode in ("patch", "bypass"):
        g = _schedule_graph(name, mode)
        g["4"]["inputs"]["keys"] = key
        res, records = run_recorded(executor, g)
        latents[mode] = _latent(res)
        if mode == "bypass":
            assert all(torch.equal(r[key], tiny["base"][key]) for r in records)
            assert res.outputs("2")[0].backup == {}
    res, _ = run_recorded(executor, _schedule_graph(name, "bypass", schedule="constant"))
    base = run_recorded(executor, _schedule_graph(name, "bypass", schedule="0:0"))[0]
    assert ratio(_latent(base), latents["patch"], latents["bypass"]) < TOL
    assert ratio(_latent(base), latents["patch"], _latent(res)) > 2 * TOL  # typically 7e-2


@pytest.mark.parametrize("schedule_mode", ["bypass", "patch"])
def test_schedule_takes_over_a_bypass_loader(host, executor, tiny, schedule_mode):
    """'(LyCORIS loader upstream)' with a bypass loader: its strength is kept; a constant schedule
    in bypass mode equals the loader bit for bit, in patch mode to TOL."""
    from test_schedule_host import FROM_MODEL

    name = tiny["files"]["lokr"]
    loader = {"class_type": "LoadLoKr", "inputs": {"lora_name": name, "strength_model": 0.6,
                                                   "mode": "bypass"}}
    plain = run_recorded(executor, _loader_only(loader))[0]
    took = run_recorded(executor, _schedule_graph(name, schedule_mode, schedule="constant",
                                                  loader=loader, lora_name=FROM_MODEL,
                                                  strength=1.0))[0]
    if schedule_mode == "bypass":
        assert torch.equal(_latent(took), _latent(plain))
    else:
        assert ratio(tiny["latent"], _latent(plain), _latent(took)) < TOL
    injections = patching_of(host).injections_of(took.outputs("2")[0]).values()
    if schedule_mode == "bypass":  # the loader's injection replaced by the schedule's
        assert len(injections) == 1 and all(inj.scheduled for inj in injections)
    else:
        assert not injections


def _loader_only(loader: dict) -> dict:
    from test_schedule_host import _graph

    return _graph(None, steps=4, loader=loader)


# ------------------------------------------------------------------------------------ stacking
def _lora_file(host, shapes) -> str:
    """A plain LoRA on `shapes` for ComfyUI's own LoraLoader (sd-scripts names)."""
    from test_loaders_common import module_name

    g = torch.Generator().manual_seed(9)
    t = {}
    for key, shape in shapes.items():
        n = module_name(key)
        t[f"{n}.lora_down.weight"] = 0.3 * torch.randn(4, *shape[1:], generator=g)
        t[f"{n}.lora_up.weight"] = 0.3 * torch.randn(shape[0], 4, *([1] * (len(shape) - 2)), generator=g)
        t[f"{n}.alpha"] = torch.tensor(2.0)
    return write_adapter(host, "bypass_stack_lora.safetensors", t, "lora")


def _chain(first: dict, second: dict) -> dict:
    """Model → first → second → recorder → sampler (each a {class_type, inputs} with lora_name,
    strengths)."""
    g = sampler_graph("tiny_sdxl", None)
    model, clip = ["1", 0], ["1", 1]
    for nid, node in (("20", first), ("21", second)):
        g[nid] = {"class_type": node["class_type"], "inputs": {
            "model": model, "clip": clip, "strength_clip": 1.0, **node["inputs"]}}
        model, clip = [nid, 0], [nid, 1]
    g["4"]["inputs"]["model"] = model
    g["5"]["inputs"]["clip"] = clip
    return g


def _ours(cls, name, s, mode):
    return {"class_type": cls, "inputs": {"lora_name": name, "strength_model": s,
                                          "block_weights": "", "mode": mode}}


@pytest.mark.parametrize("ours_first", [True, False])
def test_stacks_with_comfyui_lora_loader(host, executor, tiny, ours_first):
    """ComfyUI's LoraLoader patches the same layers (the weight the bypass's f uses): bypass +
    LoraLoader = patch + LoraLoader, in either order."""
    lora = _lora_file(host, tiny["some"])
    core = {"class_type": "LoraLoader", "inputs": {"lora_name": lora, "strength_model": 0.7}}
    latents = {}
    for mode in ("patch", "bypass"):
        ours = _ours("LoadLoHa", tiny["files"]["loha"], 0.8, mode)
        res, _ = run_recorded(executor, _chain(ours, core) if ours_first else _chain(core, ours))
        latents[mode] = _latent(res)
    only_core = _latent(run_recorded(executor, _chain(core, _ours(
        "LoadLoHa", tiny["files"]["loha"], 0.0, "bypass")))[0])
    assert ratio(only_core, latents["patch"], latents["bypass"]) < TOL


def test_two_bypass_adapters_on_the_same_layers(host, executor, tiny):
    latents = {}
    for mode in ("patch", "bypass"):
        res, _ = run_recorded(executor, _chain(_ours("LoadLoHa", tiny["files"]["loha"], 0.8, mode),
                                               _ours("LoadLoKr", tiny["files"]["lokr"], -0.6, mode)))
        latents[mode] = _latent(res)
        model = res.outputs("21")[0]
        assert len(patching_of(host).injections_of(model)) == (2 if mode == "bypass" else 0)
    assert ratio(tiny["latent"], latents["patch"], latents["bypass"]) < TOL


def test_stacks_with_core_bypass_on_current_comfyui(host, executor, tiny):
    """Core's LoraLoaderBypass (current ComfyUI) replaces module.forward; our hooks run after it."""
    import comfy_host

    if not comfy_host.at_least("0.28"):
        pytest.skip("ComfyUI 0.3.75 has no core bypass loader")
    lora = _lora_file(host, tiny["some"])
    latents = {}
    for mode, core_cls in (("patch", "LoraLoader"), ("bypass", "LoraLoaderBypass")):
        core = {"class_type": core_cls, "inputs": {"lora_name": lora, "strength_model": 0.7}}
        res, _ = run_recorded(executor, _chain(_ours("LoadLoKr", tiny["files"]["lokr"], 0.8, mode),
                                               core))
        latents[mode] = _latent(res)
    assert ratio(tiny["latent"], latents["patch"], latents["bypass"]) < TOL


# ------------------------------------------------------------- dtypes, low VRAM, lifecycle
def _sample(model, steps: int = 2) -> torch.Tensor:
    """2 euler steps of the tiny SDXL with a fixed random conditioning (no CLIP involved)."""
    import comfy.model_management as mm
    import comfy.sample

    g = torch.Generator().manual_seed(0)
    cond = [[torch.randn(1, 77, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=g)
    try:
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, steps, 2.0, "euler", "normal", cond, cond,
                                       latent, disable_pbar=True, seed=0)
    finally:
        mm.unload_all_models()


def _loras_path(host, name):
    return str(loras_dir(host) / name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn],
                         ids=["fp16", "bf16", "fp8"])
def test_low_precision_base_weights_are_never_requantised(host, tiny, dtype):
    """Base weights stored in fp16/bf16/fp8 (ComfyUI's manual-cast ops compute in float32): the
    bypass sample equals the exact reference — patch mode on a float32 copy of the same weight
    values — to TOL, and the stored weights are bit-identical afterwards. (Patch mode on the
    low-precision model itself rounds W + sΔW back to the storage dtype.)"""
    patching = patching_of(host)
    models = _models()
    low = models.sdxl_model("tiny", 0, dtype=dtype)
    exact = models.sdxl_model("tiny", 0)
    with torch.no_grad():  # the float32 model holds exactly the low-precision values
        for (_, p32), (_, plow) in zip(exact.model.named_parameters(), low.model.named_parameters(),
                                       strict=True):
            p32.copy_(plow.float())
    before = {k: v.clone() for k, v in low.model.state_dict().items()}
    path = _loras_path(host, tiny["files"]["lokr"])
    base = _sample(exact)
    ref = _sample(patching.apply_adapter(exact, None, path, 0.8, 0.0, mode="patch")[0])
    m, _, result = patching.apply_adapter(low, None, path, 0.8, 0.0, mode="bypass")
    out = _sample(m)
    assert result.bypassed and not result.fallback
    assert ratio(base, ref, out) < TOL
    after = low.model.state_dict()
    assert all(torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)) and after[k].dtype == v.dtype
               for k, v in before.items())
    assert m.backup == {}


def test_low_vram_partial_loading_runs_the_hooks(host, tiny, monkeypatch):
    """ComfyUI's partial (low-VRAM) load — modules cast at each forward, weight functions for
    patches — forced on the CPU host through its own VRAM state: the bypass sample equals the full
    load's, and equals patch mode (LowVramPatch path) to TOL."""
    import comfy.model_management as mm

    patching = patching_of(host)
    models = _models()
    path = _loras_path(host, tiny["files"]["loha"])
    full = {mode: _sample(patching.apply_adapter(models.sdxl_model("tiny", 0), None, path, 0.8, 0.0,
                                                 mode=mode)[0]) for mode in ("patch", "bypass")}
    lowvram = {}
    monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)
    monkeypatch.setattr(mm, "is_device_cpu", lambda device: False)
    for mode in ("patch", "bypass"):
        m = patching.apply_adapter(models.sdxl_model("tiny", 0), None, path, 0.8, 0.0, mode=mode)[0]
        seen: list = []
        m.set_model_unet_function_wrapper(lambda f, a, m=m, seen=seen: seen.append(
            (m.model.model_lowvram, len(m.backup))) or f(a["input"], a["timestep"], **a["c"]))
        lowvram[mode] = _sample(m)
        assert seen and all(low for low, _ in seen), "the partial load did not happen"
        assert all(b == 0 for _, b in seen)  # bypass: no backup; patch: weight functions instead
    base = _sample(models.sdxl_model("tiny", 0))
    assert ratio(base, full["bypass"], lowvram["bypass"]) < TOL
    assert ratio(base, lowvram["patch"], lowvram["bypass"]) < TOL


def test_hooks_follow_the_injection_and_its_owners(host, tiny):
    """Clones carry the injection; hooks exist only while an injecting patcher is loaded; a base
    model sampled afterwards is the base; hooks whose patchers are gone remove themselves."""
    import comfy.model_management as mm

    patching = patching_of(host)
    models = _models()
    base_model = models.sdxl_model("tiny", 0)
    path = _loras_path(host, tiny["files"]["lokr"])
    m, _, _ = patching.apply_adapter(base_model, None, path, 0.8, 0.0, mode="bypass")
    (inj,) = patching.injections_of(m).values()
    base = _sample(base_model)
    first = _sample(m)
    clone = m.clone()
    assert list(patching.injections_of(clone).values()) == [inj]
    assert torch.equal(_sample(clone), first) and inj.hooked(m) == 0
    assert torch.equal(_sample(base_model), base)
    # injected, then every patcher that injected the hooks is dropped without an eject
    mm.load_models_gpu([clone], force_full_load=True)
    assert inj.hooked(clone) == len(inj.layers) > 0
    mm.current_loaded_models.clear()
    del clone, m
    gc.collect()
    assert torch.equal(_sample(base_model), base)
    leftover = sum(len(mod._forward_hooks) for mod in base_model.model.modules())
    assert leftover == 0


def test_bypass_report_and_strength_zero(host, executor, tiny):
    res, _ = run_recorded(executor, sampler_graph("tiny_sdxl", "LoadLoKr", tiny["files"]["lokr"],
                                                  0.0, 0.0, mode="bypass"))
    assert torch.equal(_latent(res), tiny["latent"])
    assert res.outputs("2")[0] is res.outputs("1")[0]  # nothing to apply: the input itself
    res, _ = run_recorded(executor, sampler_graph("tiny_sdxl", "LoadLoKr", tiny["files"]["lokr"],
                                                  0.5, mode="bypass"))
    report = res.outputs("2")[2]
    n = len(tiny["some"])  # UNet and CLIP
    assert f"mode: bypass ({n} weights applied at forward time, base weights untouched)" in report
    assert res.ui["2"]["text"][0] == report
    # an API prompt without `mode` (saved before it existed) validates and patches, as before
    res, _ = run_recorded(executor, sampler_graph("tiny_sdxl", "LoadLoKr", tiny["files"]["lokr"], 0.5))
    assert "mode: patch" in res.outputs("2")[2] and res.outputs("2")[0].patches


def test_examples_of_fallback_geometry(host):
    """Layers bypass cannot run, and the reason the report gives."""
    bypass = sys.modules[host.pack.__name__ + ".nodes.patching.bypass"]
    assert "grouped" in bypass.geometry_of(torch.nn.Conv2d(4, 4, 3, groups=2), (4, 2, 3, 3))
    assert "padding_mode" in bypass.geometry_of(torch.nn.Conv2d(4, 4, 3, padding_mode="circular"),
                                                (4, 4, 3, 3))
    assert "transposed" in bypass.geometry_of(torch.nn.ConvTranspose2d(4, 4, 3), (4, 4, 3, 3))
    assert "not a Linear/Conv" in bypass.geometry_of(torch.nn.Embedding(4, 4), (4, 4))
    geo = bypass.geometry_of(torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), (6, 4, 3, 3))
    assert geo.conv and geo.stride == (2, 2) and geo.padding == (1, 1)
    geo = bypass.geometry_of(torch.nn.Linear(2, 3), (3, 2))
    assert not geo.conv and geo.weight_shape == (3, 2)


# ------------------------------------------------------------------------------- bad inputs
def test_bad_files_give_the_same_errors_in_bypass_mode(host, executor, tiny):
    """Every bad file of the reliability corpus fails in bypass mode with the very message it
    fails with in patch mode (file and key named), and the input model stays untouched; a ΔW that
    overflows is reported before sampling (bypass plans check it at load)."""
    from test_reliability_graph import _bad_files

    keys = [k for k in tiny["shapes"] if k.endswith(("attn1.to_q.weight", "attn2.to_v.weight"))][:2]
    scratch = loras_dir(host) / "reliability_bypass"
    scratch.mkdir(exist_ok=True)
    bad = [(f"reliability_bypass/{n}", k, m) for n, k, m in _bad_files(
        {k: tiny["shapes"][k] for k in keys}, scratch)]
    tensors, _ = make_adapter({k: tiny["shapes"][k] for k in keys}, "loha", seed=7)
    for k in [k for k in tensors if k.endswith("hada_w1_a")][-1:]:
        tensors[k] = torch.full_like(tensors[k], 1e30)
        tensors[k.replace("w1_a", "w2_a")] = torch.full_like(tensors[k], 1e30)
    lc_save(tensors, scratch / "overflow.safetensors")
    bad.append(("reliability_bypass/overflow.safetensors", None, "overflows float32"))
    base_res, _ = run_recorded(executor, sampler_graph("tiny_sdxl", None))
    model = base_res.outputs("1")[0]
    for lora_name, key, match in bad:
        messages = {}
        for mode in ("patch", "bypass"):
            res = executor.run(sampler_graph("tiny_sdxl", "LoadLyCORIS", lora_name, 0.8, mode=mode))
            assert not res.ok, (lora_name, mode)
            err = res.execution_error
            messages[mode] = err["exception_message"]
            assert key is None or key in messages[mode]
            assert match in messages[mode] or __import__("re").search(match, messages[mode])
            if mode == "bypass":
                assert err["node_id"] == "2"  # the loader, before anything is sampled
            assert model.patches == {} and not patching_of(host).injections_of(model)
            assert all(torch.equal(model.model.state_dict()[k], tiny["base"][k]) for k in keys)
        assert messages["bypass"] == messages["patch"], lora_name


def lc_save(tensors, path):
    import lycoris_core as lc

    if not path.exists():
        lc.save_safetensors(tensors, path)


def test_anima_qwen3_text_encoder_in_bypass(host):
    """Anima's Qwen3 text encoder (ComfyUI's own Qwen3 classes, `lora_te_` names) in bypass mode:
    the conditioning equals patch mode's to TOL; the CLIP's weights are never written."""
    from test_loaders_anima_te import _te_name

    patching = patching_of(host)
    models = _models()
    clip = models.anima_clip(0)
    sd = clip.cond_stage_model.state_dict()
    keys = {k: tuple(v.shape) for k, v in sd.items()
            if ".layers." in k and k.endswith(("q_proj.weight", "down_proj.weight", "gate_proj.weight"))}
    assert keys
    tensors, _ = make_adapter(keys, "lokr", seed=13, module_names=_te_name)
    path = _loras_path(host, write_adapter(host, "bypass_qwen3_lokr.safetensors", tensors, "lokr"))
    before = {k: sd[k].clone() for k in keys}

    def encode(c):
        return c.encode_from_tokens(c.tokenize("a cat on a mat"))

    conds = {"base": encode(clip)}
    for mode in ("patch", "bypass"):
        _, new_clip, result = patching.apply_adapter(None, clip, path, 0.0, 0.8, mode=mode)
        assert result.summary["matched_by_component"] == {"qwen3": len(keys)}
        conds[mode] = encode(new_clip)
        if mode == "bypass":
            assert new_clip.patcher.patches == {} and len(result.bypassed) == len(keys)
    assert ratio(conds["base"], conds["patch"], conds["bypass"]) < TOL
    after = clip.cond_stage_model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
