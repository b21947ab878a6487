"""Resolve adapter module names against a model's real state-dict keys.

ComfyUI keys look like `diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight`,
`clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight`,
`qwen3_06b.transformer.model.layers.0.mlp.down_proj.weight`. For each weight key we generate every
spelling an adapter may use for it and index them; a module name then resolves by lookup, never by
guessing where the underscores were dots.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from .diffusers_unet import ldm_to_diffusers
from .naming import underscored

# Where each text encoder's layer path starts inside ComfyUI's key, and how sd-scripts prefixes it.
TE_INNER_PREFIX = {
    "clip_l": "transformer.",
    "clip_g": "transformer.",
    "clip_h": "transformer.",
    "qwen3_06b": "transformer.model.",
    "t5xxl": "transformer.",
}

ARCHITECTURES = ("sdxl", "anima", "cosmos_predict2", "sd_unet", "unknown")


def detect_architecture(keys: Iterable[str]) -> str:
    """'sdxl', 'anima' (DiT + llm_adapter or Qwen3 TE), 'cosmos_predict2' (the bare DiT),
    'sd_unet' (another UNet) or 'unknown', from ComfyUI-style model keys."""
    ks = set(keys)
    heads = {k.split(".", 1)[0] for k in ks}
    unet = any(k.startswith("diffusion_model.input_blocks.") for k in ks)
    dit = any(k.startswith("diffusion_model.blocks.") and ".self_attn.q_proj." in k for k in ks)
    if "qwen3_06b" in heads or any(k.startswith("diffusion_model.llm_adapter.") for k in ks):
        return "anima"
    if dit:
        return "cosmos_predict2"
    if "clip_g" in heads or "diffusion_model.label_emb.0.0.weight" in ks:
        return "sdxl"
    if unet:
        return "sd_unet"
    return "unknown"


DIFFUSION_COMPONENT = {"sdxl": "unet", "sd_unet": "unet", "anima": "dit", "cosmos_predict2": "dit"}
"""The report's name of each architecture's diffusion model (its keys under `diffusion_model.`)."""
TE_COMPONENT = {"qwen3_06b": "qwen3"}
"""Text encoders reported under another name than their ComfyUI key head (others keep theirs:
`clip_l`, `clip_g`, …)."""


def component_of(model_key: str, architecture: str | None = None) -> str:
    """The part of the model a ComfyUI key belongs to, as the load report counts them:
    'unet' (SDXL UNet), 'dit' (Anima / Cosmos DiT: its blocks and every other DiT layer,
    x_embedder, t_embedder, t_embedding_norm, final_layer, …), 'llm_adapter' (Anima), 'qwen3'
    (Anima's text encoder), 'clip_l', 'clip_g' (SDXL), else the text encoder's ComfyUI name.

    `architecture` is the model's (`detect_architecture` of its keys): only it tells a DiT's
    non-block layers from a UNet's. Without it (or 'unknown') keys under `blocks.` count as DiT,
    the rest of the diffusion model as UNet."""
    if model_key.startswith("diffusion_model."):
        path = model_key[len("diffusion_model."):]
        if path.startswith("llm_adapter."):
            return "llm_adapter"
        known = DIFFUSION_COMPONENT.get(architecture or "unknown")
        if known is not None:
            return known
        return "dit" if path.startswith("blocks.") else "unet"
    head = model_key.split(".", 1)[0]
    return TE_COMPONENT.get(head, head)


PROMPT_SIDE_COMPONENTS = frozenset({"llm_adapter"})
"""Diffusion-model components that run once per sampling on the prompt, before the first step,
not at every model call: Anima's LLM adapter (it maps the Qwen3 text encoder's output to the DiT's
conditioning; ComfyUI runs it while preparing the conditionings)."""


def runs_on_prompt(model_key: str) -> bool:
    """True when `model_key` belongs to a diffusion-model component that runs on the prompt
    (`PROMPT_SIDE_COMPONENTS`), so a per-step strength cannot reach the output through it."""
    return component_of(model_key) in PROMPT_SIDE_COMPONENTS


_BLOCK_RE = re.compile(r"^diffusion_model\.(input_blocks\.\d+|output_blocks\.\d+|middle_block"
                       r"|blocks\.\d+|llm_adapter)")


def block_of(model_key: str) -> str:
    """The block a key belongs to, for per-block strengths and reports:
    'input_blocks.4', 'middle_block', 'output_blocks.0', 'blocks.12', 'llm_adapter', 'clip_l',
    or 'other' for the diffusion model's remaining layers (embedders, final layer)."""
    m = _BLOCK_RE.match(model_key)
    if m:
        return m.group(1)
    if model_key.startswith("diffusion_model."):
        return "other"
    return model_key.split(".", 1)[0]


