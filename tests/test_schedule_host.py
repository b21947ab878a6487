"""LyCORISStrengthSchedule in real ComfyUI graphs on the tiny SDXL.

The weights in effect at each model call are recorded by `LycorisTestRecorder`, which wraps the
unet function (`model_function_wrapper`). The schedule writes the weights in a CALC_COND_BATCH
wrapper, which ComfyUI runs before it calls the unet function, so the recorder sees exactly the
weights the model computes with — whether it sits before or after the schedule node (its wrapper
and ours both travel with the model clone).
"""

from __future__ import annotations

import goldens
import pytest
import torch
from helpers import rel_err
from test_loaders_common import SAMPLER, make_adapter, run_recorded, sampler_graph, write_adapter
from test_loaders_tiny import CLIP_KEYS, UNET_KEYS

from lycoris_core.schedule import parse_schedule, percent_along_sigmas

TOL = 1e-5  # max-abs relative on the change; one step off in the schedule is ≥ 5 % off
STEPS = 10
THREE_KEYFRAMES = "0:1, 50%:0.2, 1:0.6"
# s(step i) at percent i/10 for THREE_KEYFRAMES, linear, worked out by hand (not by the pack):
# 1 − 1.6·p up to 50 %, then 0.2 + 0.8·(p − 0.5).
HAND = [1.0, 0.84, 0.68, 0.52, 0.36, 0.2, 0.28, 0.36, 0.44, 0.52]
FROM_MODEL = "(LyCORIS loader upstream)"


@pytest.fixture(scope="module")
def tiny(host):
    """Adapter files for the tiny SDXL and the base (no adapter) 10-step run."""
    import comfy_host

    ex = comfy_host.Executor(host)
    res, records = run_recorded(ex, _graph(None, record=",".join(UNET_KEYS)))
    model, clip = res.outputs("1")[0], res.outputs("1")[1]
    sd = model.model.state_dict()
    shapes = {k: tuple(sd[k].shape) for k in UNET_KEYS}
    shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()
                   if k in CLIP_KEYS})
    files = {}
    for algo in ("lokr", "loha"):
        tensors, deltas = make_adapter(shapes, algo, seed=5)
        files[algo] = (write_adapter(host, f"sched_{algo}.safetensors", tensors, algo), deltas)
    return {"records": records, "latent": res.outputs("6")[0]["samples"].clone(), "files": files,
            "base": {k: sd[k].detach().clone() for k in UNET_KEYS}, "model": model}


def _graph(node: dict | None, record: str = "", sampler: str = "euler", steps: int = STEPS,
           loader: dict | None = None, recorder_first: bool = False, batch: int = 1) -> dict:
    """Model → [loader] → [schedule] → recorder → KSampler; `node` holds the schedule's inputs,
    `loader` a loader's (class_type + inputs)."""
    g = sampler_graph("tiny_sdxl", None, record=record)
    g["3"]["inputs"]["batch_size"] = batch
    g["6"]["inputs"].update(steps=steps, sampler_name=sampler)
    model, clip = ["1", 0], ["1", 1]
    if loader is not None:
        g["8"] = {"class_type": loader["class_type"], "inputs": {
            "model": model, "clip": clip, "strength_clip": 1.0, "block_weights": "",
            **loader["inputs"]}}
        model, clip = ["8", 0], ["8", 1]
    if recorder_first:
        g["4"]["inputs"]["model"] = model
        model = ["4", 0]
    if node is not None:
        g["2"] = {"class_type": "LyCORISStrengthSchedule", "inputs": {
            "model": model, "clip": clip, "strength_model": 1.0, "strength_clip": 1.0,
            "schedule": "constant", "interpolation": "linear", "timing": "steps",
            "block_weights": "", "preview_steps": STEPS, "cache_delta": True, **node}}
        model, clip = ["2", 0], ["2", 1]
    if recorder_first:
        g["6"]["inputs"]["model"] = model
    else:
        g["4"]["inputs"]["model"] = model
    g["5"]["inputs"]["clip"] = clip
    return g


def _changes(records, base_records, key):
    return [rec[key].double() - base[key].double()
            for rec, base in zip(records, base_records, strict=True)]


@pytest.mark.parametrize("algo,cache_delta,recorder_first", [
    ("lokr", True, False), ("loha", True, True), ("lokr", False, True)])
