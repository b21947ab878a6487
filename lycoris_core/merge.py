"""Merge adapters: weighted sum of ΔW per model key, re-factorised as LoRA (SVD) or LoKr.

Flow: every source's modules are resolved to model keys (a model's keys, or the bundled
full-size manifest of the detected architecture); modules of different files that patch the
same key form one group; per group ΔW = Σ wᵢ·ΔWᵢ (float32/float64, one layer at a time) is
factorised:

- LoRA: truncated SVD of ΔW reshaped to (O, I·k·k): `up (O,r[,1,1]) = U·√S`, `down (r,I[,k,k]) = √S·Vᵀ`.
- LoKr: nearest Kronecker product (Van Loan–Pitsianis): ΔW (a·b, c·d·kk) rearranged to
  (a·c, b·d·kk) so that kron(W1, W2) becomes the rank-1 matrix vec(W1)·vec(W2)ᵀ; its leading
  singular pair gives W1 (a,c) and W2 (b, d·kk); W2 is then truncated by SVD to `w2_a @ w2_b`.

Every written module has alpha = rank (scale 1). The reconstruction error is measured on the
tensors as written (after the cast to the save dtype), through this package's own ΔW code.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import Adapter, adapter_from_tensors, shape_of
from .algos import AdapterModule, factorization
from .convert import comfyui_name, sdscripts_hashes, sdscripts_name
from .errors import AdapterError
from .keymap import TE_INNER_PREFIX, KeyMap
from .layout import LoKrDims, lokr_layout, w2_full_shape
from .limits import check_strength
from .manifests import manifest
from .safetensors_io import save_safetensors

log = logging.getLogger("lycoris_nodes")

Progress = Callable[[int, int], None]
WeightSpec = "torch.Size | tuple[int, ...] | torch.Tensor"
FORMATS = ("lora", "lokr")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class FactorSpec:
    """How summed ΔW is written: format, rank (0: by energy only), energy threshold (0: off).

    With both set, energy picks the rank and `rank` caps it. `factor` is LoKr's split factor
    (−1: the split closest to square). `precision` is the dtype of ΔW and the SVDs.
    """

    fmt: str = "lora"
    rank: int = 0
    energy: float = 0.0
    factor: int = -1
    save_dtype: torch.dtype = torch.float32
    precision: torch.dtype = torch.float32

    def check(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {self.fmt!r}")
        if self.rank < 0 or not 0.0 <= self.energy <= 1.0:
            raise ValueError(f"rank must be ≥ 0 and energy in [0, 1] (got {self.rank}, {self.energy})")
        if self.rank == 0 and self.energy == 0.0:
            raise ValueError("set a rank, an energy threshold, or both")
        if self.factor == 0:
            raise ValueError("factor must be -1 (automatic) or a positive integer")

    def describe(self) -> str:
        how = []
        if self.energy:
            how.append(f"energy≥{self.energy:g}")
        if self.rank:
            how.append(f"rank{'≤' if self.energy else '='}{self.rank}")
        algo = "LoRA via SVD" if self.fmt == "lora" else (
            f"LoKr via nearest Kronecker product (factor {self.factor}) + SVD of W2")
        return f"{algo}, {', '.join(how)}"


@dataclass
class ModuleReport:
    """One written module: its rank and the error ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F of what was written."""

    name: str
    key: str | None
    shape: tuple[int, ...]
    rank: int
    error: float
    norm: float
    kron_energy: float | None = None  # LoKr: share of ‖ΔW‖² in the leading Kronecker term


@dataclass
class MergeResult:
    """Tensors and metadata to write, plus the per-module and overall reconstruction errors."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    modules: list[ModuleReport]
    skipped: list[tuple[str, str]]
    overall_error: float
    spec: FactorSpec
    sources: list[tuple[str, float]]
    notes: list[str] = field(default_factory=list)

    def report(self, path: str | os.PathLike | None = None, limit: int | None = None) -> str:
        """Human-readable report: sources, method, overall and per-module error (worst first)."""
        lines = [f"wrote: {path}"] if path else []
        lines.append("sources: " + ", ".join(f"{os.path.basename(p)} × {w:g}" for p, w in self.sources))
        lines.append(f"method: {self.spec.describe()}, saved as {_dtype_name(self.spec.save_dtype)}")
        ranks = [m.rank for m in self.modules]
        if ranks:
            lines.append(f"modules: {len(ranks)}, rank min/median/max "
                         f"{min(ranks)}/{sorted(ranks)[len(ranks) // 2]}/{max(ranks)}")
        lines.append(f"overall error (relative Frobenius): {self.overall_error:.3e}")
        lines += self.notes
        for name, why in self.skipped:
            lines.append(f"skipped {name}: {why}")
        shown = sorted(self.modules, key=lambda m: -m.error)
        if limit is not None and len(shown) > limit:
            lines.append(f"per-module error (worst {limit} of {len(shown)}; all in the file's metadata):")
            shown = shown[:limit]
        else:
            lines.append("per-module error:")
        for m in shown:
            extra = f", kron term energy {m.kron_energy:.4f}" if m.kron_energy is not None else ""
            lines.append(f"  {m.name}: rank {m.rank}, error {m.error:.3e}{extra}")
        return "\n".join(lines)


