"""lycoris_core: LoHa / LoKr / LoRA adapters in pure torch — read, reconstruct ΔW, map keys, write.

Never imports ComfyUI; usable from scripts and `python -m lycoris_core`.

    >>> adapter = load_adapter("style.safetensors")
    >>> deltas, unmatched = delta_weights(adapter, {key: w.shape for key, w in state_dict.items()})
"""

from .adapter import (
    Adapter,
    MemorySource,
    adapter_from_tensors,
    decode_network_args,
    delta_weights,
    load_adapter,
)
from .algos import (
    ALGORITHMS,
    AdapterModule,
    LoHaModule,
    LoKrModule,
    LoRAModule,
    apply_dora,
    factorization,
)
from .convert import convert_file, convert_folder, convert_tensors, plan_conversion, sdscripts_hashes
from .errors import AdapterError
from .keymap import KeyMap, Resolution, block_of, component_of, detect_architecture
from .manifests import manifest
from .safetensors_io import SafetensorsFile, load_tensors, read_metadata, save_safetensors

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "Adapter", "AdapterError", "AdapterModule", "KeyMap", "LoHaModule", "LoKrModule",
    "LoRAModule", "MemorySource", "Resolution", "SafetensorsFile", "adapter_from_tensors",
    "apply_dora", "block_of", "component_of", "decode_network_args", "delta_weights",
    "detect_architecture", "factorization", "load_adapter", "load_tensors", "manifest",
    "read_metadata", "save_safetensors", "__version__",
]
__all__ += ["convert_file", "convert_folder", "convert_tensors", "plan_conversion", "sdscripts_hashes"]
from .schedule import Keyframe, Schedule, parse_schedule, render_curve  # noqa: E402

__all__ += ["Keyframe", "Schedule", "parse_schedule", "render_curve"]
from .paths import is_within, safe_output_path  # noqa: E402

__all__ += ["is_within", "safe_output_path"]
from .bake import bake_file, bake_state_dict  # noqa: E402
from .merge import FactorSpec, MergeResult, merge_adapters, save_result  # noqa: E402
from .resize import resize_adapter  # noqa: E402

__all__ += ["FactorSpec", "MergeResult", "bake_file", "bake_state_dict", "merge_adapters", "resize_adapter",
            "save_result"]
from .blocks import PRESETS, BlockWeights, parse_block_weights  # noqa: E402

__all__ += ["PRESETS", "BlockWeights", "parse_block_weights"]
