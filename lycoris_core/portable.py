"""Portable export: rewrite an adapter into an exactly equivalent layout every reader loads.

SPEC §5 lists what each reader cannot read: sd-scripts — decompose_both (`lokr_w1_a/_b`);
LyCORIS 4.1.3 and ComfyUI — Tucker LoKr (`lokr_t2`); both sd-scripts and LyCORIS — a low-rank
`lokr_w2_a/_b` where the layout rule (`layout.lokr_layout`) expects a full `lokr_w2`. All three
read the same ΔW written without those forms. Per LoKr module:

- W1 = `lokr_w1_a @ lokr_w1_b` is stored full (float64 product, cast once);
- a Tucker W2 (`t2 (R,R,k,k)`, `w2_a (R,b)`, `w2_b (R,d)`) becomes the flat conv layout of the
  same rank, `w2_a' = w2_aᵀ (b,R)`, `w2_b'[i] = Σ_j t2[i,j] ⊗ w2_b[j]` (R, d·k·k) — exact, since
  W2[p, r, k, l] = Σ_i w2_a[i,p] · Σ_j t2[i,j,k,l] w2_b[j,r];
- where the layout rule says W2 is full at that rank, W2 = w2_a @ w2_b is stored full and, as
  both halves are then full (scale 1 in every reader), alpha/R is folded into W1.

LoHa, LoRA, conforming LoKr modules, `dora_scale` and ComfyUI's diff tensors are copied as they
are; names become sd-scripts naming (what sd-scripts and LyCORIS read; ComfyUI reads it too). The
LoKr `factor` is recorded in `ss_network_args` (sd-scripts does not infer it), and
`lycoris_portable` records what changed. The ΔW of every module is compared with the original's
(float64, max-abs relative); above `MAX_REL_DIFF` nothing is written and `AdapterError` is raised.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from .adapter import Adapter, adapter_from_tensors, load_adapter, shape_of
from .algos import AdapterModule, LoKrModule
from .convert import _same_file, _target_keymap, plan_conversion, read_all, refresh_hashes
from .errors import AdapterError
from .layout import LoKrDims, lokr_layout, w2_full_shape
from .safetensors_io import SafetensorsFile, save_safetensors

MAX_REL_DIFF = 1e-6
"""Largest ΔW difference (max-abs relative, per module) a portable file may have."""

DORA_READERS = ("DoRA kept on {n} module(s): LyCORIS applies it; sd-scripts ignores dora_scale "
                "(applies the plain ΔW); ComfyUI core normalises output-axis DoRA by W0 instead of "
                "W0 + ΔW (about 8 % off; this pack's loaders are exact)")


@dataclass
class PortableReport:
    """What a portable export did to one file."""

    source: str
    output: str | None
    modules: int
    changes: dict[str, int]
    size_before: int
    size_after: int
    max_rel_diff: float
    worst_module: str | None
    factor: str | None
    dora_modules: int
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False

    def lines(self) -> list[str]:
        verb = "would write" if self.dry_run else "wrote"
        what = ", ".join(f"{n} {k}" for k, n in sorted(self.changes.items())) or "layout unchanged"
        change = self.size_after - self.size_before
        pct = 100.0 * change / self.size_before if self.size_before else 0.0
        lines = [f"portable: {verb} {self.output} ({self.modules} modules; {what})",
                 f"  size {self.size_before:,} -> {self.size_after:,} bytes ({change:+,}, {pct:+.1f} %)",
                 f"  largest ΔW difference {self.max_rel_diff:.2e} relative (limit {MAX_REL_DIFF:g})"
                 + (f" in {self.worst_module}" if self.worst_module and self.max_rel_diff > 0 else "")]
        if self.factor is not None:
            lines.append(f"  LoKr factor {self.factor} recorded in ss_network_args")
        if self.dora_modules:
            lines.append("  " + DORA_READERS.format(n=self.dora_modules))
        lines += ["  " + n for n in self.notes]
        return lines

    def text(self) -> str:
        return "\n".join(self.lines())


def _cast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A computed factor in its source's dtype, float32 when that is half precision (so the
    product is not rounded to 11 bits)."""
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    return t.to(dtype).contiguous()


