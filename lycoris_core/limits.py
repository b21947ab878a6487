"""Bounds on user-typed text and numbers: size caps, item caps, finite numbers in range.

Every parser of user text (schedules, block weights, pattern lists, network_reg_dims/lrs) runs
in linear time on text of at most `MAX_TEXT_CHARS` characters and `MAX_ITEMS` items; past a cap
the user gets a clear error instead of a long parse. Error messages quote the input only in a
short excerpt and are built only when an error happens (never once per item).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from .errors import AdapterError

MAX_TEXT_CHARS = 64 * 1024
"""Longest text a parser accepts (64 KiB)."""
MAX_ITEMS = 10_000
"""Most items (keyframes, rules, patterns) one text may hold."""
STRENGTH_LIMIT = 100.0
"""Strengths, weights and keyframe values lie in [-100, 100], as ComfyUI's strength widgets."""
EXCERPT_CHARS = 80

_SPLIT = re.compile(r"[,;\n]")


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """`repr` of `text` cut to about `limit` characters (for error messages)."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def bounded_text(text: str | None, what: str) -> str:
    """`text` stripped; `AdapterError` naming `what` when it is longer than `MAX_TEXT_CHARS`."""
    text = (text or "").strip()
    if len(text) > MAX_TEXT_CHARS:
        raise AdapterError(f"{what} is {len(text)} characters long; at most {MAX_TEXT_CHARS} "
                           "are accepted")
    return text


def split_items(text: str, what: str, pattern: re.Pattern[str] = _SPLIT) -> list[str]:
    """Non-empty stripped items of `text` split at `pattern` (`,` `;` newline), at most `MAX_ITEMS`."""
    items = [t for t in (s.strip() for s in pattern.split(text)) if t]
    check_count(len(items), what)
    return items


def check_count(n: int, what: str) -> None:
    if n > MAX_ITEMS:
        raise AdapterError(f"{what} has {n} items; at most {MAX_ITEMS} are accepted")


def check_strength(value: float, what: str) -> float:
    """A strength or weight given as a number (Python / CLI callers): finite, within ±100."""
    v = float(value)
    if not (math.isfinite(v) and -STRENGTH_LIMIT <= v <= STRENGTH_LIMIT):
        raise AdapterError(f"{what} is {v!r}; it must be a finite number in "
                           f"[{-STRENGTH_LIMIT:g}, {STRENGTH_LIMIT:g}]")
    return v


def number_in_range(s: str, where: Callable[[], str], lo: float = -STRENGTH_LIMIT,
                    hi: float = STRENGTH_LIMIT) -> float:
    """`float(s)`, finite and in [lo, hi]; else `AdapterError` with `where()` (called only then)."""
    try:
        value = float(s)
    except ValueError:
        raise AdapterError(f"'{s[:EXCERPT_CHARS]}' is not a number {where()}") from None
    if not math.isfinite(value):
        raise AdapterError(f"'{s[:EXCERPT_CHARS]}' is not a finite number {where()}")
    if not lo <= value <= hi:
        raise AdapterError(f"{s[:EXCERPT_CHARS]} is outside [{lo:g}, {hi:g}] {where()}")
    return value
