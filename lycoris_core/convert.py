"""Rename adapter modules between sd-scripts and ComfyUI naming, for one file or a folder.

Namings (SPEC §1):
- sd-scripts: `lora_unet_<path>`, `lora_te1_/lora_te2_` (SDXL CLIP-L / CLIP-G), `lora_te_`
  (Anima's Qwen3); LyCORIS' `lycoris_<path>` is read as the same family.
- ComfyUI: `diffusion_model.<dotted path>`, `text_encoders.<te>.<dotted path>`
  (e.g. `text_encoders.qwen3_06b.transformer.model.layers.0.mlp.down_proj`) — the generic form
  every ComfyUI version maps for every weight key (0.3.75 maps no `lora_te_` Anima names).
- ComfyUI's trainer (`TrainLoraNode` + `SaveLoRA`): ComfyUI naming, no metadata, plus full
  differences `<module>.diff` / `<module>.diff_b` for norms and biases. Those are kept and
  renamed like the rest (ComfyUI applies them under either naming; sd-scripts ignores them).

Every module name is resolved against a real model key set (`KeyMap`: a bundled manifest or the
caller's keys); a name that resolves to no key, to several keys, or to a key whose shape the
module cannot patch fails the file, nothing is guessed. Only module names change: every tensor
keeps its suffix, dtype and bytes. Metadata is kept; the hash fields are recomputed the way
their writer computes them (`sshs_*`: sd-scripts' `precalculate_safetensors_hashes`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .adapter import Adapter, adapter_from_tensors, load_adapter, shape_of
from .errors import AdapterError
from .keymap import TE_INNER_PREFIX, KeyMap
from .manifests import manifest
from .naming import naming_style, underscored
from .safetensors_io import save_safetensors

log = logging.getLogger("lycoris_nodes")

NAMINGS = ("comfyui", "sd-scripts")
"""Target namings."""

SOURCES: dict[str, frozenset[str]] = {
    "auto": frozenset({"sd-scripts", "lycoris", "comfyui"}),
    "sd-scripts": frozenset({"sd-scripts", "lycoris"}),
    "comfyui": frozenset({"comfyui"}),
    "comfyui-trainer": frozenset({"comfyui"}),
}
"""Declared source naming → the `naming_style` values its module names may have."""

DIRECTIONS: dict[str, tuple[str, str]] = {
    "sd-scripts -> ComfyUI": ("sd-scripts", "comfyui"),
    "ComfyUI -> sd-scripts": ("comfyui", "sd-scripts"),
    "ComfyUI trainer -> sd-scripts": ("comfyui-trainer", "sd-scripts"),
}
"""The directions the nodes and the CLI offer: label → (source, target naming)."""

EXTRA_SUFFIXES = ("diff", "diff_b", "w_norm", "b_norm")
"""Full-difference tensors (ComfyUI's trainer writes diff / diff_b); renamed, never altered."""

ADAPTER_EXTENSIONS = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")

_FAMILY = {"sd-scripts": "sd-scripts", "lycoris": "sd-scripts", "comfyui": "comfyui"}

Target = str | Mapping[str, object] | Iterable[str]
"""'auto', 'sdxl', 'anima', or a model's keys (a {key: shape} mapping also checks shapes)."""


@dataclass
class ConversionPlan:
    """What converting one adapter does: old tensor key → new tensor key, nothing else."""

    file: str
    to: str
    architecture: str
    key_renames: dict[str, str]
    module_renames: dict[str, str]
    from_namings: dict[str, int]
    extras: int = 0

    @property
    def changed(self) -> int:
        """How many module names change (modules with only diff tensors included)."""
        return sum(old != new for old, new in self.module_renames.items())


@dataclass
class FileReport:
    """Outcome for one file: 'converted', 'skipped' or 'failed' (with the reason)."""

    source: str
    status: str
    reason: str = ""
    output: str | None = None
    modules: int = 0
    renamed: int = 0
    extras: int = 0
    architecture: str = ""
    from_namings: dict[str, int] = field(default_factory=dict)
    to: str = ""
    dry_run: bool = False


# --- names ---------------------------------------------------------------------------------

def _te_names(keys: Iterable[str]) -> list[str]:
    heads = {k.split(".", 1)[0] for k in keys if not k.startswith("diffusion_model.")}
    return sorted(h for h in heads if h in TE_INNER_PREFIX)


def comfyui_name(model_key: str) -> str:
    """`diffusion_model.x.weight` → `diffusion_model.x`; `clip_l.y.weight` → `text_encoders.clip_l.y`."""
    base = model_key[: -len(".weight")]
    return base if base.startswith("diffusion_model.") else "text_encoders." + base


def sdscripts_name(model_key: str, te_names: Iterable[str]) -> str | None:
    """The sd-scripts module name of a weight key, or None when sd-scripts has no name for it.

    Diffusion model: `lora_unet_<path>`. Text encoders: SDXL `lora_te1_` (CLIP-L) and `lora_te2_`
    (CLIP-G); a model with a single text encoder (Anima's Qwen3) `lora_te_`.
    """
    base = model_key[: -len(".weight")]
    if base.startswith("diffusion_model."):
        return "lora_unet_" + underscored(base[len("diffusion_model."):])
    te, _, rest = base.partition(".")
    inner = TE_INNER_PREFIX.get(te)
    if inner is None or not rest.startswith(inner):
        return None
    tes = set(te_names)
    if te == "clip_l" and "clip_g" in tes:
        prefix = "lora_te1_"
    elif te == "clip_g" and "clip_l" in tes:
        prefix = "lora_te2_"
    elif tes == {te}:
        prefix = "lora_te_"
    else:
        return None
    return prefix + underscored(rest[len(inner):])


def split_extra(key: str) -> tuple[str, str] | None:
    """`'diffusion_model.x.norm.diff'` → `('diffusion_model.x.norm', 'diff')`; None otherwise."""
    for suffix in EXTRA_SUFFIXES:
        if key.endswith("." + suffix) and len(key) > len(suffix) + 1:
            return key[: -len(suffix) - 1], suffix
    return None


# --- targets -------------------------------------------------------------------------------

@functools.cache
def _manifest_keymap(arch: str) -> KeyMap:
    return KeyMap(manifest(arch))


def _target_keymap(adapter: Adapter, target: Target) -> tuple[KeyMap, Mapping[str, object] | None]:
    """The key map (and the shapes, when known) the adapter's names are resolved against."""
    if isinstance(target, str):
        if target == "auto":
            arch, res = adapter.guess_architecture()
            if arch == "unknown":
                raise AdapterError("no module name matches SDXL or Anima; choose the model "
                                   f"explicitly (e.g. {sorted(adapter.modules)[:2]})",
                                   file=adapter.path)
            target = arch
        return _manifest_keymap(target), manifest(target)
    if isinstance(target, Mapping):
        return KeyMap(target.keys()), target
    return KeyMap(list(target)), None


# --- planning ------------------------------------------------------------------------------

def plan_conversion(adapter: Adapter, *, to: str, target: Target = "auto",
                    source: str = "auto") -> ConversionPlan:
    """Work out every tensor's new key (no tensor data read). Raises `AdapterError` for anything
    that cannot be resolved exactly; the message names the file and the first offending key."""
    if to not in NAMINGS:
        raise ValueError(f"unknown target naming {to!r}; choose one of {NAMINGS}")
    if source not in SOURCES:
        raise ValueError(f"unknown source naming {source!r}; choose one of {sorted(SOURCES)}")
    path = adapter.path
    extras: dict[str, str] = {}
    for key in adapter.unknown_keys:
        if split_extra(key) is None:
            raise AdapterError("not an adapter tensor (unknown suffix); the file is left alone "
                               "rather than converted without it", file=path, key=key)
        extras[key] = split_extra(key)[0]
    keymap, shapes = _target_keymap(adapter, target)
    res = adapter.resolve(keymap)
    extra_res = keymap.resolve_all(sorted(set(extras.values())))
    unresolved = list(res.unmatched) + [n for n in extra_res.unmatched if n not in res.unmatched]
    if unresolved:
        amb = {**res.ambiguous, **extra_res.ambiguous}
        why = "; ".join(f"'{n}' could be any of {amb[n]}" for n in unresolved if n in amb)
        raise AdapterError(
            f"{len(unresolved)} module name(s) match no single {keymap.architecture} layer "
            f"(e.g. {unresolved[:3]}){'; ' + why if why else ''}", file=path, key=unresolved[0])
    allowed = SOURCES[source]
    target_family = "comfyui" if to == "comfyui" else "sd-scripts"
    names = {**res.matched, **extra_res.matched}
    from_namings: Counter = Counter()
    for name in names:
        style = naming_style(name)
        if style not in allowed and _FAMILY.get(style) != target_family:
            raise AdapterError(f"module is in {style} naming, not the {source} naming this "
                               "conversion reads", file=path, key=name)
        from_namings[style] += 1
    te_names = _te_names(keymap.keys)
    module_renames: dict[str, str] = {}
    for name, model_key in names.items():
        if shapes is not None and name in adapter.modules:
            shape = shape_of(shapes.get(model_key))
            if shape is not None:
                adapter.modules[name].resolved_shape(shape)  # raises when the layer does not fit
        new = comfyui_name(model_key) if to == "comfyui" else sdscripts_name(model_key, te_names)
        if new is None or keymap.resolve(new) != model_key:
            raise AdapterError(f"{model_key} has no {to} module name that resolves back to it",
                               file=path, key=name)
        module_renames[name] = new
    key_renames: dict[str, str] = {}
    for name, module in adapter.modules.items():
        for ref in module.refs().values():
            key_renames[ref.key] = module_renames[name] + ref.key[len(name):]
    for key, name in extras.items():
        key_renames[key] = module_renames[name] + key[len(name):]
    clash = [k for k, n in Counter(key_renames.values()).items() if n > 1]
    if clash:
        raise AdapterError("two tensors would get the same name", file=path, key=clash[0])
    return ConversionPlan(path, to, keymap.architecture, key_renames, module_renames,
                          dict(from_namings), len(extras))


# --- hashes --------------------------------------------------------------------------------

def sdscripts_hashes(tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str]) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as sd-scripts stores them.

    sd-scripts serialises the tensors with only the `ss_*` metadata; the model hash is the
    SHA-256 of everything after the header (the tensor data), the legacy hash the first 8 hex
    digits of the SHA-256 of the 64 KiB at offset 1 MiB (empty for small files).
    """
    blob = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                             {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def refresh_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                   to: str) -> dict[str, str]:
    """Metadata with its hash fields recomputed for `tensors`.

    sd-scripts output always carries `sshs_model_hash` + `sshs_legacy_hash` (sd-scripts writes
    them on every save). LyCORIS / modelspec style (`0x` + SHA-256 of the tensor data, no legacy
    hash) is kept in that style. ComfyUI-named output keeps only the fields the input had.
    """
    meta = dict(metadata)
    had_model = "sshs_model_hash" in meta
    sai_style = meta.get("sshs_model_hash", "").startswith("0x")
    if not (had_model or "sshs_legacy_hash" in meta or "modelspec.hash_sha256" in meta
            or to == "sd-scripts"):
        return meta
    model_hash, legacy_hash = sdscripts_hashes(tensors, meta)
    if sai_style:
        meta["sshs_model_hash"] = "0x" + model_hash
        if "sshs_legacy_hash" in meta:
            meta["sshs_legacy_hash"] = legacy_hash
    elif had_model or "sshs_legacy_hash" in meta or to == "sd-scripts":
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash, legacy_hash
    if "modelspec.hash_sha256" in meta:
        meta["modelspec.hash_sha256"] = "0x" + model_hash
    return meta


# --- converting ----------------------------------------------------------------------------

def check_complete(plan: ConversionPlan, keys: Iterable[str]) -> None:
    """Every tensor of the file is renamed (none silently dropped)."""
    left = sorted(set(keys) - set(plan.key_renames))
    if left:
        raise AdapterError(f"{len(left)} tensor(s) would be dropped", file=plan.file, key=left[0])


def apply_plan(plan: ConversionPlan, tensors: Mapping[str, torch.Tensor],
               metadata: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Renamed tensors (the same tensor objects, unaltered) and metadata with fresh hashes."""
    missing = [k for k in plan.key_renames if k not in tensors]
    if missing:
        raise AdapterError("tensor listed in the plan is missing", file=plan.file, key=missing[0])
    check_complete(plan, tensors)
    out = {plan.key_renames[k]: tensors[k] for k in sorted(plan.key_renames, key=plan.key_renames.get)}
    return out, refresh_hashes(out, metadata, plan.to)


