"""Strength schedules over sampling: keyframes, interpolation, presets, text format, curve image.

Pure (numpy/torch only, no ComfyUI). A schedule maps the progress of sampling, a *percent* in
[0, 1] (0 = first step, 1 = end), to a strength multiplier.

Text format (what users type), items separated by `,` `;` or newlines:

- `P:S` keyframes: percent `P` as a fraction (`0.5`) or with `%` (`50%`), strength `S`
  (`P=S` works too). Two keyframes at the same percent make a jump (the later one wins there).
- a preset name (`fade_out`, `pulse`, …; see `PRESETS`), expanded in place;
- an interpolation keyword `hold`, `linear` or `cosine` (overrides the default).

Before the first keyframe the first strength holds, after the last the last one holds.
Example: `cosine; 0:1, 40%:1, 100%:0.2` — full strength for 40 %, then a smooth fade to 0.2.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import AdapterError
from .limits import bounded_text, excerpt, number_in_range, split_items

INTERPOLATIONS = ("linear", "cosine", "hold")

PRESETS: dict[str, str] = {
    "constant": "0:1",
    "fade_in": "0:0, 1:1",
    "fade_out": "0:1, 1:0",
    "pulse": "0:0, 0.5:1, 1:0",
    "dip": "0:1, 0.5:0, 1:1",
    "hold_then_fade": "0:1, 0.5:1, 1:0",
    "fade_in_then_hold": "0:0, 0.5:1, 1:1",
    "first_half": "0:1, 0.5:1, 0.5:0",
    "second_half": "0:0, 0.5:0, 0.5:1",
    "composition": "0:1, 0.3:1, 0.3:0",
    "details": "0:0, 0.6:0, 0.6:1",
}
"""Named presets: keyframes (strength multipliers), interpolated with the chosen method."""

PRESET_HELP: dict[str, str] = {
    "constant": "1 throughout (same as the plain loader)",
    "fade_in": "0 → 1 over the whole run",
    "fade_out": "1 → 0 over the whole run",
    "pulse": "0 → 1 at 50 % → 0",
    "dip": "1 → 0 at 50 % → 1",
    "hold_then_fade": "1 for the first half, then fades to 0",
    "fade_in_then_hold": "0 → 1 over the first half, then 1",
    "first_half": "1 for the first half, then off",
    "second_half": "off for the first half, then 1",
    "composition": "1 for the first 30 % only (composition), then off",
    "details": "off until 60 %, then 1 (details only)",
}


@dataclass(frozen=True)
class Keyframe:
    percent: float
    strength: float


@dataclass(frozen=True)
class Schedule:
    """Keyframes sorted by percent (stable: equal percents keep their order) and an interpolation."""

    keyframes: tuple[Keyframe, ...]
    interpolation: str = "linear"
    text: str = ""

    def __post_init__(self) -> None:
        if not self.keyframes:
            raise AdapterError("a strength schedule needs at least one keyframe")
        if self.interpolation not in INTERPOLATIONS:
            raise AdapterError(f"unknown interpolation {self.interpolation!r}; use one of "
                               f"{', '.join(INTERPOLATIONS)}")
        ordered = tuple(sorted(self.keyframes, key=lambda k: k.percent))
        object.__setattr__(self, "keyframes", ordered)

    @property
    def is_constant(self) -> bool:
        return len({k.strength for k in self.keyframes}) == 1

    def at(self, percent: float) -> float:
        """Strength at `percent` (clamped to [0, 1])."""
        p = min(1.0, max(0.0, float(percent)))
        kfs = self.keyframes
        percents = [k.percent for k in kfs]
        started = bisect.bisect_right(percents, p)  # keyframes at or before p
        return self._value(started, lambda: p)

    def at_sigma(self, sigma: float, percent_to_sigma: Callable[[float], float]) -> float:
        """Strength at a model call of noise level `sigma`, keyframes placed at
        `percent_to_sigma(percent)` (ComfyUI's model-sampling percent). A keyframe has started
        once `sigma <= its sigma`, exactly as ComfyUI's hook keyframes switch; between two
        started keyframes the percent (by bisection) interpolates."""
        kfs = self.keyframes
        started = sum(1 for k in kfs if sigma <= float(percent_to_sigma(k.percent)))
        return self._value(started, lambda: percent_from_sigma(sigma, percent_to_sigma))

    def _value(self, started: int, percent: Callable[[], float]) -> float:
        """Strength when the first `started` keyframes have started; `percent()` (called only to
        interpolate) gives the position between the last started keyframe and the next."""
        kfs = self.keyframes
        if started == 0:
            return kfs[0].strength
        if started == len(kfs):
            return kfs[-1].strength
        a, b = kfs[started - 1], kfs[started]
        if self.interpolation == "hold" or a.percent == b.percent:
            return a.strength
        return self._between(a, b, percent())

    def _between(self, a: Keyframe, b: Keyframe, p: float) -> float:
        """Interpolated strength at `p` between keyframes a and b (a.percent < b.percent)."""
        t = min(1.0, max(0.0, (p - a.percent) / (b.percent - a.percent)))
        if self.interpolation == "cosine":
            t = (1.0 - math.cos(math.pi * t)) / 2.0
        return a.strength + (b.strength - a.strength) * t

    def describe(self) -> str:
        kf = ", ".join(f"{k.percent * 100:g}%:{k.strength:g}" for k in self.keyframes)
        return f"{self.interpolation}; {kf}"


def _percent(s: str, where) -> float:
    s = s.strip()
    if s.endswith("%"):
        return number_in_range(s[:-1], lambda: f"(percent) {where()}", 0.0, 100.0) / 100.0
    p = number_in_range(s, lambda: f"(percent) {where()}", -math.inf, math.inf)
    if not 0.0 <= p <= 1.0:
        raise AdapterError(f"keyframe percent '{s[:80]}' is outside 0–1 (0 %–100 %) {where()}")
    return p


def parse_schedule(text: str | None, interpolation: str = "linear") -> Schedule:
    """Parse the text format of the module docstring. Empty text → constant 1.

    Linear time; at most `limits.MAX_TEXT_CHARS` characters and `limits.MAX_ITEMS` items;
    strengths finite and within ±`limits.STRENGTH_LIMIT`. Raises `AdapterError` (a ValueError)
    naming the offending item.
    """
    text = bounded_text(text, "the schedule")
    keyframes: list[Keyframe] = []
    interp = interpolation

    def where() -> str:  # built only for an error message
        return f"in schedule {excerpt(text)}"

    for item in split_items(text, "the schedule"):
        word = item.lower().replace("-", "_").replace(" ", "_")
        if word in INTERPOLATIONS:
            interp = word
            continue
        if word in PRESETS:
            keyframes += parse_schedule(PRESETS[word]).keyframes
            continue
        sep = ":" if ":" in item else ("=" if "=" in item else None)
        if sep is None:
            raise AdapterError(f"'{item[:80]}' is neither a keyframe PERCENT:STRENGTH, an interpolation "
                               f"({', '.join(INTERPOLATIONS)}) nor a preset ({', '.join(PRESETS)}) "
                               f"{where()}")
        p, _, s = item.partition(sep)
        keyframes.append(Keyframe(_percent(p, where),
                                  number_in_range(s.strip(), lambda: f"(strength) {where()}")))
    if not keyframes:
        keyframes = [Keyframe(0.0, 1.0)]
    return Schedule(tuple(keyframes), interp, text)


# --------------------------------------------------------------------------------------------
# percent ↔ sigma
# --------------------------------------------------------------------------------------------

def percent_along_sigmas(sigma: float, sigmas: Sequence[float]) -> float:
    """Progress of `sigma` along a sampler's decreasing sigma list (n steps → n + 1 values).

    Step i (the model call at sigmas[i]) is at percent i / n; sigmas between two steps (multi-call
    samplers) get the linear position in between; outside the list it is clamped to [0, 1].
    """
    s = [float(x) for x in sigmas]
    n = len(s) - 1
    if n < 1:
        return 0.0
    if sigma >= s[0]:
        return 0.0
    for i in range(n):
        hi, lo = s[i], s[i + 1]
        if hi >= sigma >= lo:
            frac = 0.0 if hi == lo else (hi - sigma) / (hi - lo)
            return (i + frac) / n
    return 1.0


def percent_from_sigma(sigma: float, percent_to_sigma: Callable[[float], float],
                       iterations: int = 30) -> float:
    """Invert a decreasing `percent_to_sigma` (ComfyUI's model-sampling percent, as hooks and
    ControlNet ranges use) by bisection, to 2⁻³⁰. Returns the upper end of the final bracket, so a
    sigma exactly at a keyframe's `percent_to_sigma` lands on (not just before) that keyframe, as
    ComfyUI's hook keyframes switch at `sigma <= percent_to_sigma(start_percent)`."""
    lo, hi = 0.0, 1.0
    if sigma >= float(percent_to_sigma(1e-9)):
        return 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2.0
        if float(percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return hi


# --------------------------------------------------------------------------------------------
# curve image
# --------------------------------------------------------------------------------------------

_BG = (0.11, 0.11, 0.13)
_GRID = (0.25, 0.25, 0.28)
_AXIS = (0.45, 0.45, 0.5)
_CURVE = (0.35, 0.75, 1.0)
_KEY = (1.0, 0.7, 0.25)
_STEP = (0.9, 0.9, 0.9)


def render_curve(schedule: Schedule, width: int = 256, height: int = 128,
                 steps: int | None = None) -> np.ndarray:
    """The schedule drawn as an RGB float32 image of shape (height, width, 3), values in [0, 1].

    x: percent 0 → 1; y: strength, range [min(0, lowest), max(1, highest)]; grid lines every
    25 %, strength 0 and 1 lines brighter, keyframes as orange squares, and with `steps` the
    strength each of `steps` equally spaced steps gets as white dots.
    """
    img = np.empty((height, width, 3), np.float32)
    img[:] = _BG
    pad = 4
    x0, x1, y0, y1 = pad, width - 1 - pad, pad, height - 1 - pad
    values = [k.strength for k in schedule.keyframes]
    lo, hi = min(0.0, *values), max(1.0, *values)

    def px(p: float) -> int:
        return int(round(x0 + p * (x1 - x0)))

    def py(s: float) -> int:
        return int(round(y1 - (s - lo) / (hi - lo) * (y1 - y0)))

    for q in (0.25, 0.5, 0.75):
        img[y0:y1 + 1, px(q)] = _GRID
    for level in (0.0, 1.0):
        img[py(level), x0:x1 + 1] = _AXIS
    img[y0:y1 + 1, x0] = _AXIS
    img[y0:y1 + 1, x1] = _AXIS
    prev = None
    for x in range(x0, x1 + 1):
        y = py(schedule.at((x - x0) / (x1 - x0)))
        a, b = (y, y) if prev is None else (min(prev, y), max(prev, y))
        img[a:b + 1, x] = _CURVE
        if x + 1 <= x1:
            img[y, x + 1] = _CURVE  # 2 px wide
        prev = y
    for k in schedule.keyframes:
        cx, cy = px(k.percent), py(k.strength)
        img[max(0, cy - 2):cy + 3, max(0, cx - 2):cx + 3] = _KEY
    if steps:
        for i in range(steps):
            p = i / steps
            cx, cy = px(p), py(schedule.at(p))
            img[max(0, cy - 1):cy + 2, max(0, cx - 1):cx + 2] = _STEP
    return img