@dataclass
class _Group:
    name: str
    key: str | None
    shape: tuple[int, ...]
    members: list[tuple[float, AdapterModule]] = field(default_factory=list)


def _dtype_name(dt: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dt), str(dt))


def default_model_weights(adapters: Sequence[Adapter]) -> dict[str, tuple[int, ...]]:
    """Full-size key shapes of the architecture the adapters were made for ({} when unknown)."""
    archs = {a.guess_architecture()[0] for a in adapters} - {"unknown"}
    if len(archs) > 1:
        raise AdapterError(f"the adapters are for different models ({', '.join(sorted(archs))})",
                           file=adapters[0].path)
    return dict(manifest(archs.pop())) if archs else {}


def output_name(model_key: str, te_names: set[str]) -> str:
    """The module name written for a model key: sd-scripts naming (`lora_unet_…`, `lora_te1_…`),
    or ComfyUI's generic form where sd-scripts has none."""
    return sdscripts_name(model_key, te_names) or comfyui_name(model_key)


def collect_groups(sources: Sequence[tuple[Adapter, float]],
                   model_weights: Mapping[str, object]) -> tuple[list[_Group], list[str]]:
    """Modules of all sources grouped by the model key they patch (by name when unresolved)."""
    keymap = KeyMap(model_weights.keys()) if model_weights else None
    tes = {k.split(".", 1)[0] for k in model_weights} & set(TE_INNER_PREFIX)
    groups: dict[str, _Group] = {}
    notes: list[str] = []
    for adapter, weight in sources:
        check_strength(weight, f"the weight of {os.path.basename(adapter.path)}")
        matched = adapter.resolve(keymap).matched if keymap is not None else {}
        unresolved = [n for n in adapter.modules if n not in matched]
        if unresolved:
            notes.append(f"note: {len(unresolved)} module(s) of {os.path.basename(adapter.path)} "
                         f"match no model key and are merged by name (e.g. {unresolved[0]})")
        for name, module in adapter.modules.items():
            key = matched.get(name)
            if key is not None:
                shape, gid, out = shape_of(model_weights[key]), key, output_name(key, tes)
            else:
                shape, gid, out = module.natural_shape, "name:" + name, name
            module.resolved_shape(shape)  # raises AdapterError naming file and key on mismatch
            group = groups.setdefault(gid, _Group(out, key, shape))
            if group.shape != shape:
                raise AdapterError(f"module '{name}' is {list(shape)}, another file's is "
                                   f"{list(group.shape)}", file=adapter.path, key=name)
            group.members.append((weight, module))
    return list(groups.values()), notes


def group_delta(group: _Group, model_weights: Mapping[str, object],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Σ wᵢ·ΔWᵢ of one group, in the layer's shape (DoRA members use the model's weight)."""
    total: torch.Tensor | None = None
    for weight, module in group.members:
        base = None
        if module.has_dora:
            base = model_weights.get(group.key) if group.key is not None else None
            if hasattr(base, "load"):  # a lazily read weight (FileWeights)
                base = base.load()
            if not isinstance(base, torch.Tensor):
                raise AdapterError("DoRA module: its change depends on the model's weight values; "
                                   "give a model to merge it", file=module.path,
                                   key=module.dora_ref.key)
        d = module.delta(dtype, shape=group.shape, base=base, device="cpu")
        total = d.mul_(weight) if total is None else total.add_(d, alpha=weight)
    assert total is not None
    return total


def choose_rank(s: torch.Tensor, rank: int = 0, energy: float = 0.0) -> int:
    """Rank kept from singular values `s` (descending): smallest r with Σ_{<r} σ² ≥ energy·Σσ²
    when `energy` > 0 (capped by `rank` if set), else `rank`; at least 1, at most len(s)."""
    n = s.numel()
    if energy > 0:
        cum = torch.cumsum(s.double() ** 2, 0)
        r = int(torch.searchsorted(cum, energy * cum[-1] * (1 - 1e-12)).item()) + 1
        if rank > 0:
            r = min(r, rank)
    else:
        r = rank
    return max(1, min(r, n))


def svd(m: torch.Tensor, spec: FactorSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, Vᵀ of `m`: randomized (`torch.svd_lowrank`, 4 power iterations) when only a small
    fixed rank is wanted, else the full `torch.linalg.svd`. Either way the error of what is
    written is measured exactly afterwards."""
    n = min(m.shape)
    if spec.energy == 0.0 and 4 * (spec.rank + 10) <= n:
        u, s, v = _seeded_lowrank(m, spec.rank + 10, 4)
        return u, s, v.mT
    return torch.linalg.svd(m, full_matrices=False)