def convert_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                    *, to: str, target: Target = "auto", source: str = "auto",
                    name: str = "<memory>") -> tuple[dict[str, torch.Tensor], dict[str, str],
                                                      ConversionPlan]:
    """Convert an adapter held in memory: (tensors, metadata, plan). Raises `AdapterError`."""
    adapter = adapter_from_tensors(tensors, metadata, name=name)
    plan = plan_conversion(adapter, to=to, target=target, source=source)
    new_tensors, new_meta = apply_plan(plan, tensors, metadata or {})
    return new_tensors, new_meta, plan


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def read_all(path: str | os.PathLike, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors `keys` of a (header-validated) file, read in one pass: opening the file once
    per tensor would re-parse the header each time (quadratic for thousands of modules)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in keys}
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"cannot read tensors ({exc})", file=str(path)) from exc


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, *, to: str,
                 target: Target = "auto", source: str = "auto",
                 dry_run: bool = False) -> FileReport:
    """Convert one file to `dst` (atomic, never over an existing file or the input).

    Never raises for a bad input file: the report says 'failed' and why. 'skipped' means the
    file is already in the target naming (nothing written).
    """
    src_p, dst_p = Path(src), Path(dst)
    report = FileReport(str(src_p), "failed", to=to, dry_run=dry_run)
    try:
        if src_p.suffix.lower() != ".safetensors":
            report.status = "skipped"
            report.reason = ("not a .safetensors file (pickled checkpoints are never loaded)"
                             if src_p.suffix.lower() in ADAPTER_EXTENSIONS else "not an adapter file")
            return report
        if _same_file(src_p, dst_p):
            raise AdapterError("output path is the input file; refusing to overwrite an input",
                               file=str(src_p))
        adapter = load_adapter(src_p)
        plan = plan_conversion(adapter, to=to, target=target, source=source)
        check_complete(plan, adapter.source.keys())
        report.modules, report.renamed = len(plan.module_renames), plan.changed
        report.extras, report.architecture = plan.extras, plan.architecture
        report.from_namings = plan.from_namings
        if plan.changed == 0:
            report.status, report.reason = "skipped", f"already in {to} naming"
            return report
        if dst_p.exists():
            raise FileExistsError(f"{dst_p} exists; refusing to overwrite it")
        report.output = str(dst_p)
        if dry_run:
            report.status = "converted"
            return report
        tensors = read_all(src_p, plan.key_renames)
        new_tensors, new_meta = apply_plan(plan, tensors, adapter.metadata)
        save_safetensors(new_tensors, dst_p, new_meta)
        report.status = "converted"
    except (AdapterError, FileExistsError, ValueError, OSError) as exc:
        reason = str(exc)
        if reason.startswith(f"{src_p}: "):
            reason = reason[len(f"{src_p}: "):]
        report.status, report.reason, report.output = "failed", reason, None
        log.warning("convert %s: %s", src_p, reason)
    return report


