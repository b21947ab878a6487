"""Per-block strength: named presets and the compact preset string (pure, no ComfyUI).

A preset string is a comma- (or semicolon-/newline-) separated list of items:

- a named preset (`ALL`, `UNET_ONLY`, …; see `PRESETS`), expanded in place;
- `NAME=VALUE` rules; names (case-insensitive) are
  `IN0`…`IN8` / `IN4-8` (SDXL `input_blocks`), `MID` (`middle_block`), `OUT0`…`OUT8` / `OUT3-5`
  (`output_blocks`), `B0`…`B27` / `B0-13` (Anima / Cosmos DiT `blocks`), `LLM` (`llm_adapter`),
  `OTHER` (the diffusion model's remaining layers: embedders, final layer), `TE1` / `CLIP_L`,
  `TE2` / `CLIP_G`, `QWEN3` / `QWEN3_06B`, the groups `UNET` / `DIT` / `MODEL` (whole diffusion
  model) and `TE` (every text encoder), and `*` / `ALL` (everything);
- or only numbers, positionally, in the LoRA-block-weight order users know:
  SDXL 20 values `TE, IN0…IN8, MID, OUT0…OUT8`; the 12-value SDXL LoRA-block-weight form
  `BASE, IN4, IN5, IN7, IN8, MID, OUT0…OUT5` (BASE = text encoders; other blocks keep 1);
  Anima 30 values `TE, B0…B27, LLM`.

The most specific rule wins (block > text encoder > group > `*`), later items override earlier
ones; anything not named keeps multiplier 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import AdapterError
from .keymap import block_of
from .limits import bounded_text, excerpt, number_in_range, split_items

PRESETS: dict[str, str] = {
    "ALL": "",
    "NONE": "*=0",
    "UNET_ONLY": "TE=0",
    "DIT_ONLY": "TE=0",
    "MODEL_ONLY": "TE=0",
    "TE_ONLY": "MODEL=0",
    "INPUT_ONLY": "MODEL=0, IN0-8=1",
    "MIDDLE_ONLY": "MODEL=0, MID=1",
    "OUTPUT_ONLY": "MODEL=0, OUT0-8=1",
    "NO_INPUT": "IN0-8=0",
    "NO_OUTPUT": "OUT0-8=0",
    "EARLY_BLOCKS": "MODEL=0, B0-13=1",
    "LATE_BLOCKS": "MODEL=0, B14-27=1",
    "NO_LLM_ADAPTER": "LLM=0",
    "LLM_ADAPTER_ONLY": "MODEL=0, LLM=1",
}
"""Named presets and the rules they stand for."""

PRESET_HELP = {
    "ALL": "every block at 1 (the default)",
    "NONE": "everything 0 (the file is not applied)",
    "UNET_ONLY": "text encoders off (aliases DIT_ONLY, MODEL_ONLY)",
    "TE_ONLY": "diffusion model off, text encoders only",
    "INPUT_ONLY": "SDXL input_blocks only",
    "MIDDLE_ONLY": "SDXL middle_block only",
    "OUTPUT_ONLY": "SDXL output_blocks only",
    "NO_INPUT": "SDXL input_blocks off",
    "NO_OUTPUT": "SDXL output_blocks off",
    "EARLY_BLOCKS": "DiT blocks 0-13 only",
    "LATE_BLOCKS": "DiT blocks 14-27 only",
    "NO_LLM_ADAPTER": "Anima llm_adapter off",
    "LLM_ADAPTER_ONLY": "Anima llm_adapter only",
}

TEXT_ENCODERS = ("clip_l", "clip_g", "clip_h", "qwen3_06b", "t5xxl")
SDXL_ORDER = ["TE", *(f"IN{i}" for i in range(9)), "MID", *(f"OUT{i}" for i in range(9))]
SDXL_LBW12_ORDER = ["TE", "IN4", "IN5", "IN7", "IN8", "MID", *(f"OUT{i}" for i in range(6))]
ANIMA_ORDER = ["TE", *(f"B{i}" for i in range(28)), "LLM"]
POSITIONAL = {len(SDXL_ORDER): SDXL_ORDER, len(SDXL_LBW12_ORDER): SDXL_LBW12_ORDER,
              len(ANIMA_ORDER): ANIMA_ORDER}

# Rule targets: block names as `block_of` returns them, or one of these groups.
GROUP_MODEL, GROUP_TE, GROUP_ALL = "@model", "@te", "@all"

_ALIASES = {
    "MID": ["middle_block"], "M": ["middle_block"], "M00": ["middle_block"],
    "MIDDLE": ["middle_block"], "MIDDLE_BLOCK": ["middle_block"],
    "LLM": ["llm_adapter"], "LLM_ADAPTER": ["llm_adapter"],
    "OTHER": ["other"],
    "TE1": ["clip_l"], "CLIP_L": ["clip_l"], "TE2": ["clip_g"], "CLIP_G": ["clip_g"],
    "QWEN3": ["qwen3_06b"], "QWEN3_06B": ["qwen3_06b"],
    "UNET": [GROUP_MODEL], "DIT": [GROUP_MODEL], "MODEL": [GROUP_MODEL],
    "TE": [GROUP_TE], "*": [GROUP_ALL], "ALL": [GROUP_ALL], "DEFAULT": [GROUP_ALL],
}
_RANGE = re.compile(r"^(IN|INPUT_BLOCKS\.|OUT|OUTPUT_BLOCKS\.|B|BLOCK|BLOCKS\.)(\d+)(?:-(\d+))?$")
_RANGE_TARGET = {"IN": "input_blocks", "INPUT_BLOCKS.": "input_blocks", "OUT": "output_blocks",
                 "OUTPUT_BLOCKS.": "output_blocks", "B": "blocks", "BLOCK": "blocks",
                 "BLOCKS.": "blocks"}
_RANGE_LIMIT = {"input_blocks": 8, "output_blocks": 8, "blocks": 63}  # SDXL; DiT sizes vary


def _targets(name: str, text: str) -> list[str]:
    up = name.strip().upper()
    if up in _ALIASES:
        return list(_ALIASES[up])
    m = _RANGE.match(up)
    if m:
        kind = _RANGE_TARGET[m.group(1)]
        lo = int(m.group(2))
        hi = int(m.group(3)) if m.group(3) is not None else lo
        if hi < lo or hi > _RANGE_LIMIT[kind]:
            raise AdapterError(f"block range '{name[:80]}' is not valid (0–{_RANGE_LIMIT[kind]}) in "
                               f"block weights {excerpt(text)}")
        return [f"{kind}.{i}" for i in range(lo, hi + 1)]
    raise AdapterError(f"unknown block name '{name[:80]}' in block weights {excerpt(text)}; use IN0-8, MID, "
                       f"OUT0-8, B0-27, LLM, OTHER, TE, TE1, TE2, QWEN3, UNET/DIT, * or a preset "
                       f"({', '.join(PRESETS)})")


def _number(s: str, text: str) -> float:
    return number_in_range(s, lambda: f"in block weights {excerpt(text)}")


def _items(text: str) -> list[str]:
    return split_items(text, "the block weights")


@dataclass
class BlockWeights:
    """Parsed per-block multipliers: `rules` maps a block (or group) to its multiplier."""

    text: str = ""
    rules: dict[str, float] = field(default_factory=dict)
    named: list[tuple[str, list[str]]] = field(default_factory=list)
    """Block rules the user wrote by name (item, its blocks): reports warn when one hits nothing."""

    @property
    def is_default(self) -> bool:
        return all(v == 1.0 for v in self.rules.values())

    def rule_for(self, model_key: str) -> str | None:
        """The rule target deciding `model_key`'s multiplier, or None (no rule: 1.0)."""
        block = block_of(model_key)
        if block in self.rules:
            return block
        group = GROUP_MODEL if model_key.startswith("diffusion_model.") else GROUP_TE
        if group in self.rules:
            return group
        return GROUP_ALL if GROUP_ALL in self.rules else None

    def multiplier(self, model_key: str) -> float:
        """Multiplier (on top of strength_model / strength_clip) for a ComfyUI weight key."""
        rule = self.rule_for(model_key)
        return 1.0 if rule is None else self.rules[rule]


