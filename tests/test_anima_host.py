"""Strength schedule, merge and bake on the tiny Anima in real ComfyUI graphs.

On current ComfyUI the model is the real Anima (DiT + LLM adapter, Qwen3 text encoder, see
`host_nodes.models`); on 0.3.75, which has no Anima, the Cosmos-Predict2 DiT stands in (no LLM
adapter: the LLM-adapter key is then left out). Adapter files are written in sd-scripts naming
with ΔW from the oracle of test_loaders_common (SPEC §3 only); weights are recorded at every
model call by `LycorisTestRecorder`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import rel_err
from safetensors.torch import load_file
from test_loaders_common import make_adapter, run_recorded, write_adapter
from test_merge_comfy import _core_deltas, _merge_node, comfy_deltas
from test_schedule_host import HAND, STEPS, THREE_KEYFRAMES

TOL = 1e-5
DIT_KEYS = ["diffusion_model.blocks.0.self_attn.q_proj.weight",
            "diffusion_model.blocks.1.mlp.layer2.weight",
            "diffusion_model.x_embedder.proj.1.weight",
            "diffusion_model.final_layer.linear.weight"]
LLM_KEY = "diffusion_model.llm_adapter.blocks.0.self_attn.q_proj.weight"


def _current() -> bool:
    import comfy_host

    return comfy_host.CURRENT


def model_keys() -> list[str]:
    """The DiT keys, and the LLM adapter's on the real Anima (0.3.75's stand-in has none)."""
    return DIT_KEYS + ([LLM_KEY] if _current() else [])


def sampler_graph(node: dict | None, record: str, steps: int = STEPS) -> dict:
    """tiny_anima → [node on model and clip] → recorder → KSampler (prompt from its own text
    encoder, a one-frame 64×64 Anima latent)."""
    g = {"1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_anima", "seed": 0}},
         "3": {"class_type": "EmptyCosmosLatentVideo", "inputs": {"width": 64, "height": 64,
                                                                  "length": 1, "batch_size": 1}}}
    model, clip = ["1", 0], ["1", 1]
    if node is not None:
        g["2"] = {"class_type": node["class_type"], "inputs": {"model": model, "clip": clip,
                                                               **node["inputs"]}}
        model, clip = ["2", 0], ["2", 1]
    g["4"] = {"class_type": "LycorisTestRecorder", "inputs": {"model": model, "keys": record}}
    g["5"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": clip}}
    g["6"] = {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["3", 0],
        "seed": 3, "steps": steps, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
        "denoise": 1.0}}
    g["7"] = {"class_type": "LycorisTestSink", "inputs": {"latent": ["6", 0]}}
    return g


@pytest.fixture(scope="module")
def anima(host):
    """The base run (no adapter, every key recorded) and a LoKr and a LoHa file on the keys."""
    import comfy_host

    keys = model_keys()
    res, records = run_recorded(comfy_host.Executor(host), sampler_graph(None, ",".join(keys)))
    sd = res.outputs("1")[0].model.state_dict()
    shapes = {k: tuple(sd[k].shape) for k in keys}
    files = {}
    for seed, algo in enumerate(("lokr", "loha"), start=21):
        tensors, deltas = make_adapter(shapes, algo, seed=seed)
        files[algo] = (write_adapter(host, f"anima_{algo}.safetensors", tensors, algo), deltas)
    tensors, deltas = make_adapter({k: shapes[k] for k in DIT_KEYS}, "loha", seed=23)
    files["loha_dit"] = (write_adapter(host, "anima_loha_dit.safetensors", tensors, "loha"), deltas)
    return {"records": records, "base": {k: sd[k].detach().clone() for k in sd}, "files": files,
            "latent": res.outputs("6")[0]["samples"].clone()}


def _schedule(name: str, strength: float, schedule: str) -> dict:
    return {"class_type": "LyCORISStrengthSchedule", "inputs": {
        "lora_name": name, "strength_model": strength, "strength_clip": 1.0, "schedule": schedule,
        "interpolation": "linear", "timing": "steps", "block_weights": "",
        "preview_steps": STEPS, "cache_delta": True}}


def test_schedule_follows_three_keyframes_on_anima(host, executor, anima):
    """Every DiT layer (blocks and the layers outside them) carries W0 + s(step)·ΔW at each
    step. The LLM adapter is left out here: Anima runs it once per sampling, on the prompt
    (`extra_conds`), before the first step."""
    name, deltas = anima["files"]["lokr"]
    res, records = run_recorded(executor, sampler_graph(_schedule(name, 0.8, THREE_KEYFRAMES),
                                                        ",".join(DIT_KEYS)))
    assert len(records) == STEPS == len(anima["records"])
    for key in DIT_KEYS:
        for step, (rec, base) in enumerate(zip(records, anima["records"], strict=True)):
            change = rec[key].double() - base[key].double()
            assert rel_err(change, 0.8 * HAND[step] * deltas[key]) < TOL, (key, step)
    assert not torch.equal(res.outputs("6")[0]["samples"], anima["latent"])


def _loader(name: str, strength: float, block_weights: str = "", mode: str = "patch") -> dict:
    return {"class_type": "LoadLyCORIS", "inputs": {
        "lora_name": name, "strength_model": strength, "strength_clip": 1.0,
        "block_weights": block_weights, "mode": mode}}


def _constant_vs_loader(executor, anima, file: str, keys: list[str]):
    name, deltas = anima["files"][file]
    res_l, rec_l = run_recorded(executor, sampler_graph(_loader(name, 0.7), ",".join(keys), steps=4))
    res_s, rec_s = run_recorded(executor, sampler_graph(_schedule(name, 0.7, "constant"),
                                                        ",".join(keys), steps=4))
    for a, b in zip(rec_s, rec_l, strict=True):
        for key in keys:
            assert torch.equal(a[key], b[key]), key
            assert rel_err(a[key].double() - anima["base"][key].double(), 0.7 * deltas[key]) < TOL
    assert torch.equal(res_s.outputs("6")[0]["samples"], res_l.outputs("6")[0]["samples"])


def test_constant_schedule_equals_the_loader_on_anima(host, executor, anima):
    """Constant 0.7 on the DiT's layers: the same weights at every step and the same sampler
    output, bit for bit, as LoadLyCORIS at 0.7."""
    _constant_vs_loader(executor, anima, "loha_dit", DIT_KEYS)


@pytest.mark.skipif(not _current(), reason="0.3.75 has no Anima LLM adapter")
def test_constant_schedule_equals_the_loader_on_the_llm_adapter(host, executor, anima):
    """The same with a file that also adapts the LLM adapter: equal weights at every step and the
    same sampler output, bit for bit (the LLM adapter is patched at 0.7 like the loader does)."""
    _constant_vs_loader(executor, anima, "loha", model_keys())


@pytest.mark.skipif(not _current(), reason="0.3.75 has no Anima LLM adapter")
@pytest.mark.parametrize("mode", ["patch", "bypass"])
def test_schedule_keeps_the_llm_adapter_at_strength_model(host, executor, anima, mode):
    """Anima runs its LLM adapter once, on the prompt, before the first step: a schedule that is
    0 at every step leaves the DiT unadapted but the LLM adapter at strength_model (0.7), so
    the sample equals the loader's with the LLM adapter alone (`LLM_ADAPTER_ONLY`) and differs
    from the base sample (the LLM adapter's effect is what reaches the output). Patch mode: bit
    for bit, and the recorded weights are the loader's; bypass: within the bypass tolerance
    relative to the adapter's effect (1.1e-3 against 1e-2; with the LLM adapter
    left to the schedule it is 1)."""
    name, deltas = anima["files"]["loha"]
    node = _schedule(name, 0.7, "0:0, 1:0")
    node["inputs"]["mode"] = mode
    res_s, rec_s = run_recorded(executor, sampler_graph(node, ",".join(model_keys()), steps=4))
    res_l, rec_l = run_recorded(executor, sampler_graph(_loader(name, 0.7, "LLM_ADAPTER_ONLY"),
                                                        ",".join(model_keys()), steps=4))
    res_b, _ = run_recorded(executor, sampler_graph(None, LLM_KEY, steps=4))
    sample_s, sample_l = res_s.outputs("6")[0]["samples"], res_l.outputs("6")[0]["samples"]
    base = res_b.outputs("6")[0]["samples"]
    # the LLM adapter alone moves the sample (max 2.7e-3; equal runs are deterministic: 0)
    assert float((sample_l - base).abs().max()) > 3e-4
    if mode == "patch":
        assert torch.equal(sample_s, sample_l)
        for a, b in zip(rec_s, rec_l, strict=True):
            for key in model_keys():
                assert torch.equal(a[key], b[key]), key
            assert rel_err(a[LLM_KEY].double() - anima["base"][LLM_KEY].double(),
                           0.7 * deltas[LLM_KEY]) < TOL
    else:
        from test_bypass_host import TOL as BYPASS_TOL
        from test_bypass_host import ratio

        assert ratio(base, sample_l, sample_s) < BYPASS_TOL
        for rec in rec_s:  # bypass writes no weight
            for key in model_keys():
                assert torch.equal(rec[key], anima["base"][key]), key


def test_merged_anima_file_loads_in_comfyui_exactly(host, executor, anima):
    """MergeLyCORIS of a LoKr and a LoHa on the same Anima layers at full rank: the merged
    file's ΔW in ComfyUI's own loader equals lycoris_core's and 0.7·ΔW₁ − 1.3·ΔW₂."""
    (lokr, d1), (loha, d2) = anima["files"]["lokr"], anima["files"]["loha"]
    graph = {"1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_dit", "seed": 0}},
             "2": _merge_node([(lokr, 0.7), (loha, -1.3)], rank=96, prefix="lycoris/anima_merge"),
             "3": {"class_type": "LycorisTestSink", "inputs": {"text": ["2", 0]}}}
    res = executor.run(graph)
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    path = Path(res.outputs("2")[1])
    model = res.outputs("1")[0]
    comfy, core = comfy_deltas(path, model), _core_deltas(path, model)
    assert set(comfy) == set(core) == set(model_keys())
    for key in model_keys():
        want = 0.7 * d1[key] - 1.3 * d2[key]
        assert rel_err(core[key].double(), want) < TOL, key
        assert rel_err(comfy[key].double(), want) < TOL, key


