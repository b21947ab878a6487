"""The huge-page ΔW buffer pool (`lycoris_core.algos.buffers`): a freed ΔW's mapping is reused by
the next ΔW of the same size, the cap is respected, values are right, and two live ΔW never share
memory. Sizes are at the 32 MiB threshold (the smallest size that is pooled)."""

from __future__ import annotations

import gc

import pytest
import torch

from lycoris_core.algos import buffers, lokr
from lycoris_core.algos.lokr import LoKrFactors

MIB = 1 << 20
SHAPE = (4096, 2048)  # float32: 32 MiB, the smallest pooled size
NBYTES = 4096 * 2048 * 4

pytestmark = pytest.mark.skipif(not buffers.is_large(4096 * 2048, torch.float32),
                                reason="no MADV_HUGEPAGE here: buffers.empty is torch.empty")


@pytest.fixture(autouse=True)
def fresh_pool():
    limit = buffers.pool_limit()
    buffers.clear_pool()
    buffers.pool_limit(128 * MIB)
    yield
    buffers.clear_pool()
    buffers.pool_limit(limit)


def _address(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_freed_buffer_is_reused_only_when_no_tensor_views_it():
    a = buffers.empty(SHAPE)
    view = a.reshape(-1)[:10]  # a view keeps the mapping in use
    addr = _address(a)
    del a
    gc.collect()
    assert buffers.pool_stats()["idle_bytes"] == 0
    b = buffers.empty(SHAPE)
    addr_b = _address(b)
    assert addr_b != addr  # still viewed: not handed out again
    del view, b
    gc.collect()
    assert buffers.pool_stats()["idle_bytes"] == 2 * NBYTES
    before = buffers.pool_stats()["reused"]
    c = buffers.empty(SHAPE)
    assert buffers.pool_stats()["reused"] == before + 1
    assert _address(c) in {addr, addr_b}
    d = buffers.empty(SHAPE)
    assert _address(c) != _address(d)  # two live tensors: two mappings
    c.fill_(1.0)
    d.fill_(2.0)
    assert float(c.min()) == 1.0 and float(d.max()) == 2.0


def test_cap_is_respected_and_zero_disables_pooling():
    buffers.pool_limit(NBYTES)  # room for one idle mapping
    a, b = buffers.empty(SHAPE), buffers.empty(SHAPE)
    del a, b
    gc.collect()
    assert buffers.pool_stats()["idle_bytes"] == NBYTES
    buffers.pool_limit(0)
    assert buffers.pool_stats()["idle_bytes"] == 0
    e = buffers.empty(SHAPE)
    del e
    gc.collect()
    assert buffers.pool_stats()["idle_bytes"] == 0


def test_pooled_delta_is_correct_and_not_aliased():
    """Two LoKr ΔW built on pooled memory (stale contents from an earlier ΔW) equal torch.kron
    exactly, and the first is untouched by building the second."""
    g = torch.Generator().manual_seed(0)
    f1 = LoKrFactors(w1=torch.randn(64, 32, generator=g), w2=torch.randn(64, 64, generator=g))
    f2 = LoKrFactors(w1=torch.randn(64, 32, generator=g), w2=torch.randn(64, 64, generator=g))
    junk = buffers.empty(SHAPE).fill_(float("nan"))  # stale NaN in the mapping that gets reused
    del junk
    gc.collect()
    reused = buffers.pool_stats()["reused"]
    d1 = lokr.diff_weight(f1, 0.5)
    d1_copy = d1.clone()
    d2 = lokr.diff_weight(f2, 0.5)
    assert buffers.pool_stats()["reused"] == reused + 1  # d1 took the pooled mapping
    assert _address(d1) != _address(d2)
    torch.testing.assert_close(d1, torch.kron(f1.w1 * 0.5, f1.w2), rtol=0, atol=0)
    torch.testing.assert_close(d2, torch.kron(f2.w1 * 0.5, f2.w2), rtol=0, atol=0)
    assert torch.equal(d1, d1_copy)


def test_small_blocks_use_the_heap_when_they_cannot_be_pooled():
    """Below the huge-page size a mapping only pays off when it can be reused: with the pool off
    (or smaller than the block) `empty` is torch.empty, not a fresh mapping faulted in per call."""
    buffers.pool_limit(0)
    before = buffers.pool_stats()["fresh"]
    t = buffers.empty((1024, 1024))  # 4 MiB: a pooled size when the pool has room
    assert buffers.pool_stats()["fresh"] == before and t.shape == (1024, 1024)
    buffers.pool_limit(64 * MIB)
    buffers.empty((1024, 1024))
    assert buffers.pool_stats()["fresh"] == before + 1
