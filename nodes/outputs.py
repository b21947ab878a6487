"""Where nodes write files: under ComfyUI's output folder, with SaveImage-style counters."""

from __future__ import annotations

from pathlib import Path

import folder_paths

from ..lycoris_core.paths import safe_output_path


def output_file(prefix: str, ext: str = ".safetensors") -> Path:
    """`<output>/<prefix>_<counter>_<ext>`, never outside the output folder (symlinks resolved),
    never an existing file. `prefix` may hold subfolders (`lycoris/merged`); a bad name (`..`,
    absolute, control characters) raises `ValueError`, which ComfyUI shows on the node."""
    return safe_output_path(folder_paths.get_output_directory(), prefix, ext, subdirs=True)