def test_bake_on_anima_writes_base_plus_deltas(host, executor, anima):
    """BakeLyCORIS on the tiny Anima: W0 + Σ sᵢ·ΔWᵢ on every adapted layer (LLM adapter
    included on the real Anima), every other weight unchanged; ComfyUI's own model detection
    reads the saved keys as Anima (current ComfyUI) / Cosmos-Predict2 (0.3.75)."""
    import comfy.model_detection

    (lokr, d1), (loha, d2) = anima["files"]["lokr"], anima["files"]["loha"]
    inputs = {"model": ["1", 0], "save_dtype": "keep", "filename_prefix": "lycoris/anima_bake",
              "lora_1": lokr, "strength_1": 0.5, "lora_2": loha, "strength_2": -0.25}
    for i in (3, 4):
        inputs[f"lora_{i}"], inputs[f"strength_{i}"] = "None", 1.0
    res = executor.run({
        "1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_dit", "seed": 0}},
        "2": {"class_type": "BakeLyCORIS", "inputs": inputs},
        "3": {"class_type": "LycorisTestSink", "inputs": {"text": ["2", 0]}}})
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    saved = load_file(res.outputs("2")[1])
    base = {k: v for k, v in anima["base"].items() if k.startswith("diffusion_model.")}
    assert set(saved) == {"model." + k for k in base}
    for key in model_keys():
        got = saved["model." + key].double() - base[key].double()
        assert rel_err(got, 0.5 * d1[key] - 0.25 * d2[key]) < TOL, key
    untouched = [k for k in base if k not in model_keys()]
    assert untouched and all(torch.equal(saved["model." + k], base[k]) for k in untouched)
    prefix = comfy.model_detection.unet_prefix_from_state_dict(saved)
    config = comfy.model_detection.detect_unet_config(saved, prefix)
    assert config["image_model"] == ("anima" if _current() else "cosmos_predict2")
