"""sd-scripts' noise / timestep / loss options (lycoris_core.train.sd_objective) against
independent transcriptions of sd-scripts' formulas, evaluated with numpy at hand-picked points.

Transcribed from kohya sd-scripts: library/custom_train_functions.py (apply_snr_weight,
apply_debiased_estimation, get_snr_scale, add_v_prediction_like_loss, apply_noise_offset,
pyramid_noise_like, fix_noise_scheduler_betas_for_zero_terminal_snr), library/train_util.py
(get_huber_threshold_if_needed, conditional_loss), library/flux_train_utils.py
(get_noisy_model_input_and_timesteps, time_shift, get_lin_function), library/sd3_train_utils.py
(compute_density_for_timestep_sampling, FlowMatchEulerDiscreteScheduler) and
library/anima_train_utils.py (compute_loss_weighting_for_anima).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lycoris_core.train import sd_objective as so
from lycoris_core.train.sd_objective import ObjectiveOptions

# SDXL's schedule, built independently: scaled_linear betas 0.00085 .. 0.012 over 1000 steps
BETAS = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
ALPHAS_CUMPROD = np.cumprod(1.0 - BETAS)
ALL_SNR = ALPHAS_CUMPROD / (1.0 - ALPHAS_CUMPROD)       # (√ᾱ / √(1−ᾱ))²
SIGMAS = np.sqrt((1.0 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD)
T = np.array([0, 10, 100, 250, 500, 999])


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


def test_snr_of_sigma_is_the_schedule_snr():
    got = so.snr_of_sigma(_t(SIGMAS[T])).numpy()
    np.testing.assert_allclose(got, ALL_SNR[T], rtol=1e-12)


@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
@pytest.mark.parametrize("v", [False, True])
def test_min_snr_gamma_weight(gamma, v):
    snr = ALL_SNR[T]
    expected = np.minimum(snr, gamma) / (snr + 1.0 if v else snr)
    got = so.min_snr_weight(_t(snr), gamma, v).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] == pytest.approx(gamma / (snr[0] + (1 if v else 0)))   # low t: clipped at γ
    if not v:
        assert got[-1] == pytest.approx(1.0)                             # high t: SNR < γ → 1


@pytest.mark.parametrize("v", [False, True])
def test_debiased_estimation_weight(v):
    snr = np.minimum(ALL_SNR[T], 1000.0)   # t = 0 has SNR ≈ 1170: capped
    assert ALL_SNR[0] > 1000
    expected = 1.0 / (snr + 1.0) if v else 1.0 / np.sqrt(snr)
    np.testing.assert_allclose(so.debiased_weight(_t(ALL_SNR[T]), v).numpy(), expected, rtol=1e-12)


def test_v_prediction_scalings_and_their_order():
    snr = ALL_SNR[T]
    capped = np.minimum(snr, 1000.0)
    scale = capped / (capped + 1.0)
    np.testing.assert_allclose(so.v_pred_scale(_t(snr)).numpy(), scale, rtol=1e-12)
    loss = np.linspace(0.5, 2.0, len(T))
    # every option of sd-scripts' post_process_loss on, in its order (min-SNR, scale-v,
    # v-pred-like, debiased), for an ε model and for a v model
    for v in (False, True):
        opts = ObjectiveOptions(min_snr_gamma=5.0, scale_v_pred_loss_like_noise_pred=v,
                                v_pred_like_loss=0.0 if v else 0.3, debiased_estimation_loss=True)
        x = loss * np.minimum(snr, 5.0) / (snr + 1.0 if v else snr)
        if v:
            x = x * scale
        else:
            x = x + x / scale * 0.3
        x = x * (1.0 / (capped + 1.0) if v else 1.0 / np.sqrt(capped))
        got = so.post_process_loss(_t(loss), _t(snr), opts, v).numpy()
        np.testing.assert_allclose(got, x, rtol=1e-12)


@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_schedule(schedule):
    c, scale = 0.1, 1.5
    t = T.astype(np.float64)
    if schedule == "constant":
        expected = np.full(len(T), c * scale)
    elif schedule == "exponential":
        alpha = -math.log(c) / 1000.0
        expected = np.exp(-alpha * t) * scale
    else:  # no huber_scale in sd-scripts' snr schedule
        expected = (1.0 - c) / (1.0 + SIGMAS[T]) ** 2 + c
    opts = ObjectiveOptions(loss_type="huber", huber_c=c, huber_scale=scale, huber_schedule=schedule)
    got = so.huber_threshold(opts, _t(t), _t(SIGMAS[T])).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    if schedule == "exponential":   # c^(t/1000)·scale: scale at t = 0, c·scale at t = 1000
        assert got[0] == pytest.approx(scale)
    assert so.huber_threshold(ObjectiveOptions(), _t(t), _t(SIGMAS[T])) is None  # l2


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber", "smooth_l1"])
def test_conditional_loss(loss_type):
    d = np.array([[-3.0, -0.2, 0.0], [0.05, 0.7, 4.0]])
    c = np.array([0.1, 0.5])[:, None]
    expected = {
        "l2": d ** 2,
        "l1": np.abs(d),
        "huber": 2 * c * (np.sqrt(d ** 2 + c ** 2) - c),
        "smooth_l1": 2 * (np.sqrt(d ** 2 + c ** 2) - c),
    }[loss_type]
    pred, target = _t(d + 1.0), _t(np.ones_like(d))
    got = so.conditional_loss(pred, target, loss_type, _t(c[:, 0])).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_noise_offset_and_adaptive_scale():
    g = torch.Generator().manual_seed(3)
    lat = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64) * 0.1 \
        + torch.tensor([0.05, 0.2, 0.5, 1.0], dtype=torch.float64)[None, :, None, None]
    noise = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    torch.manual_seed(11)
    got = so.apply_noise_offset(lat, noise, 0.05)
    torch.manual_seed(11)
    z = torch.randn(2, 4, 1, 1).double().numpy()
    np.testing.assert_allclose(got.numpy(), noise.numpy() + 0.05 * z, rtol=1e-12)
    torch.manual_seed(11)
    got = so.apply_noise_offset(lat, noise, 0.05, adaptive_noise_scale=-0.1)
    mean = np.abs(lat.numpy().mean(axis=(2, 3), keepdims=True))
    offset = np.maximum(0.05 - 0.1 * mean, 0.0)
    assert (offset == 0).sum() >= 2 and (offset > 0).sum() >= 2     # clamped at 0 and not
    np.testing.assert_allclose(got.numpy(), noise.numpy() + offset * z, rtol=1e-12)


def _bilinear(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Independent bilinear resize (half-pixel centres, edge clamp: torch's align_corners=False)."""
    H, W = x.shape[-2:]

    def axis(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo
    ylo, yhi, fy = axis(h, H)
    xlo, xhi, fx = axis(w, W)
    top = x[..., ylo, :][..., xlo] * (1 - fx) + x[..., ylo, :][..., xhi] * fx
    bot = x[..., yhi, :][..., xlo] * (1 - fx) + x[..., yhi, :][..., xhi] * fx
    return top * (1 - fy)[:, None] + bot * fy[:, None]


@pytest.mark.parametrize("hw,draws,levels", [
    ((8, 8), [0.0] * 10, 4), ((8, 8), [0.5] * 10, 3), ((8, 8), [0.99, 0.2, 0.7], 3),
    ((29, 23), [0.05, 0.3, 0.45, 0.6, 0.1], 4), ((29, 23), [0.0, 0.0, 0.0], 3)])
def test_multires_noise(hw, draws, levels):
    """pyramid_noise_like: r = 2 + 2u per level; sizes ⌊H/r^i⌋ × ⌊W/r^i⌋; stop at a size 1."""
    h, w = hw
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, 3, h, w, generator=g)
    torch.manual_seed(7)
    got = so.multires_noise(noise, len(draws), 0.3, scale_draws=torch.tensor(draws))
    torch.manual_seed(7)
    expected = noise.double().numpy().copy()
    used = 0
    for i, u in enumerate(draws):
        r = u * 2 + 2
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        level = torch.randn(2, 3, hn, wn).double().numpy()
        expected = expected + _bilinear(level, h, w) * 0.3 ** i
        used += 1
        if hn == 1 or wn == 1:
            break
    assert used == levels
    expected = expected / expected.std(ddof=1)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=2e-5, atol=2e-6)