@dataclass
class Resolution:
    """Which adapter module patches which model key."""

    matched: dict[str, str] = field(default_factory=dict)      # module name → model key
    unmatched: list[str] = field(default_factory=list)
    ambiguous: dict[str, list[str]] = field(default_factory=dict)
    architecture: str = "unknown"                               # of the model resolved against

    def by_component(self) -> dict[str, int]:
        """Matched modules per model part (`component_of` with the model's architecture)."""
        out: dict[str, int] = defaultdict(int)
        for key in self.matched.values():
            out[component_of(key, self.architecture)] += 1
        return dict(out)


class KeyMap:
    """Index of every spelling of every weight key of one model."""

    def __init__(self, model_keys: Iterable[str]):
        self.keys = [k for k in model_keys]
        self.architecture = detect_architecture(self.keys)
        heads = {k.split(".", 1)[0] for k in self.keys if not k.startswith("diffusion_model.")}
        te_names = [h for h in heads if h in TE_INNER_PREFIX]
        index: dict[str, set[str]] = defaultdict(set)
        for key in self.keys:
            if not key.endswith(".weight"):
                continue
            for alias in self._aliases(key, te_names):
                index[alias].add(key)
        if self.architecture in ("sdxl", "sd_unet"):
            unet = {k[len("diffusion_model."):-len(".weight")]: k for k in self.keys
                    if k.startswith("diffusion_model.") and k.endswith(".weight")}
            for path, diff in ldm_to_diffusers(unet).items():
                # diffusers-trained adapters: kohya-style, LyCORIS/SimpleTuner and PEFT spellings
                for alias in ("lora_unet_" + underscored(diff), "lycoris_" + underscored(diff),
                              "unet." + diff, diff):
                    index[alias].add(unet[path])
        self._index = dict(index)

    @staticmethod
    def _aliases(key: str, te_names: list[str]) -> list[str]:
        base = key[: -len(".weight")]
        if base.startswith("diffusion_model."):
            path = base[len("diffusion_model."):]
            return [base, "lora_unet_" + underscored(path), "lycoris_" + underscored(path)]
        te, _, rest = base.partition(".")
        out = ["text_encoders." + base]
        inner = TE_INNER_PREFIX.get(te)
        if inner is None or not rest.startswith(inner):
            return out
        path = underscored(rest[len(inner):])
        if te == "clip_l":
            out.append("lora_te1_" + path)
            if "clip_g" not in te_names:
                out.append("lora_te_" + path)
        elif te == "clip_g":
            out.append(("lora_te2_" if "clip_l" in te_names else "lora_te_") + path)
        elif len(te_names) == 1:
            # A single text encoder (Anima's Qwen3): sd-scripts writes lora_te_, while
            # lycoris.kohya writes lora_te1_ for it (SPEC §5, item 10). Both are accepted.
            out += ["lora_te_" + path, "lora_te1_" + path]
        return out

    def resolve(self, module_name: str) -> str | None:
        """The model weight key a module patches, or None (unknown or ambiguous)."""
        hits = self._index.get(module_name)
        if hits and len(hits) == 1:
            return next(iter(hits))
        return None

    def candidates(self, module_name: str) -> list[str]:
        return sorted(self._index.get(module_name, ()))

    def resolve_all(self, module_names: Iterable[str]) -> Resolution:
        res = Resolution(architecture=self.architecture)
        for name in module_names:
            hits = self._index.get(name)
            if not hits:
                res.unmatched.append(name)
            elif len(hits) > 1:
                res.ambiguous[name] = sorted(hits)
                res.unmatched.append(name)
            else:
                res.matched[name] = next(iter(hits))
        return res
