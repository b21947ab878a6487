"""One module per adapter algorithm, all behind `AdapterModule` (base.py).

Each algorithm module holds the same few pieces: a dataclass of its loaded factors, a pure
`diff_weight(factors, scale)` and the `AdapterModule` subclass that reads and checks shapes.
"""

from .base import AdapterModule, TensorRef, TensorSource, compute_dtype
from .dora import apply_dora
from .loha import LoHaFactors, LoHaModule
from .lokr import LoKrFactors, LoKrModule, factorization
from .lora import LoRAFactors, LoRAModule

ALGORITHMS: dict[str, type[AdapterModule]] = {
    "lora": LoRAModule,
    "loha": LoHaModule,
    "lokr": LoKrModule,
}

__all__ = [
    "ALGORITHMS", "AdapterModule", "TensorRef", "TensorSource", "compute_dtype", "apply_dora",
    "LoHaFactors", "LoHaModule", "LoKrFactors", "LoKrModule", "LoRAFactors", "LoRAModule",
    "factorization",
]
