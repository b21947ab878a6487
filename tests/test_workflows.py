"""Every example workflow (example_workflows/*.json, UI format, as ComfyUI's template browser shows
them) converts to an API prompt that ComfyUI's own `execution.validate_prompt` accepts as it is,
and runs on the tiny models (checkpoint loader → LycorisTestModel, few steps) with real results.

The files a user would have (checkpoint, adapters, a training image) are put in the host's folders
under the names the workflows use; the adapters are small real LoKr/LoHa files for the tiny SDXL.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
import torch
from ui_workflows import CONVERT_SOURCE, EXAMPLES, load_example, on_tiny_models, put_example_files, ui_to_api

import lycoris_core as lc

WORKFLOWS = ["lycoris_load", "lycoris_strength_schedule", "lycoris_merge", "lycoris_convert",
             "lycoris_train", "lycoris_train_text_encoder", "lycoris_train_dataset"]
TINY = {"KSampler": {"steps": 2}, "TrainLyCORIS": {"steps": 3, "lr_warmup_steps": 1, "training_dtype": "fp32",
                                                   "save_every_n_steps": 0, "max_train_epochs": 0,
                                                   "save_every_n_epochs": 0},
        "LyCORISDataset": {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128,
                           "bucket_reso_steps": 8}}


@pytest.fixture(scope="module")
def user_files(host, fixtures_dir):
    """The files the examples name in the host's folders; conversion resolves names against the
    full-size SDXL, so its source is a real-shape sd-scripts LoKr file."""
    put_example_files(host.base_dir, fixtures_dir / "lokr_linear_default_factor.safetensors")
    return host.base_dir


def _classes(host) -> dict:
    return host.nodes.NODE_CLASS_MAPPINGS


def test_one_workflow_per_capability_covering_every_node(host):
    assert sorted(p.stem for p in EXAMPLES.glob("*.json")) == sorted(WORKFLOWS)
    used = {n["type"] for name in WORKFLOWS
            for n in json.loads((EXAMPLES / f"{name}.json").read_text())["nodes"]}
    pack = {cls.define_schema().node_id for cls in host.pack.nodes.NODES}
    assert pack - used == set(), f"pack nodes in no example workflow: {sorted(pack - used)}"


def test_stale_workflow_is_refused(host):
    """The converter is strict: a widget value too many or too few is an error, not a guess."""
    wf = json.loads((EXAMPLES / "lycoris_merge.json").read_text())
    node = next(n for n in wf["nodes"] if n["type"] == "MergeLyCORIS")
    node["widgets_values"].append(1.0)
    with pytest.raises(ValueError, match="unused widget values"):
        ui_to_api(wf, _classes(host))
    node["widgets_values"] = node["widgets_values"][:-3]
    with pytest.raises(ValueError, match="no widget value"):
        ui_to_api(wf, _classes(host))


@pytest.mark.parametrize("name", ["lycoris_load", "lycoris_strength_schedule"])
def test_workflow_saved_before_the_mode_input_still_validates(host, user_files, name):
    """A workflow saved before the loaders / schedule had `mode` (one widget value fewer) loads
    with the default, as the frontend fills a newer widget: patch mode, as before."""
    wf = json.loads((EXAMPLES / f"{name}.json").read_text())
    ours = [n for n in wf["nodes"] if n["type"] in ("LoadLoHa", "LoadLoKr", "LoadLyCORIS",
                                                   "LyCORISStrengthSchedule")]
    for node in ours:
        assert node["widgets_values"].pop() in ("patch", "bypass")
    with pytest.raises(ValueError, match="no widget value for 'mode'"):
        ui_to_api(wf, _classes(host))
    prompt = ui_to_api(wf, _classes(host), fill_defaults=True)
    assert all(prompt[str(n["id"])]["inputs"]["mode"] == "patch" for n in ours)
    valid = asyncio.run(host.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert valid[0], (valid[1], valid[3])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_validates_in_comfyui(host, user_files, name):
    prompt = load_example(name, _classes(host))
    valid = asyncio.run(host.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
    assert valid[0], (valid[1], valid[3])
    assert valid[2], "no output node would run"


def _outputs_dir(host) -> Path:
    return host.base_dir / "output"


def _check(host, res, node: dict, nid: str) -> None:
    """What each pack node of an example must have produced on the tiny model."""
    kind, out = node["class_type"], res.outputs(nid)
    if kind in ("LoadLoKr", "LoadLoHa", "LoadLyCORIS"):
        # (the tiny files have 2 modules, so block-weight rules for other blocks hit nothing)
        assert "applied: 2 weights" in out[2] and "NOT applied" not in out[2], out[2]
    elif kind == "LyCORISStrengthSchedule":
        assert isinstance(out[2], torch.Tensor) and out[2].ndim == 4 and out[2].shape[-1] == 3
    elif kind in ("MergeLyCORIS", "ResizeLyCORIS", "BakeLyCORIS", "TrainLyCORIS"):
        path = Path(out[1])
        folders = {_outputs_dir(host).resolve(), (host.base_dir / "models" / "loras").resolve()}
        assert path.is_file() and folders & set(path.resolve().parents), out
        assert lc.load_adapter(path).modules if kind != "BakeLyCORIS" else path.stat().st_size > 0
        if kind == "TrainLyCORIS":  # with a CLIP connected, the text encoders are trained too
            te = [m for m in lc.load_adapter(path).modules if m.startswith("lora_te")]
            assert bool(te) == ("clip" in node["inputs"]) and (out[3] is None) != bool(te)
            sampled = int(node["inputs"].get("sample_every_n_steps") or 0)
            assert out[4].shape[0] == (1 if sampled else 0), out[4].shape  # one prompt, step 2
    elif kind == "LyCORISDataset":  # the example's kohya folder: 3 images × 4 repeats
        assert out[1].splitlines()[0].startswith("3 image(s) in 1 subset(s), 12 item(s) per epoch"), out[1]
    elif kind == "ConvertLyCORIS" and not node["inputs"]["dry_run"]:
        assert out[0].startswith(f"converted: {CONVERT_SOURCE} -> ") and " 0 failed" in out[0], out[0]
        assert list((_outputs_dir(host) / "loras" / "converted").glob("sdxl_lokr_sdscripts_*.safetensors"))
    elif kind == "BatchConvertLyCORIS":
        assert CONVERT_SOURCE in out[0], out[0]


def _tiny(prompt: dict, name: str) -> dict:
    prompt = on_tiny_models(prompt, TINY)
    if name == "lycoris_train_dataset":  # samples at step 2 of 3, at the tiny model's size
        for node in prompt.values():
            if node["class_type"] == "TrainLyCORIS":
                node["inputs"].update(sample_every_n_steps=2,
                                      sample_prompts="sks dog on a sofa --n blurry --w 64 --h 64 --s 2")
    return prompt


@pytest.mark.parametrize("name", WORKFLOWS)
def test_example_runs_on_tiny_models(host, executor, user_files, name):
    prompt = _tiny(load_example(name, _classes(host)), name)
    res = executor.run(prompt)
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    pack = {cls.define_schema().node_id for cls in host.pack.nodes.NODES}
    checked = [nid for nid, node in prompt.items() if node["class_type"] in pack]
    assert checked
    for nid in checked:
        _check(host, res, prompt[nid], nid)


def test_dataset_example_ends_in_a_muted_loader_of_the_trained_file(host, executor, user_files):
    """kohya folder → LyCORISDataset → TrainLyCORIS → samples → LoadLyCORIS: the loader (and its
    preview) are muted, as the file does not exist before the first run, and left out of the
    queued prompt; a Note says to unmute them. The loader names the file the training writes
    (output_name + the first counter, in the loras folder); unmuted after a run, it applies it."""
    wf = json.loads((EXAMPLES / "lycoris_train_dataset.json").read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in wf["nodes"]}
    loader = next(n for n in nodes.values() if n["type"] == "LoadLyCORIS")
    train = next(n for n in nodes.values() if n["type"] == "TrainLyCORIS")
    muted = {n["id"] for n in nodes.values() if n.get("mode") == 2}
    assert loader["id"] in muted and all(nodes[i]["type"] in ("LoadLyCORIS", "PreviewAny") for i in muted)
    note = next(n for n in nodes.values() if n["type"] == "Note")
    assert "unmute" in note["widgets_values"][0] and loader["widgets_values"][0] in note["widgets_values"][0]
    api = load_example("lycoris_train_dataset", _classes(host))
    assert str(loader["id"]) not in api and not {str(i) for i in muted} & set(api)
    inputs = api[str(train["id"])]["inputs"]
    assert inputs["save_to"] == "loras"
    assert loader["widgets_values"][0] == f"{inputs['output_name']}_00001_.safetensors"
    # the first run writes the file (the counter counts up if an earlier test wrote one)
    res = executor.run(_tiny(api, "lycoris_train_dataset"))
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    written = Path(res.outputs(str(train["id"]))[1])
    loras = (host.base_dir / "models" / "loras").resolve()
    rel = written.resolve().relative_to(loras).as_posix()
    assert rel.startswith(inputs["output_name"] + "_") and rel.endswith("_.safetensors")
    # unmuted, pointed at that file (as the user picks it after a refresh), it loads it
    for n in wf["nodes"]:
        n["mode"] = 0 if n["id"] in muted else n.get("mode", 0)
    loader["widgets_values"][0] = rel
    prompt = _tiny(ui_to_api(wf, _classes(host)), "lycoris_train_dataset")
    lid = str(loader["id"])
    keep = {lid, *(k for k, v in prompt.items()
                   if any(isinstance(x, list) and x[:1] == [lid] for x in v["inputs"].values()))}
    keep |= {v[0] for k in list(keep) for v in prompt[k]["inputs"].values() if isinstance(v, list)}
    res = executor.run({k: v for k, v in prompt.items() if k in keep})
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    report = res.outputs(lid)[2]
    assert "applied:" in report and "NOT applied" not in report, report
