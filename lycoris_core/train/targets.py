"""Which layers a LoHa/LoKr network trains: sd-scripts' default selection, from ComfyUI keys.

sd-scripts walks the model for container classes and adapts every Linear / Conv2d inside them:
- SDXL UNet: `Transformer2DModel` (ComfyUI: `…blocks.N.M.{proj_in,proj_out,transformer_blocks}`);
  with `conv_dim` also `ResnetBlock2D` (`in_layers.2`, `out_layers.3`, `emb_layers.1`,
  `skip_connection`), `Downsample2D` (`op`) and `Upsample2D` (`conv`).
- SDXL CLIP-L / CLIP-G: `CLIPAttention`, `CLIPMLP` (`text_model.encoder.layers.N.{self_attn,mlp}`).
- Anima / Cosmos DiT: `Block` (`blocks.N`), `PatchEmbed` (`x_embedder`), `TimestepEmbedding`
  (`t_embedder`), `FinalLayer`; `train_llm_adapter` adds `llm_adapter.blocks.N`. The default
  exclude `.*(_modulation|_norm|_embedder|final_layer).*` is always appended.
- Qwen3 text encoder: `Qwen3Attention`, `Qwen3MLP` (`layers.N.{self_attn,mlp}`).
Patterns full-match the sd-scripts module path (`original_name`); include only rescues excluded
modules. Linear and 1×1 convs get network_dim; k×k convs need conv_dim; network_reg_dims
(first full match) beats both.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..convert import sdscripts_name
from ..keymap import TE_INNER_PREFIX, detect_architecture
from ..limits import bounded_text, check_count, excerpt, number_in_range
from ..patterns import PatternSet

ANIMA_DEFAULT_EXCLUDES = (r".*(_modulation|_norm|_embedder|final_layer).*",)
DIT_ARCHS = ("anima", "cosmos_predict2")

_SDXL_CONTAINER = re.compile(r"^(input_blocks\.\d+\.\d+|middle_block\.\d+|output_blocks\.\d+\.\d+)\.(.+)$")
_TRANSFORMER_CHILD = re.compile(r"^(proj_in|proj_out|transformer_blocks\..+)$")
_RESNET_CHILD = re.compile(r"^(in_layers\.\d+|out_layers\.\d+|emb_layers\.\d+|skip_connection)$")
_CLIP_CHILD = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn|mlp)\..+$")
_QWEN_CHILD = re.compile(r"^layers\.\d+\.(self_attn|mlp)\..+$")
_DIT_CHILD = re.compile(r"^(blocks\.\d+|x_embedder|t_embedder|final_layer)\..+$")
_LLM_ADAPTER_CHILD = re.compile(r"^llm_adapter\.blocks\.\d+\..+$")


def kind_from_shape(shape: tuple[int, ...]) -> str | None:
    """'linear' (2-D), 'conv1x1', 'conv3x3' (any k×k), None for anything else (norms, biases)."""
    if len(shape) == 2:
        return "linear"
    if len(shape) == 4:
        return "conv1x1" if tuple(shape[2:]) == (1, 1) else "conv3x3"
    return None


@dataclass(frozen=True)
class Target:
    """One adapted layer: sd-scripts name and path, the ComfyUI weight key, rank and alpha."""

    lora_name: str
    path: str           # sd-scripts `original_name` (what patterns match)
    model_key: str      # ComfyUI state-dict key of the weight
    kind: str           # linear | conv1x1 | conv3x3
    shape: tuple[int, ...]
    dim: int
    alpha: float
    lr: float | None = None  # from network_reg_lrs (None: the default learning rate)

    @property
    def is_text_encoder(self) -> bool:
        return not self.lora_name.startswith("lora_unet_")


@dataclass
class TargetOptions:
    """The network_args that decide targets, ranks and per-module learning rates (sd-scripts
    defaults: dim 4, alpha 1, conv layers only with conv_dim, conv_alpha 1.0)."""

    network_dim: int = 4
    network_alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    exclude_patterns: list[str] = field(default_factory=list)
    include_patterns: list[str] = field(default_factory=list)
    reg_dims: dict[str, int] = field(default_factory=dict)
    reg_lrs: dict[str, float] = field(default_factory=dict)
    train_llm_adapter: bool = False

    def __post_init__(self) -> None:
        if self.conv_dim is not None and self.conv_alpha is None:
            self.conv_alpha = 1.0
        self.pattern_sets()  # every pattern compiles (and is accepted by the engine) up front

    def pattern_sets(self) -> dict[str, PatternSet]:
        """Fresh matchers (each with its own time budget) for the four user pattern inputs."""
        return {"exclude_patterns": PatternSet(self.exclude_patterns, "exclude_patterns"),
                "include_patterns": PatternSet(self.include_patterns, "include_patterns"),
                "network_reg_dims": PatternSet(self.reg_dims, "network_reg_dims"),
                "network_reg_lrs": PatternSet(self.reg_lrs, "network_reg_lrs")}


def parse_pattern_list(text: str | None, what: str = "patterns") -> list[str]:
    """sd-scripts' `exclude_patterns` / `include_patterns`: a Python list literal of regexes
    (a bare string is one pattern). Parsed with `ast.literal_eval`, never evaluated; at most
    `limits.MAX_TEXT_CHARS` characters and `limits.MAX_ITEMS` patterns."""
    text = bounded_text(text, what)
    if not text:
        return []
    if not text.startswith("["):
        return [text]
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, RecursionError, MemoryError) as exc:
        raise ValueError(f"{what} must be a list of strings like ['a.*', 'b'], got {excerpt(text)}: "
                         f"{str(exc)[:200]}") from None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings, got {excerpt(text)}")
    check_count(len(value), what)
    return value


REG_LIMITS = {int: (0, 4096), float: (0.0, 10.0)}
"""Accepted values of network_reg_dims (ranks, as network_dim) and network_reg_lrs (as learning_rate)."""


def parse_kv(text: str | None, cast: type, what: str = "") -> dict[str, float | int]:
    """`network_reg_dims` / `network_reg_lrs`: 'regex=value,regex=value' (first match wins).

    Values are finite and within `REG_LIMITS[cast]`; at most `limits.MAX_TEXT_CHARS` characters
    and `limits.MAX_ITEMS` pairs."""
    what = what or ("network_reg_dims" if cast is int else "network_reg_lrs")
    text = bounded_text(text, what)
    pairs = [p for p in (s.strip() for s in text.split(",")) if p]
    check_count(len(pairs), what)
    lo, hi = REG_LIMITS.get(cast, (float("-inf"), float("inf")))
    out: dict[str, float | int] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"{what}: expected 'regex=value', got {excerpt(pair)}")
        key, value = (s.strip() for s in pair.rsplit("=", 1))
        where = lambda k=key: f"for {excerpt(k)} in {what}"  # noqa: E731  (built only on error)
        if cast is int:
            if not value.isdigit() or len(value) > 9:
                raise ValueError(f"{what}: bad value {excerpt(value)} for {excerpt(key)} (expected "
                                 f"a whole number in [{lo}, {hi}])")
            out[key] = int(value)
            if not lo <= out[key] <= hi:
                raise ValueError(f"{what}: {value} for {excerpt(key)} is outside [{lo}, {hi}]")
        else:
            out[key] = cast(number_in_range(value, where, lo, hi))
    return out


def _component(key: str) -> tuple[str, str] | None:
    """(sd-scripts path, family 'unet' | 'clip' | 'qwen') of a ComfyUI weight key, or None."""
    if not key.endswith(".weight"):
        return None
    base = key[: -len(".weight")]
    if base.startswith("diffusion_model."):
        return base[len("diffusion_model."):], "unet"
    head, _, rest = base.partition(".")
    inner = TE_INNER_PREFIX.get(head)
    if inner is None or not rest.startswith(inner):
        return None
    family = "qwen" if head == "qwen3_06b" else "clip" if head.startswith("clip_") else None
    return (rest[len(inner):], family) if family else None


def _candidate(family: str, path: str, kind: str, arch: str, opts: TargetOptions) -> bool:
    """Is `path` inside one of sd-scripts' target containers for this architecture?"""
    if family == "clip":
        return _CLIP_CHILD.match(path) is not None
    if family == "qwen":
        return _QWEN_CHILD.match(path) is not None
    if arch in DIT_ARCHS:
        if _DIT_CHILD.match(path):
            return True
        return opts.train_llm_adapter and _LLM_ADAPTER_CHILD.match(path) is not None
    m = _SDXL_CONTAINER.match(path)
    if m is None:
        return False
    child = m.group(2)
    if _TRANSFORMER_CHILD.match(child):
        return True
    if opts.conv_dim is None:
        return False
    return bool(_RESNET_CHILD.match(child)) or child in ("op", "conv")