def test_zero_terminal_snr():
    """fix_noise_scheduler_betas_for_zero_terminal_snr, through the betas as sd-scripts does."""
    root = np.sqrt(np.cumprod(1.0 - BETAS))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    alphas_bar = root ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    ac = np.cumprod(alphas)        # back through betas = 1 − alphas, as sd-scripts
    ac[-1] = 4.8973451890853435e-08
    expected = np.sqrt((1.0 - ac) / ac)
    got = so.zero_terminal_snr_sigmas(_t(SIGMAS)).numpy()
    np.testing.assert_allclose(got[:-1], expected[:-1], rtol=1e-9)
    assert got[-1] == pytest.approx(expected[-1], rel=1e-9) and 4000 < got[-1] < 5000
    assert got[0] == pytest.approx(SIGMAS[0], rel=1e-12)        # first timestep unchanged
    assert abs(got[500] - SIGMAS[500]) > 0.05 * SIGMAS[500]      # the middle moves


# --- flow matching -----------------------------------------------------------------------------

def _scheduler_sigmas(shift: float) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift): its sigma table."""
    s = np.linspace(1, 1000, 1000)[::-1] / 1000.0
    return shift * s / (1 + (shift - 1) * s)


def test_flow_shift_time_shift_and_mu():
    t = np.array([0.01, 0.25, 0.5, 0.9])
    for shift in (1.0, 3.0):
        np.testing.assert_allclose(so.flow_shift(_t(t), shift).numpy(),
                                   shift * t / (1 + (shift - 1) * t), rtol=1e-12)
    assert float(so.flow_shift(_t(0.5), 3.0)) == pytest.approx(0.75)
    mu = 0.8
    np.testing.assert_allclose(so.time_shift(mu, 1.0, _t(t)).numpy(),
                               math.exp(mu) / (math.exp(mu) + (1 / t - 1)), rtol=1e-12)
    assert so.flux_mu(256) == pytest.approx(0.5) and so.flux_mu(4096) == pytest.approx(1.15)
    assert so.flux_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)


@pytest.mark.parametrize("method,scheme", [  # the density draws timesteps only for 'sigma'
    ("uniform", "none"), ("sigmoid", "none"), ("shift", "none"), ("flux_shift", "none"),
    ("sigma", "none"), ("sigma", "logit_normal"), ("sigma", "mode")])
def test_flow_timestep_sampling(method, scheme):
    opts = ObjectiveOptions(timestep_sampling=method, sigmoid_scale=1.3, discrete_flow_shift=3.0,
                            weighting_scheme=scheme, logit_mean=0.2, logit_std=0.8, mode_scale=1.29)
    torch.manual_seed(21)
    got = so.sample_flow_sigmas(opts, 64, (32, 48)).double().numpy()
    torch.manual_seed(21)
    if method == "uniform":
        sig = torch.rand(64).double().numpy()
    elif method == "sigma":
        if scheme == "logit_normal":
            z = torch.randn(64).double().numpy() * 0.8 + 0.2
            u = 1 / (1 + np.exp(-z))
        else:
            u = torch.rand(64).double().numpy()
            if scheme == "mode":
                u = 1 - u - 1.29 * (np.cos(math.pi * u / 2) ** 2 - 1 + u)
        idx = (u * 1000).astype(np.int64)
        sig = _scheduler_sigmas(3.0)[idx]
    else:
        z = torch.randn(64).double().numpy()
        sig = 1 / (1 + np.exp(-1.3 * z))
        if method == "shift":
            sig = 3.0 * sig / (1 + 2.0 * sig)
        elif method == "flux_shift":
            m = (1.15 - 0.5) / (4096 - 256)
            mu = m * (16 * 24) + 0.5 - m * 256
            sig = math.exp(mu) / (math.exp(mu) + (1 / sig - 1))
    sig = np.clip(sig, 1e-3, 1.0)
    np.testing.assert_allclose(got, sig, rtol=1e-6, atol=1e-7)


def test_anima_defaults_are_sigmoid_without_shift():
    opts = ObjectiveOptions()
    assert (opts.timestep_sampling, opts.sigmoid_scale, opts.discrete_flow_shift,
            opts.weighting_scheme) == ("default", 1.0, 1.0, "none")
    torch.manual_seed(4)
    got = so.sample_flow_sigmas(opts, 16, (8, 8))
    torch.manual_seed(4)
    assert torch.allclose(got, torch.sigmoid(torch.randn(16)).clamp(1e-3, 1.0))


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap", "logit_normal"])
def test_flow_loss_weighting(scheme):
    s = np.array([0.05, 0.3, 0.5, 0.8])
    expected = {"sigma_sqrt": s ** -2.0, "cosmap": 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))}.get(
        scheme, np.ones_like(s))
    np.testing.assert_allclose(so.flow_loss_weighting(scheme, _t(s)).numpy(), expected, rtol=1e-12)
    if scheme == "cosmap":
        assert expected[2] == pytest.approx(4 / math.pi)


# --- the loss on a small closed-form model ------------------------------------------------------

class _Sampling:
    """ComfyUI's noise scaling for ε / v (x0 + σn) and flow (σn + (1−σ)x0), written out here."""

    def __init__(self, kind):
        self.kind = kind

    def noise_scaling(self, sigma, noise, x0, max_denoise=False):
        if self.kind == "flow":
            return sigma * noise + (1 - sigma) * x0
        return x0 + sigma * noise

    def sigma(self, t):
        return torch.tensor(SIGMAS[int(t)], dtype=torch.float32)


