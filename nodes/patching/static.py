"""LyCORIS adapters as exact fp32 weight patches at a constant strength (the loaders' path).

Each adapted weight gets one `LycorisPatch` (a `comfy.weight_adapter.WeightAdapterBase`, the patch
kind ComfyUI's `comfy.lora.calculate_weight` dispatches to in 0.3.75 and in current versions).
ComfyUI calls it when it loads the model for use, fully or in low-VRAM partial mode, with the weight
to patch. The patch then builds ΔW with `lycoris_core` on that weight's device, in float32, a block
of output rows at a time, and adds `strength · ΔW` in float32; only the final weight is cast to the
weight's dtype. Extra memory at any time is one row block of ΔW (DoRA: one ΔW, it needs whole-row
norms of W0 + ΔW; done with lycoris_core's correct norm, not ComfyUI's, SPEC §5).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import comfy.utils
import comfy.weight_adapter
import safetensors.torch
import torch

from ...lycoris_core import AdapterError, KeyMap, Resolution, adapter_from_tensors, load_adapter
from ...lycoris_core.adapter import Adapter
from ...lycoris_core.algos import AdapterModule
from ...lycoris_core.algos.base import all_finite
from ...lycoris_core.blocks import BlockWeights, parse_block_weights
from ...lycoris_core.naming import is_text_encoder_name
from ..guard import scrub_exception
from .bypass import MODES, BypassInjection, bypass_plan

log = logging.getLogger("lycoris_nodes")

CHUNK_ELEMENTS = 1 << 22
"""Row blocks of ΔW hold at most this many float32 values (16 MiB) unless one row is larger."""
CACHE_SIZE = 8


# --------------------------------------------------------------------------------------------
# ΔW in row blocks (lycoris_core's pure per-algorithm functions on row slices of the factors)
# --------------------------------------------------------------------------------------------

def _row_slicer(module: AdapterModule) -> tuple[int, Callable[[object, int, int], object]] | None:
    """(rows per factor row, slicer(factors, r0, r1) → factors of ΔW rows [r0·u, r1·u)), or None
    when the layout cannot be split by output rows."""
    # by `algo`, not isinstance: scripts may import lycoris_core under another package name
    if module.algo == "loha":
        if module.tucker:  # w*_a stored transposed (R, O)
            return 1, lambda f, a, b: replace(f, w1_a=f.w1_a[:, a:b], w2_a=f.w2_a[:, a:b])
        return 1, lambda f, a, b: replace(f, w1_a=f.w1_a[a:b], w2_a=f.w2_a[a:b])
    if module.algo == "lokr":
        if module.lokr_t1 is not None:
            return None
        unit = module.w2_shape[0]
        if module.w1_full:
            return unit, lambda f, a, b: replace(f, w1=f.w1[a:b])
        return unit, lambda f, a, b: replace(f, w1_a=f.w1_a[a:b])
    if module.algo == "lora":
        return 1, lambda f, a, b: replace(f, up=f.up[a:b])
    return None


def delta_row_blocks(module: AdapterModule, shape: tuple[int, ...], device: torch.device,
                     max_elements: int = CHUNK_ELEMENTS) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (r0, r1, ΔW[r0:r1]) in float32 on `device`, at strength 1, covering all output rows.

    ΔW[r0:r1] has shape (r1 − r0, *shape[1:]). Not for DoRA modules (their rows need W0).
    """
    shape = module.resolved_shape(shape)
    split = _row_slicer(module)
    if split is None:
        yield 0, shape[0], module.delta(torch.float32, shape=shape, device=device)
        return
    unit, slicer = split
    factors = module.factors(device, torch.float32)
    # bound max|ΔW| from the stored factors' magnitudes (once per module, read on the CPU: no
    # host sync on `device`); look at ΔW only when it could overflow
    check = module.delta_may_overflow(dtype=torch.float32)
    step = _rows_per_block(shape, unit, max_elements)
    n = shape[0] // unit
    for a in range(0, n, step):
        b = min(n, a + step)
        dw = module.diff_weight(slicer(factors, a, b), module.scale)
        if check and not all_finite(dw):
            raise AdapterError(f"module '{module.name}': ΔW overflows float32 (NaN or Inf)",
                               file=module.path, key=module.name)
        yield a * unit, b * unit, dw.reshape(((b - a) * unit, *shape[1:]))