def portable_lokr(module: LoKrModule, layer_shape: tuple[int, ...] | None
                  ) -> tuple[dict[str, torch.Tensor], list[str]] | None:
    """{suffix: tensor} of the module's portable layout and what changed, or None to copy as is."""
    f = module.factors("cpu", torch.float64)
    raw = {n: module.refs()[n].load("cpu", None) for n in module.refs() if n != "alpha"}
    like = raw.get("lokr_w2_b", raw.get("lokr_w2", raw.get("lokr_w1", raw.get("lokr_w1_a"))))
    changes: list[str] = []
    if f.w1 is None:
        w1 = f.w1_a @ f.w1_b
        changes.append("decompose_both W1 multiplied out")
    else:
        w1 = f.w1
    a, c = w1.shape[:2]
    shape = tuple(layer_shape) if layer_shape is not None else module.natural_shape
    kernel = tuple(shape[2:]) if len(shape) > 2 else ()
    w2_a = w2_b = w2 = None
    if f.t2 is not None:
        rank = f.t2.shape[0]
        w2_a = f.w2_a.T
        w2_b = torch.einsum("i j ..., j r -> i r ...", f.t2, f.w2_b).reshape(rank, -1)
        changes.append("Tucker W2 multiplied out")
    elif f.w2 is None:
        w2_a, w2_b, rank = f.w2_a, f.w2_b, f.w2_b.shape[0]
    else:
        w2, rank = f.w2, None
    b = (w2 if w2 is not None else w2_a).shape[0]
    d = shape[1] // c
    if w2 is None and lokr_layout(LoKrDims(a, b, c, d), rank).w2_full:
        w2 = w2_a @ w2_b
        changes.append("low-rank W2 stored full (readers' layout rule)")
    if not changes:
        return None
    out: dict[str, torch.Tensor] = {}
    if w2 is not None:
        if module.rank:  # the file had a rank: both halves full now, readers use scale 1
            w1 = w1 * module.scale
        out["lokr_w1"] = _cast(w1, like)
        out["lokr_w2"] = _cast(w2.reshape(w2_full_shape(b, d, kernel)), like)
        out["alpha"] = torch.tensor(float(max(b, d)), dtype=torch.float32)
    else:
        out["lokr_w1"] = _cast(w1, like)
        out["lokr_w2_a"], out["lokr_w2_b"] = _cast(w2_a, like), _cast(w2_b, like)
        out["alpha"] = torch.tensor(module.alpha, dtype=torch.float32)
    if module.dora_ref is not None:
        out["dora_scale"] = module.dora_ref.load("cpu", None)
    return out, changes


def _rel_diff(old: AdapterModule, new: AdapterModule, shape: tuple[int, ...] | None) -> float:
    """max|ΔW_new − ΔW_old| / max|ΔW_old| in float64 (without DoRA: dora_scale is unchanged)."""
    want = old.raw_delta(torch.float64, shape=shape)
    got = new.raw_delta(torch.float64, shape=shape)
    peak = float(want.abs().max())
    diff = float((got - want).abs().max())
    return diff / peak if peak > 0 else diff


def _lokr_factor(adapter: Adapter) -> str | None:
    hints = {str(m.factor_hint()) for m in adapter.modules.values() if isinstance(m, LoKrModule)}
    if not hints:
        return None
    ints = {h for h in hints if h.lstrip("-").isdigit() and h != "-1"}
    return ints.pop() if len(ints) == 1 else ("-1" if hints == {"-1"} else ",".join(sorted(hints)))


@dataclass
class PortableResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    report: PortableReport


def make_portable(adapter: Adapter, target="auto", max_rel_diff: float = MAX_REL_DIFF
                  ) -> PortableResult:
    """The portable tensors and metadata of an adapter (nothing written). Raises `AdapterError`
    when a name does not resolve, or when a module's ΔW would change by more than `max_rel_diff`."""
    plan = plan_conversion(adapter, to="sd-scripts", target=target)
    keymap, shapes = _target_keymap(adapter, target)
    matched = adapter.resolve(keymap).matched
    layer_shape = {n: shape_of(shapes.get(matched[n])) if shapes is not None and n in matched
                   else None for n in adapter.modules}
    keys = list(plan.key_renames)
    raw = (read_all(adapter.path, keys) if isinstance(adapter.source, SafetensorsFile)
           else {k: adapter.source.get(k) for k in keys})
    out: dict[str, torch.Tensor] = {}
    changes: Counter = Counter()
    rewritten: dict[str, str] = {}
    for name, module in adapter.modules.items():
        new_name = plan.module_renames[name]
        done = portable_lokr(module, layer_shape[name]) if isinstance(module, LoKrModule) else None
        if done is None:
            for ref in module.refs().values():
                out[plan.key_renames[ref.key]] = raw[ref.key]
            continue
        tensors, what = done
        changes.update(what)
        rewritten[name] = new_name
        out.update({f"{new_name}.{s}": t for s, t in tensors.items()})
    extras = set(keys) - {ref.key for m in adapter.modules.values() for ref in m.refs().values()}
    out.update({plan.key_renames[k]: raw[k] for k in extras})
    renamed = sum(old != new for old, new in plan.module_renames.items())
    if renamed:
        changes["renamed to sd-scripts naming"] = renamed
    new_adapter = adapter_from_tensors(out, name=adapter.path)
    worst, worst_name = 0.0, None
    for name, new_name in rewritten.items():
        err = _rel_diff(adapter.modules[name], new_adapter.modules[new_name], layer_shape[name])
        if not err <= worst:
            worst, worst_name = err, name
    if not worst <= max_rel_diff:
        raise AdapterError(f"the portable layout would change ΔW by {worst:.2e} (relative; limit "
                           f"{max_rel_diff:g}); nothing written", file=adapter.path, key=worst_name)
    factor = _lokr_factor(adapter)
    meta = _metadata(adapter, out, layer_shape, plan.module_renames, factor, changes, worst)
    dora = sum(m.has_dora for m in adapter.modules.values())
    notes = []
    if any(m.has_dora and m.dora_ref.shape[:1] == (1,) and len(m.dora_ref.shape) > 1
           and m.dora_ref.shape[1] > 1 for m in adapter.modules.values()):
        notes.append("input-axis DoRA (dora_scale (1, I)) stays unreadable for LyCORIS 4.1.3")
    full_1x1 = sum(isinstance(m, LoKrModule) and m.w2_full and len(m.w2_shape) == 2
                   and layer_shape[n] is not None and tuple(layer_shape[n][2:]) == (1, 1)
                   for n, m in new_adapter_by_old(adapter, new_adapter, plan.module_renames))
    if full_1x1:
        notes.append(f"{full_1x1} 1×1-conv module(s) with a full lokr_w2, written (b, d) as "
                     "sd-scripts reads it; LyCORIS 4.1.3 only reads (b, d, 1, 1) — no layout "
                     "serves both")
    report = PortableReport(adapter.path, None, len(adapter.modules), dict(changes), 0, 0,
                            worst, worst_name, factor if factor != "-1" else None, dora, notes)
    return PortableResult(out, meta, report)


