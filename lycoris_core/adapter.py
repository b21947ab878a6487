"""`Adapter`: a file's modules grouped and checked, plus `load_adapter` and `delta_weights`.

Flow: file → `SafetensorsFile` (validated header, no tensor read) → keys split into module name
and suffix (naming.py) → one `AdapterModule` per module (algos/) → resolved against a model's keys
(keymap.py) → ΔW per model key.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .algos import ALGORITHMS, AdapterModule, TensorRef
from .errors import AdapterError
from .keymap import KeyMap, Resolution
from .manifests import known_architectures, manifest
from .naming import FIELD_ALGO, SUFFIXES, split_key
from .safetensors_io import SafetensorsFile

log = logging.getLogger("lycoris_nodes")


class MemorySource:
    """Tensors already in memory (trained, merged or converted adapters)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], path: str = "<memory>"):
        self.tensors = dict(tensors)
        self.path = path

    def get(self, key: str, device="cpu") -> torch.Tensor:
        try:
            return self.tensors[key].to(device)
        except KeyError:
            raise AdapterError("no such tensor", file=self.path, key=key) from None


def decode_network_args(metadata: Mapping[str, str]) -> dict:
    """`ss_network_args` as a dict (it is JSON of string values); {} when absent or unreadable."""
    raw = metadata.get("ss_network_args")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        log.warning("ss_network_args is not JSON: %.80s", raw)
        return {}
    return value if isinstance(value, dict) else {}


