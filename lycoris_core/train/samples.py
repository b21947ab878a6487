"""Sample prompts for images made while training, in sd-scripts' prompt-file format (pure).

One prompt per line; `#` lines and blank lines are skipped. Options follow the prompt as in
sd-scripts: `--n <negative prompt>`, `--w <width>`, `--h <height>`, `--s <steps>`,
`--l <cfg scale>`, `--d <seed>`. Sizes are rounded down to a multiple of 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_PROMPTS = 32
MAX_PROMPT_CHARS = 4096


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int = 512
    height: int = 512
    steps: int = 30
    cfg: float = 7.5
    seed: int | None = None   # None: the run's seed


def _number(key: str, text: str, line_no: int, kind, lo: float, hi: float):
    try:
        v = kind(text.strip())
    except ValueError:
        raise ValueError(f"sample_prompts line {line_no}: --{key} needs a number, got {text.strip()!r}") from None
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"sample_prompts line {line_no}: --{key} {v} is outside [{lo}, {hi}]")
    return v


def parse_sample_prompts(text: str) -> list[SamplePrompt]:
    """The prompts of `text` (see the module docstring). ValueError naming the line when an
    option is unknown or out of range, or when there are more than MAX_PROMPTS prompts."""
    out: list[SamplePrompt] = []
    for line_no, raw in enumerate((text or "").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_PROMPT_CHARS:
            raise ValueError(f"sample_prompts line {line_no}: longer than {MAX_PROMPT_CHARS} characters")
        parts = (" " + line).split(" --")
        fields: dict = {"prompt": parts[0].strip()}
        for part in parts[1:]:
            key, _, value = part.partition(" ")
            if key == "n":
                fields["negative"] = value.strip()
            elif key in ("w", "h"):
                v = _number(key, value, line_no, int, 8, 8192)
                fields["width" if key == "w" else "height"] = v - v % 8
            elif key == "s":
                fields["steps"] = _number(key, value, line_no, int, 1, 200)
            elif key == "l":
                fields["cfg"] = _number(key, value, line_no, float, 0.0, 100.0)
            elif key == "d":
                fields["seed"] = _number(key, value, line_no, int, 0, 2**32 - 1)
            else:
                raise ValueError(f"sample_prompts line {line_no}: unknown option --{key} (known: "
                                 "--n --w --h --s --l --d)")
        out.append(SamplePrompt(**fields))
        if len(out) > MAX_PROMPTS:
            raise ValueError(f"sample_prompts: more than {MAX_PROMPTS} prompts")
    return out


def sample_steps(every: int, total: int, start: int = 0) -> list[int]:
    """The optimizer steps after which samples are made: every `every`-th step in (start, total]."""
    if every <= 0:
        return []
    return [s for s in range(every, total + 1, every) if s > start]
