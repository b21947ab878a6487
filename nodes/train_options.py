"""LyCORISTrainingOptions: sd-scripts' noise, timestep, loss and optimizer options for TrainLyCORIS.

The node only gathers the options (their names and defaults are sd-scripts'); TrainLyCORIS takes
them at its optional `training_options` input. The formulas live in
`lycoris_core.train.sd_objective`; here they meet the host model: its kind (ε, v or flow, from
its `model_sampling`), its schedule (zero_terminal_snr rescales it for the run) and the latents'
masks (masked_loss). Without the node TrainLyCORIS keeps its plain objective (uniform timesteps
in [min_timestep, max_timestep) of the host's schedule, MSE).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field

import comfy.model_sampling as cms
import torch
from comfy_api.latest import io

from ..lycoris_core.train.loop import TrainConfig
from ..lycoris_core.train.optimizers import parse_optimizer_args
from ..lycoris_core.train.sd_objective import (
    FLOW_KINDS,
    HUBER_SCHEDULES,
    LOSS_TYPES,
    TIMESTEP_SAMPLINGS,
    WEIGHTING_SCHEMES,
    ObjectiveOptions,
    draw_inputs,
    objective_loss,
    zero_terminal_snr_sigmas,
)
from .train_data import Objective
from .train_dataset import DatasetObjective

log = logging.getLogger("lycoris_nodes")

OPTIONS_TYPE = "LYCORIS_TRAINING_OPTIONS"
TrainingOptionsIO = io.Custom(OPTIONS_TYPE)


@dataclass
class TrainingOptions:
    """What LyCORISTrainingOptions outputs: the objective options and the optimizer extras."""

    objective: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    optimizer_args: dict = field(default_factory=dict)
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0

    def train_config(self, cfg: TrainConfig) -> TrainConfig:
        """`cfg` with optimizer_args and the scheduler's cycles / power."""
        return dataclasses.replace(cfg, optimizer_args=dict(self.optimizer_args),
                                   lr_scheduler_num_cycles=self.lr_scheduler_num_cycles,
                                   lr_scheduler_power=self.lr_scheduler_power)


def model_kind(model_sampling) -> str:
    """'eps', 'v', 'flow' or 'flow_cosmos' from a ComfyUI model_sampling; other kinds are not
    supported."""
    if isinstance(model_sampling, cms.CONST):
        return "flow"
    if isinstance(model_sampling, cms.COSMOS_RFLOW):  # Cosmos-Predict2 on ComfyUI 0.3.75
        return "flow_cosmos"
    if isinstance(model_sampling, (cms.EDM, cms.X0)) or not isinstance(model_sampling, cms.EPS):
        raise ValueError(f"training options: unsupported model sampling "
                         f"{type(model_sampling).__name__} (SDXL ε / v-prediction or Anima flow)")
    return "v" if isinstance(model_sampling, cms.V_PREDICTION) else "eps"


def prepare_patcher(patcher, options: TrainingOptions | None) -> None:
    """zero_terminal_snr: the (cloned) patcher trains on its schedule rescaled to zero terminal
    SNR (an object patch of `model_sampling`, so sigma ↔ timestep stays consistent)."""
    if options is None or not options.objective.zero_terminal_snr:
        return
    ms = patcher.get_model_object("model_sampling")
    if model_kind(ms) in FLOW_KINDS or not hasattr(ms, "set_sigmas"):
        raise ValueError("zero_terminal_snr applies to discrete (SDXL) noise schedules only")
    fixed = copy.deepcopy(ms)
    fixed.set_sigmas(zero_terminal_snr_sigmas(ms.sigmas.detach().cpu()).float())
    patcher.add_object_patch("model_sampling", fixed)


def item_masks(latents: list[dict]) -> list[torch.Tensor | None]:
    """One alpha mask (1, H, W) or None per training item, from the LATENTs' `noise_mask`
    (Set Latent Noise Mask), in the order of `flatten_latents`."""
    out: list[torch.Tensor | None] = []
    for lat in latents:
        n = lat["samples"].shape[0]
        mask = lat.get("noise_mask")
        if mask is None:
            out += [None] * n
            continue
        m = mask.reshape(-1, mask.shape[-2], mask.shape[-1]).float()
        out += [m[i % m.shape[0]: i % m.shape[0] + 1] for i in range(n)]
    return out


