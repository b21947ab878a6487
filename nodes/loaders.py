"""LoadLoHa / LoadLoKr / LoadLyCORIS: apply a LyCORIS file from the `loras` folder, with a report."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io, ui

from ..lycoris_core.blocks import PRESET_HELP
from .patching import MODES, LoadResult, algo_label, apply_adapter, cache_key

log = logging.getLogger("lycoris_nodes")

MAX_LISTED = 20

BLOCK_TOOLTIP = (
    "Per-block strength (multiplies strength_model / strength_clip). Empty = all 1. "
    "Items separated by commas: NAME=VALUE with NAME one of IN0-8, MID, OUT0-8 (SDXL), B0-27, LLM "
    "(Anima DiT / llm_adapter), OTHER, TE, TE1, TE2, QWEN3, UNET/DIT, * ; ranges like OUT3-5=0.5; "
    "or a named preset: " + "; ".join(f"{k} ({v})" for k, v in PRESET_HELP.items()) +
    "; or only numbers: SDXL 20 (TE, IN0-8, MID, OUT0-8), SDXL 12 (LoRA block weight: BASE, IN4, "
    "IN5, IN7, IN8, MID, OUT0-5) or Anima 30 (TE, B0-27, LLM)."
)
MODE_TOOLTIP = (
    "Optional (default patch; prompts and workflows saved without it keep patch mode). "
    "patch: ΔW is added into the weights when ComfyUI loads the model (ComfyUI keeps a backup "
    "copy of every adapted weight; a strength change patches again). bypass: the adapter runs "
    "beside each layer at forward time, y = f(x) + strength·ΔW x, without forming ΔW: base "
    "weights are never written and no backup is kept (low memory; fp8/fp16 weights are never "
    "re-quantised), same result to float32 rounding. Layers bypass cannot run are patched and "
    "listed in the report."
)


def _counts(d: dict) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def _listed(names: list[str]) -> str:
    more = f" … (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def format_report(r: LoadResult) -> str:
    """The load report shown on the node and returned as STRING."""
    s = r.summary
    lines: list[str] = []
    unmatched = r.unmatched
    if unmatched:
        lines.append(f"WARNING: {len(unmatched)} of {s['modules']} modules match nothing in this "
                     f"model and are NOT applied: {_listed(unmatched)}")
    if r.unused_rules:
        lines.append(f"WARNING: block weight rules that hit no module: {', '.join(r.unused_rules)}")
    if s.get("unknown_keys"):
        lines.append(f"WARNING: {len(s['unknown_keys'])} keys are not adapter tensors and were "
                     f"ignored: {_listed(s['unknown_keys'])}")
    lines.append(f"file: {os.path.basename(r.path)}" + ("  (cached)" if r.cache_hit else ""))
    lines.append(f"architecture: model {r.model_architecture}")
    lines.append("algorithms: " + _counts({algo_label(a): n for a, n in s["algorithms"].items()}))
    lines.append(f"rank: {_counts(s['ranks'])}; alpha: {_counts(s['alphas'])}")
    if s.get("lokr_factor"):
        lines.append(f"LoKr factor: {_counts(s['lokr_factor'])}")
    lines.append(f"modes: {_counts(s['modes'])}")
    by_comp = s["matched_by_component"]
    lines.append(f"matched: {s['matched']} of {s['modules']} modules — "
                 + (_counts(by_comp) if by_comp else "none"))
    lines.append(f"strength: model {r.strength_model:g}, clip {r.strength_clip:g}; "
                 f"block weights: {r.block_weights.text or 'all 1'}")
    lines.append(f"applied: {len(r.applied)} weights")
    lines.append(mode_line(r))
    by_reason: dict[str, list[str]] = {}
    for name, why in r.fallback.items():
        by_reason.setdefault(why, []).append(name)
    for why, names in sorted(by_reason.items()):
        lines.append(f"patched instead of bypass: {len(names)} modules — {why}: {_listed(names)}")
    if r.zero_strength:
        lines.append(f"strength 0 (not applied): {len(r.zero_strength)} modules")
    if r.skipped_te:
        lines.append(f"text-encoder modules not applied (no CLIP connected): {len(r.skipped_te)}")
    return "\n".join(lines)


def mode_line(r: LoadResult) -> str:
    """The report's mode line."""
    if r.mode != "bypass":
        return "mode: patch (ΔW added into the weights when the model loads)"
    return (f"mode: bypass ({len(r.bypassed)} weights applied at forward time, base weights "
            f"untouched" + (f"; {len(r.fallback)} patched, see below)" if r.fallback else ")"))