def test_weights_follow_three_keyframes(host, executor, tiny, algo, cache_delta, recorder_first):
    name, deltas = tiny["files"][algo]
    graph = _graph({"lora_name": name, "strength_model": 0.8, "schedule": THREE_KEYFRAMES,
                    "cache_delta": cache_delta}, record=",".join(UNET_KEYS),
                   recorder_first=recorder_first)
    res, records = run_recorded(executor, graph)
    assert len(records) == STEPS == len(tiny["records"])  # euler: one call per step (cond+uncond)
    for key in UNET_KEYS:
        for step, change in enumerate(_changes(records, tiny["records"], key)):
            assert rel_err(change, 0.8 * HAND[step] * deltas[key]) < TOL, (key, step)
    # restored afterwards: the base model this run sampled (node 1's output, whose weights the
    # schedule wrote in place) holds the same seeded weights as the fixture's base, bit for bit
    sd = res.outputs("1")[0].model.state_dict()
    for key in UNET_KEYS:
        assert torch.equal(sd[key], tiny["base"][key]), key
    curve = res.outputs("2")[2]
    assert curve.shape == (1, 128, 256, 3) and res.ui["2"]["images"]


@pytest.mark.parametrize("algo,strength,schedule,blocks", [
    ("lokr", 0.7, "constant", ""), ("loha", 1.0, "0:0.7", "OUT0-8=0.5, MID=0")])
def test_constant_schedule_equals_loader_exactly(host, executor, tiny, algo, strength, schedule,
                                                 blocks):
    name, _ = tiny["files"][algo]
    rec = ",".join(UNET_KEYS)
    loader = _graph(None, record=rec, steps=4, loader={"class_type": "LoadLyCORIS", "inputs": {
        "lora_name": name, "strength_model": 0.7, "block_weights": blocks}})
    res_l, rec_l = run_recorded(executor, loader)
    sched = _graph({"lora_name": name, "strength_model": strength, "schedule": schedule,
                    "block_weights": blocks}, record=rec, steps=4)
    res_s, rec_s = run_recorded(executor, sched)
    assert torch.equal(res_s.outputs("6")[0]["samples"], res_l.outputs("6")[0]["samples"])
    assert len(rec_s) == len(rec_l) == 4
    assert not torch.equal(rec_l[0][UNET_KEYS[0]], tiny["base"][UNET_KEYS[0]])  # applied at all
    for a, b in zip(rec_s, rec_l, strict=True):
        for key in UNET_KEYS:
            assert torch.equal(a[key], b[key]), key


def test_takes_over_a_loaders_adapter(host, executor, tiny):
    """LoadLoKr → schedule '(loader upstream)': constant 1 is the loader bit for bit; a schedule
    scales the loader's strength per step; the loader's CLIP passes through."""
    name, deltas = tiny["files"]["lokr"]
    rec = ",".join(UNET_KEYS)
    loader = {"class_type": "LoadLoKr", "inputs": {"lora_name": name, "strength_model": 0.6}}
    res_l, _ = run_recorded(executor, _graph(None, record=rec, loader=loader, steps=4))
    res_c, _ = run_recorded(executor, _graph({"lora_name": FROM_MODEL}, record=rec, loader=loader,
                                             steps=4))
    assert torch.equal(res_c.outputs("6")[0]["samples"], res_l.outputs("6")[0]["samples"])
    _, records = run_recorded(executor, _graph(
        {"lora_name": FROM_MODEL, "schedule": THREE_KEYFRAMES}, record=rec, loader=loader))
    for key in UNET_KEYS:
        for step, change in enumerate(_changes(records, tiny["records"], key)):
            assert rel_err(change, 0.6 * HAND[step] * deltas[key]) < TOL, (key, step)


@pytest.mark.parametrize("sampler", ["heun", "dpmpp_2s_ancestral"])
def test_multi_call_samplers_and_batched_conds(host, executor, tiny, sampler):
    """Several model calls per step (heun: at both ends, dpmpp_2s_ancestral: between steps) and a
    batch of 2 latents with a combined positive: every call uses base + s(percent of its
    sigma)·ΔW; cosine interpolation."""
    name, deltas = tiny["files"]["lokr"]
    steps = 4
    graph = _graph({"lora_name": name, "schedule": THREE_KEYFRAMES, "interpolation": "cosine"},
                   record=",".join(UNET_KEYS[:2]), sampler=sampler, steps=steps, batch=2)
    graph["9"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["2", 1]}}
    graph["10"] = {"class_type": "ConditioningCombine",
                   "inputs": {"conditioning_1": ["5", 0], "conditioning_2": ["9", 0]}}
    graph["6"]["inputs"]["positive"] = ["10", 0]
    _, records = run_recorded(executor, graph)
    assert len(records) > steps
    sched = parse_schedule(THREE_KEYFRAMES, "cosine")
    import comfy.samplers

    ms = tiny["model"].get_model_object("model_sampling")
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(ms, SAMPLER["scheduler"], steps)]
    between = 0
    for rec in records:
        sigma = float(rec["sigma"].reshape(-1)[0])
        p = percent_along_sigmas(sigma, sigmas)
        between += abs(p * steps - round(p * steps)) > 1e-6
        for key in UNET_KEYS[:2]:
            change = rec[key].double() - tiny["base"][key].double()
            assert rel_err(change, sched.at(p) * deltas[key]) < TOL, (key, sigma)
    assert (between == 0) if sampler == "heun" else (between > 0)


