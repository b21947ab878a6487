"""Output tensors for full-size ΔW: CPU ones of 1 MiB or more are private mappings kept in a
small pool for the next ΔW of the same size, and from 32 MiB on they are on transparent huge pages.

glibc serves blocks under 32 MiB from its heap, where a freed ΔW is reused without page faults;
larger blocks are fresh mappings that the kernel faults in (and zeroes) 4 KiB at a time, which on
a typical machine costs several times the writing itself (an SDXL 10240×1280 or Anima 8192×2048
ΔW in float32 is 50–64 MiB). A private anonymous mapping advised MADV_HUGEPAGE is faulted in
2 MiB at a time instead (measured 7× faster for 64 MiB). Even so, fresh memory must be zeroed
by the kernel before it is written, so a fresh 64 MiB ΔW costs about two writes of it.

The pool removes that second write where it repeats: when the last tensor viewing a mapping is
freed, the mapping (its pages still resident) goes back to the pool, and the next `empty` of the
same byte size takes it instead of a fresh one. That is the common case of a model whose layers
share one shape (Anima's 28 blocks × 2 MLP weights of 64 MiB, SDXL's 10240×1280 GEGLU
projections) when ΔW is built one layer at a time (baking, merging, `AdapterModule.delta()`).
Blocks from 1 MiB are pooled too: glibc's heap gives them back to the system (`trim`) whenever
enough free memory gathers at its top, e.g. after a ΔW and a ΔW-sized temporary are both freed,
and then every call faults them in again (measured 8192 faults per 2048² LoHa ΔW with 2 threads).
Memory trade-off: up to `pool_limit()` bytes (default 64 MiB, one idle Anima-MLP ΔW;
`$LYCORIS_DW_POOL_MB` sets it, 0 turns the pool off) stay resident after the ΔW that used them is
gone, and a peak can be that much higher when a ΔW of another size is built meanwhile;
`clear_pool()` hands them back.
A mapping is only pooled once no tensor views it, so two live ΔW never share memory.
Where huge pages are unavailable (not Linux, or no MADV_HUGEPAGE) this is plain `torch.empty`;
so it is for smaller blocks (glibc reuses those) and other devices.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
import threading
import weakref
from collections import OrderedDict

import torch

HUGE_MIN_BYTES = 32 << 20
POOL_MIN_BYTES = 1 << 20
"""CPU tensors from this size on are pooled mappings (huge pages from `HUGE_MIN_BYTES`)."""
_HUGE_OK = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") \
    and hasattr(mmap, "MAP_PRIVATE")

_lock = threading.RLock()  # re-entrant: a pooled mapping can come back inside `empty` (a free)
_pool: OrderedDict[int, list[mmap.mmap]] = OrderedDict()  # byte size → idle mappings, oldest first
_pool_bytes = 0
_limit = int(float(os.environ.get("LYCORIS_DW_POOL_MB", "64")) * (1 << 20))
_stats = {"fresh": 0, "reused": 0}


def is_large(numel: int, dtype: torch.dtype) -> bool:
    """Whether a tensor this size would be put on huge pages (callers skip `empty` otherwise)."""
    return _HUGE_OK and numel * dtype.itemsize >= HUGE_MIN_BYTES


def pool_limit(nbytes: int | None = None) -> int:
    """The pool's cap in bytes; with `nbytes`, set it (idle mappings over the cap are freed)."""
    global _limit
    if nbytes is not None:
        with _lock:
            _limit = max(0, int(nbytes))
            _trim()
    return _limit


def pool_stats() -> dict[str, int]:
    """{"fresh": mappings created, "reused": taken from the pool, "idle_bytes": pooled now}."""
    with _lock:
        return {**_stats, "idle_bytes": _pool_bytes}


def clear_pool() -> None:
    """Free every idle mapping (their memory goes back to the system)."""
    with _lock:
        _pool.clear()
        _set_bytes(0)


def _set_bytes(n: int) -> None:
    global _pool_bytes
    _pool_bytes = n


def _trim() -> None:
    """Drop the oldest idle mappings until the pool fits its cap (caller holds the lock)."""
    while _pool_bytes > _limit and _pool:
        size, maps = next(iter(_pool.items()))
        maps.pop(0)
        _set_bytes(_pool_bytes - size)
        if not maps:
            del _pool[size]


def _give_back(buf: mmap.mmap, nbytes: int) -> None:
    """Called when the last tensor on `buf` is gone: keep it for reuse if it fits the cap."""
    with _lock:
        if nbytes > _limit:
            return  # dropped: the mapping is unmapped with its last reference
        _pool.setdefault(nbytes, []).append(buf)
        _pool.move_to_end(nbytes)
        _set_bytes(_pool_bytes + nbytes)
        _trim()


def _take(nbytes: int) -> mmap.mmap:
    """An idle mapping of exactly `nbytes` from the pool, else a fresh huge-page one."""
    with _lock:
        maps = _pool.get(nbytes)
        if maps:
            buf = maps.pop()
            if not maps:
                del _pool[nbytes]
            _set_bytes(_pool_bytes - nbytes)
            _stats["reused"] += 1
            return buf
        _stats["fresh"] += 1
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if nbytes >= HUGE_MIN_BYTES:
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # THP switched off: still a correct (ordinary) mapping
            pass
    return buf


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape`: CPU blocks ≥ 1 MiB pooled, ≥ 32 MiB on huge
    pages.

    The contents are whatever the memory held before (like `torch.empty`): write all of it.
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if not _HUGE_OK or nbytes < POOL_MIN_BYTES or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    if nbytes < HUGE_MIN_BYTES and nbytes > _limit:
        # could not be kept for reuse (pool off or too small): a private mapping would be faulted
        # in afresh on every call, glibc's heap at least sometimes reuses memory
        return torch.empty(shape, dtype=dtype, device=device)
    buf = _take(nbytes)
    # The tensor's storage holds `view` (and through it `buf`) until the last tensor sharing the
    # storage is freed; `view` is this allocation's own object, so its end is that moment.
    view = memoryview(buf)
    out = torch.frombuffer(view, dtype=dtype).view(shape)
    weakref.finalize(view, _give_back, buf, nbytes).atexit = False
    return out
