"""Real full-size weight keys and shapes of SDXL and Anima, shipped with the pack.

Generated from the project's reference manifests (ComfyUI naming; SDXL UNet + CLIP-L + CLIP-G,
Anima DiT incl. llm_adapter + Qwen3-0.6B). They let the CLI and the converter resolve
underscore names without loading a model.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

_DATA = Path(__file__).with_name("data") / "manifests.json.gz"


@functools.cache
def _all() -> dict[str, dict[str, tuple[int, ...]]]:
    with gzip.open(_DATA, "rt", encoding="utf-8") as fh:
        raw = json.load(fh)
    return {arch: {k: tuple(v) for k, v in keys.items()} for arch, keys in raw.items()}


def manifest(arch: str) -> dict[str, tuple[int, ...]]:
    """{ComfyUI weight key: shape} of the full-size model `arch` ('sdxl' or 'anima')."""
    try:
        return _all()[arch]
    except KeyError:
        raise KeyError(f"no manifest for {arch!r}; known: {sorted(_all())}") from None


def known_architectures() -> list[str]:
    return sorted(_all())
