"""Small shared test utilities (no ComfyUI imports here)."""

from __future__ import annotations

import goldens
import torch

import lycoris_core as lc


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max|got − want| / max|want| (the fixtures' 'rel' measure)."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def golden_model_weights(case: str) -> dict:
    """Full-size manifest of a golden case's architecture {key: shape}, with the W0 values
    (float32) where its DoRA needs them."""
    weights: dict = dict(lc.manifest(goldens.arch(case)))
    weights.update(goldens.base_weights(case))
    return weights
