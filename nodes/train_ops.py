"""Differentiable paths for ComfyUI's fused ops that have no autograd formula, while training.

Current ComfyUI (0.28+) runs parts of its models through comfy-kitchen's fused ops, registered
with `torch.library.custom_op` but without a backward: a backward through one of them fails
("no autograd formula was registered"). Anima's (and Cosmos-Predict2's) DiT self-attention calls
`comfy_kitchen.rms_rope_split_half` at every forward, so no trainer can train it as is. The ops
of this kind on SDXL's and Anima's training paths were found by tracing every op a training
step dispatches (tests/test_train_ops.py); comfy-kitchen's whole rotary-embedding family lacks
a backward, so all of it is covered, not only the op these models call today.

`differentiable_ops()` is active only while TrainLyCORIS trains. Inside it, a call of one of
these ops that autograd must record (grad enabled and a tensor argument requiring grad) runs
comfy-kitchen's own pure-torch implementation of the op instead (its `eager` backend: the code
the fused op itself runs on CPU, so the values are the same); every other call, e.g. inference
or an evaluation under `no_grad`, still goes to the fused op. ComfyUI's own training flag
(`comfy.model_management.in_training`, which some of its models read to pick their
differentiable path) is set as ComfyUI's trainer sets it. On exit, normal or by an error or a
Cancel, every attribute is put back to the object it was.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
from collections.abc import Callable, Iterator

import torch

log = logging.getLogger("lycoris_nodes")

KITCHEN_OPS = ("apply_rope", "apply_rope1", "apply_rope_split_half", "apply_rope_split_half1",
               "rms_rope", "rms_rope1", "rms_rope_split_half", "rms_rope_split_half1")
"""comfy-kitchen's public functions that dispatch to a custom op without autograd formula
(`torch.ops.comfy_kitchen.<name>`), each with a pure-torch twin of the same name and signature
in `comfy_kitchen.backends.eager`."""


def _needs_grad(args: tuple, kwargs: dict) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad
               for a in (*args, *kwargs.values()))


def routed(fused: Callable, twin: Callable) -> Callable:
    """`fused` for calls autograd does not record, `twin` (differentiable) for those it does."""
    @functools.wraps(fused)
    def op(*args, **kwargs):
        if _needs_grad(args, kwargs):
            return twin(*args, **kwargs)
        return fused(*args, **kwargs)
    return op


def substitutes() -> list[tuple[object, str, Callable]]:
    """(module, attribute, differentiable twin) for every fused op of this host that needs one;
    empty on hosts without comfy-kitchen (ComfyUI 0.3.75)."""
    try:
        kitchen = importlib.import_module("comfy_kitchen")
        eager = importlib.import_module("comfy_kitchen.backends.eager")
    except ImportError:
        return []
    return [(kitchen, name, getattr(eager, name)) for name in KITCHEN_OPS
            if callable(getattr(kitchen, name, None)) and callable(getattr(eager, name, None))]


@contextlib.contextmanager
def differentiable_ops() -> Iterator[None]:
    """While active, the fused ops without autograd formula take their differentiable twin
    whenever autograd records the call; everything is restored on exit (also on error/Cancel)."""
    saved: list[tuple[object, str, object]] = []
    try:
        for module, name, twin in substitutes():
            fused = getattr(module, name)
            saved.append((module, name, fused))
            setattr(module, name, routed(fused, twin))
        mm = importlib.import_module("comfy.model_management")
        if hasattr(mm, "in_training"):  # current ComfyUI; 0.3.75 has no such flag
            saved.append((mm, "in_training", mm.in_training))
            mm.in_training = True
        if saved:
            log.debug("TrainLyCORIS: differentiable paths for %s",
                      ", ".join(f"{m.__name__}.{n}" for m, n, _ in saved))
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)