def _seeded_lowrank(m: torch.Tensor, q: int, niter: int):
    """`torch.svd_lowrank` with a fixed seed: the same inputs always write the same file."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.svd_lowrank(m, q=q, niter=niter)


def lora_factors(dw: torch.Tensor, spec: FactorSpec) -> tuple[dict[str, torch.Tensor], int]:
    """ΔW (O, I[,k,k]) → {lora_up (O,r[,1,1]), lora_down (r,I[,k,k])} by truncated SVD."""
    o = dw.shape[0]
    u, s, vh = svd(dw.reshape(o, -1), spec)
    r = choose_rank(s, spec.rank, spec.energy)
    sq = s[:r].sqrt()
    up, down = u[:, :r] * sq, sq[:, None] * vh[:r]
    if dw.dim() > 2:
        up = up.reshape(o, r, *([1] * (dw.dim() - 2)))
        down = down.reshape(r, *dw.shape[1:])
    return {"lora_up.weight": up, "lora_down.weight": down}, r


def rearrange_kron(dw: torch.Tensor, a: int, b: int, c: int, d: int) -> torch.Tensor:
    """(a·b, c·d) → (a·c, b·d) with kron(W1, W2) ↦ vec(W1) vec(W2)ᵀ (Van Loan rearrangement)."""
    return dw.reshape(a, b, c, d).permute(0, 2, 1, 3).reshape(a * c, b * d)


def lokr_factors(dw: torch.Tensor, spec: FactorSpec
                 ) -> tuple[dict[str, torch.Tensor], int, float]:
    """ΔW (O, I[,k,k]) → LoKr {lokr_w1 (a,c), lokr_w2 or lokr_w2_a/_b, alpha}, rank, and the
    share of ‖ΔW‖² captured by the nearest Kronecker product."""
    o, i = dw.shape[0], dw.shape[1]
    kk = math.prod(dw.shape[2:])
    (a, b), (c, d) = factorization(o, spec.factor), factorization(i, spec.factor)
    m = rearrange_kron(dw.reshape(o, i * kk), a, b, c, d * kk)
    if min(m.shape) > 40:  # only the leading singular triplet is needed
        u, s, v = _seeded_lowrank(m, 10, 6)
        vh = v.mT
    else:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
    total = float(torch.linalg.vector_norm(m.double()) ** 2)
    kron_energy = float(s[0].double() ** 2) / total if total > 0 else 1.0
    root = s[0].sqrt()
    w1 = (u[:, 0] * root).reshape(a, c)
    w2 = (vh[0] * root).reshape(b, d * kk)
    u2, s2, vh2 = svd(w2, spec)
    r = choose_rank(s2, spec.rank, spec.energy)
    if r >= min(b, d * kk) or lokr_layout(LoKrDims(a, b, c, d), r).w2_full:
        # the readers expect a full W2 at this rank (SPEC §5), or low rank would be no smaller:
        # store W2 full (untruncated: the same size, and at least as exact)
        full = w2.reshape(w2_full_shape(b, d, tuple(dw.shape[2:])))
        return {"lokr_w1": w1, "lokr_w2": full}, min(b, d * kk), kron_energy
    sq = s2[:r].sqrt()
    return {"lokr_w1": w1, "lokr_w2_a": u2[:, :r] * sq, "lokr_w2_b": sq[:, None] * vh2[:r]}, \
        r, kron_energy


def _relative_error(name: str, tensors: dict[str, torch.Tensor], shape: tuple[int, ...],
                    dw: torch.Tensor) -> tuple[float, float, float]:
    """(‖ΔW − ΔŴ‖, ‖ΔW‖, relative) with ΔŴ rebuilt from the written tensors by `delta()`."""
    module = adapter_from_tensors({f"{name}.{k}": v for k, v in tensors.items()}).modules[name]
    got = module.delta(torch.float64, shape=shape)
    diff = float(torch.linalg.vector_norm(got - dw.double()))
    norm = float(torch.linalg.vector_norm(dw.double()))
    return diff, norm, diff / norm if norm > 0 else 0.0


def factorize_groups(groups: Sequence[_Group], model_weights: Mapping[str, object],
                     spec: FactorSpec, progress: Progress | None = None
                     ) -> tuple[dict[str, torch.Tensor], list[ModuleReport], list[tuple[str, str]], float]:
    """Sum and re-factorise every group; returns tensors, per-module reports, skipped, overall error."""
    spec.check()
    tensors: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    skipped: list[tuple[str, str]] = []
    sq_diff = sq_norm = 0.0
    for n, group in enumerate(groups):
        dw = group_delta(group, model_weights, spec.precision)
        if len(group.shape) < 2:
            skipped.append((group.name, f"1-D weight {list(group.shape)} cannot be factorised"))
        elif not bool(dw.any()):
            skipped.append((group.name, "summed ΔW is zero"))
        else:
            kron_energy = None
            if spec.fmt == "lora":
                out, r = lora_factors(dw, spec)
            else:
                out, r, kron_energy = lokr_factors(dw, spec)
            out = {k: v.to(spec.save_dtype).contiguous() for k, v in out.items()}
            out["alpha"] = torch.tensor(float(r), dtype=torch.float32)
            diff, norm, rel = _relative_error(group.name, out, group.shape, dw)
            sq_diff, sq_norm = sq_diff + diff ** 2, sq_norm + norm ** 2
            tensors.update({f"{group.name}.{k}": v for k, v in out.items()})
            reports.append(ModuleReport(group.name, group.key, group.shape, r, rel, norm, kron_energy))
        del dw
        if progress is not None:
            progress(n + 1, len(groups))
    overall = math.sqrt(sq_diff / sq_norm) if sq_norm > 0 else 0.0
    return tensors, reports, skipped, overall


def result_metadata(sources: Sequence[tuple[Adapter, float]], spec: FactorSpec,
                    reports: Sequence[ModuleReport], skipped: Sequence[tuple[str, str]],
                    overall: float, operation: str = "merge") -> dict[str, str]:
    """sd-scripts `ss_*` keys that are true of the written file, plus `lycoris_merge_*` keys
    recording the sources, weights, method and reconstruction errors."""
    ranks = {m.rank for m in reports}
    dim = str(ranks.pop()) if len(ranks) == 1 else "Dynamic"
    meta = {
        "ss_network_module": "networks.lora" if spec.fmt == "lora" else "networks.lokr",
        "ss_network_dim": dim,
        "ss_network_alpha": dim,  # alpha = rank for every module (scale 1)
        "lycoris_merge_operation": operation,
        "lycoris_merge_method": spec.describe(),
        "lycoris_merge_format": spec.fmt,
        "lycoris_merge_rank": str(spec.rank),
        "lycoris_merge_energy": f"{spec.energy:g}",
        "lycoris_merge_dtype": _dtype_name(spec.save_dtype),
        "lycoris_merge_sources": json.dumps([
            {"file": os.path.basename(a.path), "weight": w, "modules": len(a.modules),
             "algorithms": a.algorithms()} for a, w in sources]),
        "lycoris_merge_error": f"{overall:.6e}",
        "lycoris_merge_module_errors": json.dumps({m.name: float(f"{m.error:.6e}") for m in reports}),
        "lycoris_merge_skipped": json.dumps(dict(skipped)),
        "lycoris_merge_tool": "lycoris-nodes",
    }
    args = {"factor": str(spec.factor), "algo": "lokr"} if spec.fmt == "lokr" else {}
    args.update(conv_network_args(reports))
    if args:
        meta["ss_network_args"] = json.dumps(args)
    for k in ("ss_base_model_version", "modelspec.architecture"):
        values = {a.metadata.get(k) for a, _ in sources}
        if len(values) == 1 and None not in values:
            meta[k] = values.pop()
    return meta


def conv_network_args(reports: Sequence[ModuleReport]) -> dict[str, str]:
    """`conv_dim` / `conv_alpha` of the written k×k conv modules (sd-scripts only builds those
    modules when they are set): their rank (the largest when they differ; alpha = rank)."""
    ranks = [m.rank for m in reports if len(m.shape) > 2 and math.prod(m.shape[2:]) > 1]
    if not ranks:
        return {}
    return {"conv_dim": str(max(ranks)), "conv_alpha": str(max(ranks))}


def merge_adapters(sources: Sequence[tuple[Adapter, float]], spec: FactorSpec,
                   model_weights: Mapping[str, object] | None = None,
                   progress: Progress | None = None, operation: str = "merge") -> MergeResult:
    """Weighted sum of the sources' ΔW per model key, re-factorised by `spec`.

    `model_weights` ({ComfyUI key: shape or tensor}) resolves module names and gives DoRA its
    W0; without it the bundled manifest of the detected architecture is used.
    """
    if not sources:
        raise ValueError("nothing to merge: give at least one adapter")
    spec.check()
    if model_weights is None:
        model_weights = default_model_weights([a for a, _ in sources])
    groups, notes = collect_groups(sources, model_weights)
    tensors, reports, skipped, overall = factorize_groups(groups, model_weights, spec, progress)
    if not tensors:
        raise AdapterError("the merge produced no module (every summed ΔW is zero)",
                           file=sources[0][0].path)
    meta = result_metadata(sources, spec, reports, skipped, overall, operation)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = sdscripts_hashes(tensors, meta)
    return MergeResult(tensors, meta, reports, skipped, overall, spec,
                       [(a.path, w) for a, w in sources], notes)


def save_result(result: MergeResult, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a merge/resize result atomically; never over one of its own sources."""
    dst = Path(path).resolve()
    for src, _ in result.sources:
        if os.path.exists(src) and dst.exists() and os.path.samefile(src, dst):
            raise FileExistsError(f"{dst} is one of the inputs; refusing to overwrite it")
    return save_safetensors(result.tensors, dst, result.metadata, overwrite=overwrite)


