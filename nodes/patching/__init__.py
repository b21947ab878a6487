"""The only place that touches ComfyUI's ModelPatcher.

- `static`: an adapter applied at a constant strength as exact fp32 weight patches (loaders,
  training output, merges); the load report and the adapter cache.
- `scheduled`: strength changing over sampling steps (LyCORISStrengthSchedule), built on the
  static patch arithmetic.
- `bypass`: modules applied at forward time by hooks (mode "bypass"): no weight is written.
"""

from .bypass import MODES, BypassInjection, injections_of
from .static import (
    LoadResult,
    LycorisPatch,
    algo_label,
    apply_adapter,
    cache_key,
    cached_adapter,
    clear_cache,
    delta_row_blocks,
)

__all__ = ["MODES", "BypassInjection", "LoadResult", "LycorisPatch", "algo_label", "apply_adapter",
           "cache_key", "cached_adapter", "clear_cache", "delta_row_blocks", "injections_of"]
