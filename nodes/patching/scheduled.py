"""Scheduled adapter strength during sampling (ModelPatcher side of LyCORISStrengthSchedule).

Mechanism ("delta swap", measured against ComfyUI's hook keyframes in bench/bench_schedule.py):
the scheduled model carries no static patch for the adapter's diffusion-model weights. Two
wrappers of ComfyUI's wrapper API (`comfy.patcher_extension.WrappersMP`) do the work:

- SAMPLER_SAMPLE (once per sampler run, after ComfyUI has loaded and patched the model): snapshot
  each adapted weight W_base as loaded (other patches included), on the offload device (as
  ComfyUI backs up patched weights); with `cache_delta` on the weight's device and ΔW built once
  in float32 there too; restore every W_base bit for bit in `finally` (errors and interrupts
  included; a weight is marked dirty before its first byte is written).
- CALC_COND_BATCH (every model evaluation, before any unet-function wrapper, cond and uncond and
  every batched conditioning of that evaluation share it): from the evaluation's sigma get the
  percent of sampling, evaluate the schedule, and when a weight's strength changed write
  `W = W_base + s·ΔW` with the loader's arithmetic (fp32 sum, ComfyUI's rounding to the weight's
  dtype), so a constant schedule reproduces the loader bit for bit and nothing drifts. Without
  the cache (the default) ΔW is rebuilt from the adapter's factors a row block at a time, each
  block summed with its W_base rows and written (fp32/fp16/bf16 weights: the cast is
  element-wise, so the blocks give the loader's bits): a strength change costs about one patch
  of the adapted weights and holds one row block. Incremental updates (W += Δs·ΔW) would cost
  the same ΔW build and drift in the weight's dtype, so every write starts from W_base.

Several scheduled adapters on one model share one run per sampling (`_ACTIVE`), so weights they
both touch get `W_base + Σ sᵢ·ΔWᵢ`. Extra memory during sampling (`ScheduledAdapter.memory`,
shown in the node's report): W_base of the adapted weights in their dtype on the offload device
plus one row block; `cache_delta=True` keeps W_base on the weight's device and ΔW in float32
(4 bytes per adapted parameter more) and skips the ΔW rebuild.

Weights of components that run once on the prompt before the first step (Anima's LLM adapter,
`keymap.runs_on_prompt`) are not scheduled: no per-step strength could reach the output through
them. They get their constant strength (strength_model × block weight), patched as the loader
patches them (or in bypass mode hooked at that strength), like the CLIP at strength_clip.

Mode "bypass": the adapter runs at forward time (`bypass.BypassInjection`) and CALC_COND_BATCH
only sets the strength its hooks read (`Strength.value`, 0 outside sampling, like the weights
above); no weight is snapshot, written or restored. Modules bypass cannot run are scheduled as
above.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.float
import comfy.model_patcher
import comfy.patcher_extension
import comfy.utils
import torch

from ...lycoris_core import AdapterError
from ...lycoris_core.algos import AdapterModule
from ...lycoris_core.blocks import BlockWeights
from ...lycoris_core.keymap import runs_on_prompt
from ...lycoris_core.schedule import Schedule, percent_along_sigmas
from .bypass import BypassInjection, Strength, bypass_plan, injections_of
from .static import (
    CHUNK_ELEMENTS,
    LycorisPatch,
    _add_rows,
    _identity,
    apply_adapter,
    cached_adapter,
    delta_block_elements,
    delta_row_blocks,
    plan_constant,
)

log = logging.getLogger("lycoris_nodes")

WRAPPER_KEY = "lycoris_nodes.schedule"
TIMINGS = ("steps", "sigma")
"""How a model call's sigma becomes a percent: `steps` = position along the sampler's own sigma
list (step i of n at i/n), `sigma` = ComfyUI's model-sampling percent (as hook keyframes use)."""


