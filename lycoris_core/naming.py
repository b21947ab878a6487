"""Spellings of adapter tensor keys: `<module name>.<suffix>`.

Module names come in three families (SPEC §1): sd-scripts (`lora_unet_…`, `lora_te1_…`),
LyCORIS (`lycoris_…`) and ComfyUI state-dict form (`diffusion_model.<dotted path>`,
`text_encoders.<te>.<dotted path>`). Underscore names cannot be turned back into dotted paths by
string rules (`self_attn`, `to_out`): `keymap.KeyMap` resolves them against a model's real keys.
"""

from __future__ import annotations

from typing import NamedTuple


class Suffix(NamedTuple):
    algo: str | None  # None: shared by every algorithm (alpha, dora_scale)
    field: str


SUFFIXES: dict[str, Suffix] = {
    "lora_up.weight": Suffix("lora", "lora_up"),
    "lora_down.weight": Suffix("lora", "lora_down"),
    "lora_mid.weight": Suffix("lora", "lora_mid"),
    "lora_B.weight": Suffix("lora", "lora_up"),  # PEFT / diffusers spelling
    "lora_A.weight": Suffix("lora", "lora_down"),
    "lora.up.weight": Suffix("lora", "lora_up"),  # old diffusers spelling
    "lora.down.weight": Suffix("lora", "lora_down"),
    **{f"hada_{n}": Suffix("loha", f"hada_{n}")
       for n in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
    **{f"lokr_{n}": Suffix("lokr", f"lokr_{n}")
       for n in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t1", "t2")},
    "alpha": Suffix(None, "alpha"),
    "dora_scale": Suffix(None, "dora_scale"),
}
FIELD_ALGO: dict[str, str | None] = {s.field: s.algo for s in SUFFIXES.values()}
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)

CANONICAL_SUFFIX: dict[str, str] = {
    "lora_up": "lora_up.weight", "lora_down": "lora_down.weight", "lora_mid": "lora_mid.weight",
    **{s.field: k for k, s in SUFFIXES.items() if s.algo in ("loha", "lokr", None)},
}
"""The suffix this pack writes for each field (sd-scripts spelling)."""


def split_key(key: str) -> tuple[str, str] | None:
    """`'lora_unet_x.hada_w1_a'` → `('lora_unet_x', 'hada_w1_a')`; None for an unknown suffix."""
    for suffix in _BY_LENGTH:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], suffix
    return None


UNET_PREFIXES = ("lora_unet_", "lycoris_")
TE_PREFIXES = ("lora_te1_", "lora_te2_", "lora_te_")
COMFY_PREFIXES = ("diffusion_model.", "text_encoders.")
TEXT_ENCODER_NAME_PREFIXES = ("lora_te", "text_encoders.", "lycoris_te")


def is_text_encoder_name(module_name: str) -> bool:
    """Whether a module name, in any spelling, belongs to a text encoder (no model needed)."""
    return module_name.startswith(TEXT_ENCODER_NAME_PREFIXES)


def naming_style(module_name: str) -> str:
    """'sd-scripts', 'lycoris', 'comfyui' or 'other'."""
    if module_name.startswith(("lora_unet_",) + TE_PREFIXES):
        return "sd-scripts"
    if module_name.startswith("lycoris_"):
        return "lycoris"
    if module_name.startswith(COMFY_PREFIXES):
        return "comfyui"
    return "other"


def underscored(path: str) -> str:
    return path.replace(".", "_")
