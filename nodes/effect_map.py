"""LyCORISEffectMap: where an adapter changes the model, ‖ΔW‖ per block and layer kind
(`lycoris_core.effect`), as a picture and a table."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..lycoris_core import load_adapter
from ..lycoris_core.effect import effect_map, format_table, picture
from .merge import NONE, _diffusion_state, _fingerprint, _lora_path, _loras

NODE_ID = "LyCORISEffectMap"
COMPARE_MODES = ("same scale", "difference")


class LyCORISEffectMap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID,
            display_name="LyCORIS Effect Map",
            category="LyCORIS/inspect",
            description=("Where an adapter acts: the Frobenius norm of ΔW at strength 1 per block "
                         "(IN0-8, MID, OUT0-8, B0-27, LLM, TE1, TE2, QWEN3, OTHER) and layer kind, "
                         "computed from the factors without forming ΔW, as a heatmap and a table. "
                         "Optionally against a second file, or relative to a model's weights."),
            inputs=[
                io.Combo.Input("lora_name", options=_loras(False),
                               tooltip="The adapter (LoRA, LoHa, LoKr, DoRA) from the loras folder."),
                io.Combo.Input("compare", options=_loras(True), default=NONE, optional=True,
                               tooltip="Optional second adapter to compare with (None: one map)."),
                io.Combo.Input("compare_mode", options=list(COMPARE_MODES), default=COMPARE_MODES[0],
                               optional=True,
                               tooltip="same scale: both maps side by side on one colour scale. "
                                       "difference: per cell ‖ΔW‖ of lora_name minus that of "
                                       "compare (blue: compare acts more, red: lora_name acts more)."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the diffusion model the adapter is for. The map then "
                                       "shows ‖ΔW‖/‖W‖ with the model's real weights (text-encoder "
                                       "modules, whose weights it lacks, are left out), and DoRA "
                                       "modules their exact change."),
            ],
            outputs=[
                io.Image.Output(display_name="map",
                                tooltip="Heatmap: rows are blocks, columns layer kinds; grey cells "
                                        "hold no module. Colour scale and notes below the grid."),
                io.String.Output(display_name="table",
                                 tooltip="The same numbers as text: modules, total and per-kind norm "
                                         "for each block that holds modules, with any note (no "
                                         "known block, unmatched modules, DoRA without weights)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, compare=NONE, compare_mode=COMPARE_MODES[0], model=None):
        """Re-run when a chosen file changes on disk or an option changes."""
        return _fingerprint({"lora_name": lora_name, "lora_2": compare, "compare_mode": compare_mode})

    @classmethod
    def execute(cls, lora_name, compare=NONE, compare_mode=COMPARE_MODES[0],
                model=None) -> io.NodeOutput:
        if compare_mode not in COMPARE_MODES:
            raise ValueError(f"compare_mode must be one of {list(COMPARE_MODES)}, got {compare_mode!r}")
        weights = _diffusion_state(model) if model is not None else None
        relative = weights is not None
        emap = effect_map(load_adapter(_lora_path(lora_name)), weights)
        other = None
        if compare and compare != NONE:
            other = effect_map(load_adapter(_lora_path(compare)), weights)
        pic = picture(emap, relative, other, compare_mode)
        text = format_table(emap, relative)
        if other is not None:
            text += "\n\n" + format_table(other, relative)
            if compare_mode == "difference":
                text = f"difference: per cell {emap.file} minus {other.file}\n\n" + text
        image = torch.from_numpy(pic.rgb).to(torch.float32).div_(255.0)[None]
        return io.NodeOutput(image, text, ui=ui.PreviewText(text))


EFFECT_MAP_NODES = [LyCORISEffectMap]