@dataclass
class ScheduledAdapter:
    """Adapter weights whose strength follows `schedule`: {model key: (module, strength)}, where
    strength already holds strength_model × block multiplier; the effective strength at a model
    call is strength × schedule.at(percent)."""

    entries: dict[str, tuple[AdapterModule, float]]
    schedule: Schedule
    timing: str = "steps"
    cache_delta: bool = False
    mode: str = "patch"
    _sigma_cache: tuple[object, dict[float, float]] = field(default=(None, {}), repr=False)
    bypass: BypassInjection | None = field(default=None, init=False)
    fallback: dict[str, str] = field(default_factory=dict, init=False)
    """Bypass mode: {key: reason} of the weights scheduled by writing them instead."""
    constant: dict[str, tuple[AdapterModule, float]] = field(default_factory=dict, init=False)
    """The entries that run once on the prompt before the first step (Anima's LLM adapter,
    `keymap.runs_on_prompt`): a per-step strength cannot reach the output through them, so they
    are applied at their own strength (strength_model × block weight) for the whole run, as the
    loader does (and as the CLIP gets strength_clip). Taken out of `entries`."""
    constant_fallback: dict[str, str] = field(default_factory=dict, init=False)
    """Bypass mode: {key: reason} of the constant entries patched instead."""

    def __post_init__(self) -> None:
        self.constant = {k: e for k, e in self.entries.items() if runs_on_prompt(k)}
        if self.constant:
            self.entries = {k: e for k, e in self.entries.items() if k not in self.constant}

    @property
    def weight_entries(self) -> dict[str, tuple[AdapterModule, float]]:
        """The entries whose weights are written per strength (all of them in patch mode)."""
        if self.bypass is None:
            return self.entries
        return {k: self.entries[k] for k in self.fallback}

    def attach(self, patcher) -> None:
        """Register the wrappers (and in bypass mode the injection) on `patcher`, a ModelPatcher
        clone owned by the caller."""
        if self.mode == "bypass":
            layers, self.fallback = bypass_plan(patcher, self.entries)
            if layers:
                self.bypass = BypassInjection(layers, Strength(0.0), scheduled=True)
                self.bypass.attach(patcher)
        constant = plan_constant(patcher, self.constant, self.mode)
        self.constant_fallback = constant.fallback
        constant.attach(patcher)
        wm = comfy.patcher_extension.WrappersMP
        patcher.add_wrapper_with_key(wm.SAMPLER_SAMPLE, WRAPPER_KEY, self._sampler_sample)
        patcher.add_wrapper_with_key(wm.CALC_COND_BATCH, WRAPPER_KEY, self._calc_cond_batch)

    def memory(self, patcher) -> ScheduleMemory:
        """The extra memory this schedule holds while sampling `patcher`'s model (after attach)."""
        sd = patcher.model.state_dict()
        weights = self.weight_entries
        base = delta = block = 0
        for key, (module, _) in weights.items():
            w = sd[key]
            base += w.numel() * w.element_size()
            delta += w.numel() * 4
            shape = tuple(w.shape)
            # a block of s·ΔW in float32 + the W_base rows brought to the weight's device
            elements = delta_block_elements(module, shape, ROW_BLOCK_ELEMENTS)
            block = max(block, elements * (4 + w.element_size()))
        hooked = len(self.bypass.layers) if self.bypass is not None else 0
        return ScheduleMemory(len(weights), base, delta, block, hooked, self.cache_delta)

    def factor(self, sigma: float, run: _Run) -> float:
        """The schedule's multiplier at a model call of noise level `sigma`."""
        if self.timing != "sigma":
            return self.schedule.at(percent_along_sigmas(sigma, run.sigmas))
        ms = run.model.model_sampling
        if self._sigma_cache[0] is not ms or len(self._sigma_cache[1]) > 4096:
            self._sigma_cache = (ms, {})  # holds `ms`: a new sampling object never hits
        cache = self._sigma_cache[1]
        f = cache.get(sigma)
        if f is None:  # a bisection costs ~30 model-sampling calls: once per sigma value
            f = cache[sigma] = self.schedule.at_sigma(sigma, ms.percent_to_sigma)
        return f

    def _sampler_sample(self, executor, guider, sigmas, *args, **kwargs):
        model = guider.inner_model
        run = _ACTIVE.get(id(model))
        owner = run is None
        if owner:
            run = _ACTIVE[id(model)] = _Run(model, guider.model_patcher.offload_device,
                                             [float(s) for s in sigmas])
        try:
            run.add(self)
            return executor(guider, sigmas, *args, **kwargs)
        finally:
            if owner:
                _ACTIVE.pop(id(model), None)
                run.restore()

    def _calc_cond_batch(self, executor, model, conds, x_in, timestep, model_options):
        run = _ACTIVE.get(id(model))
        if run is not None:
            run.update(float(timestep.reshape(-1)[0]))
        return executor(model, conds, x_in, timestep, model_options)


