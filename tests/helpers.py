"""Small shared test utilities (no ComfyUI imports here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got − want| / max|want| (the fixtures' 'rel' measure)."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def golden_cases(fixtures: Path) -> list[str]:
    """The golden case names; an error (not an empty list, which pytest would skip) if none."""
    cases = sorted(p.name[: -len(".expected.safetensors")] for p in fixtures.glob("*.expected.safetensors"))
    if not cases:
        raise RuntimeError(f"no golden cases in {fixtures}: the reference fixtures are missing "
                           "(expected ../shared/fixtures beside the checkout, or set LYCORIS_FIXTURES)")
    return cases


def case_arch(fixtures: Path, case: str) -> str:
    index = json.loads((fixtures / "index.json").read_text())
    entry = index["cases"][case] if "cases" in index else index[case]
    return entry.get("arch") or ("anima" if case.startswith("anima") else "sdxl")
