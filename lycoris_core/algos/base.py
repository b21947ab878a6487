"""The contract every adapter algorithm implements.

An `AdapterModule` is one adapted layer of a file: named tensor references (loaded lazily),
the rank read from shapes, alpha, and `delta()`, which builds ΔW in float32 or better.
Subclasses only declare their tensors, check shapes and supply the pure ΔW function.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch

from ..errors import AdapterError
from .dora import apply_dora, dora_axis, magnitude_ratio
from .layer import LayerGeometry


class TensorSource(Protocol):
    """Something that hands out tensors by key (a lazily read file, or a dict in memory)."""

    path: str

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor: ...


_MAX_ABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""source → {key: max |entry|} of the floating tensors read so far (each checked finite once)."""


@dataclass(frozen=True)
class Magnitude:
    """What a magnitude bound needs of a tensor (`loha.magnitude_bound`): its shape and its
    largest |entry|, known without touching a copy of it on any device."""

    shape: tuple[int, ...]
    max_abs: float


@dataclass(frozen=True)
class TensorRef:
    """A tensor known by key and shape; its data is read only by `load()`."""

    key: str
    shape: tuple[int, ...]
    source: TensorSource = field(repr=False, compare=False)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def _record(self, t: torch.Tensor) -> float:
        """max |t| of the stored (CPU) tensor, kept per source and key; NaN/Inf raise."""
        m = float(t.detach().abs().amax()) if t.numel() else 0.0
        if not math.isfinite(m):
            raise AdapterError("tensor holds NaN or Inf values", file=self.source.path, key=self.key)
        _MAX_ABS.setdefault(self.source, {})[self.key] = m
        return m

    def max_abs(self) -> float:
        """The largest |entry| of the tensor as stored (read on the CPU once, then remembered);
        raises `AdapterError` when it holds NaN or Inf."""
        m = _MAX_ABS.get(self.source, {}).get(self.key)
        return self._record(self.source.get(self.key)) if m is None else m

    def load(self, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """The tensor on `device`, cast to `dtype` (None: as stored), checked finite.

        The check is made once per tensor on the CPU copy the source hands out (`max_abs`), never
        on `device`: loading factors onto an accelerator costs no host synchronisation."""
        m = _MAX_ABS.get(self.source, {}).get(self.key)
        if m is not None:
            t = self.source.get(self.key, device=device)
        else:
            t = self.source.get(self.key)
            if t.is_floating_point():
                m = self._record(t)
            t = t.to(device)
        stored = t.dtype
        if dtype is not None and (t.is_floating_point() or dtype.is_floating_point):
            t = t.to(dtype)
        if m is not None and t.is_floating_point() and stored.is_floating_point \
                and torch.finfo(t.dtype).max < torch.finfo(stored).max \
                and not m < torch.finfo(t.dtype).max:  # narrowed (float64 → float32): now Inf
            raise AdapterError("tensor holds NaN or Inf values", file=self.source.path, key=self.key)
        return t


def may_overflow(bound: float, dtype: torch.dtype) -> bool:
    """Whether a ΔW whose entries are at most `bound` (an `algos.<algo>.max_abs_bound`) could hold
    NaN/Inf in `dtype`; when not, checking ΔW itself (`all_finite`) is unnecessary."""
    return not bound < torch.finfo(dtype).max / 4


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`: one sum (a NaN/Inf entry makes it NaN/Inf), confirmed entry-wise only
    when the sum is not finite (a sum of finite entries can itself overflow)."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """ΔW is always computed in float32 or better (fp16 Hadamard products overflow)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class AdapterModule:
    """One adapted layer. `name` is the module name as the file spells it."""

    algo: ClassVar[str] = ""
    tensor_names: ClassVar[tuple[str, ...]] = ()

    name: str
    source: TensorSource = field(repr=False)
    alpha_ref: TensorRef | None = field(default=None, repr=False)
    dora_ref: TensorRef | None = field(default=None, repr=False)
    weight_shape: tuple[int, ...] | None = None
    """The shape of the layer weight this module patches, once known (from a model or shapes)."""

    _alpha: float | None = field(default=None, init=False, repr=False)
    _unit_bound: float | None = field(default=None, init=False, repr=False, compare=False)

    # --- what subclasses provide -------------------------------------------------------------
    @property
    def rank(self) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def out_features(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def natural_shape(self) -> tuple[int, ...]:
        """The shape ΔW comes out in before reshaping to the layer (conv-flat stays 2-D)."""
        raise NotImplementedError  # pragma: no cover

    # the algorithm's pure functions (`algos.<algo>.diff_weight` / `.max_abs_bound`), as
    # staticmethods: diff_weight(factors, scale) → ΔW; max_abs_bound(factors) → bound at scale 1
    diff_weight: ClassVar[Callable[..., torch.Tensor]]
    max_abs_bound: ClassVar[Callable[..., float]]
    bypass_diff: ClassVar[Callable[..., torch.Tensor]]
    """bypass_diff(x, factors, layer, scale) → scale · ΔW x without forming ΔW (`LayerGeometry`)."""
    frobenius_sq: ClassVar[Callable[..., float]]
    """frobenius_sq(factors, scale) → ‖scale · ΔW‖² from the factors, without forming ΔW."""

    def _diff_of(self, factors, scale: float = 1.0) -> torch.Tensor:
        """scale · ΔW in `natural_shape` from loaded factors (the scale goes on a factor)."""
        return self.diff_weight(factors, scale).reshape(self.natural_shape)

    def _diff(self, device: str | torch.device, dtype: torch.dtype,
              scale: float = 1.0) -> torch.Tensor:
        """scale · ΔW in `natural_shape`."""
        return self._diff_of(self.factors(device, dtype), scale)

    def _build_factors(self, ld: Callable[[TensorRef | None], object]):  # pragma: no cover
        """The algorithm's factors dataclass with `ld(ref)` for each of its tensors."""
        raise NotImplementedError

    def factors(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32):
        """The factors on `device` in `dtype` (None: as stored), each checked finite."""
        return self._build_factors(lambda r: None if r is None else r.load(device, dtype))

    def magnitudes(self):
        """The factors dataclass holding a `Magnitude` (shape, max |entry|) per tensor: all that
        `max_abs_bound` needs, read on the CPU once per tensor, never from a device copy."""
        return self._build_factors(lambda r: None if r is None else Magnitude(r.shape, r.max_abs()))

    def delta_may_overflow(self, factors=None, dtype: torch.dtype = torch.float32) -> bool:
        """Whether ΔW at this module's scale could hold NaN/Inf in `dtype`. When not, ΔW needs no
        check of its own. The bound comes from the stored tensors' magnitudes (`magnitudes`),
        computed once per module: no pass over, and no host read of, factors on a device.
        (`factors` is accepted for compatibility and not used.)"""
        if self._unit_bound is None:
            self._unit_bound = self.max_abs_bound(self.magnitudes())
        return may_overflow(abs(self.scale) * self._unit_bound, dtype)

    def dora_may_overflow(self, dtype: torch.dtype = torch.float32) -> bool:
        """Whether DoRA's change W' − W0 could hold NaN/Inf in `dtype`, for a base weight W0 that is
        finite and well inside the range (what any patch W0 + s·ΔW assumes). W' = w·m/(‖w‖ + eps)
        with w = W0 + ΔW: an entry of a column of w is at most that column's norm, so every entry
        of W' is at most max|m|; where a column of w is zero, the ratio m/eps multiplies zeros. So
        the bounds of ΔW (`delta_may_overflow`) and of max|m|/eps decide, from the stored
        tensors' magnitudes: W0's values are never read, and no device value either."""
        eps = torch.finfo(dtype).eps
        return (self.delta_may_overflow(dtype=dtype)
                or may_overflow(self.dora_ref.max_abs() / eps, dtype))

    def describe(self) -> dict:
        """Mode information for reports (Tucker, full, decomposed, …)."""
        return {}

    # --- shared behaviour -------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.source.path

    def refs(self) -> dict[str, TensorRef]:
        out = {n: getattr(self, n) for n in self.tensor_names if getattr(self, n) is not None}
        if self.alpha_ref is not None:
            out["alpha"] = self.alpha_ref
        if self.dora_ref is not None:
            out["dora_scale"] = self.dora_ref
        return out

    @property
    def alpha(self) -> float:
        """alpha as stored (int64 or float, read with `.item()`); missing or 0 means alpha = rank."""
        if self._alpha is None:
            value = None
            if self.alpha_ref is not None:
                t = self.alpha_ref.source.get(self.alpha_ref.key)
                if t.numel() != 1:
                    raise AdapterError(f"alpha must be a scalar, has shape {tuple(t.shape)}",
                                       file=self.path, key=self.alpha_ref.key)
                value = float(t.reshape(()).item())
                if not math.isfinite(value):
                    raise AdapterError("alpha is NaN or Inf", file=self.path, key=self.alpha_ref.key)
            rank = self.rank
            self._alpha = value if value else float(rank if rank else 1)
        return self._alpha

    @property
    def scale(self) -> float:
        rank = self.rank
        return 1.0 if not rank else self.alpha / rank

    @property
    def has_dora(self) -> bool:
        return self.dora_ref is not None

    def resolved_shape(self, shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
        shape = tuple(shape) if shape is not None else self.weight_shape
        nat = self.natural_shape
        if shape is None:
            return nat
        if math.prod(shape) != math.prod(nat) or shape[0] != nat[0]:
            raise AdapterError(
                f"module '{self.name}' makes a {list(nat)} change, the layer weight is {list(shape)}",
                file=self.path, key=self._first_key())
        if self.dora_ref is not None:  # one magnitude per output row, or (1, I) per input column
            n, d = math.prod(self.dora_ref.shape), self.dora_ref.shape
            if n != shape[0] and not (d and d[0] == 1 and n == shape[1]):
                raise AdapterError(f"dora_scale {list(d)} fits neither the {shape[0]} output rows nor "
                                   f"the {shape[1]} input columns of {list(shape)}",
                                   file=self.path, key=self.dora_ref.key)
        return shape

    def _first_key(self) -> str:
        refs = self.refs()
        return next(iter(refs.values())).key if refs else self.name

    def raw_delta(self, dtype: torch.dtype = torch.float32, *,
                  shape: tuple[int, ...] | None = None,
                  device: str | torch.device = "cpu") -> torch.Tensor:
        """scale · ΔW without the DoRA rescale, in float32 (float64 if asked), cast to `dtype`."""
        cdt = compute_dtype(dtype)
        return self._diff(device, cdt, self.scale).reshape(self.resolved_shape(shape)).to(dtype)

    def delta(self, dtype: torch.dtype = torch.float32, *, shape: tuple[int, ...] | None = None,
              base: torch.Tensor | None = None,
              device: str | torch.device | None = None) -> torch.Tensor:
        """ΔW at strength 1, shaped like the layer weight when that shape is known.

        With DoRA (`dora_scale`) the change depends on the base weight: pass `base` (W0) and the
        full change `W' − W0` is returned; without it an `AdapterError` is raised.
        Computed in float32 (float64 if asked), cast to `dtype` at the end.
        """
        if base is not None:
            shape = tuple(base.shape)
            device = base.device if device is None else device
        device = device if device is not None else "cpu"
        if self.dora_ref is not None and base is None:
            raise AdapterError(
                "DoRA module: its change depends on the base weight values; pass the weight "
                "tensor, not only its shape", file=self.path, key=self.dora_ref.key)
        cdt = compute_dtype(dtype)
        factors = self.factors(device, cdt)
        dw = self._diff_of(factors, self.scale).reshape(self.resolved_shape(shape))
        # The factors were checked finite when loaded. If their magnitude bound shows ΔW cannot
        # reach the dtype's range, ΔW is finite without looking at it; otherwise it is checked.
        if self.dora_ref is not None:
            w0 = base.to(device=device, dtype=cdt)
            dw = apply_dora(w0, dw, self.dora_ref.load(device, cdt)) - w0
            check = self.dora_may_overflow(cdt)
        else:
            check = self.delta_may_overflow(dtype=cdt)
        if check and not all_finite(dw):
            raise AdapterError(f"module '{self.name}': ΔW overflows {cdt} (NaN or Inf): factors too "
                               "large", file=self.path, key=self._first_key())
        return dw.to(dtype)


    def delta_norm_sq(self, base: torch.Tensor | None = None) -> float:
        """‖ΔW‖² at strength 1 (squared Frobenius norm) from the factors without forming ΔW
        (`frobenius_sq`: Grams in float64). A DoRA module with its base weight W0 gives ‖W' − W0‖²
        (ΔW is formed: it depends on W0's values); without W0, the change before DoRA's
        magnitude rescale. Raises `AdapterError` when the norm overflows."""
        if self.dora_ref is not None and base is not None:
            dw = self.delta(torch.float64, base=base)
            value = float(torch.linalg.vector_norm(dw) ** 2)
        else:
            value = self.frobenius_sq(self.factors("cpu", torch.float32), self.scale)
        if not math.isfinite(value):
            raise AdapterError(f"module '{self.name}': ‖ΔW‖ overflows float64: factors too large",
                               file=self.path, key=self._first_key())
        return value

    # --- bypass: ΔW applied to activations at forward time -------------------------------------
    def dora_on_output_axis(self, shape: tuple[int, ...]) -> bool:
        """Whether this module's DoRA (if any) rescales output rows (the LyCORIS default; bypass
        applies it exactly) rather than input channels (`dora_scale` (1, I))."""
        return self.dora_ref is None or dora_axis(self.dora_ref.load("cpu", None), shape) == 0

    def dora_output_scale(self, base: torch.Tensor) -> torch.Tensor:
        """v (O,) = dora_scale / (‖W0 + ΔW‖ + eps) per output row, in float32 (float64 for a float64
        base) on base's device: output-axis DoRA gives W' = v·(W0 + ΔW). One ΔW is built (as the
        patch path does); raises like `delta()` when ΔW overflows."""
        if self.dora_ref is None:
            raise ValueError(f"module '{self.name}' has no dora_scale")
        shape = tuple(base.shape)
        if not self.dora_on_output_axis(shape):
            raise AdapterError(f"module '{self.name}': dora_scale {list(self.dora_ref.shape)} is "
                               "per input channel; only output-row DoRA has an output scale",
                               file=self.path, key=self.dora_ref.key)
        cdt = compute_dtype(base.dtype)
        factors = self.factors(base.device, cdt)
        w = self._diff_of(factors, self.scale).reshape(self.resolved_shape(shape))
        w += base.to(cdt)
        v = magnitude_ratio(w, self.dora_ref.load(base.device, cdt)).reshape(-1)
        if self.dora_may_overflow(cdt) and not (all_finite(w) and all_finite(v)):
            raise AdapterError(f"module '{self.name}': ΔW overflows {cdt} (NaN or Inf): factors too "
                               "large", file=self.path, key=self._first_key())
        return v

    def check_delta_finite(self, shape: tuple[int, ...] | None = None) -> None:
        """Raise the `AdapterError` that `delta()` raises when ΔW overflows float32 — only built
        when the factors' magnitude bound says it could (bypass never builds ΔW otherwise)."""
        if self.delta_may_overflow():
            if not all_finite(self.raw_delta(torch.float32, shape=shape)):
                raise AdapterError(f"module '{self.name}': ΔW overflows float32 (NaN or Inf)",
                                   file=self.path, key=self.name)

    def bypass_plan(self, layer: LayerGeometry, dora_scale: torch.Tensor | None = None):
        """A `bypass.BypassPlan` applying this module to `layer` at forward time; pass the
        output-axis DoRA scale `dora_output_scale(W0)` for a DoRA module."""
        from .bypass import BypassPlan

        return BypassPlan(self, layer, dora_scale)


ModuleFactory = Callable[..., AdapterModule]
