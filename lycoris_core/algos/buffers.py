"""Output tensors for full-size ΔW: large CPU ones are backed by transparent huge pages.

glibc serves blocks under 32 MiB from its heap, where a freed ΔW is reused without page faults;
larger blocks are fresh mappings that the kernel faults in 4 KiB at a time, which on a typical
machine costs several times the writing itself (an SDXL 10240×1280 or Anima 8192×2048 ΔW in
float32 is 50–64 MiB). A private anonymous mapping advised MADV_HUGEPAGE is faulted in 2 MiB
at a time instead (measured 7× faster for 64 MiB, as fast as copying into touched memory).
Where that is unavailable (not Linux, or THP disabled) this is plain `torch.empty`.
"""

from __future__ import annotations

import math
import mmap
import sys

import torch

HUGE_MIN_BYTES = 32 << 20
_HUGE_OK = sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE") \
    and hasattr(mmap, "MAP_PRIVATE")


def is_large(numel: int, dtype: torch.dtype) -> bool:
    """Whether a tensor this size would be put on huge pages (callers skip `empty` otherwise)."""
    return _HUGE_OK and numel * dtype.itemsize >= HUGE_MIN_BYTES


def empty(shape: tuple[int, ...] | list[int], dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> torch.Tensor:
    """An uninitialised contiguous tensor of `shape`; CPU blocks ≥ 32 MiB on huge pages."""
    nbytes = math.prod(shape) * dtype.itemsize
    if not _HUGE_OK or nbytes < HUGE_MIN_BYTES or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP switched off: still a correct (ordinary) mapping
        pass
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps `buf` alive