def _model(kind, w):
    """x0 estimate of a toy model whose raw output is w·x_t (ε, v or velocity)."""
    def apply(xt, sigma):
        s = sigma.reshape(-1, 1, 1, 1)
        out = w * xt
        if kind == "eps":
            return xt - out * s
        if kind == "v":
            return xt / (s * s + 1) - out * s / torch.sqrt(s * s + 1)
        if kind == "flow_cosmos":   # ComfyUI's COSMOS_RFLOW: t = σ/(σ+1), input x_t·(1−t)
            t = s / (s + 1)
            return xt * (1 - t) - w * (xt * (1 - t)) * t
        return xt - out * s
    return apply


@pytest.mark.parametrize("kind", ["eps", "v", "flow", "flow_cosmos"])
def test_objective_loss_equals_sdscripts_per_model(kind):
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(2, 4, 6, 6, generator=g)
    noise = torch.randn(2, 4, 6, 6, generator=g)
    ip = 0.1 * torch.randn(2, 4, 6, 6, generator=g)
    flow = kind.startswith("flow")
    sigma = torch.tensor([0.4, 0.75]) if flow else torch.tensor(SIGMAS[[300, 700]], dtype=torch.float32)
    ts = sigma.double() * 1000 if flow else torch.tensor([300, 700])
    w = 0.3
    opts = ObjectiveOptions(ip_noise_gamma=0.1, loss_type="huber", huber_c=0.2,
                            huber_schedule="constant", weighting_scheme="cosmap" if flow else "none",
                            min_snr_gamma=0.0 if flow else 5.0)
    got = so.objective_loss(_model(kind, w), _Sampling(kind), kind, x0,
                            so.Draw(noise, sigma, ts, ip), opts)
    # sd-scripts: x_t from noise + γξ, target from the noise alone, in the model's output space
    x0n, nn_, ipn, s = (a.double().numpy() for a in (x0, noise, ip, sigma))
    s4 = s[:, None, None, None]
    if flow:   # the same velocity and target in both parametrisations of the flow
        xt = (1 - s4) * x0n + s4 * (nn_ + ipn)
        pred, target = w * xt, nn_ - x0n
    else:
        ac = 1 / (1 + s4 ** 2)                     # add_noise: √ᾱ x0 + √(1−ᾱ) n, model input scaled
        xt = x0n + s4 * (nn_ + ipn)                # ComfyUI's x_t = add_noise(...)/√ᾱ
        if kind == "eps":
            pred, target = w * xt, nn_
        else:
            pred = w * xt
            target = np.sqrt(ac) * nn_ - np.sqrt(1 - ac) * x0n
    c = 0.2
    elem = 2 * c * (np.sqrt((pred - target) ** 2 + c ** 2) - c)
    if flow:
        elem = elem * (2 / (math.pi * (1 - 2 * s4 + 2 * s4 ** 2)))
    per = elem.mean(axis=(1, 2, 3))
    if not flow:
        snr = 1 / s ** 2
        per = per * np.minimum(snr, 5.0) / (snr + 1 if kind == "v" else snr)
    assert float(got) == pytest.approx(per.mean(), rel=1e-5)