@dataclass
class ScheduleMemory:
    """Extra memory a schedule holds while it samples, computed from the connected model's
    adapted weights (their shapes and dtypes): bytes, not estimates.

    - `base_bytes`: one copy of the weights written per strength (W_base), in their dtype — what
      ComfyUI's own patching keeps as its backup of patched weights;
    - `delta_bytes`: ΔW of the same weights in float32 (kept only with cache_delta);
    - `block_bytes`: the largest transient of a strength change without the cache: one row block
      of s·ΔW in float32 plus its W_base rows on the weight's device (a DoRA module's whole ΔW).
    """

    weights: int
    base_bytes: int
    delta_bytes: int
    block_bytes: int
    bypassed: int = 0
    cache_delta: bool = False

    @property
    def extra_bytes(self) -> int:
        """What this setting adds during sampling."""
        if self.cache_delta:
            return self.base_bytes + self.delta_bytes
        return self.base_bytes + self.block_bytes


def _gb(n: int) -> str:
    """Bytes as GB (10⁹), or MB (10⁶) below 1 GB."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def describe_memory(m: ScheduleMemory, offload: str, load: str) -> list[str]:
    """Report lines: this setting's extra memory and what the other settings would cost."""
    lines = []
    if m.weights:
        if m.cache_delta:
            lines.append(f"schedule memory: +{_gb(m.extra_bytes)} while sampling (cache_delta on: "
                         f"W_base {_gb(m.base_bytes)} + float32 ΔW {_gb(m.delta_bytes)} of "
                         f"{m.weights} weights, on {load}); cache_delta off: "
                         f"+{_gb(m.base_bytes + m.block_bytes)}")
        else:
            lines.append(f"schedule memory: +{_gb(m.extra_bytes)} while sampling (W_base "
                         f"{_gb(m.base_bytes)} of {m.weights} weights on {offload}, as ComfyUI "
                         f"backs up patched weights, + one row block {_gb(m.block_bytes)}); "
                         f"cache_delta on would add {_gb(m.delta_bytes)} of float32 ΔW and "
                         f"keep W_base on {load}")
    if m.bypassed:
        lines.append(f"bypass: {m.bypassed} weights hooked at forward time, no weight copy or ΔW "
                     "kept (+0 MB)")
    return lines


@dataclass
class _Term:
    adapter: ScheduledAdapter
    module: AdapterModule
    strength: float
    delta: torch.Tensor | None = None  # float32 ΔW at strength 1 (cache_delta) or None


ROW_BLOCK_ELEMENTS = CHUNK_ELEMENTS
"""Rows of W written at once: a block of s·ΔW (float32) holds at most this many values (unless
one row is larger); the transient memory of a strength change. The loader's blocks exactly: a ΔW
block's GEMM may round differently at another block size, and the bits must be the loader's."""
_BLOCKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""Weight dtypes whose rounding from float32 is element-wise (ComfyUI's `stochastic_rounding` is
a plain cast for them), so writing W row block by row block gives the loader's bits."""


