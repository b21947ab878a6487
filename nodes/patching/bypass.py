"""Bypass mode: LyCORIS modules applied at forward time, y = f(x) + s·h(x); weights never written.

The model carries one ComfyUI `PatcherInjection` per adapter load (key `INJECTION_PREFIX.<id>`).
When ComfyUI injects the model (it does so after every load, fully or in low-VRAM partial mode,
and ejects it before unloading or re-loading), the injection registers a torch forward hook on
each adapted Linear / ConvNd module; eject removes them. The hook adds
`lycoris_core.algos.bypass.BypassPlan.change` to the layer's output: the math (no ΔW formed,
float32, DoRA exact) lives in lycoris_core. Nothing is added to the patcher's weight patches, so
ComfyUI keeps no backup of these weights and a strength change re-patches nothing.

Why forward hooks (core's bypass replaces `module.forward`): hooks run after whatever forward the
module has, so they stack with ComfyUI's weight patches (they change the weight f uses), with
core's bypass adapters and with a second bypass adapter on the same layer, in any inject/eject
order, and they cannot leave a stale forward behind.

Strength: every hook reads `holder.value × layer strength` at each call (`Strength`): a schedule
changes `holder.value` per model evaluation and nothing else.

Which patcher owns the hooks: clones share the injection object and the model, and ComfyUI copies
`is_injected` to clones, so hooks are registered once per model and kept while any patcher that
injected them is alive and not ejected (a weak set); a hook whose owners are all gone removes
itself on its next call.

A module that cannot run in bypass falls back to the patch path for that module alone, with the
reason in the load report (`bypass_plan` returns them): a weight that is not a Linear/ConvNd
layer's `.weight`, a grouped / transposed / non-zero-padded conv, and input-axis DoRA
(`dora_scale` (1, I): its rescale acts on the layer input).
"""

from __future__ import annotations

import logging
import uuid
import weakref
from dataclasses import dataclass, field

import comfy.model_patcher
import comfy.patcher_extension
import torch

from ...lycoris_core.algos import AdapterModule
from ...lycoris_core.algos.bypass import BypassPlan
from ...lycoris_core.algos.layer import LayerGeometry

log = logging.getLogger("lycoris_nodes")

INJECTION_PREFIX = "lycoris_nodes.bypass"
MODES = ("patch", "bypass")


@dataclass
class Strength:
    """The strength multiplier every hook of one adapter reads at each forward."""

    value: float = 1.0


@dataclass
class BypassLayer:
    """One adapted weight applied at forward time: `key` (…​.weight) of the module at `path`."""

    key: str
    path: str
    plan: BypassPlan
    strength: float  # strength_model / strength_clip × block multiplier

    @property
    def module(self) -> AdapterModule:
        return self.plan.module


def geometry_of(layer: torch.nn.Module, weight_shape: tuple[int, ...]) -> LayerGeometry | str:
    """The layer's geometry, or why bypass cannot run it (a reason for the report)."""
    name = type(layer).__name__
    if isinstance(layer, torch.nn.modules.conv._ConvNd):
        if layer.transposed:
            return f"transposed convolution ({name})"
        if layer.groups != 1:
            return f"grouped convolution (groups={layer.groups})"
        if layer.padding_mode != "zeros":
            return f"convolution with padding_mode '{layer.padding_mode}'"
        if len(weight_shape) != 2 + len(layer.kernel_size):
            return f"weight {list(weight_shape)} does not fit the {name}"
        return LayerGeometry.convolution(weight_shape, layer.stride, layer.padding, layer.dilation)
    linear = isinstance(layer, torch.nn.Linear) or (
        name == "Linear" and hasattr(layer, "in_features") and hasattr(layer, "out_features"))
    if linear and len(weight_shape) == 2:
        return LayerGeometry.linear(*weight_shape)
    return f"not a Linear/Conv layer ({name})"


def base_weight_fp32(model: torch.nn.Module, key: str) -> torch.Tensor:
    """The weight at `key` as ComfyUI's patcher sees it, in float32 (quantised/fp8 weights
    dequantised by the layer's own `convert_weight`); a copy, the model is not touched."""
    weight, _, convert = comfy.model_patcher.get_key_weight(model, key)
    w = weight.detach().to(torch.float32, copy=True)
    return convert(w, inplace=True) if convert is not None else w


