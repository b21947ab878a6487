"""TrainLyCORIS's inputs added for real datasets: where the file goes (`save_to`), the
LyCORISDataset training set, epochs. New optional inputs, appended after the original ones, so
workflows saved before them run as they did."""

from __future__ import annotations

from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..lycoris_core.paths import safe_output_path

SAVE_TO = ("loras", "output")


def extra_inputs() -> list:
    """The optional inputs appended to TrainLyCORIS's schema."""
    return [
        io.Combo.Input("save_to", options=list(SAVE_TO), default="loras", optional=True,
                       tooltip="Where the trained file goes: 'loras' (ComfyUI's first loras "
                       "folder: LoadLyCORIS and the LoRA loaders list it at once, after a refresh "
                       "of the page's lists) or 'output' (ComfyUI's output folder). Workflows "
                       "saved before this option existed keep writing to 'output'."),
    ]


def save_root(o: dict) -> str:
    """The folder the trained files go to. Without the option (an API prompt made before it
    existed): the output folder, as before."""
    where = o.get("save_to") or "output"
    if where not in SAVE_TO:
        raise ValueError(f"save_to must be one of {SAVE_TO}, got {where!r}")
    if where == "loras":
        return folder_paths.get_folder_paths("loras")[0]
    return folder_paths.get_output_directory()


def save_path(o: dict) -> Path:
    """`<root>/<output_name>_NNNNN_.safetensors`: SaveImage-style counter, never an existing
    file, never outside the chosen folder (a bad name raises ValueError)."""
    return safe_output_path(save_root(o), o["output_name"], ".safetensors", subdirs=True)