class SdScriptsObjective(Objective):
    """The objective with sd-scripts' options: noise, timesteps and loss by `ObjectiveOptions`."""

    def __init__(self, *args, options: ObjectiveOptions, kind: str,
                 masks: list[torch.Tensor | None] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.opts, self.kind = options, kind
        self.masks = masks

    def _mask(self, members: list[int]) -> torch.Tensor | None:
        if not self.opts.masked_loss:
            return None
        masks = [self.masks[i] if self.masks else None for i in members]
        if any(m is None for m in masks):
            raise ValueError("masked_loss: a training latent has no mask (use Set Latent Noise "
                             "Mask on the latents)")
        if len({tuple(m.shape) for m in masks}) > 1:
            raise ValueError("masked_loss: the masks of a batch differ in size")
        return torch.cat(masks).to(self.device)

    def _group_loss(self, members: list[int], conds: list[dict]) -> torch.Tensor:
        x0 = torch.cat([self.x0[i] for i in members])
        draw = draw_inputs(self.sampling, self.kind, x0, self.opts, self.min_t, self.max_t)
        with self._autocast():
            return objective_loss(self.base.apply_model, self.sampling, self.kind, x0, draw,
                                  self.opts, self._mask(members), transformer_options=self.options,
                                  **self._kwargs(conds))


class DatasetSdScriptsObjective(DatasetObjective, SdScriptsObjective):
    """A LyCORISDataset's items (flips, caption draws, regularisation weight) with sd-scripts'
    noise, timestep and loss options."""


def make_objective(options: TrainingOptions | None, patcher, lat: list[torch.Tensor], conds,
                   device, dtype, min_t: int, max_t: int, encoder=None,
                   latents: list[dict] | None = None, training_set=None,
                   trained_clip=None) -> Objective:
    """TrainLyCORIS's loss function: the plain objective, or sd-scripts' with `options`
    (checked against the model: an option that does not apply is an error naming it), on the
    latents/conditionings or on a LyCORISDataset `training_set`."""
    if options is None:
        if training_set is not None:
            return DatasetObjective(patcher, training_set, device, dtype, min_t, max_t,
                                    trained_clip=trained_clip)
        return Objective(patcher, lat, conds, device, dtype, min_t, max_t, encoder=encoder)
    kind = model_kind(patcher.get_model_object("model_sampling"))
    options.objective.check_model(kind, min_t, max_t)
    if training_set is not None:
        if options.objective.masked_loss:
            raise ValueError("masked_loss: a LyCORISDataset has no masks; use latents with Set "
                             "Latent Noise Mask instead")
        return DatasetSdScriptsObjective(patcher, training_set, device, dtype, min_t, max_t,
                                         trained_clip=trained_clip, options=options.objective,
                                         kind=kind)
    masks = item_masks(latents) if latents is not None and options.objective.masked_loss else None
    return SdScriptsObjective(patcher, lat, conds, device, dtype, min_t, max_t, encoder=encoder,
                              options=options.objective, kind=kind, masks=masks)


def _inputs() -> list:
    F, B, C, Int = io.Float.Input, io.Boolean.Input, io.Combo.Input, io.Int.Input
    flow = " Flow-matching models (Anima) only."
    sd = " SDXL (ε / v-prediction) only; an error on Anima."
    return [
        F("noise_offset", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="sd-scripts "
          "--noise_offset: add offset·N(0,1) per image and channel to the noise (0 = off)." + sd),
        B("noise_offset_random_strength", default=False, tooltip="sd-scripts "
          "--noise_offset_random_strength: offset drawn uniformly in [0, noise_offset]." + sd),
        F("adaptive_noise_scale", default=0.0, min=-1.0, max=1.0, step=0.001, tooltip="sd-scripts "
          "--adaptive_noise_scale: offset += scale·|latent channel mean| (needs noise_offset)." + sd),
        Int("multires_noise_iterations", default=0, min=0, max=20, tooltip="sd-scripts "
            "--multires_noise_iterations: pyramid noise levels (0 = off; 6–10 typical)." + sd),
        F("multires_noise_discount", default=0.3, min=0.0, max=1.0, step=0.01, tooltip="sd-scripts "
          "--multires_noise_discount: weight discount per pyramid level (default 0.3)." + sd),
        F("ip_noise_gamma", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="sd-scripts "
          "--ip_noise_gamma: input perturbation noise (0 = off; ~0.1 recommended)."),
        B("ip_noise_gamma_random_strength", default=False, tooltip="sd-scripts "
          "--ip_noise_gamma_random_strength: gamma drawn uniformly in [0, ip_noise_gamma]."),
        F("min_snr_gamma", default=0.0, min=0.0, max=100.0, step=0.5, tooltip="sd-scripts "
          "--min_snr_gamma: Min-SNR loss weighting (0 = off; 5 recommended)." + sd),
        B("debiased_estimation_loss", default=False, tooltip="sd-scripts "
          "--debiased_estimation_loss: weight the loss by 1/√SNR (ε) or 1/(SNR+1) (v)." + sd),
        B("scale_v_pred_loss_like_noise_pred", default=False, tooltip="sd-scripts "
          "--scale_v_pred_loss_like_noise_pred: scale a v-prediction loss by SNR/(SNR+1). "
          "v-prediction models only."),
        F("v_pred_like_loss", default=0.0, min=0.0, max=10.0, step=0.01, tooltip="sd-scripts "
          "--v_pred_like_loss: add loss·(SNR+1)/SNR·value (ε-prediction models only; 0 = off)."),
        C("loss_type", options=list(LOSS_TYPES), default="l2", tooltip="sd-scripts --loss_type: "
          "l2 (MSE), l1, huber or smooth_l1."),
        F("huber_c", default=0.1, min=0.0001, max=1.0, step=0.01, tooltip="sd-scripts --huber_c: "
          "threshold of the huber / smooth_l1 loss (default 0.1)."),
        F("huber_scale", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="sd-scripts "
          "--huber_scale: scale of the constant / exponential huber schedules (default 1)."),
        C("huber_schedule", options=list(HUBER_SCHEDULES), default="snr", tooltip="sd-scripts "
          "--huber_schedule: snr (SDXL only), exponential or constant (default snr)."),
        B("zero_terminal_snr", default=False, tooltip="sd-scripts --zero_terminal_snr: train on "
          "the noise schedule rescaled to zero terminal SNR." + sd),
        B("masked_loss", default=False, tooltip="sd-scripts --masked_loss: weight the loss by "
          "the latents' mask (Set Latent Noise Mask), area-resized to the latent."),
        C("timestep_sampling", options=list(TIMESTEP_SAMPLINGS), default="default",
          tooltip="sd-scripts --timestep_sampling: default (Anima: sigmoid), uniform, sigmoid, "
          "shift, sigma (the weighting_scheme's density) or flux_shift." + flow),
        F("sigmoid_scale", default=1.0, min=0.01, max=100.0, step=0.1, tooltip="sd-scripts "
          "--sigmoid_scale: scale of the normal draw of sigmoid / shift / flux_shift (default 1)."
          + flow),
        F("discrete_flow_shift", default=1.0, min=0.01, max=100.0, step=0.1, tooltip="sd-scripts "
          "--discrete_flow_shift: shift s·t/(1+(s−1)t) of 'shift' and 'sigma' (Anima default 1)."
          + flow),
        C("weighting_scheme", options=list(WEIGHTING_SCHEMES), default="none", tooltip="sd-scripts "
          "--weighting_scheme: loss weight sigma_sqrt / cosmap; logit_normal / mode shape the "
          "timestep density of timestep_sampling 'sigma' (default none)." + flow),
        F("logit_mean", default=0.0, min=-10.0, max=10.0, step=0.1, tooltip="sd-scripts "
          "--logit_mean of weighting_scheme logit_normal (default 0)." + flow),
        F("logit_std", default=1.0, min=0.01, max=10.0, step=0.1, tooltip="sd-scripts "
          "--logit_std of weighting_scheme logit_normal (default 1)." + flow),
        F("mode_scale", default=1.29, min=0.0, max=10.0, step=0.01, tooltip="sd-scripts "
          "--mode_scale of weighting_scheme mode (default 1.29)." + flow),
        io.String.Input("optimizer_args", default="", tooltip="sd-scripts --optimizer_args: "
                        "key=value items separated by spaces, e.g. 'weight_decay=0.1 "
                        "betas=0.9,0.99 eps=1e-8' (numbers only; checked against the optimizer)."),
        Int("lr_scheduler_num_cycles", default=1, min=1, max=1000, tooltip="sd-scripts "
            "--lr_scheduler_num_cycles: restarts of cosine_with_restarts (default 1)."),
        F("lr_scheduler_power", default=1.0, min=0.01, max=100.0, step=0.1, tooltip="sd-scripts "
          "--lr_scheduler_power: power of the polynomial scheduler (default 1)."),
    ]


OPTIMIZER_KEYS = ("optimizer_args", "lr_scheduler_num_cycles", "lr_scheduler_power")


class LyCORISTrainingOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LyCORISTrainingOptions",
            display_name="LyCORIS Training Options",
            category="LyCORIS/training",
            description="kohya sd-scripts' noise, timestep, loss and optimizer options (same "
                        "names and defaults) for TrainLyCORIS's training_options input. Options "
                        "that do not apply to the trained model are an error naming the option.",
            inputs=_inputs(),
            outputs=[TrainingOptionsIO.Output(display_name="training_options", tooltip="Connect "
                                              "to TrainLyCORIS's training_options input.")],
        )

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        objective = ObjectiveOptions(**{k: v for k, v in kwargs.items() if k not in OPTIMIZER_KEYS})
        return io.NodeOutput(TrainingOptions(
            objective, parse_optimizer_args(kwargs.get("optimizer_args", "")),
            int(kwargs.get("lr_scheduler_num_cycles", 1)), float(kwargs.get("lr_scheduler_power", 1.0))))


def training_options_input():
    """TrainLyCORIS's optional input for this node's output (appended to its inputs)."""
    return TrainingOptionsIO.Input("training_options", optional=True, tooltip="Optional "
                                   "LyCORISTrainingOptions: sd-scripts' noise / timestep / loss / "
                                   "optimizer options. Without it: uniform timesteps in "
                                   "[min_timestep, max_timestep) of the model's schedule, MSE.")


TRAIN_OPTION_NODES = [LyCORISTrainingOptions]
