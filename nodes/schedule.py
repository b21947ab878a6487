"""LyCORISStrengthSchedule: adapter strength that follows keyframes over the sampling steps."""

from __future__ import annotations

import logging

import folder_paths
import torch
from comfy_api.latest import io, ui

from ..lycoris_core.blocks import parse_block_weights
from ..lycoris_core.schedule import INTERPOLATIONS, PRESET_HELP, parse_schedule, render_curve
from .loaders import BLOCK_TOOLTIP, MODE_TOOLTIP
from .patching import MODES, cache_key
from .patching.scheduled import (
    TIMINGS,
    ScheduledAdapter,
    describe_memory,
    plan_from_file,
    take_over_loader_patches,
)

log = logging.getLogger("lycoris_nodes")

NODE_ID = "LyCORISStrengthSchedule"
FROM_MODEL = "(LyCORIS loader upstream)"

SCHEDULE_TOOLTIP = (
    "Strength multiplier over sampling. Keyframes PERCENT:STRENGTH separated by commas, percent as "
    "0-1 or with % (e.g. '0:1, 40%:1, 100%:0.2'); the same percent twice makes a jump; before the "
    "first / after the last keyframe the strength holds. A word hold / linear / cosine in the text "
    "overrides the interpolation input. Or a preset: "
    + "; ".join(f"{k} ({v})" for k, v in PRESET_HELP.items()) + ".")
CACHE_TOOLTIP = (
    "Off (default): keep only a copy of the adapted weights in their dtype on the offload device "
    "(what ComfyUI keeps for any patch) and rebuild ΔW from the adapter's factors in row blocks at "
    "each strength change (about one patch of those weights per change). On: also keep ΔW in "
    "float32 and the copy on the weights' device (VRAM on a GPU), read at each change instead of "
    "rebuilt (no faster for a LoKr, where the rebuild is cheap); extra memory = "
    "adapted parameters × (4 bytes + their dtype's size), e.g. +15 GB for a LoKr on all 788 fp16 "
    "weights of a full SDXL UNet. The node's report gives the figure for the connected model. "
    "Patch mode only; bypass keeps no copy at all.")
TIMING_TOOLTIP = (
    "How a step's percent is measured. steps: position in the sampler's own steps (step i of n is "
    "at i/n; 50% = the middle step). sigma: ComfyUI's model-sampling percent, as hook keyframes and "
    "ControlNet start/end use (depends on the noise level, not the step count).")


def _loras() -> list[str]:
    return [FROM_MODEL, *folder_paths.get_filename_list("loras")]


class LyCORISStrengthSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name="LyCORIS Strength Schedule",
            category="LyCORIS/schedule",
            description=(
                "Apply a LoHa / LoKr / LoRA file (or take over the one a LyCORIS loader put on the "
                "model) with a diffusion-model strength that follows keyframes over the sampling "
                "steps (hold / linear / cosine, presets such as fade_out or pulse), with per-block "
                "strengths and a separate, constant CLIP strength. Before each model call only the "
                "adapter's weights are set to base + strength·ΔW (ΔW rebuilt in row blocks when the "
                "strength changes, or kept with cache_delta); the base weights are restored after "
                "sampling. The report shows the extra memory. Works with every sampler, CFG and "
                "batched conditionings. Mode bypass: the adapter runs at forward time and reads the "
                "strength at each model call, no weight is written. Shows the curve."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (SDXL UNet or Anima DiT)."),
                io.Combo.Input("lora_name", options=_loras(),
                               tooltip="The adapter file in the loras folder, or "
                                       f"'{FROM_MODEL}' to schedule the LyCORIS patches a "
                                       "LoadLoHa / LoadLoKr / LoadLyCORIS node put on this model "
                                       "(their strengths and block weights are kept and multiplied "
                                       "by the ones here; CLIP then passes through unchanged)."),
                io.Float.Input("strength_model", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Diffusion-model strength; the schedule multiplies it at "
                                       "each step."),
                io.Float.Input("strength_clip", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Text-encoder strength, constant (the prompt is encoded "
                                       "once, before sampling). Ignored for the loader upstream."),
                io.String.Input("schedule", default="0:1, 0.5:1, 1:0.2", tooltip=SCHEDULE_TOOLTIP),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="linear",
                               tooltip="Between keyframes: linear, cosine (smooth ease in/out) or "
                                       "hold (keep the earlier keyframe's strength: steps)."),
                io.Combo.Input("timing", options=list(TIMINGS), default="steps",
                               tooltip=TIMING_TOOLTIP),
                io.String.Input("block_weights", default="", tooltip=BLOCK_TOOLTIP),
                io.Int.Input("preview_steps", default=20, min=0, max=1000,
                             tooltip="Dots on the curve preview at the strength each of this many "
                                     "steps gets (timing 'steps'); 0 = no dots."),
                io.Boolean.Input("cache_delta", default=False, tooltip=CACHE_TOOLTIP),
                io.Combo.Input("mode", options=list(MODES), default="patch", optional=True,
                               tooltip=MODE_TOOLTIP + " With a schedule, bypass reads the "
                                       "strength at each forward: nothing is written when it "
                                       "changes (cache_delta does not apply)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional text encoder(s), patched at strength_clip."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL",
                                tooltip="A clone of the model whose adapter strength follows the "
                                        "schedule while it samples."),
                io.Clip.Output(display_name="CLIP",
                               tooltip="The text encoder(s) patched at strength_clip, or the input."),
                io.Image.Output(display_name="curve",
                                tooltip="The schedule's curve (x: percent of sampling, y: strength "
                                        "multiplier; orange: keyframes, white: steps)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        """Re-run when the file changes on disk (mtime/size), not only when the name does."""
        if lora_name == FROM_MODEL:
            return lora_name
        try:
            return cache_key(folder_paths.get_full_path_or_raise("loras", lora_name))
        except Exception:  # an unknown name is reported by execute
            return lora_name

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, schedule, interpolation,
                timing, block_weights, preview_steps, cache_delta=False,
                mode="patch", clip=None) -> io.NodeOutput:
        sched = parse_schedule(schedule, interpolation)
        bw = parse_block_weights(block_weights)
        if lora_name == FROM_MODEL:
            new_model, entries = take_over_loader_patches(model, strength_model, bw)
            new_clip = clip
        else:
            path = folder_paths.get_full_path_or_raise("loras", lora_name)
            entries, new_clip, _ = plan_from_file(model, clip, path, strength_model, strength_clip,
                                                  bw, node=NODE_ID, mode=mode)
            new_model = model.clone() if entries else model
        report_lines: list[str] = []
        if entries:
            scheduled = ScheduledAdapter(entries, sched, timing, cache_delta, mode)
            scheduled.attach(new_model)
            memory = scheduled.memory(new_model)
            report_lines += describe_memory(memory, str(new_model.offload_device),
                                            str(new_model.load_device))
            for key, why in scheduled.fallback.items():
                log.warning("%s %s: %s is scheduled by writing its weight (bypass cannot run "
                            "it: %s)", NODE_ID, lora_name, key, why)
            for key, why in scheduled.constant_fallback.items():
                log.warning("%s %s: %s is patched (bypass cannot run it: %s)", NODE_ID, lora_name,
                            key, why)
            if scheduled.constant:
                log.info("%s %s: %d LLM-adapter weights at constant strength (the LLM adapter runs "
                         "once on the prompt, before the steps a schedule follows)", NODE_ID,
                         lora_name, len(scheduled.constant))
        report = "\n".join([f"{len(entries)} weights scheduled (mode {mode}), "
                            f"{sched.describe()}", *report_lines])
        log.info("%s %s: %s", NODE_ID, lora_name, report)
        curve = torch.from_numpy(render_curve(sched, steps=preview_steps or None))[None]
        shown = {**ui.PreviewImage(curve, cls=cls).as_dict(), **ui.PreviewText(report).as_dict()}
        return io.NodeOutput(new_model, new_clip, curve, ui=shown)


SCHEDULE_NODES = [LyCORISStrengthSchedule]