@dataclass
class _Weight:
    key: str
    param: torch.Tensor
    base: torch.Tensor
    set_func: Callable | None
    convert_func: Callable | None
    terms: list[_Term] = field(default_factory=list)
    current: tuple[float, ...] | None = None  # strengths now in effect; None = W_base
    dirty: bool = False  # param may differ from W_base (set before the first byte is written)

    def base_fp32(self) -> torch.Tensor:
        """W_base in float32 on the weight's device, as ComfyUI's patcher prepares it."""
        temp = self.base.to(self.param.device, torch.float32, copy=True)
        if self.convert_func is not None:
            temp = self.convert_func(temp, inplace=True)
        return temp

    def add_term(self, adapter: ScheduledAdapter | None, module: AdapterModule, strength: float,
                 cache_delta: bool) -> None:
        """Add `strength`·ΔW of `module` (ΔW built now in float32 when `cache_delta`)."""
        term = _Term(adapter, module, strength)
        if cache_delta:
            blocks = [dw for _, _, dw in _deltas(module, self.base_fp32())]
            term.delta = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
        self.terms.append(term)

    def write(self, strengths: tuple[float, ...]) -> None:
        """param ← W_base + Σ sᵢ·ΔWᵢ with the loader's arithmetic (fp32 sums, ComfyUI's rounding)."""
        self.current = None
        self.dirty = True  # from here on an error leaves param to restore()
        with torch.no_grad():
            if not any(strengths):
                self.param.copy_(self.base)
            elif self._blocked():
                self._write_rows(self.terms[0], strengths[0])
            else:
                temp = self.base_fp32()
                for term, s in zip(self.terms, strengths, strict=True):
                    if s == 0.0:
                        continue
                    if term.delta is not None:
                        _add_rows(temp, 0, temp.shape[0], term.delta.clone(), s, _identity)
                    else:
                        for r0, r1, dw in _deltas(term.module, temp):
                            _add_rows(temp, r0, r1, dw, s, _identity)
                seed = comfy.model_patcher.string_to_seed(self.key)
                if self.set_func is not None:
                    self.set_func(temp, inplace_update=True, seed=seed)
                else:
                    self.param.copy_(comfy.float.stochastic_rounding(temp, self.param.dtype, seed=seed))
        self.current = strengths

    def _blocked(self) -> bool:
        """One term on a plain weight: written a row block at a time (no whole fp32 copy)."""
        return (len(self.terms) == 1 and self.set_func is None and self.convert_func is None
                and self.param.dtype in _BLOCKED_DTYPES
                and (self.terms[0].delta is not None or not self.terms[0].module.has_dora))

    def _write_rows(self, term: _Term, s: float) -> None:
        """param[r0:r1] ← round(float32(W_base[r0:r1]) + s·ΔW[r0:r1]) per row block: the
        loader's sum (float32, addition commutes bit for bit) and its cast to the weight's dtype."""
        device = self.param.device
        for r0, r1, dw in self._term_blocks(term, s, device):
            dw.add_(self.base[r0:r1].to(device))  # fp16/bf16 rows are widened exactly
            self.param[r0:r1].copy_(dw)

    def _term_blocks(self, term: _Term, s: float, device: torch.device):
        """(r0, r1, s·ΔW[r0:r1]) in float32 on `device`, each block a new tensor."""
        if term.delta is None:
            for r0, r1, dw in delta_row_blocks(term.module, tuple(self.param.shape), device,
                                               ROW_BLOCK_ELEMENTS):
                yield r0, r1, dw.mul_(s) if s != 1.0 else dw
            return
        rows = term.delta.shape[0]
        step = max(1, ROW_BLOCK_ELEMENTS // max(1, term.delta[0].numel()))
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            yield r0, r1, torch.mul(term.delta[r0:r1].to(device), s)

    def restore(self) -> None:
        if self.dirty:
            with torch.no_grad():
                self.param.copy_(self.base)
            self.dirty = False
        self.current = None


def _deltas(module: AdapterModule, base32: torch.Tensor):
    """(r0, r1, ΔW rows) at strength 1 in float32 for a weight whose fp32 base is `base32`."""
    if module.has_dora:  # W' − W0 with the norm of W0 + ΔW: needs the whole W0 (SPEC §5)
        yield 0, base32.shape[0], module.delta(torch.float32, base=base32)
        return
    yield from delta_row_blocks(module, tuple(base32.shape), base32.device)


class _Run:
    """The scheduled weights of one model during one sampler run."""

    def __init__(self, model, offload_device: torch.device, sigmas: list[float]):
        self.model = model
        self.offload_device = offload_device
        self.sigmas = sigmas
        self.weights: dict[str, _Weight] = {}
        self.adapters: list[ScheduledAdapter] = []
        self.last_sigma: float | None = None

    def add(self, adapter: ScheduledAdapter) -> None:
        self.adapters.append(adapter)
        for key, (module, strength) in adapter.weight_entries.items():
            w = self.weights.get(key)
            if w is None:
                param, set_func, convert_func = comfy.model_patcher.get_key_weight(self.model, key)
                where = param.device if adapter.cache_delta else self.offload_device
                base = param.detach().to(where, copy=True)
                w = self.weights[key] = _Weight(key, param, base, set_func, convert_func)
            w.add_term(adapter, module, strength, adapter.cache_delta)
        self.last_sigma = None

    def update(self, sigma: float) -> None:
        """Bring every scheduled weight to its strength at `sigma` (no-op when unchanged)."""
        if sigma == self.last_sigma:
            return
        self.last_sigma = sigma
        factors = {id(a): a.factor(sigma, self) for a in self.adapters}
        for a in self.adapters:
            if a.bypass is not None:
                a.bypass.holder.value = factors[id(a)]
        for w in self.weights.values():
            strengths = tuple(t.strength * factors[id(t.adapter)] for t in w.terms)
            if strengths != w.current:
                w.write(strengths)

    def restore(self) -> None:
        for a in self.adapters:
            if a.bypass is not None:
                a.bypass.holder.value = 0.0
        for w in self.weights.values():
            w.restore()


_ACTIVE: dict[int, _Run] = {}
"""Runs in progress, by id of the BaseModel being sampled."""


# --------------------------------------------------------------------------------------------
# Where the scheduled weights come from: a file (planned by the loader) or a loader's patches
# --------------------------------------------------------------------------------------------

def plan_from_file(model, clip, path: str, strength_model: float, strength_clip: float,
                   block_weights: str | BlockWeights, node: str, mode: str = "patch"):
    """Resolve and check `path` exactly as the loader does (same errors, same per-key strengths).

    Returns (entries {diffusion-model key: (module, strength_model × block multiplier)}, CLIP
    applied statically at strength_clip in `mode` (text encoding happens once, before sampling),
    LoadResult).
    """
    _, new_clip, result = apply_adapter(model, clip, path, strength_model, strength_clip,
                                        block_weights, node=node, mode=mode, plan_model=False)
    adapter, _ = cached_adapter(path)
    names = {key: name for name, key in result.resolution.matched.items()}
    model_keys = set(model.model.state_dict())
    entries = {key: (adapter.modules[names[key]], s) for key, s in result.applied.items()
               if key in model_keys}
    return entries, new_clip, result


def take_over_loader_patches(model, strength_model: float, block_weights: BlockWeights):
    """Move the LyCORIS patches (or bypass injections) loaders put on `model` into a schedule.

    Returns (clone of `model` without them, entries {key: (module, loader strength ×
    strength_model × block multiplier)}). Other patches (other LoRAs) stay where they are.
    Raises AdapterError when the model carries none or one a schedule cannot represent.
    """
    clone = model.clone()
    entries: dict[str, tuple[AdapterModule, float]] = {}
    for inj_key, injection in injections_of(clone).items():
        if injection.scheduled:  # another schedule's: already follows its own keyframes
            continue
        for layer in injection.layers:
            if layer.key in entries:
                raise AdapterError("two LyCORIS loaders apply this weight in bypass mode; a "
                                   "schedule cannot take both over: schedule the file by name "
                                   "instead", key=layer.key)
            entries[layer.key] = (layer.module, injection.holder.value * layer.strength
                                  * strength_model * block_weights.multiplier(layer.key))
        clone.remove_injections(inj_key)
    for key in list(clone.patches):
        kept = []
        for p in clone.patches[key]:
            strength, patch, strength_w, offset, function = p
            if not isinstance(patch, LycorisPatch):
                kept.append(p)
                continue
            if key in entries or strength_w != 1.0 or offset is not None or function is not None:
                raise AdapterError("this weight carries a LyCORIS patch that a schedule cannot take "
                                   "over (two LyCORIS loaders on it, or an offset/function patch); "
                                   "schedule the file by name instead", key=key)
            entries[key] = (patch.module, strength * strength_model * block_weights.multiplier(key))
        if kept:
            clone.patches[key] = kept
        else:
            del clone.patches[key]
    if not entries:
        raise AdapterError("the model carries no LyCORIS patch: connect LoadLoHa / LoadLoKr / "
                           "LoadLyCORIS before this node, or pick the file in lora_name")
    clone.patches_uuid = uuid.uuid4()
    return clone, entries
