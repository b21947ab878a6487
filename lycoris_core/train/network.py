"""A LoHa/LoKr network: modules for the selected layers, hooked onto a live torch model.

The layers themselves are never modified: a forward hook adds ΔW·x to each layer's output (what
sd-scripts' replaced forward does), and `detach()` removes every hook. Saving writes sd-scripts
names (`lora_unet_…`, `lora_te1_…`), the scalar folded in, and `ss_*` metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .modules import ConvArgs, LayerSpec, TrainModule, make_module
from .targets import Target, TargetOptions, select_targets

SS_MODULES = {"loha": "networks.loha", "lokr": "networks.lokr"}
BASE_MODEL_VERSION = {"sdxl": "sdxl_base_v1-0", "anima": "anima", "cosmos_predict2": "anima"}
MODELSPEC_ARCH = {"sdxl": "stable-diffusion-xl-v1-base/lora", "anima": "anima-preview/lora",
                  "cosmos_predict2": "anima-preview/lora"}


@dataclass
class NetworkConfig:
    """Everything sd-scripts reads from `--network_module/--network_dim/--network_alpha/
    --network_args` for LoHa/LoKr (SPEC §4), with sd-scripts' defaults."""

    algo: str = "loha"
    targets: TargetOptions = field(default_factory=TargetOptions)
    use_tucker: bool = False
    use_scalar: bool = False
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    factor: int = -1
    decompose_both: bool = False
    loraplus_lr_ratio: float | None = None
    lokr_bypass: bool | None = None  # None: per layer, whichever costs fewer flops

    def __post_init__(self) -> None:
        if self.algo not in SS_MODULES:
            raise ValueError(f"algorithm must be 'loha' or 'lokr', got {self.algo!r}")
        for n in ("rank_dropout", "module_dropout"):
            v = getattr(self, n)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{n} must be in [0, 1), got {v}")

    def network_args(self) -> dict[str, str | None]:
        """The `--network_args` key=value strings sd-scripts would be given (non-defaults only;
        `factor` always for LoKr, because sd-scripts does not infer it on load)."""
        t = self.targets
        args: dict[str, str | None] = {}
        if t.conv_dim is not None:
            args["conv_dim"] = str(t.conv_dim)
            args["conv_alpha"] = _num(t.conv_alpha)
        if self.use_tucker:
            args["use_tucker"] = "true"
        if self.use_scalar:
            args["use_scalar"] = "true"
        if self.rank_dropout:
            args["rank_dropout"] = _num(self.rank_dropout)
        if self.module_dropout:
            args["module_dropout"] = _num(self.module_dropout)
        if t.exclude_patterns:
            args["exclude_patterns"] = repr(list(t.exclude_patterns))
        if t.include_patterns:
            args["include_patterns"] = repr(list(t.include_patterns))
        if t.reg_dims:
            args["network_reg_dims"] = ",".join(f"{k}={v}" for k, v in t.reg_dims.items())
        if t.reg_lrs:
            args["network_reg_lrs"] = ",".join(f"{k}={v}" for k, v in t.reg_lrs.items())
        if self.algo == "lokr":
            args["factor"] = str(self.factor)
            if self.decompose_both:
                args["decompose_both"] = "true"
        if t.train_llm_adapter:
            args["train_llm_adapter"] = "true"
        if self.loraplus_lr_ratio:
            args["loraplus_lr_ratio"] = _num(self.loraplus_lr_ratio)
        args["dropout"] = None
        return args


def _num(v: float | None) -> str:
    return str(int(v)) if v is not None and float(v).is_integer() else str(v)


def layers_of(named: Iterable[tuple[str, nn.Module]]) -> dict[str, tuple[tuple[int, ...], str]]:
    """{weight key: (shape, kind)} of the Linear / Conv2d layers of `named` (e.g. named_modules)."""
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, m in named:
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(m, nn.Linear):
            out[f"{name}.weight"] = (tuple(w.shape), "linear")
        elif isinstance(m, nn.Conv2d):
            kind = "conv1x1" if tuple(m.kernel_size) == (1, 1) else "conv3x3"
            out[f"{name}.weight"] = (tuple(w.shape), kind)
    return out


def _conv_args(m: nn.Module) -> ConvArgs | None:
    if not isinstance(m, nn.Conv2d):
        return None
    return ConvArgs(tuple(m.stride), m.padding if isinstance(m.padding, str) else tuple(m.padding),
                    tuple(m.dilation), int(m.groups))