def _schema(node_id: str, display: str, accepts: str) -> io.Schema:
    return io.Schema(
        node_id=node_id,
        display_name=display,
        category="LyCORIS/loaders",
        description=(f"Apply a {accepts} file from the loras folder to MODEL (and CLIP), computing "
                     "ΔW in float32 on the weight's device (exact in full and low-VRAM mode), or in "
                     "bypass mode at forward time without touching the weights, with a load "
                     "report. SDXL (UNet, CLIP-L, CLIP-G) and Anima (DiT, llm_adapter, Qwen3)."),
        inputs=[
            io.Model.Input("model", tooltip="The diffusion model to patch (SDXL UNet or Anima DiT)."),
            io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                           tooltip=f"The {accepts} file (.safetensors) in ComfyUI's loras folder."),
            io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                           tooltip="Multiplier of ΔW on the diffusion model; 0 leaves it unchanged."),
            io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                           tooltip="Multiplier of ΔW on the text encoder(s); 0 leaves CLIP unchanged."),
            io.String.Input("block_weights", default="", tooltip=BLOCK_TOOLTIP),
            io.Combo.Input("mode", options=list(MODES), default="patch", optional=True,
                           tooltip=MODE_TOOLTIP),
            io.Clip.Input("clip", optional=True,
                          tooltip="Optional text encoder(s) to patch (CLIP-L + CLIP-G, or Qwen3)."),
        ],
        outputs=[
            io.Model.Output(display_name="MODEL", tooltip="The patched model (a clone)."),
            io.Clip.Output(display_name="CLIP",
                           tooltip="The patched text encoder(s), or the input when not patched."),
            io.String.Output(display_name="report",
                             tooltip="What was loaded: architecture, algorithms, rank/alpha/factor, "
                                     "matches per component, unmatched modules (warning first)."),
        ],
    )


class _LoaderBase(io.ComfyNode):
    ALGO: str | None = None
    NODE_ID = ""
    DISPLAY = ""
    ACCEPTS = ""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(cls.NODE_ID, cls.DISPLAY, cls.ACCEPTS)

    @classmethod
    def fingerprint_inputs(cls, model, lora_name, strength_model, strength_clip, block_weights,
                           mode="patch", clip=None):
        """Re-run when the file changes on disk (mtime/size), not only when the name does."""
        try:
            return cache_key(folder_paths.get_full_path_or_raise("loras", lora_name))
        except Exception:  # an unknown name is reported by execute
            return lora_name

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, block_weights,
                mode="patch", clip=None) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        new_model, new_clip, result = apply_adapter(model, clip, path, strength_model, strength_clip,
                                                    block_weights, expect_algo=cls.ALGO,
                                                    node=cls.NODE_ID, mode=mode)
        report = format_report(result)
        if result.unmatched or result.unused_rules:
            log.warning("%s: %s", lora_name, report.split("\n", 1)[0])
        log.info("%s %s:\n%s", cls.NODE_ID, lora_name, report)
        return io.NodeOutput(new_model, new_clip, report, ui=ui.PreviewText(report))


class LoadLoHa(_LoaderBase):
    ALGO, NODE_ID, DISPLAY, ACCEPTS = "loha", "LoadLoHa", "Load LoHa", "LoHa"


class LoadLoKr(_LoaderBase):
    ALGO, NODE_ID, DISPLAY, ACCEPTS = "lokr", "LoadLoKr", "Load LoKr", "LoKr"


class LoadLyCORIS(_LoaderBase):
    ALGO, NODE_ID = None, "LoadLyCORIS"
    DISPLAY, ACCEPTS = "Load LyCORIS (LoHa / LoKr / LoRA)", "LoHa, LoKr or LoRA"


LOADER_NODES = [LoadLoHa, LoadLoKr, LoadLyCORIS]