def test_masked_loss():
    loss = torch.ones(2, 4, 4, 4)
    mask = torch.zeros(2, 8, 8)
    mask[0, :4, :] = 1.0          # top half of item 0
    mask[1, :, 1] = 1.0           # one pixel column: half of each 2×2 block of block column 0
    got = so.apply_mask(loss, mask)
    area = F.avg_pool2d(mask[:, None], 2)   # 'area' resize by 2 = mean of 2×2 blocks
    assert torch.equal(got, loss * area)
    assert float(got[0].mean()) == pytest.approx(0.5) and float(got[1].mean()) == pytest.approx(0.125)


# --- which options apply to which model ---------------------------------------------------------

@pytest.mark.parametrize("kind,over,name", [
    ("flow", {"min_snr_gamma": 5.0}, "min_snr_gamma"),
    ("flow", {"noise_offset": 0.05}, "noise_offset"),
    ("flow", {"multires_noise_iterations": 6}, "multires_noise_iterations"),
    ("flow", {"v_pred_like_loss": 0.1}, "v_pred_like_loss"),
    ("flow", {"zero_terminal_snr": True}, "zero_terminal_snr"),
    ("flow", {"loss_type": "huber"}, "huber_schedule"),
    ("eps", {"timestep_sampling": "sigmoid"}, "timestep_sampling"),
    ("eps", {"discrete_flow_shift": 3.0}, "discrete_flow_shift"),
    ("eps", {"weighting_scheme": "cosmap"}, "weighting_scheme"),
    ("eps", {"scale_v_pred_loss_like_noise_pred": True}, "scale_v_pred_loss_like_noise_pred"),
    ("v", {"v_pred_like_loss": 0.1}, "v_pred_like_loss"),
])
def test_options_that_do_not_apply_name_the_option(kind, over, name):
    with pytest.raises(ValueError, match=name):
        ObjectiveOptions(**over).check_model(kind)