class LycorisNetwork(nn.Module):
    """The trainable modules of one network, keyed by sd-scripts module name."""

    def __init__(self, targets: list[Target], config: NetworkConfig):
        super().__init__()
        if not targets:
            raise ValueError("no layers selected for training: check exclude/include patterns and "
                             "network_reg_dims (a dim of 0 removes a layer)")
        self.config = config
        self.targets = {t.lora_name: t for t in targets}
        mods = {}
        for t in targets:
            spec = LayerSpec("linear" if t.kind == "linear" else "conv", t.shape)
            mods[t.lora_name] = make_module(
                config.algo, t.lora_name, spec, t.dim, t.alpha, use_tucker=config.use_tucker,
                use_scalar=config.use_scalar, rank_dropout=config.rank_dropout,
                module_dropout=config.module_dropout, factor=config.factor,
                decompose_both=config.decompose_both, bypass=config.lokr_bypass)
        self.lora_modules = nn.ModuleDict(mods)
        self._handles: list[Any] = []

    @classmethod
    def for_model(cls, named: Iterable[tuple[str, nn.Module]], config: NetworkConfig,
                  arch: str | None = None) -> LycorisNetwork:
        """Select sd-scripts' targets among `named` layers and build the network for them."""
        return cls(select_targets(layers_of(named), config.targets, arch), config)

    def __iter__(self):
        return iter(self.lora_modules.values())

    # --- hooking onto a model ----------------------------------------------------------------
    def attach(self, named: Iterable[tuple[str, nn.Module]]) -> None:
        """Add each module's ΔW·x to its layer's output with a forward hook (no layer changes)."""
        if self._handles:
            raise RuntimeError("network is already attached")
        by_key = {f"{n}.weight": m for n, m in named}
        missing = [t.model_key for t in self.targets.values() if t.model_key not in by_key]
        if missing:
            raise ValueError(f"{len(missing)} target layers are not in the model, e.g. {missing[:3]}")
        try:
            for name, t in self.targets.items():
                layer = by_key[t.model_key]
                if tuple(layer.weight.shape) != t.shape:
                    raise ValueError(f"{t.model_key}: layer is {list(layer.weight.shape)}, "
                                     f"network expects {list(t.shape)}")
                self._handles.append(layer.register_forward_hook(
                    _make_hook(self.lora_modules[name], _conv_args(layer))))
        except Exception:
            self.detach()
            raise

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # --- optimisation ------------------------------------------------------------------------
    def param_groups(self, lr: float, text_encoder_lr: float | None = None) -> list[dict]:
        """Optimizer groups as sd-scripts builds them: text encoder / UNet, network_reg_lrs groups,
        and LoRA+ groups (`hada_w2_a` / `lokr_w1*` at lr · loraplus_lr_ratio). LR 0 → frozen."""
        ratio = self.config.loraplus_lr_ratio or None
        buckets: dict[tuple[str, float, bool], list[nn.Parameter]] = {}
        for name, mod in self.lora_modules.items():
            t = self.targets[name]
            base = t.lr if t.lr is not None else (
                text_encoder_lr if t.is_text_encoder and text_encoder_lr is not None else lr)
            part = "te" if t.is_text_encoder else "unet"
            for pname, p in mod.named_parameters():
                plus = ratio is not None and ("hada_w2_a" in pname or "lokr_w1" in pname)
                buckets.setdefault((part, base, plus), []).append(p)
        groups = []
        for (part, base, plus), params in buckets.items():
            group_lr = base * ratio if plus else base
            for p in params:
                p.requires_grad_(group_lr != 0)
            if group_lr == 0:
                continue
            groups.append({"params": params, "lr": group_lr,
                           "name": f"{part}{' plus' if plus else ''} lr={base:g}"})
        if not groups:
            raise ValueError("every parameter has learning rate 0: nothing to train")
        return groups

    def named_trainables(self) -> dict[str, nn.Parameter]:
        """Every trainable tensor as '<lora_name>.<param>' (raw, scalar not folded)."""
        return {f"{n}.{p}": t for n, m in self.lora_modules.items() for p, t in m.named_parameters()}

    # --- saving ------------------------------------------------------------------------------
    def saved_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The adapter file's tensors in sd-scripts naming; factors cast to `dtype`, alpha fp32."""
        out: dict[str, torch.Tensor] = {}
        for name, mod in self.lora_modules.items():
            for suffix, t in mod.saved_tensors().items():
                t = t.detach().to("cpu")
                out[f"{name}.{suffix}"] = t.float() if suffix == "alpha" else t.to(dtype).contiguous()
        return out

    @torch.no_grad()
    def load_raw(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore raw parameters saved by `named_trainables` (exact resume)."""
        own = self.named_trainables()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise ValueError(f"training state lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for k, p in own.items():
            src = tensors[k]
            if tuple(src.shape) != tuple(p.shape):
                raise ValueError(f"{k}: saved shape {list(src.shape)}, network has {list(p.shape)}")
            p.copy_(src.to(p.dtype))

    @torch.no_grad()
    def load_saved(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Start from an adapter file's factors (sd-scripts `network_weights`); scalar → 1."""
        for name, mod in self.lora_modules.items():
            for suffix in mod.saved_tensors():
                if suffix == "alpha":
                    continue
                key = f"{name}.{suffix}"
                if key not in tensors:
                    raise ValueError(f"the file has no {key}: it was trained with other options")
                p = getattr(mod, suffix)
                if tuple(tensors[key].shape) != tuple(p.shape):
                    raise ValueError(f"{key}: file has {list(tensors[key].shape)}, network "
                                     f"needs {list(p.shape)}")
                p.copy_(tensors[key].to(p.dtype))
            if mod.use_scalar:
                mod.scalar.fill_(1.0)

    def metadata(self, arch: str, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
        """`ss_*` and `modelspec.*` metadata as sd-scripts' train_network writes them."""
        t = self.config.targets
        md = {
            "ss_network_module": SS_MODULES[self.config.algo],
            "ss_network_dim": str(t.network_dim),
            "ss_network_alpha": str(float(t.network_alpha)),
            "ss_network_args": json.dumps(self.config.network_args()),
            "ss_base_model_version": BASE_MODEL_VERSION.get(arch, arch),
            "ss_v2": "False",
            "modelspec.sai_model_spec": "1.0.1",
            "modelspec.architecture": MODELSPEC_ARCH.get(arch, f"{arch}/lora"),
            "modelspec.implementation": "https://github.com/kohya-ss/sd-scripts",
            "modelspec.implementation_version": "lycoris-nodes/TrainLyCORIS",
        }
        for k, v in (extra or {}).items():
            md[k] = v if isinstance(v, str) else json.dumps(v)
        return md

    def num_parameters(self) -> int:
        return sum(math.prod(p.shape) for p in self.parameters())


def _make_hook(mod: TrainModule, conv: ConvArgs | None):
    def hook(_layer, args, output):
        extra = mod.adapter_output(args[0], conv)
        return output if extra is None else output + extra.to(output.dtype)
    return hook
