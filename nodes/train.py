"""TrainLyCORIS: train a LoHa/LoKr network in the graph with kohya sd-scripts' options and format.

The math and the loop live in `lycoris_core.train`; this module only connects them to ComfyUI:
the MODEL's torch modules, its conditioning objects and sigma schedule, the output folder, the
progress bar and Cancel. The trained file is then applied with `patching.apply_adapter`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..lycoris_core.keymap import detect_architecture
from ..lycoris_core.paths import is_within
from ..lycoris_core.train import checkpoint as ckpt
from ..lycoris_core.train.loop import SCHEDULERS, TrainConfig, Trainer, nan_hint
from ..lycoris_core.train.network import LycorisNetwork, NetworkConfig
from ..lycoris_core.train.objective import (
    gradient_checkpointing,
    loss_curve_image,
    release_inference_tensors,
)
from ..lycoris_core.train.optimizers import available_optimizers
from ..lycoris_core.train.sdscripts import (
    dataset_config_toml,
    dataset_toml,
    sdscripts_command,
    write_text,
)
from ..lycoris_core.train.targets import TargetOptions, parse_kv, parse_pattern_list
from .patching import apply_adapter
from .train_data import CaptionEncoder, training_items
from .train_dataset import (
    Validation,
    caption_models,
    draw_validation,
    epoch_args,
    epoch_plan,
    epoch_saves,
    extra_inputs,
    save_path,
    step_saves,
)
from .train_ops import differentiable_ops
from .train_options import TRAIN_OPTION_NODES, make_objective, prepare_patcher, training_options_input
from .train_samples import TrainingSamples, sample_inputs

log = logging.getLogger("lycoris_nodes")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs() -> list:
    Int, F, B, S, C = io.Int.Input, io.Float.Input, io.Boolean.Input, io.String.Input, io.Combo.Input
    return [
        io.Model.Input("model", tooltip="The diffusion model to train on (SDXL or Anima / Cosmos DiT)."),
        io.Latent.Input("latents", optional=True, tooltip="Training latents (one or more LATENT "
                        "batches; every image is one training item). Not needed with a "
                        "training_set."),
        io.Conditioning.Input("positive", optional=True, tooltip="The conditioning of each "
                              "training item, in the same order as the latents (one conditioning "
                              "is used for all). Not needed when a CLIP and captions are given."),
        io.Clip.Input("clip", optional=True, tooltip="Connect to train the text encoder(s) too "
                      "(sd-scripts without --network_train_unet_only): CLIP-L/CLIP-G for SDXL, "
                      "Qwen3 for Anima. Needs captions."),
        io.String.Input("captions", optional=True, multiline=True, tooltip="With a CLIP: the "
                        "caption of each training item, one per line in the order of the latents "
                        "(or a list of strings; one caption is used for all). Re-encoded at every "
                        "step so the text-encoder modules learn."),
        io.Float.Input("text_encoder_lr", default=0.0, min=0.0, max=10.0, step=1e-6, round=False,
                       optional=True, tooltip="--text_encoder_lr for the text-encoder modules (0 = the learning "
                       "rate). Used only with a CLIP."),
        C("algorithm", options=["loha", "lokr"], default="loha",
          tooltip="networks.loha (Hadamard product) or networks.lokr (Kronecker product)."),
        Int("network_dim", default=4, min=1, max=4096, tooltip="sd-scripts --network_dim: rank of "
          "Linear and 1×1 conv modules (default 4)."),
        F("network_alpha", default=1.0, min=0.0, max=4096.0, step=0.5, tooltip="sd-scripts "
          "--network_alpha: scale = alpha / dim (default 1; 0 means alpha = dim)."),
        Int("conv_dim", default=0, min=0, max=4096, tooltip="network_args conv_dim: rank of k×k convs "
          "(ResBlock, down/upsample). 0 = no conv modules (sd-scripts default)."),
        F("conv_alpha", default=1.0, min=0.0, max=4096.0, step=0.5, tooltip="network_args "
          "conv_alpha (default 1.0; used only with conv_dim)."),
        B("use_tucker", default=False, tooltip="network_args use_tucker: Tucker decomposition for "
          "k×k convs."),
        B("use_scalar", default=False, tooltip="network_args use_scalar (LyCORIS): a trained scalar "
          "that starts at 0; folded into hada_w1_a / lokr_w1 when saving."),
        F("rank_dropout", default=0.0, min=0.0, max=0.99, step=0.01, tooltip="network_args "
          "rank_dropout: drop random output rows of ΔW (sd-scripts), rescaled by 1/(1-p)."),
        F("module_dropout", default=0.0, min=0.0, max=0.99, step=0.01, tooltip="network_args "
          "module_dropout: skip a whole module for a step with this probability."),
        S("exclude_patterns", default="", tooltip="network_args exclude_patterns: Python list of "
          "regexes, full match on the module path, e.g. ['.*attn2.*']. Anima always adds "
          ".*(_modulation|_norm|_embedder|final_layer).*"),
        S("include_patterns", default="", tooltip="network_args include_patterns: rescue excluded "
          "modules, same syntax."),
        S("network_reg_dims", default="", tooltip="network_args network_reg_dims: "
          "'regex=dim,regex=dim' (first full match wins; dim 0 removes the module)."),
        S("network_reg_lrs", default="", tooltip="network_args network_reg_lrs: "
          "'regex=lr,regex=lr' per-module learning rates (first full match wins)."),
        Int("factor", default=-1, min=-1, max=8192, tooltip="LoKr network_args factor: split "
          "dimensions as (factor, dim/factor); -1 = as square as possible."),
        B("decompose_both", default=False, tooltip="LoKr (LyCORIS) decompose_both: low-rank w1 too."),
        B("train_llm_adapter", default=False, tooltip="Anima network_args train_llm_adapter: also "
          "train the LLM adapter blocks."),
        F("loraplus_lr_ratio", default=0.0, min=0.0, max=1000.0, step=0.5, tooltip="network_args "
          "loraplus_lr_ratio: learning rate × ratio for hada_w2_a / lokr_w1 (0 = off)."),
        C("optimizer", options=list(available_optimizers()), default="AdamW", tooltip="sd-scripts "
          "--optimizer_type (torch's; Lion, Prodigy, AdamW8bit when their package is installed)."),
        F("learning_rate", default=1e-4, min=0.0, max=10.0, step=1e-6, round=False,
          tooltip="--learning_rate (also the UNet/DiT learning rate)."),
        C("lr_scheduler", options=list(SCHEDULERS), default="constant", tooltip="--lr_scheduler."),
        Int("lr_warmup_steps", default=0, min=0, max=1_000_000, tooltip="--lr_warmup_steps."),
        Int("steps", default=100, min=1, max=1_000_000, tooltip="--max_train_steps (optimizer "
          "steps; a resumed run continues up to this total)."),
        Int("batch_size", default=1, min=1, max=1024, tooltip="Items per micro-batch."),
        Int("gradient_accumulation_steps", default=1, min=1, max=1024,
          tooltip="--gradient_accumulation_steps: micro-batches per optimizer step."),
        F("max_grad_norm", default=1.0, min=0.0, max=1000.0, step=0.1, tooltip="--max_grad_norm "
          "(0 = no clipping)."),
        Int("seed", default=0, min=0, max=0xFFFFFFFF, tooltip="Seed of the initial factors, batch "
          "order, noise, timesteps and dropouts."),
        Int("min_timestep", default=0, min=0, max=999, tooltip="--min_timestep (of 1000)."),
        Int("max_timestep", default=1000, min=1, max=1000, tooltip="--max_timestep (of 1000)."),
        C("training_dtype", options=list(DTYPES), default="bf16", tooltip="Autocast dtype of the "
          "forward pass (--mixed_precision); the factors stay float32."),
        C("save_precision", options=["fp32", "fp16", "bf16"], default="fp32",
          tooltip="--save_precision of the factors in the file."),
        B("gradient_checkpointing", default=False, tooltip="--gradient_checkpointing: recompute "
          "block activations in the backward pass (less memory, slower)."),
        Int("save_every_n_steps", default=0, min=0, max=1_000_000, tooltip="--save_every_n_steps "
          "(0 = only at the end). Each save also writes a .train_state sidecar for resuming."),
        S("output_name", default="lycoris/TrainLyCORIS", tooltip="File name prefix inside the "
          "save_to folder (loras or output)."),
        S("resume_from", default="", tooltip="A file this node saved (path, or name in the output "
          "or loras folder). With its .train_state sidecar, training continues exactly; without, "
          "it starts from its weights."),
        B("write_sdscripts_config", default=False, tooltip="Also write the equivalent "
          "sd-scripts command line (.sdscripts.sh) and dataset TOML for multi-GPU training."),
        *extra_inputs(),
        *sample_inputs(),
        training_options_input(),
    ]


def _blocks(diffusion_model) -> list:
    out = []
    for name in ("input_blocks", "output_blocks", "blocks"):
        out += list(getattr(diffusion_model, name, []) or [])
    mid = getattr(diffusion_model, "middle_block", None)
    return out + ([mid] if mid is not None else [])


def _resolve_resume(name: str) -> Path | None:
    name = name.strip()
    if not name:
        return None
    roots = [folder_paths.get_output_directory(), *folder_paths.get_folder_paths("loras")]
    p = Path(name)
    candidates = [p] if p.is_absolute() else [Path(r) / p for r in roots]
    for c in candidates:
        if c.is_file() and any(is_within(r, c.resolve()) for r in roots):
            return c.resolve()
    raise ValueError(f"resume_from: no file {name!r} inside the output or loras folders")


def _network_config(o: dict) -> NetworkConfig:
    targets = TargetOptions(
        network_dim=o["network_dim"], network_alpha=o["network_alpha"],
        conv_dim=o["conv_dim"] or None, conv_alpha=o["conv_alpha"] if o["conv_dim"] else None,
        exclude_patterns=parse_pattern_list(o["exclude_patterns"], "exclude_patterns"),
        include_patterns=parse_pattern_list(o["include_patterns"], "include_patterns"),
        reg_dims=parse_kv(o["network_reg_dims"], int), reg_lrs=parse_kv(o["network_reg_lrs"], float),
        train_llm_adapter=o["train_llm_adapter"])
    return NetworkConfig(o["algorithm"], targets, use_tucker=o["use_tucker"],
                         use_scalar=o["use_scalar"], rank_dropout=o["rank_dropout"],
                         module_dropout=o["module_dropout"], factor=o["factor"],
                         decompose_both=o["decompose_both"],
                         loraplus_lr_ratio=o["loraplus_lr_ratio"] or None)


def _train_config(o: dict) -> TrainConfig:
    return TrainConfig(steps=o["steps"], learning_rate=o["learning_rate"], optimizer=o["optimizer"],
                       text_encoder_lr=o.get("text_encoder_lr") or None,
                       lr_scheduler=o["lr_scheduler"], lr_warmup_steps=o["lr_warmup_steps"],
                       batch_size=o["batch_size"], grad_accumulation=o["gradient_accumulation_steps"],
                       max_grad_norm=o["max_grad_norm"], seed=o["seed"],
                       save_every=o["save_every_n_steps"])


def _progress(node_id, total: int):
    bar = comfy.utils.ProgressBar(total, node_id=node_id)

    def on_step(step: int, loss: float) -> None:
        bar.update_absolute(step, total)
        try:
            from server import PromptServer
            PromptServer.instance.send_progress_text(f"step {step}/{total}  loss {loss:.5f}", node_id)
        except Exception:  # no server (scripts, tests): the bar alone is fine
            pass
    return on_step


def train(model, latents: list[dict], positive: list | None, o: dict, node_id=None, clip=None,
          captions: list[str] | None = None):
    """Run the training described by the node options `o`.

    Returns (model, path, loss image, clip, samples); the clip is None when none was given,
    the samples an IMAGE batch (of 0 images when none was made).
    """
    if o["min_timestep"] >= o["max_timestep"]:
        raise ValueError("min_timestep must be smaller than max_timestep")
    ts = o.get("training_set")
    lat, conds, texts = training_items(latents, positive, clip, captions) if ts is None else \
        (ts.latents, None, None)
    net_cfg, cfg = _network_config(o), _train_config(o)
    topts = o.get("training_options")  # LyCORISTrainingOptions, or None: the plain objective
    if topts is not None:
        cfg = topts.train_config(cfg)
    sampler, cfg = epoch_plan(o, ts, lat, cfg)
    resume_path = _resolve_resume(o["resume_from"])
    out_file = save_path(o)  # <loras or output>/<name>_NNNNN_.safetensors, never outside
    filename = out_file.name[: -len(".safetensors")].rstrip("_").rsplit("_", 1)[0]
    base = out_file.with_suffix("")
    save_dtype = DTYPES[o["save_precision"]]

    patcher = model.clone()
    prepare_patcher(patcher, topts)
    te = clip.clone() if clip is not None else None
    mm.load_models_gpu([patcher] + ([te.patcher] if te else []) + caption_models(ts, te),
                       memory_required=1e20,
                       force_full_load=True)
    dm = patcher.model.diffusion_model
    arch = detect_architecture(k for k, _ in patcher.model.named_parameters())
    modules = [patcher.model] + ([te.cond_stage_model] if te else [])

    def named_layers() -> list:
        return [nm for m in modules for nm in m.named_modules()]
    with torch.inference_mode(False), torch.enable_grad():
        with torch.random.fork_rng(devices=[]):  # seeded initial factors; host RNG untouched
            torch.manual_seed(o["seed"])
            net = LycorisNetwork.for_model(named_layers(), net_cfg, arch).to(mm.get_torch_device())
        if te is not None and not any(t.is_text_encoder for t in net.targets.values()):
            raise ValueError("the CLIP has no text-encoder layer sd-scripts would train "
                             "(CLIP-L/CLIP-G self_attn/mlp, Qwen3 attention/mlp)")
        for m in modules:
            release_inference_tensors(m)
            m.requires_grad_(False)
        named = named_layers()
        encoder = CaptionEncoder(te, texts) if te is not None and ts is None else None
        objective = make_objective(topts, patcher, lat, conds, mm.get_torch_device(),
                                   DTYPES[o["training_dtype"]], o["min_timestep"], o["max_timestep"],
                                   encoder=encoder, latents=latents, training_set=ts, trained_clip=te)
        trainer = Trainer(net, cfg, objective, len(lat))
        trainer.sampler = sampler
        samples = TrainingSamples(o, patcher, te if te is not None else getattr(ts, "clip", None),
                                  o.get("vae") or getattr(ts, "vae", None), net, node_id,
                                  cfg.steps, cfg.seed)
        validation = Validation(o, ts, patcher, mm.get_torch_device(), DTYPES[o["training_dtype"]],
                                o["min_timestep"], o["max_timestep"], te, net, node_id, cfg.steps,
                                cfg.seed, cfg.batch_size)
        trainer.nan_hint = nan_hint(DTYPES[o["training_dtype"]])
        if resume_path is not None:
            exact = ckpt.resume(trainer, resume_path)
            log.info("TrainLyCORIS: resumed from %s at step %d (%s)", resume_path, trainer.step,
                     "exact" if exact else "weights only")
            if trainer.step >= cfg.steps:
                raise ValueError(f"{resume_path} is already at step {trainer.step}; set steps higher")
        extra = {"ss_output_name": filename, "ss_training_comment": "TrainLyCORIS (ComfyUI)",
                 "modelspec.title": filename}

        def save(path: Path) -> None:
            ckpt.save_checkpoint(trainer, path, arch, save_dtype, extra)
        net.attach(named)
        try:
            with differentiable_ops(), gradient_checkpointing(_blocks(dm), o["gradient_checkpointing"]):
                finished = trainer.run(
                    on_step=validation.wrap(samples.wrap(epoch_saves(
                        _progress(node_id, cfg.steps), sampler, o, save, base, cfg.steps))),
                    should_stop=mm.processing_interrupted,
                    on_save=step_saves(save, base, o, cfg.save_every))
        finally:
            net.detach()
        final = Path(f"{base}.safetensors") if finished else Path(f"{base}step{trainer.step:06d}.safetensors")
        if not final.exists():  # a cancel right after a periodic save: that file is the result
            save(final)
    if not finished:
        log.warning("TrainLyCORIS: cancelled at step %d; saved %s", trainer.step, final)
        mm.throw_exception_if_processing_interrupted()
    if o["write_sdscripts_config"]:
        toml = write_text(f"{base}.dataset.toml", dataset_toml(batch_size=cfg.batch_size)
                          if ts is None else dataset_config_toml(ts.description, cfg.batch_size))
        cmd = sdscripts_command(arch, net_cfg, cfg, output_name=filename, dataset_toml=str(toml),
                                training_dtype=o["training_dtype"], save_precision=o["save_precision"],
                                gradient_checkpointing=o["gradient_checkpointing"],
                                min_timestep=o["min_timestep"], max_timestep=o["max_timestep"],
                                train_text_encoder=te is not None,
                                objective=topts.objective if topts is not None else None,
                                v_parameterization=getattr(objective, "kind", None) == "v")
        write_text(f"{base}.sdscripts.sh", "#!/bin/sh\n" + cmd + epoch_args(o) + "\n")
    new_model, new_clip, _ = apply_adapter(model, clip, str(final), 1.0, 1.0, node="TrainLyCORIS")
    chart = draw_validation(loss_curve_image(trainer.losses), trainer.losses, validation.points)
    return new_model, str(final), chart, new_clip, samples.batch()


class TrainLyCORIS(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TrainLyCORIS",
            display_name="Train LyCORIS (LoHa / LoKr)",
            category="LyCORIS/training",
            description="Trains a LoHa or LoKr network on the given latents with kohya sd-scripts' "
                        "options, defaults, target modules and file format (networks.loha / "
                        "networks.lokr, ss_* metadata). Saves into the loras or output "
                        "folder, resumable.",
            is_input_list=True,
            inputs=_inputs(),
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained "
                                "adapter applied at strength 1."),
                io.String.Output(display_name="path", tooltip="The saved adapter file."),
                io.Image.Output(display_name="loss", tooltip="Loss per step (grey) and its "
                                "running mean (blue)."),
                io.Clip.Output(display_name="clip", tooltip="The input CLIP with the trained "
                               "text-encoder modules applied at strength 1 (empty without a CLIP)."),
                io.Image.Output(display_name="samples", tooltip="The images sampled during "
                                "training (sample_every_n_steps), in order of step and prompt "
                                "(a batch of 0 images without samples)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latents=None, positive=None, clip=None, captions=None,
                **kwargs) -> io.NodeOutput:
        opts = {k: v[0] if isinstance(v, list) else v for k, v in kwargs.items()}
        node_id = getattr(getattr(cls, "hidden", None), "unique_id", None)
        m, path, img, new_clip, samples = train(model[0], latents, positive, opts, node_id,
                                       clip=clip[0] if clip else None, captions=captions)
        return io.NodeOutput(m, path, img, new_clip, samples)


TRAIN_NODES = [TrainLyCORIS, *TRAIN_OPTION_NODES]