def iter_adapter_files(folder: str | os.PathLike, recursive: bool = False,
                       exclude: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Adapter-like files (by extension) in `folder`, sorted; `exclude` folders are not entered."""
    root = Path(folder)
    if not root.is_dir():
        raise AdapterError("not a folder", file=str(root))
    skip = {Path(e).resolve() for e in exclude}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames
                             if recursive and (Path(dirpath) / d).resolve() not in skip)
        found += [Path(dirpath) / f for f in filenames if f.lower().endswith(ADAPTER_EXTENSIONS)]
    return sorted(found)


def convert_folder(src_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
                   to: str, target: Target = "auto", source: str = "auto",
                   recursive: bool = False, dry_run: bool = False,
                   dest: Callable[[Path], Path] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> list[FileReport]:
    """Convert every adapter file of a folder; one report per file, in path order.

    Outputs go to `dest(relative path)` or else `out_dir/<relative path>`; the output folder is
    never scanned. A broken file is reported as failed and nothing is written for it.
    """
    if dest is None and out_dir is None:
        raise ValueError("give out_dir or dest")
    src_root = Path(src_dir)
    exclude = [out_dir] if out_dir is not None else []
    files = iter_adapter_files(src_root, recursive, exclude)
    reports: list[FileReport] = []
    for i, path in enumerate(files):
        rel = path.relative_to(src_root)
        dst = dest(rel) if dest is not None else Path(out_dir) / rel
        reports.append(convert_file(path, dst, to=to, target=target, source=source,
                                    dry_run=dry_run))
        if progress is not None:
            progress(i + 1, len(files))
    return reports


def format_report(reports: list[FileReport], roots: Iterable[str | os.PathLike] = ()) -> str:
    """One line per file and a totals line (what the nodes and the CLI print); paths are shown
    relative to the first of `roots` that holds them."""
    bases = [Path(r) for r in roots]

    def show(p: str | None) -> str:
        for base in bases:
            try:
                return Path(p).relative_to(base).as_posix()
            except ValueError:
                pass
        return str(p)

    def hide_roots(text: str) -> str:  # reasons name files by their path under the roots
        for base in bases:
            text = text.replace(f"{base}{os.sep}", "")
        return text

    lines = []
    for r in reports:
        if r.status == "converted":
            verb = "would convert" if r.dry_run else "converted"
            extra = f", {r.extras} diff tensors" if r.extras else ""
            src = ", ".join(f"{n} {s}" for s, n in sorted(r.from_namings.items()))
            lines.append(f"{verb}: {show(r.source)} -> {show(r.output)} ({r.architecture}, "
                         f"{r.renamed} of {r.modules} modules renamed from {src} to {r.to}{extra})")
        else:
            lines.append(f"{r.status}: {show(r.source)}: {hide_roots(r.reason)}")
    counts = Counter(r.status for r in reports)
    lines.append(f"total: {len(reports)} file(s): {counts['converted']} converted, "
                 f"{counts['skipped']} skipped, {counts['failed']} failed"
                 + (" (dry run: nothing written)" if reports and reports[0].dry_run else ""))
    return "\n".join(lines)



# --- command line --------------------------------------------------------------------------

def cmd_convert(args) -> int:
    """`python -m lycoris_core convert`: exit 0 when nothing failed, 1 otherwise."""
    source, to = args.source, args.to
    src, out = Path(args.src), Path(args.output)
    if args.portable:
        return _cmd_portable(args, src, out)
    if to is None:
        raise SystemExit("convert: --to is required (or give --portable)")
    if src.is_dir():
        reports = convert_folder(src, out, to=to, target=args.arch, source=source,
                                 recursive=args.recursive, dry_run=args.dry_run)
    else:
        dst = out / src.name if out.is_dir() or args.output.endswith(os.sep) else out
        reports = [convert_file(src, dst, to=to, target=args.arch, source=source,
                                dry_run=args.dry_run)]
    print(format_report(reports, [src, out] if src.is_dir() else []))
    return 1 if any(r.status == "failed" for r in reports) else 0


def _cmd_portable(args, src: Path, out: Path) -> int:
    """`convert --portable`: every file rewritten to the layout all readers load (portable.py)."""
    from .portable import portable_reports_text, portable_safely

    if args.to not in (None, "sd-scripts"):
        raise SystemExit("convert --portable writes sd-scripts naming; leave out --to")
    if src.is_dir():
        pairs = [(p, out / p.relative_to(src))
                 for p in iter_adapter_files(src, args.recursive, [out])]
    else:
        pairs = [(src, out / src.name if out.is_dir() or args.output.endswith(os.sep) else out)]
    results = [(str(s), portable_safely(s, d, args.arch, args.dry_run)) for s, d in pairs]
    print(portable_reports_text(results))
    return 1 if any(isinstance(r, str) for _, r in results) else 0


def add_cli(sub) -> None:
    """Register the `convert` subcommand."""
    p = sub.add_parser("convert", help="rename modules between sd-scripts and ComfyUI naming",
                       description="Convert one adapter file or a folder of them. Names are "
                       "resolved against the real SDXL / Anima key sets; outputs are written "
                       "atomically and never over an existing file.")
    p.add_argument("src", help="an adapter file or a folder of them")
    p.add_argument("-o", "--output", required=True,
                   help="output file, or folder (for a folder input, or ending in '/')")
    p.add_argument("--to", choices=NAMINGS, help="target naming (required unless --portable)")
    p.add_argument("--from", dest="source", choices=sorted(SOURCES), default="auto",
                   help="naming the input must be in; comfyui-trainer = files from ComfyUI's "
                   "TrainLoraNode/SaveLoRA (default: any)")
    p.add_argument("--arch", choices=("auto", "sdxl", "anima"), default="auto",
                   help="model whose key set resolves the names (default: best match)")
    p.add_argument("-r", "--recursive", action="store_true", help="include subfolders")
    p.add_argument("--dry-run", action="store_true", help="report only, write nothing")
    p.add_argument("--portable", action="store_true",
                   help="rewrite into the exactly equivalent layout sd-scripts, LyCORIS and "
                   "ComfyUI all load (Tucker LoKr multiplied out, w1 = w1_a @ w1_b, full w2 where "
                   "the readers expect it, factor recorded; sd-scripts naming); reports the size "
                   "change and the largest ΔW difference (refused above 1e-6 relative)")
    p.set_defaults(func=cmd_convert)