def parse_block_weights(text: str | None) -> BlockWeights:
    """Parse a preset string (see the module docstring) into `BlockWeights`.

    Linear time; at most `limits.MAX_TEXT_CHARS` characters and `limits.MAX_ITEMS` items; values
    finite and within ±`limits.STRENGTH_LIMIT`. Raises `AdapterError` (a ValueError) naming the
    offending item.
    """
    text = bounded_text(text, "the block weights")
    out = BlockWeights(text)
    items = _items(text)
    positional = bool(items) and all(re.fullmatch(r"[-+]?[\d.eE+-]+", t) for t in items)
    if positional:
        order = POSITIONAL.get(len(items))
        if order is None:
            raise AdapterError(
                f"{len(items)} positional block weights; expected {len(SDXL_ORDER)} (SDXL: TE, "
                f"IN0-8, MID, OUT0-8), {len(SDXL_LBW12_ORDER)} (SDXL LoRA-block-weight: BASE, IN4, "
                f"IN5, IN7, IN8, MID, OUT0-5) or {len(ANIMA_ORDER)} (Anima: TE, B0-27, LLM)")
        items = [f"{n}={v}" for n, v in zip(order, items, strict=True)]
    for item in items:
        _apply(out, item, text, depth=1 if positional else 0)
    return out


