"""MergeLyCORIS / ResizeLyCORIS / BakeLyCORIS: thin glue over `lycoris_core.merge/resize/bake`.

Adapters come from ComfyUI's `loras` folder; results are written under ComfyUI's output folder
with counters (never over an existing file) and every node returns a text report.
"""

from __future__ import annotations

import os

import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..lycoris_core import load_adapter
from ..lycoris_core.bake import bake_state_dict
from ..lycoris_core.merge import DTYPES, FORMATS, FactorSpec, MergeResult, merge_adapters, save_result
from ..lycoris_core.resize import resize_adapter
from .outputs import output_file

NONE = "None"
SLOTS = 4
CATEGORY = "LyCORIS/merge"


def _loras(optional: bool) -> list[str]:
    names = folder_paths.get_filename_list("loras")
    return [NONE, *names] if optional else list(names)


def _lora_path(name: str) -> str:
    return folder_paths.get_full_path_or_raise("loras", name)


def _progress() -> callable:
    bar = comfy.utils.ProgressBar(1)
    return lambda done, total: bar.update_absolute(done, total)


def _fingerprint(inputs: dict) -> tuple:
    """Re-run when a chosen file changes on disk or any widget value changes."""
    names = [v for k, v in inputs.items() if k == "lora_name" or k.startswith("lora_")]
    return (_stats(*names),
            tuple(sorted((k, str(v)) for k, v in inputs.items() if k not in ("model", "clip"))))


def _stats(*names: str) -> tuple:
    out = []
    for n in names:
        if n and n != NONE:
            try:
                st = os.stat(_lora_path(n))
                out.append((n, st.st_mtime_ns, st.st_size))
            except (OSError, FileNotFoundError):
                out.append((n, None))
    return tuple(out)


def _model_weights(model, clip) -> dict | None:
    """{ComfyUI key: weight} of the given MODEL/CLIP (resolves names, gives DoRA its W0)."""
    if model is None and clip is None:
        return None
    weights: dict = {}
    if model is not None:
        weights.update(_diffusion_state(model))
    if clip is not None:
        weights.update(clip.cond_stage_model.state_dict())
    return weights


def _diffusion_state(model) -> dict:
    """The MODEL's weights under ComfyUI keys (`diffusion_model.…`), unpatched, not copied."""
    return {k: v for k, v in model.model.state_dict().items() if k.startswith("diffusion_model.")}


def _slot_inputs(value: str, value_tooltip: str) -> list:
    """`lora_i` (file; optional from the second on) + `<value>_i` (float) for each slot."""
    out = []
    for i in range(1, SLOTS + 1):
        out += [
            io.Combo.Input(f"lora_{i}", options=_loras(i > 1),
                           tooltip=f"Adapter {i} (LoRA, LoHa or LoKr) from the loras folder"
                                   + (" (None: unused)." if i > 1 else ".")),
            io.Float.Input(f"{value}_{i}", default=1.0, min=-10.0, max=10.0, step=0.01,
                           tooltip=value_tooltip.format(i=i)),
        ]
    return out


def _chosen(first: str, first_value: float, value: str, slots: dict) -> list[tuple[str, float]]:
    """The (file path, value) pairs of the slots in use."""
    pairs = [(first, first_value)] + [(slots.get(f"lora_{i}", NONE), slots.get(f"{value}_{i}", 1.0))
                                      for i in range(2, SLOTS + 1)]
    return [(_lora_path(n), float(v)) for n, v in pairs if n and n != NONE]


def _spec_inputs() -> list:
    return [
        io.Combo.Input("format", options=list(FORMATS), default="lora",
                       tooltip="lora: truncated SVD of the summed ΔW (up/down). lokr: nearest "
                               "Kronecker product kron(W1, W2) with W2 truncated by SVD."),
        io.Int.Input("rank", default=16, min=0, max=4096,
                     tooltip="Target rank (LoKr: rank of W2). With energy > 0 it is the cap; 0 "
                             "means no cap."),
        io.Float.Input("energy", default=0.0, min=0.0, max=1.0, step=0.001,
                       tooltip="If > 0: per module, keep the smallest rank whose singular values "
                               "hold this share of ‖ΔW‖² (e.g. 0.99)."),
        io.Int.Input("factor", default=-1, min=-1, max=4096,
                     tooltip="LoKr split factor; -1 picks the split closest to square (sd-scripts' "
                             "default). Ignored for LoRA."),
        io.Combo.Input("save_dtype", options=list(DTYPES), default="fp32",
                       tooltip="dtype of the saved factors (the error is measured after this cast)."),
        io.Combo.Input("precision", options=["fp32", "fp64"], default="fp32",
                       tooltip="dtype of the summed ΔW and of the SVDs (fp64 is slower, more exact)."),
        io.String.Input("filename_prefix", default="lycoris/merged",
                        tooltip="Path under ComfyUI's output folder; a counter is appended."),
        io.Model.Input("model", optional=True,
                       tooltip="Optional: resolve module names against this model's real weights "
                               "(needed for DoRA modules, whose change depends on W0). Without it "
                               "the bundled full-size SDXL/Anima key list is used."),
        io.Clip.Input("clip", optional=True,
                      tooltip="Optional: the text encoders, for the same purpose as model."),
    ]


