"""User-typed regular expressions with bounded matching time (TrainLyCORIS exclude_patterns,
include_patterns, network_reg_dims, network_reg_lrs).

Python's `re` backtracks: a pattern such as `(.+)+X` or `(\\w|\\w\\w)+[a-z]` takes time exponential
in the length of the module path, holds the GIL the whole time and cannot be interrupted, so one
such pattern froze the whole ComfyUI server. Two engines, chosen once at import (`ENGINE`):

- `"regex"` (the `regex` package, which every ComfyUI install has through `transformers`; it is
  not a declared dependency of lycoris_core): patterns compile with it (same syntax as `re`) and
  every match runs with a small `timeout=` (`MATCH_TIMEOUT_S`); a match that times out refuses
  the input at once.
- `"re"` (fallback when `regex` is not importable): the standard library can neither time out
  nor be interrupted, so a pattern is accepted only if its backtracking is provably small: no
  backreferences or conditionals, no variable-length repeat or alternation inside a repeat
  (`(a+)+`, `(a|ab)*`), and at most `MAX_VARIABLE_REPEATS` variable-length repeats in all (a
  failing full match then costs O(n^3) steps on a path of n < 200 characters: milliseconds).
  Anything else is refused with a message that says so.

In both, the time spent matching one input's patterns is summed and past `MATCH_BUDGET_S` the
input is refused with an error naming it, so a runaway pattern costs at most about that long.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable

from .limits import EXCERPT_CHARS

try:  # the engine with match timeouts; optional (see the module docstring)
    import regex as _regex
    _ERRORS: tuple[type[BaseException], ...] = (re.error, _regex.error, RecursionError, OverflowError)
except ImportError:  # pragma: no cover - every ComfyUI install has it
    _regex = None
    _ERRORS = (re.error, RecursionError, OverflowError)

try:
    from re import _constants as _sre_c
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _sre_c  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

ENGINE = "regex" if _regex is not None else "re"
"""Which engine compiles user patterns: "regex" (timeouts) or "re" (structural check)."""
MATCH_BUDGET_S = 0.25
"""Total matching time allowed for the patterns of one input (one call of `select_targets`)."""
MATCH_TIMEOUT_S = 0.02
"""`timeout=` of one `regex` match (an ordinary full match of a module path takes microseconds).
`regex` overshoots its timeout several times over (0.25 s took 1.9 s on a loaded 2-core machine,
0.01 s took 0.08 s), so the per-match timeout is small and the budget is summed here."""
MAX_PATTERN_CHARS = 1000
MAX_VARIABLE_REPEATS = 3

_REPEATS = {_sre_c.MAX_REPEAT, _sre_c.MIN_REPEAT} | (
    {_sre_c.POSSESSIVE_REPEAT} if hasattr(_sre_c, "POSSESSIVE_REPEAT") else set())


def _show(p: str) -> str:
    """The pattern as the user typed it (no escaping), cut to an excerpt."""
    return f"'{p[:EXCERPT_CHARS]}{'…' if len(p) > EXCERPT_CHARS else ''}'"


class PatternError(ValueError):
    """A user pattern is invalid, unsafe for the fallback engine, or too slow to match."""


def _refuse_reason(pattern: str) -> str | None:
    """Why the `re` fallback refuses `pattern` (None: its backtracking is bounded)."""
    count = 0

    def walk(items, in_repeat: bool) -> str | None:
        nonlocal count
        for op, av in items:
            if op in (_sre_c.GROUPREF, _sre_c.GROUPREF_EXISTS):
                return "backreferences and conditionals are not supported"
            if op in _REPEATS:
                lo, hi, sub = av
                variable = lo != hi
                if in_repeat and variable:
                    return "a variable-length repeat inside a repeat backtracks exponentially"
                count += variable
                why = walk(sub, in_repeat or hi > 1)
            elif op == _sre_c.BRANCH:
                if in_repeat:
                    return "an alternation inside a repeat backtracks exponentially"
                why = next(filter(None, (walk(alt, in_repeat) for alt in av[1])), None)
            elif op == _sre_c.SUBPATTERN:
                why = walk(av[-1], in_repeat)
            elif op in (_sre_c.ASSERT, _sre_c.ASSERT_NOT):
                why = walk(av[1], in_repeat)
            elif op == getattr(_sre_c, "ATOMIC_GROUP", None):
                why = walk(av, in_repeat)
            else:
                why = None
            if why:
                return why
        return None

    why = walk(_sre_parse.parse(pattern), False)
    if why is None and count > MAX_VARIABLE_REPEATS:
        why = f"more than {MAX_VARIABLE_REPEATS} variable-length repeats (*, +, ?, {{m,n}})"
    return why


class PatternSet:
    """The compiled patterns of one user input (e.g. `exclude_patterns`), matched with a time budget.

    `first(path)` is the index of the first pattern that fully matches `path` (None: none does).
    Raises `PatternError` naming the input when a pattern is invalid, refused, or when matching
    has used up `budget` seconds in total.
    """

    def __init__(self, patterns: Iterable[str], what: str, *, engine: str | None = None,
                 budget: float = MATCH_BUDGET_S):
        self.what = what
        self.engine = engine or ENGINE
        self.budget = budget
        self.spent = 0.0
        self.patterns = list(patterns)
        self._compiled = [self._compile(p) for p in self.patterns]

    def _compile(self, p: str):
        if not isinstance(p, str):
            raise PatternError(f"{self.what}: patterns must be strings, got {type(p).__name__}")
        if len(p) > MAX_PATTERN_CHARS:
            raise PatternError(f"{self.what}: the pattern {_show(p)} is {len(p)} characters long; "
                               f"at most {MAX_PATTERN_CHARS} are accepted")
        try:
            compiled = re.compile(p)  # the syntax users know (sd-scripts uses `re`)
            if self.engine == "regex":
                return _regex.compile(p)
        except _ERRORS as exc:
            raise PatternError(f"{self.what}: invalid regular expression {_show(p)}: {exc}") from None
        why = _refuse_reason(p)
        if why:
            raise PatternError(f"{self.what}: the pattern {_show(p)} is refused: {why} (without the "
                               "'regex' package, patterns are limited to forms that cannot run away); "
                               "simplify it")
        return compiled

    def _too_slow(self, p: str) -> PatternError:
        return PatternError(
            f"{self.what}: the pattern {_show(p)} takes too long to match the module paths (more "
            f"than {self.budget:g} s in all; a repeat of something that can match in several ways, "
            "such as '(.+)+' or '(a|aa)*', backtracks exponentially); simplify it")

    def first(self, subject: str) -> int | None:
        for i, (p, c) in enumerate(zip(self.patterns, self._compiled, strict=True)):
            left = self.budget - self.spent
            if left <= 0:
                raise self._too_slow(p)
            t0 = time.perf_counter()
            try:
                hit = (c.fullmatch(subject, timeout=min(left, MATCH_TIMEOUT_S)) if self.engine == "regex"
                       else c.fullmatch(subject))
            except TimeoutError:
                raise self._too_slow(p) from None
            finally:
                self.spent += time.perf_counter() - t0
            if self.spent > self.budget:
                raise self._too_slow(p)
            if hit is not None:
                return i
        return None

    def any(self, subject: str) -> bool:
        return self.first(subject) is not None