def test_errors_are_shown(host, executor, tiny):
    name, _ = tiny["files"]["lokr"]
    res = executor.run(_graph({"lora_name": name, "schedule": "0:1, 150%:0"}))
    assert not res.ok and "150%" in str(res.execution_error)
    res = executor.run(_graph({"lora_name": FROM_MODEL}))
    assert not res.ok and "no LyCORIS patch" in str(res.execution_error)


@pytest.mark.parametrize("case", ["lyco_loha_dora", "lokr_linear_default_factor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("cache_delta", [True, False])
def test_write_uses_the_loaders_arithmetic(host, fixtures_dir, case, dtype, cache_delta):
    """A scheduled weight after several strength changes equals, bit for bit, what ComfyUI's
    patcher makes of the loader's patch at that strength (fp32 copy, LycorisPatch, ComfyUI's
    rounding to the weight's dtype) — DoRA (norm of W0 + ΔW) and fp16 included, no drift; and
    restore() gives the base back."""
    import comfy.float
    import comfy.model_patcher
    from safetensors.torch import load_file

    sp, pt = host.pack.nodes.patching.scheduled, host.pack.nodes.patching
    adapter, _ = pt.cached_adapter(str(fixtures_dir / f"{case}.safetensors"))
    (module,) = adapter.modules.values()
    (key, dw), = goldens.expected(case).items()
    base_file = fixtures_dir / f"{case}.base.safetensors"
    w0 = (load_file(base_file)[key] if base_file.exists()
          else 0.02 * torch.randn(dw.shape, generator=torch.Generator().manual_seed(0))).to(dtype)

    def loader(s: float) -> torch.Tensor:
        temp = w0.to(torch.float32, copy=True)
        temp = pt.LycorisPatch(module, key).calculate_weight(temp, key, s, 1.0, None, None)
        return comfy.float.stochastic_rounding(temp, dtype,
                                               seed=comfy.model_patcher.string_to_seed(key))

    w = sp._Weight(key, w0.clone(), w0.clone(), None, None)
    w.add_term(None, module, 0.8, cache_delta)
    for s in (1.0, 0.25, 0.0, 1.3):
        w.write((0.8 * s,))
        assert torch.equal(w.param, loader(0.8 * s)), s
    assert not torch.equal(w.param, w0)
    w.restore()
    assert torch.equal(w.param, w0)


def test_sigma_timing_matches_comfyui_hook_keyframes(host, executor, tiny):
    """timing 'sigma' + hold = ComfyUI's own hook keyframes (CreateHookLora → CreateHookKeyframe ×3
    → SetHookKeyframes → ConditioningSetProperties) on the same file: the same latent."""
    name, _ = tiny["files"]["lokr"]
    keyframes = [(0.0, 1.0), (0.4, 0.3), (0.7, 0.8)]
    ours = _graph({"lora_name": name, "strength_clip": 0.0, "interpolation": "hold",
                   "timing": "sigma", "schedule": ", ".join(f"{p}:{s}" for p, s in keyframes)},
                  steps=6)
    hooks = _graph(None, steps=6)
    hooks["10"] = {"class_type": "CreateHookLora", "inputs": {
        "lora_name": name, "strength_model": 1.0, "strength_clip": 0.0}}
    prev = None
    for i, (p, s) in enumerate(keyframes):
        hooks[f"1{i + 1}"] = {"class_type": "CreateHookKeyframe", "inputs": {
            "strength_mult": s, "start_percent": p, **({"prev_hook_kf": prev} if prev else {})}}
        prev = [f"1{i + 1}", 0]
    hooks["15"] = {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["10", 0], "hook_kf": prev}}
    hooks["16"] = {"class_type": "ConditioningSetProperties", "inputs": {
        "cond_NEW": ["5", 0], "strength": 1.0, "set_cond_area": "default", "hooks": ["15", 0]}}
    hooks["6"]["inputs"].update(positive=["16", 0], negative=["16", 0])
    constant = _graph({"lora_name": name, "strength_clip": 0.0}, steps=6)
    latents = [run_recorded(executor, g)[0].outputs("6")[0]["samples"] for g in (ours, hooks, constant)]
    same = float((latents[0] - latents[1]).abs().max())
    schedule_effect = float((latents[1] - latents[2]).abs().max())
    assert same < 1e-3 * schedule_effect, (same, schedule_effect)
