"""Bake adapters into a model's weights and save the result, streaming one layer at a time.

For every tensor of the model, in file order: read it (lazily, `SafetensorsFile.get`), add
Σ sᵢ·ΔWᵢ in float32 (float64 stays float64), cast back to the tensor's dtype (or the chosen
save dtype) and write it (`save_safetensors_streaming`). Peak memory is about one layer plus
its ΔW, never the whole model. Every ΔW is computed against the original weight W0 (DoRA
included), so the result is `W0 + Σ sᵢ·ΔWᵢ` whatever the order of the adapters.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import Adapter
from .algos import AdapterModule
from .errors import AdapterError
from .keymap import KeyMap
from .limits import check_strength
from .safetensors_io import (
    FLOAT_DTYPES,
    ST_DTYPE_NAMES,
    SafetensorsFile,
    TensorInfo,
    save_safetensors_streaming,
)

log = logging.getLogger("lycoris_nodes")

Progress = Callable[[int, int], None]

FILE_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "diffusion_model."),   # SD/SDXL checkpoints, ComfyUI saves
    ("diffusion_model.", "diffusion_model."),
    ("net.", "diffusion_model."),                      # Cosmos / Anima diffusion-model files
    ("conditioner.embedders.0.transformer.", "clip_l.transformer."),  # SDXL checkpoint CLIP-L
    ("cond_stage_model.transformer.", "clip_l.transformer."),          # SD1 checkpoint CLIP-L
    ("clip_l.", "clip_l."), ("clip_g.", "clip_g."), ("qwen3_06b.", "qwen3_06b."),
)
"""Checkpoint-file key prefix → ComfyUI model-key prefix. A file without any of them is taken
as a bare diffusion model (`input_blocks.…`, `blocks.…`). Keys outside these (VAE, CLIP-G in
open_clip layout) are copied unchanged and reported."""


def model_keys_of_file(keys: Sequence[str]) -> dict[str, str]:
    """{file key: ComfyUI model key} for the keys an adapter could patch."""
    out: dict[str, str] = {}
    for k in keys:
        for prefix, repl in FILE_PREFIXES:
            if k.startswith(prefix):
                out[k] = repl + k[len(prefix):]
                break
    if not out:  # a bare diffusion-model file
        out = {k: "diffusion_model." + k for k in keys}
    return out


@dataclass
class AdapterUse:
    """How one adapter was applied: modules matched to the model and the ones that were not."""

    path: str
    strength: float
    matched: int
    unmatched: list[str]


@dataclass
class BakeReport:
    path: Path
    tensors: int
    patched: int
    adapters: list[AdapterUse]
    save_dtype: str
    not_mapped: int = 0
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"wrote: {self.path}",
                 f"tensors: {self.tensors}, patched: {self.patched}, saved as {self.save_dtype}"]
        for use in self.adapters:
            lines.append(f"{os.path.basename(use.path)} × {use.strength:g}: {use.matched} modules "
                         f"applied" + (f", {len(use.unmatched)} NOT applied (no such weight): "
                                       f"{', '.join(use.unmatched[:10])}" if use.unmatched else ""))
        if self.not_mapped:
            lines.append(f"{self.not_mapped} tensors outside the known layouts were copied unchanged")
        return "\n".join(lines + self.notes)


def plan_bake(shapes: Mapping[str, tuple[int, ...]], key_of: Mapping[str, str],
              adapters: Sequence[tuple[Adapter, float]]
              ) -> tuple[dict[str, list[tuple[float, AdapterModule]]], list[AdapterUse]]:
    """{out key: [(strength, module)]} for every tensor an adapter patches; shapes checked now,
    so a bad adapter fails before anything is written."""
    by_model = {m: k for k, m in key_of.items()}
    keymap = KeyMap(by_model)
    plan: dict[str, list[tuple[float, AdapterModule]]] = {}
    uses: list[AdapterUse] = []
    for adapter, strength in adapters:
        check_strength(strength, f"the strength of {os.path.basename(adapter.path)}")
        res = adapter.resolve(keymap)
        if not res.matched:
            raise AdapterError(f"none of its {len(adapter.modules)} modules matches a weight of the "
                               f"model (e.g. {next(iter(adapter.modules))})", file=adapter.path)
        for name, model_key in res.matched.items():
            out_key = by_model[model_key]
            module = adapter.modules[name]
            module.resolved_shape(tuple(shapes[out_key]))
            plan.setdefault(out_key, []).append((strength, module))
        uses.append(AdapterUse(adapter.path, strength, len(res.matched), list(res.unmatched)))
    return plan, uses


def patched(w: torch.Tensor, members: Sequence[tuple[float, AdapterModule]],
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """W0 + Σ sᵢ·ΔWᵢ(W0), computed in float32 (float64 if W0 is), cast to `out_dtype` (W0's)."""
    cdt = torch.float64 if w.dtype == torch.float64 else torch.float32
    w0 = w.to(cdt)
    shared = w0.data_ptr() == w.data_ptr()  # no conversion happened: never add into the model
    acc = w0.clone() if shared or any(m.has_dora for _, m in members) else w0
    for strength, module in members:
        if strength:
            acc.add_(module.delta(cdt, shape=tuple(w.shape), base=w0 if module.has_dora else None,
                                  device=w.device), alpha=strength)
    return acc.to(out_dtype or w.dtype)


def bake_stream(specs: Sequence[TensorInfo], read: Callable[[str], torch.Tensor],
                key_of: Mapping[str, str], adapters: Sequence[tuple[Adapter, float]],
                out_path: str | os.PathLike, *, save_dtype: torch.dtype | None = None,
                metadata: Mapping[str, str] | None = None, overwrite: bool = False,
                progress: Progress | None = None) -> BakeReport:
    """Write every tensor of `specs` (read one at a time by `read`) with the adapters baked in.

    `key_of` maps tensor keys to ComfyUI model keys (tensors absent from it are copied as is).
    `save_dtype` casts floating-point tensors; None keeps each tensor's dtype.
    """
    if not adapters:
        raise ValueError("nothing to bake: give at least one adapter")
    plan, uses = plan_bake({s.key: s.shape for s in specs}, key_of, adapters)
    target = ST_DTYPE_NAMES[save_dtype] if save_dtype is not None else None
    out_specs = [TensorInfo(s.key, target if target and s.dtype in FLOAT_DTYPES else s.dtype,
                            s.shape) for s in specs]

    def produce() -> Iterator[tuple[str, torch.Tensor]]:
        for n, spec in enumerate(specs):
            w = read(spec.key)
            cast = save_dtype if save_dtype is not None and w.is_floating_point() else None
            if spec.key in plan:
                w = patched(w, plan[spec.key], cast)
            elif cast is not None:
                w = w.to(cast)
            yield spec.key, w
            del w
            if progress is not None:
                progress(n + 1, len(specs))

    meta = dict(metadata or {})
    meta["lycoris_bake_adapters"] = json.dumps(
        [{"file": os.path.basename(u.path), "strength": u.strength, "modules_applied": u.matched,
          "modules_not_applied": len(u.unmatched)} for u in uses])
    meta["lycoris_bake_tool"] = "lycoris-nodes"
    path = save_safetensors_streaming(out_path, out_specs, produce(), meta, overwrite=overwrite)
    return BakeReport(path, len(specs), len(plan), uses,
                      "as stored" if save_dtype is None else str(save_dtype).replace("torch.", ""),
                      not_mapped=sum(1 for s in specs if s.key not in key_of))


def bake_file(model_path: str | os.PathLike, adapters: Sequence[tuple[Adapter, float]],
              out_path: str | os.PathLike, *, save_dtype: torch.dtype | None = None,
              overwrite: bool = False, progress: Progress | None = None) -> BakeReport:
    """Bake into a checkpoint / diffusion-model safetensors file, reading one tensor at a time.

    The model file's metadata is kept; `lycoris_bake_*` keys record what was applied.
    """
    src = SafetensorsFile(model_path)
    dst = Path(out_path)
    if dst.exists() and os.path.samefile(dst, src.path):
        raise FileExistsError(f"{dst} is the input model; refusing to overwrite it")
    specs = list(src.infos.values())
    key_of = model_keys_of_file([s.key for s in specs])
    return bake_stream(specs, src.get, key_of, adapters, dst, save_dtype=save_dtype,
                       metadata=src.metadata, overwrite=overwrite, progress=progress)


def bake_state_dict(state: Mapping[str, torch.Tensor], key_of: Mapping[str, str],
                    adapters: Sequence[tuple[Adapter, float]], out_path: str | os.PathLike, *,
                    save_dtype: torch.dtype | None = None, metadata: Mapping[str, str] | None = None,
                    overwrite: bool = False, progress: Progress | None = None) -> BakeReport:
    """Bake into tensors already in memory (a loaded model): each patched copy lives only while
    it is written, so the extra memory is one layer."""
    specs = []
    for k, t in state.items():
        if t.dtype not in ST_DTYPE_NAMES:
            raise ValueError(f"{k}: dtype {t.dtype} cannot be stored in safetensors")
        specs.append(TensorInfo(k, ST_DTYPE_NAMES[t.dtype], tuple(t.shape)))
    return bake_stream(specs, lambda k: state[k], key_of, adapters, out_path, save_dtype=save_dtype,
                       metadata=metadata, overwrite=overwrite, progress=progress)


def cmd_bake(args) -> int:
    from .adapter import load_adapter
    from .merge import DTYPES, parse_weighted

    adapters = [(load_adapter(p), s) for p, s in map(parse_weighted, args.adapter)]
    dtype = None if args.dtype == "keep" else DTYPES[args.dtype]
    report = bake_file(args.model, adapters, args.output, save_dtype=dtype, overwrite=args.overwrite)
    print(report.report())
    return 0


def add_cli(sub) -> None:
    p = sub.add_parser("bake", help="apply adapters into a model file's weights (streamed)")
    p.add_argument("model", help="checkpoint or diffusion-model .safetensors")
    p.add_argument("-a", "--adapter", action="append", required=True, metavar="FILE[:STRENGTH]",
                   help="adapter to apply (repeat for several)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--dtype", choices=("keep", "fp32", "fp16", "bf16"), default="keep",
                   help="dtype of the saved floating-point tensors")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_bake)
