"""Saving a trained network (sd-scripts file) and its training state (sidecar), and resuming.

`<name>.safetensors` is the adapter in sd-scripts format. `<name>.train_state.safetensors` holds
what resuming needs: raw parameters (scalar not folded), optimizer tensors, the CPU RNG state,
and, as JSON in its metadata, the step, losses, scheduler and optimizer settings. Never pickle.
Both files are written atomically and never over an existing file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..convert import sdscripts_hashes
from ..safetensors_io import load_tensors, save_safetensors
from .loop import Trainer
from .optimizers import EXTRA_OPTIMIZERS, format_optimizer_args

STATE_KEY = "lycoris_train_state"
STATE_SUFFIX = ".train_state.safetensors"


def state_path(adapter_path: str | Path) -> Path:
    """The sidecar of an adapter file: `x.safetensors` → `x.train_state.safetensors`."""
    p = Path(adapter_path)
    return p.with_name(p.name[: -len(".safetensors")] + STATE_SUFFIX) if p.name.endswith(
        ".safetensors") else p.with_name(p.name + STATE_SUFFIX)


def save_adapter(trainer: Trainer, path: str | Path, arch: str,
                 dtype: torch.dtype = torch.float32, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the adapter in sd-scripts format with `ss_*` metadata and sd-scripts' hashes."""
    net = trainer.network
    tensors = net.saved_tensors(dtype)
    cfg = trainer.cfg
    info = {
        "ss_steps": str(trainer.step), "ss_max_train_steps": str(cfg.steps),
        "ss_learning_rate": str(cfg.learning_rate), "ss_lr_scheduler": cfg.lr_scheduler,
        "ss_lr_warmup_steps": str(cfg.lr_warmup_steps),
        "ss_optimizer": _optimizer_name(cfg.optimizer, cfg.optimizer_args),
        "ss_batch_size_per_device": str(cfg.batch_size),
        "ss_gradient_accumulation_steps": str(cfg.grad_accumulation),
        "ss_max_grad_norm": str(cfg.max_grad_norm), "ss_seed": str(cfg.seed),
        "ss_text_encoder_lr": str(cfg.text_encoder_lr), "ss_unet_lr": str(cfg.learning_rate),
        "ss_num_train_images": str(trainer.dataset_size),
        **{k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (extra or {}).items()},
    }
    md = net.metadata(arch, info)
    md["sshs_model_hash"], md["sshs_legacy_hash"] = sdscripts_hashes(tensors, md)
    return save_safetensors(tensors, path, md)


def _optimizer_name(name: str, args: dict | None = None) -> str:
    """sd-scripts' ss_optimizer: the class path, with the optimizer_args in parentheses."""
    base = {"AdamW": "torch.optim.adamw.AdamW", "Adam": "torch.optim.adam.Adam",
            "SGD": "torch.optim.sgd.SGD", "Adafactor": "torch.optim.adafactor.Adafactor"}.get(name)
    if base is None:
        module, cls, _ = EXTRA_OPTIMIZERS[name]
        base = f"{module}.{cls}"
    return base + (f"({','.join(format_optimizer_args(args))})" if args else "")


def save_state(trainer: Trainer, adapter_path: str | Path) -> Path:
    """Write the resume sidecar next to `adapter_path`."""
    tensors: dict[str, torch.Tensor] = {f"param.{k}": v.detach().cpu() for k, v in
                                        trainer.network.named_trainables().items()}
    opt = trainer.optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in opt["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    if trainer.rng_state is not None:
        tensors["rng.cpu"] = trainer.rng_state.clone()
    info = {
        "format": 1, "step": trainer.step, "losses": trainer.losses,
        "config": trainer.cfg.to_json(),
        "network_args": trainer.network.config.network_args(),
        "algo": trainer.network.config.algo,
        "modules": sorted(trainer.network.lora_modules.keys()),
        "optimizer_param_groups": opt["param_groups"], "optimizer_scalars": scalars,
        "scheduler": trainer.scheduler.state_dict(),
    }
    sampler = getattr(trainer, "sampler", None)
    if sampler is not None:  # epoch and position in it: a mid-epoch resume continues exactly
        info["sampler"] = sampler.state()
    return save_safetensors(tensors, state_path(adapter_path), {STATE_KEY: json.dumps(info)})


def save_checkpoint(trainer: Trainer, path: str | Path, arch: str,
                    dtype: torch.dtype = torch.float32,
                    extra: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Adapter file + resume sidecar (sidecar first, so an adapter file always has its state)."""
    sp = save_state(trainer, path)
    try:
        return save_adapter(trainer, path, arch, dtype, extra), sp
    except BaseException:
        sp.unlink(missing_ok=True)
        raise


def read_state(adapter_path: str | Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, info) of an adapter file's sidecar, or None when it has none."""
    sp = state_path(adapter_path)
    if not sp.is_file():
        return None
    tensors, metadata = load_tensors(sp)
    if STATE_KEY not in metadata:
        raise ValueError(f"{sp} is not a TrainLyCORIS training state (no {STATE_KEY} metadata)")
    return tensors, json.loads(metadata[STATE_KEY])


def resume(trainer: Trainer, adapter_path: str | Path) -> bool:
    """Continue from a saved file. With its sidecar: parameters, optimizer, scheduler, RNG and
    step are restored exactly (returns True). Without: only the factors are loaded (returns
    False; like sd-scripts `--network_weights`)."""
    state = read_state(adapter_path)
    net = trainer.network
    if state is None:
        net.load_saved(load_tensors(adapter_path)[0])
        return False
    tensors, info = state
    if info.get("algo") != net.config.algo or sorted(net.lora_modules) != info.get("modules"):
        raise ValueError(f"{adapter_path}: saved with algorithm {info.get('algo')} on "
                         f"{len(info.get('modules', []))} modules; this run has {net.config.algo} on "
                         f"{len(net.lora_modules)}: use the same options to resume")
    net.load_raw({k[len("param."):]: v for k, v in tensors.items() if k.startswith("param.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    for pid, st in info.get("optimizer_scalars", {}).items():
        opt_state.setdefault(int(pid), {}).update(st)
    groups = info["optimizer_param_groups"]
    if len(groups) != len(trainer.optimizer.param_groups) or any(
            len(a["params"]) != len(b["params"]) for a, b in zip(groups, trainer.optimizer.param_groups, strict=True)):
        raise ValueError(f"{adapter_path}: optimizer groups differ from this run (learning-rate "
                         "options changed?)")
    trainer.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    trainer.scheduler.load_state_dict(info["scheduler"])
    trainer.step = int(info["step"])
    trainer.losses = list(info["losses"])
    trainer.rng_state = tensors.get("rng.cpu")
    sampler = getattr(trainer, "sampler", None)
    if (sampler is None) != (info.get("sampler") is None):
        raise ValueError(f"{adapter_path}: saved {'with' if info.get('sampler') else 'without'} "
                         "epochs (a training set or epoch options); resume the same way")
    if sampler is not None:
        sampler.load_state(info["sampler"])
    return True
