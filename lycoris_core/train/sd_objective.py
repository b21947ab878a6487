"""kohya sd-scripts' noise, timestep and loss options for the diffusion objective (pure torch).

Names and defaults are sd-scripts' (`train_util`, `custom_train_functions`, the flow-matching
helpers its Anima trainer uses). The host passes its model's `apply_model` (x0 estimate) and
`model_sampling` (noise scaling, sigma of a timestep), as ComfyUI's models have them; the model
kind decides which options apply:

- "eps" / "v": SDXL-style discrete schedules (variance preserving, SNR = 1/σ²). Integer
  timesteps in [min_timestep, max_timestep); noise offset / multires noise; the SNR-based loss
  weights (min_snr_gamma, debiased estimation, the v-prediction scalings) after the per-sample mean.
- "flow": rectified flow (Anima), x_t = σ·n + (1−σ)·x0, target n − x0, σ drawn by
  timestep_sampling; weighting_scheme weights the per-element loss. "flow_cosmos" is the same
  flow in ComfyUI's Cosmos-RFlow parametrisation (its σ is t/(1−t), its x_t is x0 + σ·n).

The prediction and target are compared in the model's own output space: ε for "eps", v for "v"
(v = √ᾱ·n − √(1−ᾱ)·x0), the velocity n − x0 for "flow"; the target is made with the noise
without the ip_noise_gamma perturbation, as in sd-scripts.
All randomness comes from the global CPU generator (the trainer seeds and forks it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")
TIMESTEP_SAMPLINGS = ("default", "uniform", "sigmoid", "shift", "sigma", "flux_shift")
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
MODEL_KINDS = ("eps", "v", "flow", "flow_cosmos")
FLOW_KINDS = ("flow", "flow_cosmos")
NUM_TRAIN_TIMESTEPS = 1000
SNR_CAP = 1000.0
"""sd-scripts caps the SNR at 1000 in the debiased / v-prediction scalings (t = 0 is ~inf)."""
FLOW_SIGMA_MIN = 1e-3
"""Flow sigmas are kept ≥ 0.1 %: the prediction is recovered as (x_t − x0_est)/σ."""
ZSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08
"""ᾱ of the last timestep after the zero-terminal-SNR rescale (exactly 0 in the paper): ComfyUI's
value, so that σ stays finite (≈ 4519)."""


@dataclass
class ObjectiveOptions:
    """sd-scripts' objective options with their names and defaults (0 / False = off)."""

    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_snr_gamma: float = 0.0
    debiased_estimation_loss: bool = False
    scale_v_pred_loss_like_noise_pred: bool = False
    v_pred_like_loss: float = 0.0
    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    huber_schedule: str = "snr"
    zero_terminal_snr: bool = False
    masked_loss: bool = False
    timestep_sampling: str = "default"   # default: sd-scripts' per model (SDXL integer, Anima sigmoid)
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 1.0     # sd-scripts' Anima trainer default
    weighting_scheme: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self) -> None:
        for name, allowed in (("loss_type", LOSS_TYPES), ("huber_schedule", HUBER_SCHEDULES),
                              ("timestep_sampling", TIMESTEP_SAMPLINGS),
                              ("weighting_scheme", WEIGHTING_SCHEMES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
        if self.adaptive_noise_scale and not self.noise_offset:
            raise ValueError("adaptive_noise_scale needs noise_offset (as in sd-scripts)")
        if self.multires_noise_iterations < 0:
            raise ValueError("multires_noise_iterations must be >= 0")
        if not 0.0 < self.huber_c <= 1.0 and self.loss_type in ("huber", "smooth_l1"):
            raise ValueError(f"huber_c must be in (0, 1], got {self.huber_c}")
        if self.discrete_flow_shift <= 0 or self.sigmoid_scale <= 0 or self.logit_std <= 0:
            raise ValueError("discrete_flow_shift, sigmoid_scale and logit_std must be > 0")

    def non_defaults(self) -> dict:
        """{name: value} of every option not at sd-scripts' default."""
        base = ObjectiveOptions()
        return {k: v for k, v in asdict(self).items() if getattr(base, k) != v}

    def check_model(self, kind: str, min_timestep: int = 0, max_timestep: int = 1000) -> None:
        """Raise a ValueError naming the first option that does not apply to a `kind` model."""
        if kind not in MODEL_KINDS:
            raise ValueError(f"unsupported model kind {kind!r} (expected one of {MODEL_KINDS})")
        set_ = self.non_defaults()
        if kind in FLOW_KINDS:
            sd_only = ("noise_offset", "noise_offset_random_strength", "adaptive_noise_scale",
                       "multires_noise_iterations", "multires_noise_discount", "min_snr_gamma",
                       "debiased_estimation_loss", "scale_v_pred_loss_like_noise_pred",
                       "v_pred_like_loss", "zero_terminal_snr")
            for name in sd_only:
                if name in set_:
                    raise ValueError(f"{name} does not apply to a flow-matching model (Anima); "
                                     "sd-scripts' Anima trainer does not use it")
            if self.loss_type in ("huber", "smooth_l1") and self.huber_schedule == "snr":
                raise ValueError("huber_schedule 'snr' needs a discrete (SDXL) noise schedule; use "
                                 "'exponential' or 'constant' on a flow-matching model")
            if (min_timestep, max_timestep) != (0, NUM_TRAIN_TIMESTEPS):
                raise ValueError("min_timestep / max_timestep do not apply to a flow-matching "
                                 "model with training options: use timestep_sampling")
            return
        for name in ("timestep_sampling", "sigmoid_scale", "discrete_flow_shift",
                     "weighting_scheme", "logit_mean", "logit_std", "mode_scale"):
            if name in set_:
                raise ValueError(f"{name} applies to flow-matching models (Anima) only, not to "
                                 "an SDXL-style model")
        if kind == "eps" and self.scale_v_pred_loss_like_noise_pred:
            raise ValueError("scale_v_pred_loss_like_noise_pred needs a v-prediction model")
        if kind == "v" and self.v_pred_like_loss:
            raise ValueError("v_pred_like_loss cannot be used with a v-prediction model")

    def to_json(self) -> dict:
        return asdict(self)


# --- noise ------------------------------------------------------------------------------------


def apply_noise_offset(latents: torch.Tensor, noise: torch.Tensor, noise_offset: float,
                       adaptive_noise_scale: float = 0.0) -> torch.Tensor:
    """noise + offset·N(0,1) per (item, channel). With adaptive_noise_scale the offset becomes
    max(0, offset + scale·|mean of the latent channel|)."""
    per_channel = latents.shape[:2] + (1,) * (latents.dim() - 2)
    offset: float | torch.Tensor = noise_offset
    if adaptive_noise_scale:
        mean = latents.mean(dim=tuple(range(2, latents.dim())), keepdim=True).abs()
        offset = (noise_offset + adaptive_noise_scale * mean).clamp(min=0.0)
    return noise + offset * torch.randn(per_channel).to(latents.device, latents.dtype)


def multires_noise(noise: torch.Tensor, iterations: int, discount: float,
                   scale_draws: torch.Tensor | None = None) -> torch.Tensor:
    """sd-scripts' pyramid noise: add upsampled noise at sizes ⌊H/r^i⌋ × ⌊W/r^i⌋ (r ~ U[2, 4)
    per level) weighted by discount^i, stop at a size of 1, divide by the std of the result.

    `scale_draws` (one uniform [0, 1) per level) replaces the random r's (tests); sd-scripts
    draws them from Python's `random`, here from the torch generator so that runs repeat.
    """
    if noise.dim() != 4:
        raise ValueError(f"multires noise needs (B, C, H, W) latents, got {list(noise.shape)}")
    b, c, h, w = noise.shape
    up = torch.nn.Upsample(size=(h, w), mode="bilinear")
    out = noise.clone()
    for i in range(iterations):
        u = float(torch.rand(()) if scale_draws is None else scale_draws[i])
        r = u * 2 + 2
        hn, wn = max(1, int(h / (r ** i))), max(1, int(w / (r ** i)))
        out = out + up(torch.randn(b, c, hn, wn).to(noise)) * discount ** i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


# --- SNR-based loss weights (discrete schedules) -----------------------------------------------


def snr_of_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """SNR of a variance-preserving schedule at sigma (ComfyUI's σ² = (1−ᾱ)/ᾱ): ᾱ/(1−ᾱ) = 1/σ²."""
    return 1.0 / sigma.double() ** 2


def min_snr_weight(snr: torch.Tensor, gamma: float, v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-γ: min(SNR, γ)/SNR (ε), min(SNR, γ)/(SNR+1) (v)."""
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if v_prediction else clipped / snr


def debiased_weight(snr: torch.Tensor, v_prediction: bool = False) -> torch.Tensor:
    """Debiased estimation: 1/√SNR (ε), 1/(SNR+1) (v), with the SNR capped at 1000."""
    s = torch.clamp(snr, max=SNR_CAP)
    return 1.0 / (s + 1.0) if v_prediction else 1.0 / torch.sqrt(s)


def v_pred_scale(snr: torch.Tensor) -> torch.Tensor:
    """SNR/(SNR+1), SNR capped at 1000: scale_v_pred_loss_like_noise_pred multiplies the loss by
    it; v_pred_like_loss adds loss/scale·value."""
    s = torch.clamp(snr, max=SNR_CAP)
    return s / (s + 1.0)


def post_process_loss(loss: torch.Tensor, snr: torch.Tensor, opts: ObjectiveOptions,
                      v_prediction: bool) -> torch.Tensor:
    """sd-scripts' SD/SDXL post-processing of the per-sample loss (B,), in its order."""
    snr = snr.to(loss.device)
    if opts.min_snr_gamma:
        loss = loss * min_snr_weight(snr, opts.min_snr_gamma, v_prediction).to(loss.dtype)
    if opts.scale_v_pred_loss_like_noise_pred:
        loss = loss * v_pred_scale(snr).to(loss.dtype)
    if opts.v_pred_like_loss:
        loss = loss + loss / v_pred_scale(snr).to(loss.dtype) * opts.v_pred_like_loss
    if opts.debiased_estimation_loss:
        loss = loss * debiased_weight(snr, v_prediction).to(loss.dtype)
    return loss


# --- huber / smooth L1 -----------------------------------------------------------------------


def huber_threshold(opts: ObjectiveOptions, timesteps: torch.Tensor,
                    sigma: torch.Tensor) -> torch.Tensor | None:
    """Per-sample c of the huber / smooth_l1 loss (None for l2 / l1).

    constant: c·scale; exponential: c^(t/1000)·scale; snr: (1−c)/(1+σ)² + c (σ of the discrete
    schedule; sd-scripts applies no scale there).
    """
    if opts.loss_type not in ("huber", "smooth_l1"):
        return None
    t = timesteps.double()
    if opts.huber_schedule == "constant":
        return torch.full_like(t, opts.huber_c * opts.huber_scale)
    if opts.huber_schedule == "exponential":
        alpha = -math.log(opts.huber_c) / NUM_TRAIN_TIMESTEPS
        return torch.exp(-alpha * t) * opts.huber_scale
    return (1.0 - opts.huber_c) / (1.0 + sigma.double()) ** 2 + opts.huber_c


def conditional_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     huber_c: torch.Tensor | None = None) -> torch.Tensor:
    """Element-wise loss (no reduction): l2 (d²), l1 (|d|), huber 2c(√(d²+c²) − c),
    smooth_l1 2(√(d²+c²) − c), with c per sample."""
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if huber_c is None:
        raise ValueError(f"loss_type {loss_type!r} needs a huber_c")
    c = huber_c.to(pred.device, pred.dtype).reshape((-1,) + (1,) * (pred.dim() - 1))
    core = torch.sqrt((pred - target) ** 2 + c ** 2) - c
    if loss_type == "huber":
        return 2.0 * c * core
    if loss_type == "smooth_l1":
        return 2.0 * core
    raise ValueError(f"unknown loss_type {loss_type!r}")


def apply_mask(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sd-scripts' masked loss: the alpha mask (B, H, W) in [0, 1], area-resized to the loss's
    spatial size, multiplies the element-wise loss (the mean then still divides by all pixels)."""
    m = mask.to(loss.device, loss.dtype)
    if m.dim() == 2:
        m = m[None]
    m = F.interpolate(m[:, None], size=tuple(loss.shape[-2:]), mode="area")
    return loss * m.reshape((m.shape[0], 1) + (1,) * (loss.dim() - 4) + tuple(m.shape[-2:]))


# --- flow matching: timestep sampling and loss weighting --------------------------------------


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """discrete_flow_shift: s·t / (1 + (s−1)·t)."""
    return t * shift / (1.0 + (shift - 1.0) * t)


def time_shift(mu: float, exponent: float, t: torch.Tensor) -> torch.Tensor:
    """FLUX's resolution shift: e^μ / (e^μ + (1/t − 1)^exponent)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0) ** exponent)


def flux_mu(tokens: int, x1: float = 256, y1: float = 0.5, x2: float = 4096,
            y2: float = 1.15) -> float:
    """μ of flux_shift: linear in the number of 2×2 latent patches (0.5 at 256, 1.15 at 4096)."""
    m = (y2 - y1) / (x2 - x1)
    return m * tokens + (y1 - m * x1)


def timestep_density(scheme: str, batch: int, logit_mean: float = 0.0, logit_std: float = 1.0,
                     mode_scale: float = 1.29) -> torch.Tensor:
    """u in [0, 1) for timestep_sampling 'sigma': logit_normal sigmoid(N(mean, std)); mode
    1 − u − s·(cos²(πu/2) − 1 + u); otherwise uniform."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(batch) * logit_std + logit_mean)
    u = torch.rand(batch)
    if scheme == "mode":
        return 1.0 - u - mode_scale * (torch.cos(math.pi * u / 2.0) ** 2 - 1.0 + u)
    return u


def sigma_of_index(index: torch.Tensor, shift: float,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The flow-matching scheduler's sigma at table index i (index 0 = most noise):
    shift applied to (N − i)/N."""
    s = (num_train_timesteps - index.double()) / num_train_timesteps
    return flow_shift(s, shift)


def sample_flow_sigmas(opts: ObjectiveOptions, batch: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """σ in (0, 1] per item by sd-scripts' timestep_sampling ('default' = Anima's 'sigmoid')."""
    method = "sigmoid" if opts.timestep_sampling == "default" else opts.timestep_sampling
    if method == "uniform":
        sigma = torch.rand(batch)
    elif method in ("sigmoid", "shift", "flux_shift"):
        sigma = torch.sigmoid(opts.sigmoid_scale * torch.randn(batch))
        if method == "shift":
            sigma = flow_shift(sigma, opts.discrete_flow_shift)
        elif method == "flux_shift":
            h, w = latent_hw
            sigma = time_shift(flux_mu((h // 2) * (w // 2)), 1.0, sigma)
    else:  # "sigma": a table timestep drawn by the weighting scheme's density
        u = timestep_density(opts.weighting_scheme, batch, opts.logit_mean, opts.logit_std,
                             opts.mode_scale)
        index = (u * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        sigma = sigma_of_index(index, opts.discrete_flow_shift)
    return sigma.float().clamp(FLOW_SIGMA_MIN, 1.0)


def flow_loss_weighting(scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    """weighting_scheme's loss weight: sigma_sqrt σ⁻², cosmap 2/(π(1 − 2σ + 2σ²)), else 1."""
    if scheme == "sigma_sqrt":
        return sigma.double() ** -2.0
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma.double() + 2.0 * sigma.double() ** 2))
    return torch.ones_like(sigma, dtype=torch.float64)


# --- zero terminal SNR --------------------------------------------------------------------------


def zero_terminal_snr_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The discrete schedule (σ per timestep, ascending) rescaled to zero terminal SNR
    (Lin et al. 2023, as sd-scripts' --zero_terminal_snr): √ᾱ shifted so its last value is 0 and
    scaled so its first is unchanged; the last ᾱ is then set to 4.9e-8 so σ stays finite."""
    ac = 1.0 / (sigmas.double() ** 2 + 1.0)
    root = ac.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    ac = root ** 2
    ac[-1] = ZSNR_LAST_ALPHA_CUMPROD
    return ((1.0 - ac) / ac).sqrt()


# --- the loss -------------------------------------------------------------------------------------


@dataclass
class Draw:
    """The random inputs of one batch: noise (same shape as x0), σ and timestep per item."""

    noise: torch.Tensor
    sigma: torch.Tensor
    timesteps: torch.Tensor
    ip_noise: torch.Tensor | None = None


def draw_inputs(model_sampling, kind: str, x0: torch.Tensor, opts: ObjectiveOptions,
                min_timestep: int = 0, max_timestep: int = NUM_TRAIN_TIMESTEPS) -> Draw:
    """Noise, σ and timesteps for a batch, as sd-scripts draws them for this kind of model."""
    b = x0.shape[0]
    noise = torch.randn(x0.shape).to(x0.device)
    if kind in FLOW_KINDS:
        sigma = sample_flow_sigmas(opts, b, tuple(x0.shape[-2:]))
        timesteps = sigma.double() * NUM_TRAIN_TIMESTEPS
    else:
        if opts.noise_offset:
            strength = opts.noise_offset
            if opts.noise_offset_random_strength:
                strength = float(torch.rand(())) * opts.noise_offset
            noise = apply_noise_offset(x0, noise, strength, opts.adaptive_noise_scale)
        if opts.multires_noise_iterations:
            noise = multires_noise(noise, opts.multires_noise_iterations,
                                   opts.multires_noise_discount)
        timesteps = torch.randint(min_timestep, max_timestep, (b,))
        sigma = torch.stack([torch.as_tensor(model_sampling.sigma(t.float())).reshape(())
                             for t in timesteps]).float()
    ip = None
    if opts.ip_noise_gamma:
        gamma = opts.ip_noise_gamma
        if opts.ip_noise_gamma_random_strength:
            gamma = float(torch.rand(())) * gamma
        ip = gamma * torch.randn(x0.shape).to(x0.device)
    return Draw(noise, sigma, timesteps, ip)


def objective_loss(apply_model: Callable[..., torch.Tensor], model_sampling, kind: str,
                   x0: torch.Tensor, draw: Draw, opts: ObjectiveOptions,
                   mask: torch.Tensor | None = None, **model_kwargs) -> torch.Tensor:
    """sd-scripts' training loss of one batch (a scalar), given its random inputs.

    x_t is made with noise (+ the ip_noise_gamma perturbation), the target with the noise alone;
    element-wise loss (loss_type, huber_c), × weighting_scheme (flow), × mask (masked_loss),
    mean per item, SNR post-processing (eps / v), mean.
    """
    shape = (-1,) + (1,) * (x0.dim() - 1)
    sigma = draw.sigma
    if kind == "flow_cosmos":  # the host's σ of flow time t, kept finite
        sigma = sigma.clamp(max=1.0 - FLOW_SIGMA_MIN)
        sigma = sigma / (1.0 - sigma)
    s = sigma.to(x0.device, torch.float32).reshape(shape)
    noisy_noise = draw.noise if draw.ip_noise is None else draw.noise + draw.ip_noise
    xt = model_sampling.noise_scaling(s, noisy_noise, x0, False)
    denoised = apply_model(xt, sigma.to(x0.device), **model_kwargs)
    if kind == "flow_cosmos":  # back to flow space: x_flow = x_t·(1−t), velocity (x_flow − x̂0)/t
        k = 1.0 / (1.0 + s)
        t = s * k
        pred = (xt * k - denoised.float()) / t
        target = (model_sampling.noise_scaling(s, draw.noise, x0, False) * k - x0) / t
    elif kind == "v":  # v̂ = (√ᾱ·x_vp − x̂0)/√(1−ᾱ) with ᾱ = 1/(1+σ²), x_vp = √ᾱ·x_t
        k = torch.sqrt(1.0 + s * s)
        pred = (xt / (k * k) - denoised.float()) * k / s
        target = (draw.noise - s * x0) / k
    else:  # ε̂ = (x_t − x̂0)/σ (ε); the velocity (flow): (x_t − x̂0)/σ, target n − x0
        pred = (xt - denoised.float()) / s
        target = (model_sampling.noise_scaling(s, draw.noise, x0, False) - x0) / s
    c = huber_threshold(opts, draw.timesteps, draw.sigma)
    loss = conditional_loss(pred, target, opts.loss_type, c)
    if kind in FLOW_KINDS and opts.weighting_scheme in ("sigma_sqrt", "cosmap"):
        loss = loss * flow_loss_weighting(opts.weighting_scheme, draw.sigma).to(
            loss.device, loss.dtype).reshape(shape)
    if opts.masked_loss and mask is not None:
        loss = apply_mask(loss, mask)
    loss = loss.mean(dim=tuple(range(1, loss.dim())))
    if kind not in FLOW_KINDS:
        loss = post_process_loss(loss, snr_of_sigma(draw.sigma), opts, kind == "v")
    return loss.mean()
