"""An adapter module applied at forward time ("bypass"): y = f(x) + s·h(x), the base weight is
never read or written.

`BypassPlan` binds one `AdapterModule` to one layer (`LayerGeometry`). `change(x, out, s)` is what
strength s adds to the layer's output `out = f(x)`:

- without DoRA: s · scale·ΔW x, by the algorithm's `bypass_diff` (no ΔW formed: LoKr by the
  Kronecker identity, LoHa as a Khatri–Rao rank-R² product or ΔW in row blocks, LoRA as its chain);
- output-axis DoRA: W' = v·(W0 + ΔW) with v = m / ‖W0 + ΔW‖ per output row (computed once from the
  base weight, `AdapterModule.dora_output_scale`), so W0 + s(W' − W0) gives
  f(x) + s·[(v − 1)·(f(x) − bias) + v·ΔW x] (`dora.bypass_change`).

Precision: computed in float32 (float64 for float64 inputs) whatever the input, factor and output
dtypes; the output is rounded once when the change is added (fp16 Hadamard / Khatri–Rao products
overflow, SPEC §3). Memory: the factors are kept per device in their stored dtype (on the CPU the
adapter's own tensors, no copy) and cast for each call; nothing of ΔW's size is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .base import AdapterModule, compute_dtype
from .dora import bypass_change
from .layer import LayerGeometry


def _cast(factors, dtype: torch.dtype):
    """The factors dataclass with every tensor cast to `dtype` (no copy where already so)."""
    values = {f.name: getattr(factors, f.name) for f in fields(factors)}
    return type(factors)(**{k: v.to(dtype) if v is not None else None for k, v in values.items()})


@dataclass
class BypassPlan:
    """`module` applied to `layer` at forward time; `dora` is the output-axis DoRA scale v (O,)
    for a DoRA module. `strategy` pins LoHa's strategy (`loha.STRATEGIES`; None: per call by cost)."""

    module: AdapterModule
    layer: LayerGeometry
    dora: torch.Tensor | None = None
    strategy: str | None = None
    _factors: dict = field(default_factory=dict, init=False, repr=False)
    _ready: dict = field(default_factory=dict, init=False, repr=False)
    _dora: dict = field(default_factory=dict, init=False, repr=False)
    _strategies: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.module.resolved_shape(self.layer.weight_shape)  # raises naming file and key
        if self.module.has_dora and self.dora is None:
            raise ValueError(f"module '{self.module.name}' is DoRA: pass its output scale")
        if self.dora is not None:
            if self.dora.numel() != self.layer.out_features:
                raise ValueError(f"DoRA scale has {self.dora.numel()} values for "
                                 f"{self.layer.out_features} outputs")
            self.dora = self.dora.detach().reshape(-1)
        self.scale = self.module.scale
        self._loha = self.module.algo == "loha"

    def factors_on(self, device: torch.device):
        """The module's factors on `device` in their stored dtype, read (and checked) once per
        device."""
        f = self._factors.get(device)
        if f is None:
            with torch.inference_mode(False), torch.no_grad():  # usable by autograd later
                f = self._factors[device] = self.module.factors(device, None)
        return f

    def factors_for(self, device: torch.device, dtype: torch.dtype):
        """The factors on `device` cast to `dtype`: kept when that is no copy (stored in `dtype`),
        else cast again at each call (a float32 copy of fp16 factors would double their memory)."""
        f = self._ready.get((device, dtype))
        if f is not None:
            return f
        stored = self.factors_on(device)
        f = _cast(stored, dtype)
        if all(getattr(f, k.name) is getattr(stored, k.name) for k in fields(f)):
            self._ready[(device, dtype)] = f
        return f

    def _strategy_for(self, f, x: torch.Tensor) -> dict:
        """LoHa's strategy for this input size (`loha.choose_strategy`, once per size)."""
        if not self._loha:
            return {}
        if self.strategy is not None:
            return {"strategy": self.strategy}
        size = (self.layer.positions(x), self.layer.output_positions(x))
        strategy = self._strategies.get(size)
        if strategy is None:
            from .loha import choose_strategy

            strategy = self._strategies[size] = choose_strategy(f, self.layer, *size)
        return {"strategy": strategy}

    def release(self) -> None:
        """Forget the factors and DoRA scales copied to devices other than the CPU (the CPU ones
        are the adapter's own tensors)."""
        for cache in (self._factors, self._ready, self._dora):
            for k in [k for k in cache if (k[0] if isinstance(k, tuple) else k).type != "cpu"]:
                del cache[k]

    def _dora_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        v = self._dora.get((device, dtype))
        if v is None:
            with torch.inference_mode(False), torch.no_grad():
                v = self._dora[(device, dtype)] = self.dora.to(device, dtype)
        return v

    def delta_out(self, x: torch.Tensor) -> torch.Tensor:
        """scale · ΔW x in float32 (float64 for float64 x), in the layer's output layout."""
        cdt = compute_dtype(x.dtype)
        f = self.factors_for(x.device, cdt)
        x = x.to(cdt)
        unbatched = self.layer.conv and x.dim() == self.layer.spatial + 1
        if unbatched:
            x = x.unsqueeze(0)
        h = self.module.bypass_diff(x, f, self.layer, self.scale, **self._strategy_for(f, x))
        return h.squeeze(0) if unbatched else h

    def change(self, x: torch.Tensor, out: torch.Tensor, strength: float,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """What strength s adds to the layer's output `out` = f(x) (computation dtype).
        `bias`: the layer's bias, needed for DoRA (its rescale acts on W0 x = f(x) − bias)."""
        h = self.delta_out(x)
        if self.dora is None:
            return h.mul_(strength) if strength != 1.0 else h
        base = out.to(h.dtype, copy=True)
        if bias is not None:
            shape = [1] * base.dim()
            shape[self.layer.channel_dim] = -1
            base -= bias.to(base.device, base.dtype).reshape(shape)
        return bypass_change(base, h, self._dora_on(h.device, h.dtype), strength,
                             self.layer.channel_dim)

    def apply(self, x: torch.Tensor, out: torch.Tensor, strength: float,
              bias: torch.Tensor | None = None, inplace: bool = False) -> torch.Tensor:
        """f(x) + change, rounded once to out's dtype; into `out` itself when `inplace`."""
        ch = self.change(x, out, strength, bias)
        if inplace:
            return out.add_(ch)
        return torch.add(out, ch).to(out.dtype)