def test_option_values_are_checked():
    with pytest.raises(ValueError, match="adaptive_noise_scale"):
        ObjectiveOptions(adaptive_noise_scale=0.01)
    with pytest.raises(ValueError, match="loss_type"):
        ObjectiveOptions(loss_type="l3")
    with pytest.raises(ValueError, match="huber_c"):
        ObjectiveOptions(loss_type="huber", huber_c=0.0)
    with pytest.raises(ValueError, match="noise_offset"):
        ObjectiveOptions(noise_offset=float("nan"))
    with pytest.raises(ValueError, match="min_timestep"):
        ObjectiveOptions().check_model("flow", 100, 900)
    ObjectiveOptions(min_snr_gamma=5.0, noise_offset=0.05).check_model("eps")   # fine on SDXL
    ObjectiveOptions(timestep_sampling="shift", discrete_flow_shift=3.0).check_model("flow")


# --- the exported sd-scripts command -------------------------------------------------------------

def _other(name: str, value):
    """A value other than sd-scripts' default for option `name`."""
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return value + 3
    if isinstance(value, float):
        return value + 0.25
    choices = {"loss_type": so.LOSS_TYPES, "huber_schedule": so.HUBER_SCHEDULES,
               "timestep_sampling": so.TIMESTEP_SAMPLINGS, "weighting_scheme": so.WEIGHTING_SCHEMES}
    return next(c for c in choices[name] if c not in (value, "default"))