def _first_match(table: Mapping[str, float | int], patterns: PatternSet, path: str):
    i = patterns.first(path)
    return None if i is None else table[patterns.patterns[i]]


def select_targets(layers: Mapping[str, tuple[tuple[int, ...], str]], opts: TargetOptions,
                   arch: str | None = None) -> list[Target]:
    """sd-scripts' module list for a model given as {ComfyUI weight key: (shape, kind)}.

    `kind` is 'linear', 'conv1x1' or 'conv3x3' (see `kind_from_shape`); other layers (embeddings,
    norms) must be left out by the caller. Text encoders first, then the diffusion model, each in
    key order.
    """
    arch = arch or detect_architecture(layers.keys())
    te_names = {k.split(".", 1)[0] for k in layers} & set(TE_INNER_PREFIX)
    builtin_ex = [re.compile(p) for p in ANIMA_DEFAULT_EXCLUDES] if arch in DIT_ARCHS else []
    sets = opts.pattern_sets()  # user patterns: bounded matching time (lycoris_core.patterns)
    ex, inc = sets["exclude_patterns"], sets["include_patterns"]
    te: list[Target] = []
    unet: list[Target] = []
    for key, (shape, kind) in layers.items():
        comp = _component(key)
        if comp is None or kind not in ("linear", "conv1x1", "conv3x3"):
            continue
        path, family = comp
        if not _candidate(family, path, kind, arch, opts):
            continue
        excluded = ex.any(path) or any(p.fullmatch(path) for p in builtin_ex)
        if excluded and not inc.any(path):
            continue
        dim = _first_match(opts.reg_dims, sets["network_reg_dims"], path)
        alpha = opts.network_alpha
        if dim is None:
            if kind in ("linear", "conv1x1"):
                dim = opts.network_dim
            elif opts.conv_dim is not None:
                dim, alpha = opts.conv_dim, opts.conv_alpha
        if not dim:
            continue
        lr = _first_match(opts.reg_lrs, sets["network_reg_lrs"], path)
        name = sdscripts_name(key, te_names)
        if name is None:
            continue
        t = Target(name, path, key, kind, tuple(shape), int(dim),
                   float(alpha), None if lr is None else float(lr))
        (unet if family == "unet" else te).append(t)
    return te + unet


def targets_from_shapes(shapes: Mapping[str, tuple[int, ...]], opts: TargetOptions,
                        arch: str | None = None) -> list[Target]:
    """`select_targets` with each layer's kind read from its weight shape (manifests)."""
    layers = {k: (tuple(s), kind_from_shape(tuple(s))) for k, s in shapes.items()}
    return select_targets({k: v for k, v in layers.items() if v[1] is not None}, opts, arch)
