"""`AdapterModule.delta()` skips its pass over ΔW when the factors' magnitude bound
(`algos.<algo>.max_abs_bound`) shows ΔW cannot overflow. The bound must therefore never be below
the true max |ΔW|, and an overflowing ΔW must still be refused."""

from __future__ import annotations

import pytest
import torch

import lycoris_core as lc
from lycoris_core.algos import LoHaFactors, LoKrFactors, loha, lokr, lora
from lycoris_core.algos.lora import LoRAFactors


def _r(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CASES = {
    "lora": (lora, lambda s: LoRAFactors(_r(12, 3, seed=s), _r(3, 10, seed=s + 1))),
    "lora tucker": (lora, lambda s: LoRAFactors(_r(6, 3, 1, 1, seed=s), _r(2, 5, 1, 1, seed=s + 1),
                                                _r(3, 2, 3, 3, seed=s + 2))),
    "loha": (loha, lambda s: LoHaFactors(_r(12, 3, seed=s), _r(3, 10, seed=s + 1),
                                         _r(12, 2, seed=s + 2), _r(2, 10, seed=s + 3))),
    "loha tucker": (loha, lambda s: LoHaFactors(_r(2, 6, seed=s), _r(2, 5, seed=s + 1),
                                                _r(3, 6, seed=s + 2), _r(3, 5, seed=s + 3),
                                                _r(2, 2, 3, 3, seed=s + 4),
                                                _r(3, 3, 3, 3, seed=s + 5))),
    "lokr full": (lokr, lambda s: LoKrFactors(w1=_r(3, 2, seed=s), w2=_r(4, 5, seed=s + 1))),
    "lokr low": (lokr, lambda s: LoKrFactors(w1_a=_r(3, 2, seed=s), w1_b=_r(2, 2, seed=s + 1),
                                             w2_a=_r(4, 3, seed=s + 2), w2_b=_r(3, 5, seed=s + 3))),
    "lokr tucker": (lokr, lambda s: LoKrFactors(w1=_r(2, 2, seed=s), w2_a=_r(2, 4, seed=s + 1),
                                                w2_b=_r(3, 3, seed=s + 2),
                                                t2=_r(2, 3, 3, 3, seed=s + 3))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bound_is_never_below_the_largest_entry(name):
    algo, make = CASES[name]
    for seed in range(20):
        f = make(seed * 10)
        dw = algo.diff_weight(f, -0.7)
        bound = algo.max_abs_bound(f, -0.7)
        assert float(dw.abs().max()) <= bound * (1 + 1e-9)  # up to rounding of the products
        # and it is a tight-enough bound to skip the check for ordinary factors
        assert bound < 1e6


def test_overflowing_delta_is_still_refused():
    """LoKr with finite factors whose product overflows float32: the bound is huge, so the full
    check runs and names the module."""
    tensors = {"lora_unet_x.lokr_w1": torch.full((2, 2), 1e20),
               "lora_unet_x.lokr_w2": torch.full((3, 3), 1e20)}
    module = lc.adapter_from_tensors(tensors).modules["lora_unet_x"]
    with pytest.raises(lc.AdapterError, match="overflows"):
        module.delta()
    fine = {"lora_unet_x.lokr_w1": torch.full((2, 2), 1e10),
            "lora_unet_x.lokr_w2": torch.full((3, 3), 1e10)}
    assert float(lc.adapter_from_tensors(fine).modules["lora_unet_x"].delta().max()) == \
        pytest.approx(1e20)