# --- command line: `python -m lycoris_core merge` (resize reuses the spec arguments) ----------

def parse_weighted(item: str, default: float = 1.0) -> tuple[str, float]:
    """'file.safetensors:0.7' → ('file.safetensors', 0.7); a suffix that is no number is path."""
    path, sep, tail = item.rpartition(":")
    if sep:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return item, default


def add_spec_arguments(p) -> None:
    """--format/--rank/--energy/--factor/--dtype/--precision, shared by merge and resize."""
    p.add_argument("--format", choices=FORMATS, default="lora", help="written algorithm")
    p.add_argument("--rank", type=int, default=0, help="target rank (cap when --energy is set)")
    p.add_argument("--energy", type=float, default=0.0,
                   help="keep the smallest rank holding this share of ‖ΔW‖² (0 < e ≤ 1)")
    p.add_argument("--factor", type=int, default=-1, help="LoKr split factor (-1: near square)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="saved tensor dtype")
    p.add_argument("--precision", choices=("fp32", "fp64"), default="fp32",
                   help="dtype of the summed ΔW and the SVDs")
    p.add_argument("--model", help="model .safetensors whose keys resolve the modules (default: "
                                   "the bundled full-size manifest of the detected architecture)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors (never overwritten "
                                                         "unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def spec_from_args(args) -> FactorSpec:
    return FactorSpec(args.format, args.rank, args.energy, args.factor, DTYPES[args.dtype],
                      torch.float64 if args.precision == "fp64" else torch.float32)


@dataclass(frozen=True)
class LazyWeight:
    """A model weight known by shape; `load()` reads it (only DoRA modules need the values)."""

    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


class FileWeights(Mapping):
    """{ComfyUI model key: LazyWeight} over a model file: shapes from the header, values on demand."""

    def __init__(self, path: str | os.PathLike):
        from .bake import model_keys_of_file
        from .safetensors_io import SafetensorsFile

        self.file = SafetensorsFile(path)
        self._key = {m: k for k, m in model_keys_of_file(self.file.keys()).items()}

    def __getitem__(self, key: str) -> LazyWeight:
        file_key = self._key[key]
        return LazyWeight(self.file.infos[file_key].shape, lambda: self.file.get(file_key))

    def __iter__(self):
        return iter(self._key)

    def __len__(self) -> int:
        return len(self._key)


def run_result_cli(args, result: MergeResult) -> int:
    """Write the result and print the report (text or JSON)."""
    path = save_result(result, args.output, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({"output": str(path), "overall_error": result.overall_error,
                          "modules": [m.__dict__ for m in result.modules],
                          "skipped": result.skipped, "metadata": result.metadata}, default=str))
    else:
        print(result.report(path, limit=40))
    return 0


def cmd_merge(args) -> int:
    from .adapter import load_adapter

    sources = [(load_adapter(p), w) for p, w in map(parse_weighted, args.adapters)]
    weights = FileWeights(args.model) if args.model else None
    return run_result_cli(args, merge_adapters(sources, spec_from_args(args), weights))


def add_cli(sub) -> None:
    p = sub.add_parser("merge", help="weighted sum of several adapters' ΔW, written as LoRA or LoKr")
    p.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]")
    add_spec_arguments(p)
    p.set_defaults(func=cmd_merge)
