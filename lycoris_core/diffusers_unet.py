"""Diffusers names of a UNet's layers (SDXL, SD1.x), derived from its original (ldm) keys.

Adapters trained with diffusers-based tools name SDXL layers `down_blocks.1.attentions.0.…`
where ComfyUI and sd-scripts say `input_blocks.4.1.…`. The correspondence is structural, so it is
derived from the model's own key set (which blocks exist, where the down/upsamplers sit) rather
than from a fixed configuration.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
BASIC = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
         "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
         "label_emb.0.2": "add_embedding.linear_2", "out.0": "conv_norm_out", "out.2": "conv_out"}
_BLOCK = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.*))?$")
_MIDDLE = re.compile(r"^middle_block\.(\d+)\.(.*)$")


def _resnet(rest: str) -> str | None:
    for ldm, diff in RESNET.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diff + rest[len(ldm):]
    return None


def ldm_to_diffusers(paths: Iterable[str]) -> dict[str, str]:
    """{ldm layer path: diffusers layer path} for the UNet layer paths given (no
    `diffusion_model.` prefix, no `.weight`). Paths with no diffusers counterpart are left out."""
    paths = list(paths)
    inputs, outputs = set(), set()
    down_at, up_at = set(), {}
    for p in paths:
        m = _BLOCK.match(p)
        if not m:
            continue
        kind, n = m.group(1), int(m.group(2))
        (inputs if kind == "input_blocks" else outputs).add(n)
        if kind == "input_blocks" and m.group(3) == "0" and (m.group(4) or "").startswith("op"):
            down_at.add(n)
        if kind == "output_blocks" and m.group(3) in ("1", "2") and (m.group(4) or "").startswith("conv"):
            up_at[n] = m.group(3)
    # where each block sits in diffusers' (level, index) layout
    place: dict[tuple[str, int], tuple[int, int]] = {}
    level = idx = 0
    for n in sorted(inputs - {0}):
        place[("input_blocks", n)] = (level, idx)
        if n in down_at:
            level, idx = level + 1, 0
        else:
            idx += 1
    level = idx = 0
    for n in sorted(outputs):
        place[("output_blocks", n)] = (level, idx)
        if n in up_at:
            level, idx = level + 1, 0
        else:
            idx += 1

    out: dict[str, str] = {}
    for p in paths:
        diff = _one(p, place, down_at, up_at)
        if diff is not None:
            out[p] = diff
    return out


def _one(p: str, place, down_at, up_at) -> str | None:
    for ldm, diff in BASIC.items():
        if p == ldm or p.startswith(ldm + "."):
            return diff + p[len(ldm):]
    m = _MIDDLE.match(p)
    if m:
        sub, rest = int(m.group(1)), m.group(2)
        if sub == 1:
            return f"mid_block.attentions.0.{rest}"
        r = _resnet(rest)
        return f"mid_block.resnets.{sub // 2}.{r}" if r else None
    m = _BLOCK.match(p)
    if not m or m.group(4) is None:
        return None
    kind, n, sub, rest = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    if (kind, n) not in place:
        return None
    level, idx = place[(kind, n)]
    side = "down_blocks" if kind == "input_blocks" else "up_blocks"
    if kind == "input_blocks" and n in down_at:
        return f"down_blocks.{level}.downsamplers.0.{rest.replace('op', 'conv', 1)}" if rest.startswith("op") else None
    if kind == "output_blocks" and up_at.get(n) == sub:
        return f"up_blocks.{level}.upsamplers.0.{rest}"
    if sub == "0":
        r = _resnet(rest)
        return f"{side}.{level}.resnets.{idx}.{r}" if r else None
    if sub == "1":
        return f"{side}.{level}.attentions.{idx}.{rest}"
    return None
