"""Trainable LoHa / LoKr modules (torch.nn.Module) on top of the pure ΔW functions in `algos/`.

One module adapts one Linear or Conv2d layer of shape (O, I[, k, k]). It never touches the layer:
`adapter_output(x, conv)` returns ΔW·x (what sd-scripts adds to the layer's own output), with
sd-scripts' dropouts. Gradients come from autograd alone (no custom backward, SPEC §5).

Initialisation follows kohya sd-scripts (SPEC §4), so ΔW = 0 at step 0:
- LoHa: w1_a ~ N(0, 0.1), w1_b ~ N(0, 1), w2_a = 0, w2_b ~ N(0, 1);
  Tucker (k×k conv): t1, t2 ~ N(0, 0.1), w1_a = 0, w2_a ~ N(0, 0.1), w*_b ~ N(0, 1).
- LoKr: w1 (or w1_a, w1_b), w2_a, t2 kaiming-uniform (a = √5); w2_b = 0 (or full w2 = 0).
- use_scalar (LyCORIS): a trainable scalar starts at 0 and the zero factor gets a random init;
  the scalar is folded into w1_a (LoHa) / w1 or w1_a (LoKr) when saving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..algos import loha as loha_algo
from ..algos import lokr as lokr_algo
from ..algos.lokr import factorization
from ..layout import LoKrDims, lokr_layout, w2_full_shape


@dataclass(frozen=True)
class LayerSpec:
    """The adapted layer: `kind` 'linear' or 'conv', weight shape (O, I[, kh, kw])."""

    kind: str
    shape: tuple[int, ...]

    @property
    def out_dim(self) -> int:
        return self.shape[0]

    @property
    def in_dim(self) -> int:
        return self.shape[1]

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.shape[2:])

    @property
    def is_kxk(self) -> bool:
        """A conv with a kernel larger than 1×1 (sd-scripts' 'conv3x3' kind)."""
        return self.kind == "conv" and any(k != 1 for k in self.kernel)


@dataclass(frozen=True)
class ConvArgs:
    """Arguments of the wrapped Conv2d that ΔW must be applied with."""

    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] | str = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class TrainModule(nn.Module):
    """Common part: alpha/scale, multiplier, dropouts, scalar and applying ΔW to activations."""

    algo: str = ""

    def __init__(self, name: str, spec: LayerSpec, rank: int, alpha: float | None,
                 rank_dropout: float = 0.0, module_dropout: float = 0.0, use_scalar: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"{name}: rank must be >= 1, got {rank}")
        self.lora_name = name
        self.spec = spec
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha else float(rank)
        self.multiplier = 1.0
        self.rank_dropout = float(rank_dropout or 0.0)
        self.module_dropout = float(module_dropout or 0.0)
        self.use_scalar = bool(use_scalar)
        if use_scalar:
            self.scalar = nn.Parameter(torch.tensor(0.0))
        else:
            self.register_buffer("scalar", torch.tensor(1.0), persistent=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # --- what subclasses provide -------------------------------------------------------------
    def delta(self) -> torch.Tensor:
        """ΔW (scale and scalar applied) in the layer's weight shape."""
        raise NotImplementedError  # pragma: no cover

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """{suffix: tensor} in sd-scripts naming, scalar folded in, alpha included."""
        raise NotImplementedError  # pragma: no cover

    def _linear_delta_out(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.delta().to(x.dtype))

    # --- shared behaviour --------------------------------------------------------------------
    def _alpha_tensor(self) -> torch.Tensor:
        return torch.tensor(self.alpha, dtype=torch.float32)

    def adapter_output(self, x: torch.Tensor, conv: ConvArgs | None = None) -> torch.Tensor | None:
        """multiplier · ΔW x, with sd-scripts' module/rank dropout in training mode.

        Returns None when module dropout skips the module for this forward. Rank dropout zeroes
        random output channels (ΔW rows) and rescales by 1/(1-p), as sd-scripts does.
        Random numbers come from the global CPU generator (gradient checkpointing replays it).
        """
        if self.training and self.module_dropout > 0 and float(torch.rand(1)) < self.module_dropout:
            return None
        if self.spec.kind == "linear":
            y = self._linear_delta_out(x)
            channel_dim = -1
        else:
            w = self.delta().to(x.dtype)
            c = conv or ConvArgs()
            y = F.conv2d(x, w, None, c.stride, c.padding, c.dilation, c.groups)
            channel_dim = 1
        mult = self.multiplier
        if self.training and self.rank_dropout > 0:
            keep = (torch.rand(self.spec.out_dim) > self.rank_dropout).to(device=y.device, dtype=y.dtype)
            shape = [1] * y.dim()
            shape[channel_dim] = -1
            y = y * keep.reshape(shape)
            mult = mult / (1.0 - self.rank_dropout)
        return y * mult if mult != 1.0 else y


class LoHaTrain(TrainModule):
    """LoHa: ΔW = scale · scalar · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), Tucker for k×k convs."""

    algo = "loha"

    def __init__(self, name: str, spec: LayerSpec, rank: int, alpha: float | None, *,
                 use_tucker: bool = False, **kw):
        super().__init__(name, spec, rank, alpha, **kw)
        o, i, r = spec.out_dim, spec.in_dim, self.rank
        self.tucker = bool(use_tucker) and spec.is_kxk
        if self.tucker:
            k = spec.kernel
            self.hada_t1 = nn.Parameter(torch.empty(r, r, *k))
            self.hada_w1_a = nn.Parameter(torch.empty(r, o))
            self.hada_w1_b = nn.Parameter(torch.empty(r, i))
            self.hada_t2 = nn.Parameter(torch.empty(r, r, *k))
            self.hada_w2_a = nn.Parameter(torch.empty(r, o))
            self.hada_w2_b = nn.Parameter(torch.empty(r, i))
        else:
            flat_in = i * math.prod(spec.kernel) if spec.is_kxk else i
            self.hada_w1_a = nn.Parameter(torch.empty(o, r))
            self.hada_w1_b = nn.Parameter(torch.empty(r, flat_in))
            self.hada_w2_a = nn.Parameter(torch.empty(o, r))
            self.hada_w2_b = nn.Parameter(torch.empty(r, flat_in))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        if self.tucker:  # sd-scripts: the zero factor is w1_a in Tucker mode
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
            nn.init.normal_(self.hada_w2_a, std=0.1)
            zero = self.hada_w1_a
        else:
            nn.init.normal_(self.hada_w1_a, std=0.1)
            zero = self.hada_w2_a
        if self.use_scalar:
            nn.init.normal_(zero, std=0.1)
        else:
            nn.init.zeros_(zero)

    def factors(self) -> loha_algo.LoHaFactors:
        t1 = self.hada_t1 if self.tucker else None
        t2 = self.hada_t2 if self.tucker else None
        return loha_algo.LoHaFactors(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b,
                                     t1, t2)

    def delta(self) -> torch.Tensor:
        dw = loha_algo.diff_weight(self.factors(), self.scale)
        return (dw * self.scalar).reshape(self.spec.shape)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        names = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]
        if self.tucker:
            names += ["hada_t1", "hada_t2"]
        out = {n: getattr(self, n).detach() for n in names}
        out["hada_w1_a"] = out["hada_w1_a"] * self.scalar.detach()
        out["alpha"] = self._alpha_tensor()
        return out


