"""The one exception type the pack raises for bad adapter input."""

from __future__ import annotations


class AdapterError(ValueError):
    """An adapter file or module is unusable.

    The message always names the file (when there is one) and the offending key, so that a
    user who sees it in ComfyUI's error panel knows which file to fix and where.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        self.detail = message  # the message without the file prefix (to name the file otherwise)
        parts = []
        if file:
            parts.append(f"{file}")
        if key:
            parts.append(f"key '{key}'")
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)


def finite_number(s: str, where: str) -> float:
    """`float(s)` for a number a user typed; `AdapterError` naming `where` if it is not finite.
    (Kept for callers; the parsers use `limits.number_in_range`, which also bounds the value.)"""
    from .limits import number_in_range  # limits imports this module

    return number_in_range(s, lambda: where, float("-inf"), float("inf"))
