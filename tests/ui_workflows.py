"""UI-format workflows (what ComfyUI's frontend saves and `example_workflows/` holds) → API prompts,
and their substitution onto the test host's tiny models.

The conversion follows the frontend's rules: `widgets_values` hold one value per widget input in
the order of the node's input spec (required, then optional); an INT `seed`/`noise_seed` (or any
input with `control_after_generate`) is followed by its control value, an `image_upload` combo by
its upload widget's value; an input with a link takes the linked output instead of its widget value.
With `fill_defaults`, a widget added to a node after the workflow was saved (no value left for it)
keeps its default, as the frontend does when it loads such a workflow.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from PIL import Image
from test_loaders_common import make_adapter

import lycoris_core as lc

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"
TINY_LATENT = {"width": 64, "height": 64}
# The files the examples name (a user has their own): checkpoint, adapters, conversion source, image.
EXAMPLE_CHECKPOINT = "sd_xl_base_1.0.safetensors"
EXAMPLE_ADAPTERS = {"example_lokr.safetensors": "lokr", "example_loha.safetensors": "loha"}
CONVERT_SOURCE = "sdxl_lokr_sdscripts.safetensors"
EXAMPLE_IMAGE = "example.png"
EXAMPLE_DATASET = "kohya_dataset"
TINY_UNET_KEYS = ("diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_q.weight",
                  "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn1.to_k.weight")


def input_spec(node_class) -> list[tuple[str, list]]:
    """[(input name, [type, options])] of a node class, required first (V1 and V3 nodes)."""
    info = node_class.GET_NODE_INFO_V1()["input"] if hasattr(node_class, "GET_NODE_INFO_V1") \
        else node_class.INPUT_TYPES()
    return [(name, list(spec)) for section in ("required", "optional")
            for name, spec in (info.get(section) or {}).items()]


def _is_widget(spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not opts.get("forceInput")


def _extra_values(name: str, spec: list) -> int:
    """How many values the frontend stores after this widget's own value (control / upload)."""
    opts = spec[1] if len(spec) > 1 else {}
    if opts.get("control_after_generate") or (spec[0] == "INT" and name in ("seed", "noise_seed")):
        return 1
    return 1 if opts.get("image_upload") else 0


MUTED = 2                            # LiteGraph mode NEVER: the frontend does not queue it
NOTES = ("Note", "MarkdownNote")     # frontend-only nodes