def _rows_per_block(shape: tuple[int, ...], unit: int, max_elements: int) -> int:
    """Factor rows per row block of ΔW (each factor row gives `unit` output rows)."""
    row_numel = max(1, int(torch.Size(shape[1:]).numel()))
    return max(1, max_elements // (row_numel * unit))


def delta_block_elements(module: AdapterModule, shape: tuple[int, ...],
                         max_elements: int = CHUNK_ELEMENTS) -> int:
    """The most float32 values one ΔW block of `delta_row_blocks` (or a DoRA module's whole
    change) holds for a weight of `shape`: what building ΔW in row blocks costs at once."""
    shape = module.resolved_shape(shape)
    numel = int(torch.Size(shape).numel())
    split = None if module.has_dora else _row_slicer(module)
    if split is None:
        return numel
    unit = split[0]
    rows = min(shape[0], _rows_per_block(shape, unit, max_elements) * unit)
    return min(numel, rows * int(torch.Size(shape[1:]).numel()))


def _add_rows(weight: torch.Tensor, r0: int, r1: int, dw: torch.Tensor, strength: float,
              function: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """weight[r0:r1] ← weight[r0:r1] + function(strength·dw), summed in float32 (or better)."""
    rows = weight[r0:r1]
    if strength != 1.0:
        dw.mul_(strength)
    dw = function(dw)
    if weight.dtype in (torch.float32, torch.float64):
        rows.add_(dw)
    else:  # low-VRAM path hands us the fp16/bf16 weight: sum in fp32, cast once
        dw.add_(rows)
        rows.copy_(dw)


class LycorisPatch(comfy.weight_adapter.WeightAdapterBase):
    """One adapted weight: ComfyUI asks it for `W + strength·ΔW` (ΔW by lycoris_core, fp32)."""

    name = "lycoris_nodes"

    def __init__(self, module: AdapterModule, key: str):
        self.module = module
        self.key = key
        self.loaded_keys = set(module.refs())
        self.weights = []  # factors stay in the adapter; nothing for ComfyUI to move

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        """Patch `weight` in place (its device, float32 sums) and return it."""
        if strength == 0.0:
            return weight
        if function is None:
            function = _identity
        shape = tuple(weight.shape)
        try:
            with torch.no_grad():  # weight math only; also outside ComfyUI's inference mode
                if self.module.has_dora:
                    w0 = weight.to(torch.float32)
                    change = self.module.delta(torch.float32, base=w0)  # W' − W0, norm of W0 + ΔW
                    _add_rows(weight, 0, shape[0], change, strength, function)
                    return weight
                for r0, r1, dw in delta_row_blocks(self.module, shape, weight.device):
                    _add_rows(weight, r0, r1, dw, strength, function)
        except AdapterError as e:  # raised in ComfyUI's sampler, not in our node: no server paths
            scrub_exception(e)
            raise
        return weight


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# --------------------------------------------------------------------------------------------
# Adapter cache
# --------------------------------------------------------------------------------------------

_CACHE: OrderedDict[tuple[str, int, int], Adapter] = OrderedDict()


def cache_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.realpath(path), st.st_mtime_ns, st.st_size


def cached_adapter(path: str) -> tuple[Adapter, bool]:
    """The adapter of `path` with its tensors in memory (CPU, stored dtype), and whether it came
    from the cache. Keyed by real path, mtime and size, so an edited file is read again."""
    try:
        key = cache_key(path)
    except OSError as exc:
        raise AdapterError(f"cannot read file: {exc.strerror or exc}", file=str(path)) from exc
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit, True
    checked = load_adapter(path)  # header, dtypes and shapes validated before any data is read
    refs = {ref.key: ref for m in checked.modules.values() for ref in m.refs().values()}
    try:  # one open for the whole file (per-key reads reopen it thousands of times)
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"cannot read tensors ({exc})", file=str(path)) from exc
    for ref in refs.values():
        t = tensors.get(ref.key)
        if t is None or tuple(t.shape) != ref.shape:
            raise AdapterError("file changed while it was read", file=str(path), key=ref.key)
    adapter = adapter_from_tensors({k: tensors[k] for k in refs}, checked.metadata, name=str(path))
    pbar = comfy.utils.ProgressBar(len(adapter.modules))
    for module in adapter.modules.values():
        # every float tensor checked finite now, on the CPU, with its max |entry| remembered: the
        # patch path (any device) then needs no look at the factors (`TensorRef.max_abs`)
        for ref in module.refs().values():
            if ref.source.get(ref.key).is_floating_point():
                ref.max_abs()
        module.alpha  # noqa: B018  (read once here, not on the patch path)
        pbar.update(1)
    _CACHE[key] = adapter
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return adapter, False


def clear_cache() -> None:
    _CACHE.clear()


# --------------------------------------------------------------------------------------------
# Applying a file to MODEL / CLIP
# --------------------------------------------------------------------------------------------

@dataclass
class LoadResult:
    """What was applied, for the report."""

    path: str
    summary: dict
    model_architecture: str
    resolution: Resolution
    applied: dict[str, float] = field(default_factory=dict)       # model key → effective strength
    skipped_te: list[str] = field(default_factory=list)            # TE modules, no CLIP given
    zero_strength: list[str] = field(default_factory=list)         # matched, strength 0
    unused_rules: list[str] = field(default_factory=list)
    block_weights: BlockWeights = field(default_factory=BlockWeights)
    strength_model: float = 1.0
    strength_clip: float = 1.0
    cache_hit: bool = False
    mode: str = "patch"
    bypassed: list[str] = field(default_factory=list)              # keys applied at forward time
    fallback: dict[str, str] = field(default_factory=dict)         # bypass mode: name → why patched

    @property
    def unmatched(self) -> list[str]:
        skipped = set(self.skipped_te)
        return [n for n in self.resolution.unmatched if n not in skipped]


def _check_algorithm(adapter: Adapter, expect: str | None, node: str) -> None:
    if expect is None:
        return
    counts = adapter.algorithms()
    if set(counts) != {expect}:
        what = ", ".join(f"{n} {algo_label(a)}" for a, n in sorted(counts.items()))
        raise AdapterError(f"{node} loads {algo_label(expect)} files only; this file holds {what} "
                           "modules. Use LoadLyCORIS (any algorithm) or the loader for that "
                           "algorithm.", file=adapter.path)


def algo_label(algo: str) -> str:
    return {"loha": "LoHa", "lokr": "LoKr", "lora": "LoRA/LoCon"}.get(algo, algo)


def _no_match_error(adapter: Adapter, arch: str, model_keys: int, has_clip: bool) -> AdapterError:
    file_arch, _ = adapter.guess_architecture()
    names = list(adapter.modules)
    if not has_clip and names and all(is_text_encoder_name(n) for n in names):
        hint = "it only has text-encoder modules: connect a CLIP"
    else:
        hint = f"the file looks like {file_arch}, the model is {arch}"
    return AdapterError(f"none of its {len(names)} modules matches any of the model's {model_keys} "
                        f"weights ({hint}); e.g. {names[:3]}. Nothing was applied.",
                        file=adapter.path)


def add_lycoris_patches(patcher, items: dict[str, tuple[AdapterModule, float]],
                        path: str | None = None) -> None:
    """Add `items` {weight key: (module, strength)} to `patcher` (a ModelPatcher or CLIP clone
    owned by the caller) as `LycorisPatch` patches, one `add_patches` call per strength."""
    groups: dict[float, dict[str, LycorisPatch]] = {}
    for key, (module, s) in items.items():
        groups.setdefault(s, {})[key] = LycorisPatch(module, key)
    for s, patches in groups.items():
        added = patcher.add_patches(patches, s)
        if len(added) != len(patches):  # cannot happen: keys come from the same state dicts
            missing = sorted(set(patches) - set(added))
            raise AdapterError(f"ComfyUI refused {len(missing)} patches, e.g. {missing[:3]}",
                               file=None if path is None else str(path), key=missing[0])


@dataclass
class ConstantPlan:
    """Weights at constant strengths planned for a mode: `patches` {key: (module, strength)} go
    into the weights, `injection` runs the rest at forward time (bypass), `fallback` {key: why}
    names the weights bypass cannot run (they are among `patches`)."""

    patches: dict[str, tuple[AdapterModule, float]]
    injection: BypassInjection | None = None
    fallback: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.patches and self.injection is None

    def attach(self, patcher, path: str | None = None) -> None:
        """Apply the plan to `patcher` (a ModelPatcher clone owned by the caller)."""
        add_lycoris_patches(patcher, self.patches, path)
        if self.injection is not None:
            self.injection.attach(patcher)


def plan_constant(patcher, items: dict[str, tuple[AdapterModule, float]], mode: str) -> ConstantPlan:
    """Plan `items` {weight key: (module, strength)} of `patcher`'s model for `mode`, reading the
    model only (so an error leaves it untouched): all patched in patch mode; in bypass mode
    hooked, except the weights `bypass_plan` sends back to the patch path."""
    if mode != "bypass" or not items:
        return ConstantPlan(dict(items))
    layers, fallback = bypass_plan(patcher, items)
    return ConstantPlan({k: items[k] for k in fallback},
                        BypassInjection(layers) if layers else None, fallback)


def apply_adapter(model, clip, path: str, strength_model: float, strength_clip: float,
                  block_weights: str | BlockWeights = "", expect_algo: str | None = None,
                  node: str = "LoadLyCORIS", mode: str = "patch", plan_model: bool = True):
    """Clone `model`/`clip` and apply the file at `path`. Returns (model, clip, LoadResult).

    `mode`: "patch" (weights rewritten when ComfyUI loads the model) or "bypass" (added at
    forward time by `bypass.BypassInjection`; modules bypass cannot run are patched, with the
    reason in `LoadResult.fallback`). Everything is checked (algorithm, key matches, shapes,
    finite values, bypass plans) before anything is cloned, so an error leaves the inputs
    untouched. Strength 0 returns the inputs themselves. `plan_model=False` (the strength schedule)
    resolves and reports the model's modules but applies only the CLIP's.
    """
    if mode not in MODES:
        raise AdapterError(f"mode must be one of {', '.join(MODES)}, not {mode!r}", file=str(path))
    bw = block_weights if isinstance(block_weights, BlockWeights) else parse_block_weights(block_weights)
    adapter, hit = cached_adapter(path)
    _check_algorithm(adapter, expect_algo, node)

    unet_sd = model.model.state_dict() if model is not None else {}
    clip_sd = clip.cond_stage_model.state_dict() if clip is not None else {}
    keymap = KeyMap(list(unet_sd) + list(clip_sd))
    res = adapter.resolve(keymap)
    shapes = {**{k: tuple(v.shape) for k, v in unet_sd.items()},
              **{k: tuple(v.shape) for k, v in clip_sd.items()}}
    for name, key in res.matched.items():
        adapter.modules[name].resolved_shape(shapes[key])  # raises naming file and key
    result = LoadResult(path=str(path), summary=adapter.summary(keymap), resolution=res,
                        model_architecture=keymap.architecture, block_weights=bw,
                        strength_model=strength_model, strength_clip=strength_clip, cache_hit=hit,
                        mode=mode)
    if clip is None:
        result.skipped_te = [n for n in res.unmatched if is_text_encoder_name(n)]
    active = (strength_model != 0.0 and model is not None) or (strength_clip != 0.0 and clip is not None)
    if not res.matched and active:
        raise _no_match_error(adapter, keymap.architecture, len(keymap.keys), clip is not None)

    entries: dict[str, dict[str, tuple[AdapterModule, float]]] = {"model": {}, "clip": {}}
    names: dict[str, str] = {}
    used_rules: set[str] = set()
    for name, key in res.matched.items():
        is_model = key in unet_sd
        rule = bw.rule_for(key)
        if rule is not None:
            used_rules.add(rule)
        s = (strength_model if is_model else strength_clip) * bw.multiplier(key)
        if s == 0.0:
            result.zero_strength.append(name)
            continue
        result.applied[key] = s
        names[key] = name
        entries["model" if is_model else "clip"][key] = (adapter.modules[name], s)
    # a block rule the user wrote that touches no module is worth a warning (groups are not)
    result.unused_rules = [item for item, blocks in bw.named if not used_rules.intersection(blocks)]
    if not plan_model:
        entries["model"] = {}

    # planned on the inputs (read only) before anything is cloned
    plans = {"model": plan_constant(model, entries["model"], mode),
             "clip": plan_constant(clip.patcher if clip is not None else None, entries["clip"], mode)}
    for plan in plans.values():
        result.fallback.update({names[k]: why for k, why in plan.fallback.items()})
        if plan.injection is not None:
            result.bypassed += [layer.key for layer in plan.injection.layers]

    new_model = model.clone() if model is not None and not plans["model"].empty else model
    new_clip = clip.clone() if clip is not None and not plans["clip"].empty else clip
    if new_model is not model:
        plans["model"].attach(new_model, path)
    if new_clip is not clip:
        plans["clip"].attach(new_clip.patcher, path)
    return new_model, new_clip, result