@pytest.mark.parametrize("arch", ["sdxl", "anima"])
def test_sdscripts_command_carries_every_option(arch):
    import shlex
    from dataclasses import fields

    from lycoris_core.train.loop import TrainConfig
    from lycoris_core.train.network import NetworkConfig
    from lycoris_core.train.sdscripts import sdscripts_command

    every = {f.name: _other(f.name, f.default) for f in fields(ObjectiveOptions)}
    opts = ObjectiveOptions(**every)
    cfg = TrainConfig(optimizer="AdamW", lr_scheduler="polynomial", lr_scheduler_power=2.0,
                      optimizer_args={"weight_decay": 0.1, "betas": (0.9, 0.99), "eps": 1e-7})
    cmd = shlex.split(sdscripts_command(arch, NetworkConfig(), cfg, output_name="x",
                                        objective=opts, v_parameterization=True))
    for name, value in every.items():
        assert f"--{name}" in cmd, name
        if not isinstance(value, bool):
            got = cmd[cmd.index(f"--{name}") + 1]
            assert (float(got) == value) if not isinstance(value, str) else got == value, name
    i = cmd.index("--optimizer_args")
    assert cmd[i + 1: i + 4] == ["weight_decay=0.1", "betas=0.9,0.99", "eps=1e-07"]
    assert cmd[cmd.index("--lr_scheduler_power") + 1] == "2.0" and "--v_parameterization" in cmd
    # defaults: nothing for SDXL; Anima's timestep options spelled out (default → sigmoid)
    plain = shlex.split(sdscripts_command(arch, NetworkConfig(), TrainConfig(), output_name="x",
                                          objective=ObjectiveOptions()))
    flow = {"--timestep_sampling": "sigmoid", "--sigmoid_scale": "1", "--discrete_flow_shift": "1",
            "--weighting_scheme": "none"}
    got = {k: plain[plain.index(k) + 1] for k in flow if k in plain}
    assert got == (flow if arch == "anima" else {})
    assert not any(f"--{f.name}" in plain for f in fields(ObjectiveOptions) if f"--{f.name}" not in flow)


def test_optimizer_args_parse_and_reach_the_optimizer():
    from lycoris_core.train.optimizers import available_optimizers, build, parse_optimizer_args

    args = parse_optimizer_args("weight_decay=0.1 betas=0.9,0.99 eps=1e-7 amsgrad=true")
    assert args == {"weight_decay": 0.1, "betas": (0.9, 0.99), "eps": 1e-7, "amsgrad": True}
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build("AdamW", [{"params": [p]}], 1e-3, {"weight_decay": 0.01}, args)
    g = opt.param_groups[0]
    assert (g["weight_decay"], g["betas"], g["eps"], g["amsgrad"]) == (0.1, (0.9, 0.99), 1e-7, True)
    assert build("AdamW", [{"params": [p]}], 1e-3, {"weight_decay": 0.01}, {}).param_groups[0][
        "weight_decay"] == 0.01                                   # sd-scripts: torch's default
    for bad, name in [("momentum=0.9", "momentum"), ("betas=0.9,1.2", "betas"), ("eps=0", "eps"),
                      ("weight_decay=-1", "weight_decay"), ("eps=nan", "eps"), ("x", "key=value"),
                      ("lr=__import__('os')", "lr")]:
        with pytest.raises(ValueError, match=name):
            build("AdamW", [{"params": [p]}], 1e-3, {}, parse_optimizer_args(bad))
    assert available_optimizers()[:4] == ("AdamW", "Adam", "SGD", "Adafactor")
    for extra, package in [("Lion", "lion-pytorch"), ("Prodigy", "prodigyopt"),
                           ("AdamW8bit", "bitsandbytes")]:
        if extra not in available_optimizers():   # not installed here: offered only when it is
            with pytest.raises(ValueError, match=package):
                build(extra, [{"params": [p]}], 1e-3, {}, {})