def new_adapter_by_old(old: Adapter, new: Adapter, renames: dict[str, str]):
    """(old module name, the new adapter's module) pairs."""
    return [(n, new.modules[renames[n]]) for n in old.modules]


def _metadata(adapter: Adapter, out: dict[str, torch.Tensor], layer_shape: dict,
              renames: dict[str, str], factor: str | None, changes: Counter,
              worst: float) -> dict[str, str]:
    """The source's metadata with true `ss_network_args` (factor, conv_dim/conv_alpha, no
    Tucker / decompose_both), a `lycoris_portable` record, and fresh sd-scripts hashes."""
    meta = dict(adapter.metadata)
    args = dict(adapter.network_args)
    if changes.get("Tucker W2 multiplied out"):
        args.pop("use_tucker", None)
    if changes.get("decompose_both W1 multiplied out"):
        args.pop("decompose_both", None)
    if factor is not None:
        args["factor"] = factor
    conv = [n for n, s in layer_shape.items() if s is not None and len(s) > 2 and math.prod(s[2:]) > 1]
    if conv and "conv_dim" not in args:
        new = adapter_from_tensors(out).modules
        ranks = [new[renames[n]].rank or max(new[renames[n]].w2_shape[:2]) for n in conv]
        args["conv_dim"] = args["conv_alpha"] = str(max(ranks))
    meta["ss_network_args"] = json.dumps(args)
    meta["lycoris_portable"] = json.dumps({
        "source": os.path.basename(adapter.path), "changes": dict(changes),
        "max_rel_diff": float(f"{worst:.3e}"), "factor": factor,
        "dora_modules": sum(m.has_dora for m in adapter.modules.values())})
    return refresh_hashes(out, meta, "sd-scripts")


def portable_file(src: str | os.PathLike, dst: str | os.PathLike, *, target="auto",
                  dry_run: bool = False, max_rel_diff: float = MAX_REL_DIFF) -> PortableReport:
    """Write the portable form of `src` to `dst` (atomic; never over the input or an existing
    file). Raises `AdapterError` / `FileExistsError`; nothing is written on error."""
    src_p, dst_p = Path(src), Path(dst)
    if _same_file(src_p, dst_p):
        raise AdapterError("output path is the input file; refusing to overwrite an input",
                           file=str(src_p))
    if dst_p.exists():
        raise FileExistsError(f"{dst_p} exists; refusing to overwrite it")
    result = make_portable(load_adapter(src_p), target, max_rel_diff)
    report = result.report
    report.size_before = src_p.stat().st_size
    report.output, report.dry_run = str(dst_p), dry_run
    if dry_run:
        report.size_after = len(safetensors_bytes(
            {k: v.contiguous() for k, v in result.tensors.items()}, result.metadata))
        return report
    save_safetensors(result.tensors, dst_p, result.metadata)
    report.size_after = dst_p.stat().st_size
    return report


def portable_reports_text(results: list[tuple[str, PortableReport | str]],
                          show=lambda p: p) -> str:
    """One block per file (its report, or `failed: file: reason`) and a totals line."""
    lines, failed = [], 0
    for source, res in results:
        if isinstance(res, PortableReport):
            block = res.lines()
            block[0] = block[0].replace(f" {res.output} (", f" {show(res.output)} (", 1)
            lines += [f"{show(source)}:"] + block
        else:
            failed += 1
            lines.append(f"failed: {show(source)}: {res}")
    lines.append(f"total: {len(results)} file(s): {len(results) - failed} portable, {failed} failed")
    return "\n".join(lines)


def portable_safely(src: Path, dst: Path, target="auto", dry_run: bool = False
                    ) -> PortableReport | str:
    """`portable_file`, with a bad input reported as its reason (path prefix removed)."""
    try:
        return portable_file(src, dst, target=target, dry_run=dry_run)
    except (AdapterError, FileExistsError, OSError) as exc:
        reason = str(exc)
        return reason[len(f"{src}: "):] if reason.startswith(f"{src}: ") else reason