@dataclass
class Adapter:
    """An adapter file: metadata and modules (module name as spelled in the file → module)."""

    path: str
    metadata: dict[str, str]
    modules: dict[str, AdapterModule]
    unknown_keys: list[str] = field(default_factory=list)
    source: object = field(default=None, repr=False)

    @property
    def network_args(self) -> dict:
        return decode_network_args(self.metadata)

    def algorithms(self) -> dict[str, int]:
        return dict(Counter(m.algo for m in self.modules.values()))

    def resolve(self, keymap: KeyMap) -> Resolution:
        """Match modules to model keys; two spellings of one module are an error."""
        res = keymap.resolve_all(self.modules)
        seen: dict[str, str] = {}
        for name, key in res.matched.items():
            if key in seen:
                raise AdapterError(
                    f"modules '{seen[key]}' and '{name}' both patch {key} (the same module in two "
                    "spellings)", file=self.path, key=name)
            seen[key] = name
        return res

    def guess_architecture(self) -> tuple[str, Resolution]:
        """Resolve against the bundled full-size manifests; the best-matching architecture wins."""
        best: tuple[str, Resolution] | None = None
        for arch in known_architectures():
            res = self.resolve(KeyMap(manifest(arch)))
            if best is None or len(res.matched) > len(best[1].matched):
                best = (arch, res)
        assert best is not None
        if not best[1].matched:
            return "unknown", best[1]
        return best

    def summary(self, keymap: KeyMap | None = None) -> dict:
        """Everything `inspect` and the loader report show, as plain data."""
        if keymap is None:
            arch, res = self.guess_architecture()
        else:
            arch, res = keymap.architecture, self.resolve(keymap)
        ranks, alphas, modes = Counter(), Counter(), Counter()
        factors = Counter()
        for m in self.modules.values():
            ranks[str(m.rank) if m.rank else "full"] += 1
            alphas[_fmt(m.alpha) if m.rank else "-"] += 1
            d = m.describe()
            if m.algo == "lokr":
                modes[f"lokr w1 {d['w1']} / w2 {d['w2']}"] += 1
                factors[str(d["factor"])] += 1
            else:
                modes[f"{m.algo} {d.get('mode', '')}".strip()] += 1
            if m.has_dora:
                modes["dora"] += 1
        return {
            "file": self.path,
            "architecture": arch,
            "modules": len(self.modules),
            "algorithms": self.algorithms(),
            "ranks": dict(ranks),
            "alphas": dict(alphas),
            "modes": dict(modes),
            "lokr_factor": dict(factors),
            "matched": len(res.matched),
            "matched_by_component": res.by_component(),
            "unmatched": list(res.unmatched),
            "ambiguous": res.ambiguous,
            "unknown_keys": list(self.unknown_keys),
            "network_args": self.network_args,
            "metadata": dict(self.metadata),
            "readers": [r.as_dict() for r in self.readers(arch, res)],
        }

    def readers(self, arch: str, res: Resolution) -> list:
        """`readers.ReaderLine` per reader (sd-scripts, LyCORIS, ComfyUI core), with the layer
        shapes of the bundled manifest when the architecture is known."""
        from .readers import reader_lines

        try:  # display only: never let it stop a load
            shapes = {}
            if arch in known_architectures():
                full = manifest(arch)
                shapes = {n: tuple(full[k]) for n, k in res.matched.items() if k in full}
            return reader_lines(self.modules, shapes, arch)
        except Exception:  # pragma: no cover - a bug here must not break loading
            log.exception("%s: reader compatibility lines failed", self.path)
            return []


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def build_modules(shapes: Mapping[str, tuple[int, ...]], source, path: str
                  ) -> tuple[dict[str, AdapterModule], list[str]]:
    """Group tensor keys into modules and check their shapes (no tensor data is read)."""
    groups: dict[str, dict[str, str]] = defaultdict(dict)
    unknown: list[str] = []
    for key in shapes:
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, suffix = split
        fld = SUFFIXES[suffix].field
        if fld in groups[module]:
            raise AdapterError(f"module '{module}' has '{fld}' twice ({groups[module][fld]})",
                               file=path, key=key)
        groups[module][fld] = key
    modules: dict[str, AdapterModule] = {}
    for module, fields in groups.items():
        algos = {FIELD_ALGO[f] for f in fields} - {None}
        if not algos:
            key = next(iter(fields.values()))
            raise AdapterError(f"module '{module}' has only {sorted(fields)} and no factor tensors",
                               file=path, key=key)
        if len(algos) > 1:
            raise AdapterError(f"module '{module}' mixes tensors of {sorted(algos)}", file=path,
                               key=next(iter(fields.values())))
        algo = algos.pop()
        refs = {f: TensorRef(k, tuple(shapes[k]), source) for f, k in fields.items()}
        alpha, dora = refs.pop("alpha", None), refs.pop("dora_scale", None)
        if alpha is not None and (len(alpha.shape) > 1 or math.prod(alpha.shape) != 1):
            raise AdapterError(f"alpha must be a scalar, has shape {list(alpha.shape)}",
                               file=path, key=alpha.key)
        modules[module] = ALGORITHMS[algo](name=module, source=source, alpha_ref=alpha,
                                           dora_ref=dora, **refs)
    return modules, unknown


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Open an adapter file lazily: header and shapes are checked now, tensors read on use.

    Raises `AdapterError` (naming the file and the key) for anything unusable.
    """
    f = SafetensorsFile(path)
    shapes = {k: info.shape for k, info in f.infos.items()}
    for k, info in f.infos.items():
        if split_key(k) is not None and info.dtype not in ("F32", "F16", "BF16", "F64") and not (
                k.endswith(".alpha") and info.dtype in ("I64", "I32", "I16", "I8", "U8")):
            raise AdapterError(f"unsupported dtype {info.dtype} for an adapter tensor",
                               file=f.path, key=k)
    modules, unknown = build_modules(shapes, f, f.path)
    if not modules:
        raise AdapterError("no LoRA, LoHa or LoKr tensors found "
                           f"({len(unknown)} other keys, e.g. {unknown[:3]})", file=f.path)
    if unknown:
        log.warning("%s: %d keys are not adapter tensors and are ignored (e.g. %s)", f.path,
                    len(unknown), unknown[:3])
    return Adapter(f.path, dict(f.metadata), modules, unknown, source=f)


def adapter_from_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                         name: str = "<memory>") -> Adapter:
    """An `Adapter` over tensors in memory (same checks as a file)."""
    src = MemorySource(tensors, name)
    modules, unknown = build_modules({k: tuple(v.shape) for k, v in tensors.items()}, src, name)
    if not modules:
        raise AdapterError("no LoRA, LoHa or LoKr tensors found", file=name)
    return Adapter(name, dict(metadata or {}), modules, unknown, source=src)


def shape_of(value: object) -> tuple[int, ...] | None:
    """The shape in a `model_weights` mapping value: a weight tensor (or anything with `.shape`,
    such as a lazily read weight) or a shape; None otherwise."""
    if hasattr(value, "shape"):
        return tuple(int(v) for v in value.shape)
    if isinstance(value, (tuple, list, torch.Size)):
        return tuple(int(v) for v in value)
    return None


def delta_weights(
    adapter: Adapter,
    model_weights: Mapping[str, torch.Size | tuple[int, ...] | torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """ΔW per model key at strength 1, float32, and the module names that matched no key.

    `model_weights` maps ComfyUI state-dict keys to the weight's shape or the weight itself.
    DoRA modules need the tensor (their change depends on W0's values).
    """
    keymap = KeyMap(model_weights.keys())
    res = adapter.resolve(keymap)
    if model_weights and adapter.modules and not res.matched:  # a wrong file must not do nothing
        names = list(adapter.modules)
        raise AdapterError(
            f"none of its {len(names)} modules matches any of the model's {len(model_weights)} "
            f"weights (the file looks like {adapter.guess_architecture()[0]}, the model is "
            f"{keymap.architecture}); e.g. {names[:3]}", file=adapter.path, key=names[0])
    deltas: dict[str, torch.Tensor] = {}
    for name, key in res.matched.items():
        module = adapter.modules[name]
        target = model_weights[key]
        if isinstance(target, torch.Tensor):
            base = target if module.has_dora else None
            deltas[key] = module.delta(torch.float32, shape=tuple(target.shape), base=base,
                                       device=target.device if target.device.type != "meta" else "cpu")
        else:
            if module.has_dora:
                raise AdapterError(
                    f"DoRA module needs the weight tensor of {key}, not only its shape",
                    file=adapter.path, key=module.dora_ref.key)
            deltas[key] = module.delta(torch.float32, shape=shape_of(target))
    return deltas, list(res.unmatched)