def _apply(out: BlockWeights, item: str, text: str, depth: int) -> None:
    if "=" not in item:
        preset = PRESETS.get(item.strip().upper())
        if preset is None:
            raise AdapterError(f"'{item[:80]}' is neither a preset ({', '.join(PRESETS)}) nor NAME=VALUE "
                               f"in block weights {excerpt(text)}")
        for sub in _items(preset):
            _apply(out, sub, text, depth + 1)
        return
    name, _, value = item.partition("=")
    v = _number(value.strip(), text)
    targets = _targets(name, text)
    for target in targets:
        out.rules[target] = v
    blocks = [t for t in targets if not t.startswith("@")]
    if depth == 0 and blocks:
        out.named.append((item.strip(), blocks))


def preset_names() -> list[str]:
    return list(PRESETS)


# --- the per-block names of a weight key (effect map, reports): the names the parser above reads
_BLOCK_LABEL = {}
for _name, _blocks in _ALIASES.items():  # the first alias of a single block is its name
    if len(_blocks) == 1 and not _blocks[0].startswith("@"):
        _BLOCK_LABEL.setdefault(_blocks[0], _name)
_RANGE_LABEL = {}
for _prefix, _kind in _RANGE_TARGET.items():
    _RANGE_LABEL.setdefault(_kind, _prefix)


def block_label(model_key: str) -> str:
    """The per-block strength name of a ComfyUI weight key, as `block_weights` spells it:
    `IN0`…`IN8`, `MID`, `OUT0`…`OUT8`, `B0`…, `LLM`, `TE1`, `TE2`, `QWEN3`, else `OTHER`.
    Reading the name back (`NAME=…` in a block-weights string) targets exactly this key's block."""
    block = block_of(model_key)
    kind, _, index = block.rpartition(".")
    name = f"{_RANGE_LABEL[kind]}{index}" if kind in _RANGE_LABEL else _BLOCK_LABEL.get(block, "OTHER")
    try:
        return name if _targets(name, name) == [block] else "OTHER"
    except AdapterError:  # a block number beyond the names' range
        return "OTHER"


def block_labels(architecture: str) -> list[str]:
    """Every block name of an architecture, in the order of its positional block weights, then
    its text encoders and `OTHER` ('sdxl', 'anima' / 'cosmos_predict2'; else [])."""
    if architecture in ("sdxl", "sd_unet"):
        return [*SDXL_ORDER[1:], "TE1", "TE2", "OTHER"]
    if architecture in ("anima", "cosmos_predict2"):
        return [*ANIMA_ORDER[1:], "QWEN3", "OTHER"]
    return []