def ui_to_api(workflow: dict, node_classes: dict, fill_defaults: bool = False) -> dict:
    """API prompt {id: {class_type, inputs}} of a UI workflow; raises ValueError if it is stale
    (with `fill_defaults`, missing trailing widget values take the widgets' defaults)."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    # as the frontend queues: muted nodes (mode 2) and notes are left out of the prompt
    skipped = {n["id"] for n in workflow["nodes"] if n.get("mode", 0) == MUTED or n["type"] in NOTES}
    for node in workflow["nodes"]:
        kind, nid = node["type"], node["id"]
        if nid in skipped:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {nid} ({kind}) is bypassed: not supported here")
        fed = [i["name"] for i in node.get("inputs", []) if i.get("link") is not None
               and links[i["link"]][1] in skipped]
        if fed:
            raise ValueError(f"node {nid} ({kind}): inputs {fed} come from a muted node")
        if kind not in node_classes:
            raise ValueError(f"node {nid}: unknown node type {kind}")
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs: dict = {}
        for name, spec in input_spec(node_classes[kind]):
            if _is_widget(spec):
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if values:
                    inputs[name] = values.pop(0)
                    del values[:_extra_values(name, spec)]
                elif fill_defaults and "default" in opts:  # a newer widget than the workflow
                    inputs[name] = opts["default"]
                else:
                    raise ValueError(f"node {nid} ({kind}): no widget value for {name!r}")
            if name in linked:
                link = linked.pop(name)
                inputs[name] = [str(link[1]), link[2]]
        if values or linked:
            raise ValueError(f"node {nid} ({kind}): unused widget values {values} or links "
                             f"{sorted(linked)} (workflow older than the node?)")
        prompt[str(nid)] = {"class_type": kind, "inputs": inputs}
    return prompt


def load_example(name: str, node_classes: dict) -> dict:
    return ui_to_api(json.loads((EXAMPLES / f"{name}.json").read_text()), node_classes)


def _consumers(prompt: dict, nid: str, slot: int | None = None) -> list[str]:
    return [k for k, n in prompt.items() for v in n["inputs"].values()
            if isinstance(v, list) and len(v) == 2 and v[0] == nid and (slot is None or v[1] == slot)]


def _drop(prompt: dict, nid: str) -> None:
    """Remove a node and everything downstream of it."""
    for c in _consumers(prompt, nid):
        if c in prompt:
            _drop(prompt, c)
    prompt.pop(nid, None)


def on_tiny_models(prompt: dict, overrides: dict[str, dict] | None = None) -> dict:
    """The same graph on the test host: checkpoint loaders → LycorisTestModel (tiny SDXL, which has
    no VAE: VAEDecode and what follows it are dropped, VAEEncode becomes a tiny empty latent of 2),
    latents 64×64, samplers end in LycorisTestSink; `overrides` {class_type: {input: value}}."""
    p = json.loads(json.dumps(prompt))
    for nid, node in list(p.items()):
        if node["class_type"] != "CheckpointLoaderSimple":
            continue
        p[nid] = {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}}
        for c in _consumers(p, nid, 2):
            if p[c]["class_type"] == "VAEEncode":
                p[c] = {"class_type": "EmptyLatentImage", "inputs": {**TINY_LATENT, "batch_size": 2}}
            elif p[c]["class_type"] == "LyCORISDataset":  # encodes with the tiny test VAE
                p[f"{nid}_vae"] = {"class_type": "LycorisTestVAE", "inputs": {"seed": 0}}
                p[c]["inputs"]["vae"] = [f"{nid}_vae", 0]
            else:
                _drop(p, c)
    for nid, node in list(p.items()):
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"].update(TINY_LATENT)
        node["inputs"].update((overrides or {}).get(node["class_type"], {}))
        if node["class_type"] == "KSampler" and not _consumers(p, nid):
            p[f"{nid}_sink"] = {"class_type": "LycorisTestSink", "inputs": {"latent": [nid, 0]}}
    return p


def tiny_sdxl_shapes(keys) -> dict[str, tuple[int, ...]]:
    """Shapes of weights of the test host's tiny SDXL (built by the test-only node module)."""
    models = next(m for name, m in sys.modules.items()
                  if name.endswith("host_nodes.models") and hasattr(m, "sdxl_model"))
    sd = models.sdxl_model("tiny", 0).model.state_dict()
    return {k: tuple(sd[k].shape) for k in keys}


def put_example_files(base: Path, convert_source: Path | None = None) -> None:
    """The files the examples name, in the ComfyUI base folder `base`: the checkpoint (empty: only
    its name is listed and validated; the runs use the tiny model), small real LoKr/LoHa files for
    the tiny SDXL (2 modules each), the conversion source (a copy of `convert_source`, or without
    one a tiny LoKr that is only listed) and the training image."""
    loras = base / "models" / "loras"
    (base / "models" / "checkpoints" / EXAMPLE_CHECKPOINT).touch()
    shapes = tiny_sdxl_shapes(TINY_UNET_KEYS)
    for i, (name, algo) in enumerate(EXAMPLE_ADAPTERS.items()):
        if not (loras / name).exists():
            tensors, _ = make_adapter(shapes, algo, rank=4, alpha=2.0, seed=11 + i)
            lc.save_safetensors(tensors, loras / name, {"ss_network_module": f"networks.{algo}",
                                                       "ss_network_dim": "4", "ss_network_alpha": "2.0"})
    if convert_source is not None:
        shutil.copyfile(convert_source, loras / CONVERT_SOURCE)
    elif not (loras / CONVERT_SOURCE).exists():
        shutil.copyfile(loras / "example_lokr.safetensors", loras / CONVERT_SOURCE)
    Image.new("RGB", (64, 64), (200, 120, 40)).save(base / "input" / EXAMPLE_IMAGE)
    # the kohya folder of lycoris_train_dataset: 4 repeats of class "sks dog", mixed sizes, one
    # image without a caption file
    subset = base / "input" / EXAMPLE_DATASET / "4_sks dog"
    subset.mkdir(parents=True, exist_ok=True)
    for i, (size, caption) in enumerate([((64, 64), "sks dog, sitting"), ((64, 96), "sks dog, standing"),
                                         ((96, 64), None)]):
        Image.new("RGB", size, (40 * i, 120, 200 - 40 * i)).save(subset / f"dog{i}.png")
        if caption is not None:
            (subset / f"dog{i}.txt").write_text(caption, encoding="utf-8")
