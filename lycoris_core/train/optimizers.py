"""Optimizers for TrainLyCORIS: torch's own, plus sd-scripts' popular extras when installed.

sd-scripts' `--optimizer_args` ("weight_decay=0.1 betas=0.9,0.99 eps=1e-8") are parsed here into
keyword arguments and checked against the optimizer's signature; values must be finite numbers
(or true/false), never evaluated as code. Lion (`lion-pytorch`), Prodigy (`prodigyopt`) and
8-bit AdamW (`bitsandbytes`, GPU) are optional dependencies: offered only when importable.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Mapping

import torch

TORCH_OPTIMIZERS = ("AdamW", "Adam", "SGD", "Adafactor")
EXTRA_OPTIMIZERS = {  # sd-scripts --optimizer_type: (module, class, pip package)
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
}
MAX_ARGS_CHARS = 1000


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def available_optimizers() -> tuple[str, ...]:
    """torch's optimizers, then every extra whose package is installed."""
    return TORCH_OPTIMIZERS + tuple(n for n, (mod, _, _) in EXTRA_OPTIMIZERS.items()
                                    if _installed(mod))


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    if name in TORCH_OPTIMIZERS:
        return getattr(torch.optim, name)
    if name not in EXTRA_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {available_optimizers()}, got {name!r}")
    module, cls, package = EXTRA_OPTIMIZERS[name]
    if not _installed(module):
        raise ValueError(f"optimizer {name} needs the optional package {package!r} "
                         f"(pip install {package} in ComfyUI's Python)")
    return getattr(importlib.import_module(module), cls)


def _value(key: str, text: str) -> float | bool | tuple[float, ...]:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        parts = tuple(float(p) for p in low.strip("()[]").split(",") if p.strip())
    except ValueError:
        raise ValueError(f"optimizer_args {key}: {text!r} is not a number, a list of numbers "
                         "or true/false") from None
    if not parts or not all(math.isfinite(p) for p in parts):
        raise ValueError(f"optimizer_args {key}: {text!r} must be finite numbers")
    return parts if len(parts) > 1 or "," in low else parts[0]


def parse_optimizer_args(text: str | None) -> dict[str, float | bool | tuple[float, ...]]:
    """sd-scripts' --optimizer_args: 'key=value' items separated by spaces (a value may be a
    comma list: betas=0.9,0.99). weight_decay ≥ 0, eps > 0 and betas in [0, 1) are checked."""
    text = (text or "").strip()
    if len(text) > MAX_ARGS_CHARS:
        raise ValueError(f"optimizer_args is longer than {MAX_ARGS_CHARS} characters")
    out: dict[str, float | bool | tuple[float, ...]] = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"optimizer_args: expected key=value, got {item!r}")
        out[key] = _value(key, value)
    wd = out.get("weight_decay")
    if wd is not None and (not isinstance(wd, float) or wd < 0):
        raise ValueError(f"optimizer_args weight_decay must be a number >= 0, got {wd}")
    eps = out.get("eps")
    if isinstance(eps, float) and eps <= 0:
        raise ValueError(f"optimizer_args eps must be > 0, got {eps}")
    betas = out.get("betas")
    if betas is not None and (not isinstance(betas, tuple) or not all(0 <= b < 1 for b in betas)):
        raise ValueError(f"optimizer_args betas must be numbers in [0, 1) like 0.9,0.999, got {betas}")
    return out


def format_optimizer_args(args: Mapping[str, object]) -> list[str]:
    """The --optimizer_args items of sd-scripts' command line."""
    def fmt(v):
        if isinstance(v, bool):
            return str(v)
        if isinstance(v, tuple):
            return ",".join(repr(x) for x in v)
        return repr(v)
    return [f"{k}={fmt(v)}" for k, v in args.items()]


def build(name: str, groups: list[dict], lr: float, defaults: Mapping[str, object],
          args: Mapping[str, object]) -> torch.optim.Optimizer:
    """Optimizer `name` over `groups` with lr, the pack's `defaults` and the user's
    optimizer_args; an argument the optimizer does not take is an error naming it."""
    cls = optimizer_class(name)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in args:
        if key not in params and not takes_any:
            raise ValueError(f"optimizer_args {key}: {name} has no such argument")
    kwargs = {k: v for k, v in defaults.items() if k in params}
    kwargs.update(args)
    return cls(groups, lr=lr, **kwargs)