def _spec(fmt, rank, energy, factor, save_dtype, precision) -> FactorSpec:
    import torch

    spec = FactorSpec(fmt, int(rank), float(energy), int(factor), DTYPES[save_dtype],
                      torch.float64 if precision == "fp64" else torch.float32)
    spec.check()  # ValueError with a clear message shows in the UI
    return spec


def _outputs() -> list:
    return [io.String.Output("report", tooltip="What was written: sources, method, rank, overall "
                                               "and per-module reconstruction error."),
            io.String.Output("path", tooltip="Full path of the written file.")]


def _finish(result: MergeResult, prefix: str) -> io.NodeOutput:
    path = save_result(result, output_file(prefix))
    text = result.report(path)
    return io.NodeOutput(text, str(path), ui=ui.PreviewText(text))


class MergeLyCORIS(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        slots = _slot_inputs("weight", "Weight of adapter {i} in the sum Σ wᵢ·ΔWᵢ.")
        return io.Schema(
            node_id="MergeLyCORIS", display_name="Merge LyCORIS adapters", category=CATEGORY,
            description="Weighted sum of several LoRA/LoHa/LoKr adapters' ΔW per layer, written as "
                        "one LoRA (SVD) or LoKr (nearest Kronecker product) file in sd-scripts "
                        "naming, with the reconstruction error per module and overall.",
            inputs=slots + _spec_inputs(), outputs=_outputs(), is_output_node=True)

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return _fingerprint(kwargs)

    @classmethod
    def execute(cls, lora_1, weight_1, format, rank, energy, factor, save_dtype, precision,
                filename_prefix, model=None, clip=None, **slots) -> io.NodeOutput:
        spec = _spec(format, rank, energy, factor, save_dtype, precision)
        sources = [(load_adapter(p), w) for p, w in _chosen(lora_1, weight_1, "weight", slots)]
        result = merge_adapters(sources, spec, _model_weights(model, clip), _progress())
        return _finish(result, filename_prefix)


class ResizeLyCORIS(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ResizeLyCORIS", display_name="Resize LyCORIS adapter", category=CATEGORY,
            description="Re-rank a LoRA/LoHa/LoKr file into a LoRA or LoKr of a target rank or "
                        "energy; reports the reconstruction error per module and overall.",
            inputs=[io.Combo.Input("lora_name", options=_loras(False),
                                   tooltip="Adapter file to resize, from the loras folder."),
                    *_spec_inputs()],
            outputs=_outputs(), is_output_node=True)

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return _fingerprint(kwargs)

    @classmethod
    def execute(cls, lora_name, format, rank, energy, factor, save_dtype, precision,
                filename_prefix, model=None, clip=None) -> io.NodeOutput:
        spec = _spec(format, rank, energy, factor, save_dtype, precision)
        result = resize_adapter(_lora_path(lora_name), spec, _model_weights(model, clip),
                                _progress())
        return _finish(result, filename_prefix)


BAKE_DTYPES = ["keep", "fp16", "bf16", "fp32"]


class BakeLyCORIS(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        slots = _slot_inputs("strength", "Strength of adapter {i}: W = W0 + Σ sᵢ·ΔWᵢ.")
        return io.Schema(
            node_id="BakeLyCORIS", display_name="Bake LyCORIS into model", category=CATEGORY,
            description="Apply one or more adapters, each at its own strength, to the diffusion "
                        "model's weights (ΔW in float32, cast back) and save a diffusion-model "
                        "safetensors file (loadable with Load Diffusion Model), one layer at a time.",
            inputs=[io.Model.Input("model", tooltip="The model whose weights are baked and saved. "
                                                    "Patches added by other nodes are not included."),
                    *slots,
                    io.Combo.Input("save_dtype", options=BAKE_DTYPES, default="keep",
                                   tooltip="dtype of the saved weights; keep = as the model holds them."),
                    io.String.Input("filename_prefix", default="lycoris/baked",
                                    tooltip="Path under ComfyUI's output folder; a counter is appended.")],
            outputs=[io.String.Output("report", tooltip="Adapters applied, modules not applied "
                                                        "(no such weight), tensors written."),
                     io.String.Output("path", tooltip="Full path of the written file.")],
            is_output_node=True)

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return _fingerprint(kwargs)

    @classmethod
    def execute(cls, model, lora_1, strength_1, save_dtype, filename_prefix,
                **slots) -> io.NodeOutput:
        adapters = [(load_adapter(p), s) for p, s in _chosen(lora_1, strength_1, "strength", slots)]
        state = _diffusion_state(model)
        out = {"model." + k: v for k, v in state.items()}  # ComfyUI's checkpoint prefix
        key_of = {"model." + k: k for k in state}
        dtype = None if save_dtype == "keep" else DTYPES[save_dtype]
        report = bake_state_dict(out, key_of, adapters, output_file(filename_prefix),
                                 save_dtype=dtype, progress=_progress())
        text = report.report()
        if getattr(model, "patches", None):
            text += (f"\nnote: the input MODEL carries patches on {len(model.patches)} weights from "
                     "other nodes; they are not part of the saved file")
        return io.NodeOutput(text, str(report.path), ui=ui.PreviewText(text))


MERGE_NODES = [MergeLyCORIS, ResizeLyCORIS, BakeLyCORIS]