class LoKrTrain(TrainModule):
    """LoKr: ΔW = scale · scalar · kron(W1, W2) with sd-scripts' full-matrix rule.

    (a, b) = factorization(O, factor), (c, d) = factorization(I, factor); W1 (a, c) full, or
    w1_a (a, R) @ w1_b (R, c) with decompose_both when R < max(a, c)/2. W2 is full when
    R ≥ max(b, d)/2, else w2_a (b, R) @ w2_b (R, d[·k·k]) or Tucker t2/w2_a (R, b)/w2_b (R, d).
    Both halves full → scale 1 (alpha stored as R).
    """

    algo = "lokr"

    def __init__(self, name: str, spec: LayerSpec, rank: int, alpha: float | None, *,
                 factor: int = -1, decompose_both: bool = False, use_tucker: bool = False,
                 bypass: bool | None = None, **kw):
        super().__init__(name, spec, rank, alpha, **kw)
        r = self.rank
        a, b = factorization(spec.out_dim, int(factor))
        c, d = factorization(spec.in_dim, int(factor))
        self.factor = int(factor)
        self.dims = (a, b, c, d)
        self.bypass = bypass
        k = spec.kernel if spec.is_kxk else ()
        self.tucker = False
        layout = lokr_layout(LoKrDims(a, b, c, d), r, decompose_both)  # the readers' rule
        if not layout.w1_full:
            self.lokr_w1_a = nn.Parameter(torch.empty(a, r))
            self.lokr_w1_b = nn.Parameter(torch.empty(r, c))
            self.w1_full = False
        else:
            self.lokr_w1 = nn.Parameter(torch.empty(a, c))
            self.w1_full = True
        if layout.w2_full:  # full-matrix rule (for k×k convs the full test comes first)
            self.lokr_w2 = nn.Parameter(torch.empty(w2_full_shape(b, d, k)))
            self.w2_full = True
        else:
            self.w2_full = False
            if k and use_tucker:
                self.tucker = True
                self.lokr_t2 = nn.Parameter(torch.empty(r, r, *k))
                self.lokr_w2_a = nn.Parameter(torch.empty(r, b))
                self.lokr_w2_b = nn.Parameter(torch.empty(r, d))
            else:
                self.lokr_w2_a = nn.Parameter(torch.empty(b, r))
                self.lokr_w2_b = nn.Parameter(torch.empty(r, d * math.prod(k)))
        if self.w1_full and self.w2_full:
            self.alpha = float(r)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.w1_full:
            _kaiming(self.lokr_w1)
        else:
            _kaiming(self.lokr_w1_a)
            _kaiming(self.lokr_w1_b)
        zero = self.lokr_w2 if self.w2_full else self.lokr_w2_b
        if not self.w2_full:
            if self.tucker:
                _kaiming(self.lokr_t2)
            _kaiming(self.lokr_w2_a)
        if self.use_scalar:
            _kaiming(zero)
        else:
            nn.init.zeros_(zero)

    def _names(self) -> list[str]:
        names = ["lokr_w1"] if self.w1_full else ["lokr_w1_a", "lokr_w1_b"]
        names += ["lokr_w2"] if self.w2_full else ["lokr_w2_a", "lokr_w2_b"]
        if self.tucker:
            names.append("lokr_t2")
        return names

    def factors(self) -> lokr_algo.LoKrFactors:
        return lokr_algo.LoKrFactors(**{n[len("lokr_"):]: getattr(self, n) for n in self._names()})

    def delta(self) -> torch.Tensor:
        dw = lokr_algo.diff_weight(self.factors(), self.scale)
        return (dw * self.scalar).reshape(self.spec.shape)

    def use_bypass(self, tokens: int) -> bool:
        """Apply kron(W1, W2) to activations instead of building ΔW when that costs fewer flops."""
        if self.bypass is not None:
            return self.bypass
        a, b, c, d = self.dims
        r = self.rank
        rebuild = 0 if self.w2_full else b * d * r
        via_bypass = tokens * (a * c * d + a * b * d) + rebuild
        via_dense = a * b * c * d + tokens * a * b * c * d + rebuild
        return via_bypass < via_dense

    def _linear_delta_out(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_bypass(x.numel() // max(1, x.shape[-1])):
            f = self.factors()
            y = lokr_algo.bypass_linear(x, f, self.scale)
            return y * self.scalar.to(y.dtype) if self.use_scalar else y
        return super()._linear_delta_out(x)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        out = {n: getattr(self, n).detach() for n in self._names()}
        first = "lokr_w1" if self.w1_full else "lokr_w1_a"
        out[first] = out[first] * self.scalar.detach()
        out["alpha"] = self._alpha_tensor()
        return out


ALGOS: dict[str, type[TrainModule]] = {"loha": LoHaTrain, "lokr": LoKrTrain}


def make_module(algo: str, name: str, spec: LayerSpec, rank: int, alpha: float | None, *,
                use_tucker: bool = False, use_scalar: bool = False, rank_dropout: float = 0.0,
                module_dropout: float = 0.0, factor: int = -1, decompose_both: bool = False,
                bypass: bool | None = None) -> TrainModule:
    """Build a trainable LoHa ('loha') or LoKr ('lokr') module for one layer."""
    common = dict(use_tucker=use_tucker, use_scalar=use_scalar, rank_dropout=rank_dropout,
                  module_dropout=module_dropout)
    if algo == "loha":
        return LoHaTrain(name, spec, rank, alpha, **common)
    if algo == "lokr":
        return LoKrTrain(name, spec, rank, alpha, factor=factor, decompose_both=decompose_both,
                         bypass=bypass, **common)
    raise ValueError(f"unknown algorithm {algo!r}: expected 'loha' or 'lokr'")
