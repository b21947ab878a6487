"""lycoris_core.schedule: text format, presets, interpolation, percent ↔ sigma, curve image."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lycoris_core import AdapterError
from lycoris_core.schedule import (
    PRESETS,
    Keyframe,
    Schedule,
    parse_schedule,
    percent_along_sigmas,
    percent_from_sigma,
    render_curve,
)


def test_text_format_keyframes_percent_signs_and_keywords():
    s = parse_schedule("cosine; 0:1, 40%:1\n100% = 0.2")
    assert s.interpolation == "cosine"
    assert s.keyframes == (Keyframe(0.0, 1.0), Keyframe(0.4, 1.0), Keyframe(1.0, 0.2))
    assert parse_schedule("1:0, 0:1").keyframes[0] == Keyframe(0.0, 1.0)  # sorted
    assert parse_schedule("").at(0.3) == 1.0 and parse_schedule(None).is_constant


@pytest.mark.parametrize("text,needle", [
    ("0:1, 150%:0", "150%"), ("0:x", "'x' is not a number"), ("wobble", "wobble"),
    ("0:inf", "finite"), ("-0.1:1", "outside"),
])
def test_bad_text_names_the_item(text, needle):
    with pytest.raises(AdapterError, match=needle):
        parse_schedule(text)
    with pytest.raises(ValueError):  # AdapterError is a ValueError: the UI shows it
        parse_schedule(text)


def test_interpolations_by_hand():
    kf = "0:1, 50%:0.2, 1:0.6"
    lin, cos, hold = (parse_schedule(kf, m) for m in ("linear", "cosine", "hold"))
    assert lin.at(0.25) == pytest.approx(0.6, abs=1e-12)
    assert lin.at(0.75) == pytest.approx(0.4, abs=1e-12)
    assert cos.at(0.25) == pytest.approx(1 - 0.8 * (1 - math.cos(math.pi / 2)) / 2, abs=1e-12)
    assert cos.at(0.125) == pytest.approx(1 - 0.8 * (1 - math.cos(math.pi / 4)) / 2, abs=1e-12)
    assert hold.at(0.49) == 1.0 and hold.at(0.5) == 0.2 and hold.at(0.99) == 0.2
    assert hold.at(1.0) == 0.6
    for s in (lin, cos, hold):  # clamped outside [0, 1], exact at keyframes
        assert s.at(-1) == 1.0 and s.at(2) == 0.6 and s.at(0.5) == 0.2


def test_jumps_and_holding_outside_keyframes():
    s = parse_schedule("30%:2, 0.6:2, 0.6:0")
    assert s.at(0.0) == 2.0 and s.at(0.59) == 2.0 and s.at(0.6) == 0.0 and s.at(1.0) == 0.0


def test_presets_are_valid_and_expand_in_text():
    for name in PRESETS:
        s = parse_schedule(name)
        assert all(0.0 <= k.percent <= 1.0 for k in s.keyframes)
    assert parse_schedule("fade_out").at(0.25) == pytest.approx(0.75)
    assert parse_schedule("Fade-In").at(0.25) == pytest.approx(0.25)
    assert parse_schedule("pulse, cosine").at(0.5) == 1.0
    assert parse_schedule("first_half", "linear").at(0.49) == 1.0
    assert parse_schedule("first_half", "linear").at(0.5) == 0.0
    assert parse_schedule("constant").is_constant


def test_unknown_interpolation_and_empty_keyframes():
    with pytest.raises(AdapterError, match="interpolation"):
        Schedule((Keyframe(0, 1),), "spline")
    with pytest.raises(AdapterError, match="at least one"):
        Schedule(())


def test_percent_along_sigmas_steps_and_between():
    sigmas = [10.0, 6.0, 3.0, 1.0, 0.0]  # 4 steps
    assert [percent_along_sigmas(s, sigmas) for s in sigmas[:-1]] == [0.0, 0.25, 0.5, 0.75]
    assert percent_along_sigmas(4.5, sigmas) == pytest.approx(0.25 + 0.5 / 4)
    assert percent_along_sigmas(99.0, sigmas) == 0.0 and percent_along_sigmas(-1.0, sigmas) == 1.0
    assert percent_along_sigmas(3.0, [3.0]) == 0.0


@settings(derandomize=True, database=None, deadline=None)  # the same examples on every run
@given(st.floats(0.001, 0.999))
def test_percent_from_sigma_inverts_a_decreasing_map(p):
    def p2s(q: float) -> float:  # a log-linear noise schedule like ComfyUI's EDM one
        return math.exp(math.log(0.03) + (1 - q) * (math.log(14.6) - math.log(0.03)))

    assert percent_from_sigma(p2s(p), p2s) == pytest.approx(p, abs=1e-8)
    assert p2s(percent_from_sigma(p2s(p), p2s)) <= p2s(p)  # never before a keyframe at p


def test_curve_image_draws_the_schedule():
    s = parse_schedule("0:0, 1:1")
    img = render_curve(s, 256, 128, steps=4)
    assert img.shape == (128, 256, 3) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    curve = np.array([0.35, 0.75, 1.0], np.float32)
    # the curve pixel of each column rises from the 0-line (bottom) to the 1-line (top)
    rows = [int(np.nonzero((img[:, x] == curve).all(-1))[0].mean()) for x in (40, 100, 220)]
    assert rows[0] > rows[1] > rows[2]
    flat = render_curve(parse_schedule("0:1"), 256, 128)
    assert not np.array_equal(flat, img)


def test_at_sigma_switches_like_comfyui_hook_keyframes():
    """A keyframe starts once sigma <= percent_to_sigma(its percent), even on a map whose float
    rounding makes the bisection land a hair before the keyframe."""
    def p2s(q: float) -> float:
        return 999999999.9 if q <= 0 else (0.0 if q >= 1 else float(np.float32(10 * (1 - q))))

    hold = parse_schedule("0:1, 0.4:0.3, 0.7:0.8", "hold")
    assert hold.at_sigma(p2s(0.4), p2s) == 0.3
    assert hold.at_sigma(np.nextafter(p2s(0.4), 99), p2s) == 1.0
    assert hold.at_sigma(p2s(0.7), p2s) == 0.8 and hold.at_sigma(20.0, p2s) == 1.0
    lin = parse_schedule("0:1, 0.4:0.2, 1:0.6", "linear")
    assert lin.at_sigma(p2s(0.2), p2s) == pytest.approx(0.6, abs=1e-6)
    assert lin.at_sigma(p2s(0.7), p2s) == pytest.approx(0.4, abs=1e-6)
    assert lin.at_sigma(0.0, p2s) == 0.6