def bypass_plan(patcher, entries: dict[str, tuple[AdapterModule, float]]
                ) -> tuple[list[BypassLayer], dict[str, str]]:
    """Plan `entries` {weight key: (module, strength)} of `patcher`'s model for bypass.

    Returns (layers to hook, {key: reason} of the weights that must be patched instead). Reads
    the model only (DoRA: its base weight, once); raises the patch path's `AdapterError`s (e.g.
    a ΔW that overflows), so an error leaves the model untouched.
    """
    model = patcher.model
    layers: list[BypassLayer] = []
    fallback: dict[str, str] = {}
    with torch.inference_mode(False), torch.no_grad():
        for key, (module, strength) in entries.items():
            path, _, leaf = key.rpartition(".")
            try:
                layer = model.get_submodule(path) if leaf == "weight" else None
            except AttributeError:
                layer = None
            if layer is None or getattr(layer, "weight", None) is None:
                fallback[key] = "not the weight of a layer"
                continue
            shape = tuple(module.resolved_shape(tuple(layer.weight.shape)))
            geometry = geometry_of(layer, shape)
            if isinstance(geometry, str):
                fallback[key] = geometry
                continue
            dora_scale = None
            if module.has_dora:
                if not module.dora_on_output_axis(shape):
                    fallback[key] = "input-axis DoRA (dora_scale (1, I) rescales the layer input)"
                    continue
                dora_scale = module.dora_output_scale(base_weight_fp32(model, key))
            else:
                module.check_delta_finite(shape)
            layers.append(BypassLayer(key, path, module.bypass_plan(geometry, dora_scale), strength))
    return layers, fallback


class _Attached:
    """The hooks of one injection on one model, and the live patchers that injected them."""

    def __init__(self, model: torch.nn.Module):
        self.model = weakref.ref(model)
        self.owners: weakref.WeakSet = weakref.WeakSet()
        self.handles: list = []

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


class _Hook:
    """Forward hook of one layer: output + holder.value · strength · change."""

    __slots__ = ("layer", "attached", "holder")

    def __init__(self, layer: BypassLayer, attached: _Attached, holder: Strength):
        self.layer, self.attached, self.holder = layer, attached, holder

    def __call__(self, module, args, kwargs, output):
        if not self.attached.owners:  # every patcher that injected this is gone: clean up
            self.attached.remove()
            return None
        s = self.holder.value * self.layer.strength
        if s == 0.0 or not isinstance(output, torch.Tensor):
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        plan = self.layer.plan
        bias = getattr(module, "bias", None) if plan.dora is not None else None
        grad = torch.is_grad_enabled() and (output.requires_grad or x.requires_grad)
        inplace = not grad and (torch.is_inference_mode_enabled() or not output.is_inference())
        return plan.apply(x, output, s, bias=bias, inplace=inplace)


@dataclass(eq=False)
class BypassInjection:
    """The bypass layers of one adapter load on one patcher (MODEL, or CLIP's patcher).

    `scheduled`: the holder follows a strength schedule (a loader's is constant 1)."""

    layers: list[BypassLayer]
    holder: Strength = field(default_factory=Strength)
    scheduled: bool = False
    key: str = field(default_factory=lambda: f"{INJECTION_PREFIX}.{uuid.uuid4().hex}")
    _attached: dict[int, _Attached] = field(default_factory=dict, repr=False)

    def attach(self, patcher) -> None:
        """Add this injection to `patcher` (a clone owned by the caller)."""
        patcher.set_injections(self.key, [comfy.patcher_extension.PatcherInjection(
            inject=self.inject, eject=self.eject)])

    def inject(self, patcher) -> None:
        model = patcher.model
        att = self._attached.get(id(model))
        if att is None or att.model() is not model:
            att = self._attached[id(model)] = _Attached(model)
        att.owners.add(patcher)
        if att.handles:
            return
        for layer in self.layers:
            target = model.get_submodule(layer.path)
            att.handles.append(target.register_forward_hook(_Hook(layer, att, self.holder),
                                                            with_kwargs=True))

    def eject(self, patcher) -> None:
        att = self._attached.get(id(patcher.model))
        if att is None:
            return
        att.owners.discard(patcher)
        if not att.owners:
            att.remove()
            del self._attached[id(patcher.model)]
            for layer in self.layers:  # factors copied to an accelerator are let go
                layer.plan.release()

    def hooked(self, patcher) -> int:
        """How many forward hooks this injection has on `patcher`'s model now."""
        att = self._attached.get(id(patcher.model))
        return len(att.handles) if att is not None else 0


def injections_of(patcher) -> dict[str, BypassInjection]:
    """This pack's bypass injections on `patcher`, by injection key."""
    out = {}
    for key, items in patcher.injections.items():
        if not key.startswith(INJECTION_PREFIX):
            continue
        for inj in items:
            owner = getattr(inj.inject, "__self__", None)
            if isinstance(owner, BypassInjection):
                out[key] = owner
    return out
