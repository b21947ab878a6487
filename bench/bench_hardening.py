"""Parsers of user text and user patterns: linear time, and a runaway pattern refused at once.

    .venv/bin/python -m bench.bench_hardening [--quick]

- parse_schedule / parse_block_weights / parse_kv at 2.5k, 5k and 10k items (the 10k-item cap,
  text under the 64 KiB cap): median ms, the reference being `float()` on the same numbers in a
  plain loop (the least any parser must do); `growth` = t(10k) / t(2.5k) (linear: ≈ 4,
  quadratic: 16; the old parsers, which built each number's error message from the whole text,
  took 0.69 s / 2.7 s / 10.7 s at 5k / 10k / 20k keyframes);
- a runaway pattern `(\\w|\\.|\\w\\w)+[a-z]` in exclude_patterns over the full-size SDXL layers:
  time until the error with the `regex` engine (timeout) and the `re` fallback (refused before
  matching); `re.fullmatch` alone on one 30-character path is given as the reference (the old code
  ran it on every layer, up to 55 characters: the server froze).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

from lycoris_core import manifest
from lycoris_core import patterns as pat
from lycoris_core.blocks import parse_block_weights
from lycoris_core.schedule import parse_schedule
from lycoris_core.train.targets import TargetOptions, parse_kv, targets_from_shapes

from .common import format_table, row

RUNAWAY = r"(\w|\.|\w\w)+[a-z]"


def _median_ms(fn, *args, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _texts(n: int) -> dict[str, tuple[str, list[str]]]:
    nums = [str(i % 10) for i in range(n)]
    return {"schedule": (",".join(f"{i % 100}%:{v}" for i, v in enumerate(nums)), nums),
            "block_weights": (",".join(f"B{i % 28}={v}" for i, v in enumerate(nums)), nums),
            "reg_dims": (",".join(f"{chr(97 + i % 26)}={v}" for i, v in enumerate(nums)), nums)}


PARSERS = {"schedule": parse_schedule, "block_weights": parse_block_weights,
           "reg_dims": lambda t: parse_kv(t, int)}


def _floats(nums: list[str]) -> None:
    for s in nums:
        float(s)


def main(quick: bool = False) -> dict:
    rows = []
    repeat = 3 if quick else 7
    for name, parse in PARSERS.items():
        times = {}
        for n in (2500, 5000, 10_000):
            text, nums = _texts(n)[name]
            times[n] = _median_ms(parse, text, repeat=repeat)
            ref = _median_ms(_floats, nums, repeat=repeat)
            rows.append(row("hardening", f"{name} {n} items", times[n], {"float_loop": ref},
                            chars=len(text)))
        rows.append(row("hardening", f"{name} growth 10k/2.5k", times[10_000] / times[2500], {},
                        unit="×", ratios={"linear=4, quadratic=16": None}))
    shapes = {k: tuple(s) for k, s in manifest("sdxl").items()}
    one_path = "input_blocks.4.1.transformer_blocks.0"[:29] + "0"  # 30 characters, no full match
    t0 = time.perf_counter()
    re.fullmatch(RUNAWAY, one_path)  # ~1.6× per extra character; SDXL paths reach 55
    ref = (time.perf_counter() - t0) * 1e3
    for engine in ("regex", "re"):
        saved = pat.ENGINE
        pat.ENGINE = engine
        try:
            t0 = time.perf_counter()
            try:
                targets_from_shapes(shapes, TargetOptions(exclude_patterns=[RUNAWAY]), "sdxl")
                raise AssertionError("the runaway pattern was not refused")
            except pat.PatternError:
                pass
            ms = (time.perf_counter() - t0) * 1e3
        finally:
            pat.ENGINE = saved
        rows.append(row("hardening", f"runaway pattern refused ({engine})", ms,
                        {"re.fullmatch, one 30-char path": ref}))
    return {"rows": rows}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    print(format_table(main(ap.parse_args().quick)["rows"]))
