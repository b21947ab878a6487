"""The equivalent kohya sd-scripts run: `accelerate launch` command line and dataset TOML.

For training on several GPUs with accelerate/sd-scripts: same network module, dim, alpha and
network_args (so the same targets), same optimizer, schedule, steps and seed.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path

from .loop import TrainConfig
from .network import SS_MODULES, NetworkConfig, _num
from .optimizers import format_optimizer_args
from .sd_objective import ObjectiveOptions

SCRIPTS = {"sdxl": "sdxl_train_network.py", "anima": "anima_train_network.py",
           "cosmos_predict2": "anima_train_network.py"}
MIXED = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def sdscripts_command(arch: str, net: NetworkConfig, cfg: TrainConfig, *, output_name: str,
                      dataset_toml: str = "dataset.toml", train_text_encoder: bool = False,
                      training_dtype: str = "bf16", save_precision: str = "fp32",
                      gradient_checkpointing: bool = False, min_timestep: int = 0,
                      max_timestep: int = 1000, model_path: str = "<path to the base model>",
                      num_processes: int = 2, objective: ObjectiveOptions | None = None,
                      v_parameterization: bool = False) -> str:
    """A shell command running the same training under `accelerate launch`; `objective` adds
    sd-scripts' noise / timestep / loss options (LyCORISTrainingOptions)."""
    t = net.targets
    args: list[str] = [
        "accelerate", "launch", f"--num_processes={num_processes}", "--multi_gpu",
        SCRIPTS.get(arch, "train_network.py"),
        "--pretrained_model_name_or_path", model_path,
        "--dataset_config", dataset_toml,
        "--network_module", SS_MODULES[net.algo],
        "--network_dim", str(t.network_dim), "--network_alpha", _num(t.network_alpha),
    ]
    nargs = [f"{k}={v}" for k, v in net.network_args().items() if v is not None]
    if nargs:
        args += ["--network_args", *nargs]
    args += [
        "--optimizer_type", cfg.optimizer, "--learning_rate", repr(cfg.learning_rate),
        "--lr_scheduler", cfg.lr_scheduler, "--lr_warmup_steps", str(cfg.lr_warmup_steps),
        "--max_train_steps", str(cfg.steps),
        "--gradient_accumulation_steps", str(cfg.grad_accumulation),
        "--max_grad_norm", repr(cfg.max_grad_norm), "--seed", str(cfg.seed),
        "--mixed_precision", MIXED.get(training_dtype, "bf16"), "--save_precision", save_precision,
        "--output_name", output_name, "--save_model_as", "safetensors",
    ]
    if cfg.lr_scheduler == "cosine_with_restarts":
        args += ["--lr_scheduler_num_cycles", str(cfg.lr_scheduler_num_cycles)]
    if cfg.lr_scheduler == "polynomial":
        args += ["--lr_scheduler_power", repr(cfg.lr_scheduler_power)]
    if cfg.text_encoder_lr is not None:
        args += ["--text_encoder_lr", repr(cfg.text_encoder_lr)]
    if cfg.save_every:
        args += ["--save_every_n_steps", str(cfg.save_every)]
    opt_args = dict(cfg.optimizer_args)
    if cfg.optimizer in ("AdamW", "Adafactor") and cfg.weight_decay != 0.01:
        opt_args.setdefault("weight_decay", cfg.weight_decay)
    if opt_args:
        args += ["--optimizer_args", *format_optimizer_args(opt_args)]
    if min_timestep:
        args += ["--min_timestep", str(min_timestep)]
    if max_timestep != 1000:
        args += ["--max_timestep", str(max_timestep)]
    if gradient_checkpointing:
        args.append("--gradient_checkpointing")
    if v_parameterization:
        args.append("--v_parameterization")
    if objective is not None:
        args += objective_args(arch, objective)
    if not train_text_encoder:
        args.append("--network_train_unet_only")
    args.append("--cache_latents")
    return " ".join(shlex.quote(a) for a in args)


FLOW_ARGS = ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift", "weighting_scheme")


def objective_args(arch: str, objective: ObjectiveOptions) -> list[str]:
    """sd-scripts arguments for every non-default objective option (flags for booleans); for
    Anima its timestep options always, 'default' written as the Anima trainer's 'sigmoid'."""
    items = objective.non_defaults()
    if arch in ("anima", "cosmos_predict2"):
        for name in FLOW_ARGS:
            items.setdefault(name, getattr(objective, name))
        if items["timestep_sampling"] == "default":
            items["timestep_sampling"] = "sigmoid"
    out: list[str] = []
    for name, value in items.items():
        if isinstance(value, bool):
            out += [f"--{name}"] if value else []
        elif isinstance(value, str):
            out += [f"--{name}", value]
        else:
            out += [f"--{name}", _num(value) if isinstance(value, float) else str(value)]
    return out


def dataset_toml(image_dir: str = "<folder with images and .txt captions>", *, resolution: int = 1024,
                 batch_size: int = 1, num_repeats: int = 1) -> str:
    """sd-scripts dataset config for one folder of images with same-named .txt captions."""
    return (
        "[general]\n"
        "shuffle_caption = false\n"
        'caption_extension = ".txt"\n'
        "enable_bucket = true\n\n"
        "[[datasets]]\n"
        f"resolution = {int(resolution)}\n"
        f"batch_size = {int(batch_size)}\n\n"
        "  [[datasets.subsets]]\n"
        f"  image_dir = {_toml_str(image_dir)}\n"
        f"  num_repeats = {int(num_repeats)}\n"
    )


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_text(path: str | Path, text: str) -> Path:
    """Write a small text file atomically; never over an existing file."""
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.link(tmp, dst)  # fails if dst exists: no clobbering
    finally:
        os.unlink(tmp)
    return dst
