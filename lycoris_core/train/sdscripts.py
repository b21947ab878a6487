"""The equivalent kohya sd-scripts run: `accelerate launch` command line and dataset TOML.

For training on several GPUs with accelerate/sd-scripts: same network module, dim, alpha and
network_args (so the same targets), same optimizer, schedule, steps and seed.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path

from .dataset import BucketOptions, CaptionOptions, DatasetDescription, SubsetInfo
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


SUBSET_KEYS = ("caption_extension", "shuffle_caption", "keep_tokens", "keep_tokens_separator",
               "caption_separator", "caption_dropout_rate", "caption_tag_dropout_rate",
               "caption_prefix", "caption_suffix")
BUCKET_KEYS = ("enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
               "bucket_no_upscale")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(float(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return _toml_str(str(v))


def dataset_config_toml(desc: DatasetDescription, batch_size: int | None = None) -> str:
    """sd-scripts' dataset config for a kohya folder: one dataset (resolution, batch size,
    bucket options) with one subset per `N_name` folder (image_dir, num_repeats, class_tokens,
    caption options, flip_aug). `tomllib` reads it back as `description_from_toml` shows."""
    b, c = desc.buckets, desc.captions
    w, h = b.resolution
    lines = ["[general]", f"flip_aug = {_toml_value(desc.flip_aug)}", "",
             "[[datasets]]",
             f"resolution = {_toml_value(w if w == h else [w, h])}",
             f"batch_size = {int(batch_size or desc.batch_size)}"]
    lines += [f"{k} = {_toml_value(getattr(b, k))}" for k in BUCKET_KEYS]
    if desc.validation_split > 0:
        lines += [f"validation_split = {_toml_value(float(desc.validation_split))}",
                  f"validation_seed = {int(desc.validation_seed)}"]
    for s in desc.subsets:
        root = desc.reg_dir if s.is_reg else desc.image_dir
        lines += ["", "  [[datasets.subsets]]",
                  f"  image_dir = {_toml_str(str(Path(root) / s.folder))}",
                  f"  num_repeats = {int(s.num_repeats)}",
                  f"  class_tokens = {_toml_str(s.class_tokens)}"]
        if s.is_reg:
            lines.append("  is_reg = true")
        lines += [f"  {k} = {_toml_value(getattr(c, k))}" for k in SUBSET_KEYS]
    return "\n".join(lines) + "\n"


def description_from_toml(doc: dict) -> DatasetDescription:
    """The dataset description an sd-scripts dataset config (as parsed by tomllib) gives: the
    first dataset, its subsets (their common parent folder as image_dir), bucket and caption
    options of the first subset, and flip_aug."""
    ds = doc["datasets"][0]
    res = ds["resolution"]
    w, h = (res, res) if isinstance(res, int) else tuple(res)
    buckets = BucketOptions((w, h), **{k: ds[k] for k in BUCKET_KEYS if k in ds})
    subs = ds.get("subsets", [])
    captions = CaptionOptions(**{k: subs[0][k] for k in SUBSET_KEYS if subs and k in subs[0]})
    dirs = [Path(s["image_dir"]) for s in subs]
    train_dirs = [d for d, s in zip(dirs, subs, strict=True) if not s.get("is_reg", False)]
    reg_dirs = [d for d, s in zip(dirs, subs, strict=True) if s.get("is_reg", False)]
    root = str(train_dirs[0].parent) if train_dirs else ""
    reg_root = str(reg_dirs[0].parent) if reg_dirs else ""
    subsets = [SubsetInfo(d.name, int(s.get("num_repeats", 1)), s.get("class_tokens", ""),
                          is_reg=bool(s.get("is_reg", False)))
               for d, s in zip(dirs, subs, strict=True)]
    flip = doc.get("general", {}).get("flip_aug", subs[0].get("flip_aug", False) if subs else False)
    return DatasetDescription(root, subsets, buckets, captions, bool(flip), int(ds.get("batch_size", 1)),
                              reg_dir=reg_root,
                              validation_split=float(ds.get("validation_split", 0.0)),
                              validation_seed=int(ds.get("validation_seed", 0)))
