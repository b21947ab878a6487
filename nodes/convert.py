"""ConvertLyCORIS / BatchConvertLyCORIS: rename adapter modules between sd-scripts and ComfyUI naming.

Thin glue over `lycoris_core.convert`: picks files from the `loras` folder, writes the results
under ComfyUI's output folder with counters (never over an input or an existing file) and
returns the per-file report.
"""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..lycoris_core.convert import (
    DIRECTIONS,
    convert_file,
    convert_folder,
    format_report,
    iter_adapter_files,
)
from ..lycoris_core.portable import portable_reports_text, portable_safely
from .outputs import output_file

log = logging.getLogger("lycoris_nodes")

ROOT_FOLDER = "(loras folder)"
ARCHITECTURES = ["auto", "sdxl", "anima"]

DIRECTION_TOOLTIP = (
    "sd-scripts -> ComfyUI: lora_unet_/lora_te1_/lora_te2_/lora_te_ names become "
    "diffusion_model.<path> / text_encoders.<te>.<path> (what every ComfyUI version reads, incl. "
    "Anima's Qwen3 which ComfyUI 0.3.75 cannot map under lora_te_). ComfyUI -> sd-scripts: the "
    "reverse. ComfyUI trainer -> sd-scripts: files saved by ComfyUI's Train LoRA + Save LoRA nodes "
    "(their diff/diff_b tensors are renamed too). Files already in the target naming are skipped.")
ARCH_TOOLTIP = ("Model whose real key set resolves the names: auto picks SDXL or Anima by the "
                "best match. Names that match no layer exactly fail the file; nothing is guessed.")
FOLDER_TOOLTIP = ("Subfolder of ComfyUI's output folder for the converted files; each file keeps "
                  "its name plus a counter (_00001_) and is never written over an existing file.")
DRY_RUN_TOOLTIP = "Only report what would be converted; write nothing."
PORTABLE_TOOLTIP = (
    "Rewrite into the exactly equivalent layout that sd-scripts, LyCORIS and ComfyUI core all "
    "load right: Tucker LoKr multiplied out, w1 = w1_a @ w1_b, a full w2 where those readers "
    "expect one, the LoKr factor recorded, sd-scripts naming (direction is not used). DoRA is "
    "kept. The report gives the size change and the largest ΔW difference; a file whose ΔW would "
    "change by more than 1e-6 (relative) is refused and nothing is written.")
REPORT_TOOLTIP = "One line per file: converted (to which output), skipped or failed (and why)."


def _output_path(output_folder: str, rel: Path) -> Path:
    """`<output>/<output_folder>/<rel dir>/<stem>_<counter>_.safetensors`, inside the output folder."""
    parts = [output_folder] if str(rel.parent) == "." else [output_folder, rel.parent.as_posix()]
    return output_file("/".join([*parts, rel.stem]))


def _file_stats(paths: list[Path]) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((str(p), None, None))
    return tuple(out)


def lora_folders() -> list[str]:
    """The loras root and every subfolder that holds an adapter file (combo options)."""
    subs = set()
    for name in folder_paths.get_filename_list("loras"):
        parent = Path(name).parent
        while str(parent) not in ("", "."):
            subs.add(parent.as_posix())
            parent = parent.parent
    return [ROOT_FOLDER] + sorted(subs)


def _folder_roots(folder: str) -> list[Path]:
    rel = "" if folder == ROOT_FOLDER else folder
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise ValueError(f"folder must be inside the loras folder: {folder!r}")
    roots = [Path(r) / rel for r in folder_paths.get_folder_paths("loras")]
    found = [r for r in roots if r.is_dir()]
    if not found:
        raise ValueError(f"no folder {folder!r} in the loras folder(s) {[str(r) for r in roots]}")
    return found


def _schema(node_id: str, display_name: str, description: str, inputs: list) -> io.Schema:
    """The schema both convert nodes share: their own inputs, then direction, architecture,
    output folder and dry run; one STRING report output."""
    return io.Schema(
        node_id=node_id,
        display_name=display_name,
        category="LyCORIS/convert",
        description=description,
        inputs=[
            *inputs,
            io.Combo.Input("direction", options=list(DIRECTIONS), default=next(iter(DIRECTIONS)),
                           tooltip=DIRECTION_TOOLTIP),
            io.Combo.Input("architecture", options=ARCHITECTURES, default="auto",
                           tooltip=ARCH_TOOLTIP),
            io.String.Input("output_folder", default="loras/converted", tooltip=FOLDER_TOOLTIP),
            io.Boolean.Input("dry_run", default=False, tooltip=DRY_RUN_TOOLTIP),
            io.Boolean.Input("portable", default=False, optional=True, tooltip=PORTABLE_TOOLTIP),
        ],
        outputs=[io.String.Output(display_name="report", tooltip=REPORT_TOOLTIP)],
        is_output_node=True,
    )


class ConvertLyCORIS(io.ComfyNode):
    """One adapter file from the loras folder → renamed copy under the output folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "ConvertLyCORIS", "Convert LyCORIS naming (sd-scripts ↔ ComfyUI)",
            ("Rename the modules of one LoHa/LoKr/LoRA file between sd-scripts naming "
             "and ComfyUI naming (SDXL and Anima), resolved against the real model key "
             "sets. Tensors are copied byte for byte; metadata is kept and the sd-scripts "
             "hash fields are recomputed. Output goes to ComfyUI's output folder."),
            [io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                            tooltip="The adapter file (.safetensors) in the loras folder.")])

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        """Re-run when the file changes on disk, not only when its name does."""
        path = folder_paths.get_full_path("loras", lora_name)
        return _file_stats([Path(path)]) if path else lora_name

    @classmethod
    def execute(cls, lora_name, direction, architecture, output_folder,
                dry_run, portable=False) -> io.NodeOutput:
        src = folder_paths.get_full_path_or_raise("loras", lora_name)
        source, to = DIRECTIONS[direction]
        dst = _output_path(output_folder, Path(Path(lora_name).name))
        if portable:
            return _portable([(Path(src), dst)], architecture, dry_run, raise_on_error=lora_name)
        report = convert_file(src, dst, to=to, target=architecture, source=source,
                              dry_run=dry_run)
        roots = [folder_paths.get_output_directory(), *folder_paths.get_folder_paths("loras")]
        text = format_report([report], roots)
        if report.status == "failed":
            raise ValueError(f"{lora_name}: {report.reason}")
        log.info("ConvertLyCORIS %s:\n%s", lora_name, text)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


class BatchConvertLyCORIS(io.ComfyNode):
    """Every adapter file of a loras subfolder → renamed copies under the output folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return _schema(
            "BatchConvertLyCORIS", "Batch convert LyCORIS naming (folder)",
            ("Convert every adapter file of a folder under loras between sd-scripts and "
             "ComfyUI naming. Good files are converted, broken ones are reported with "
             "the reason and nothing is written for them; files already in the target "
             "naming are skipped. The subfolder layout is kept under the output folder."),
            [io.Combo.Input("folder", options=lora_folders(),
                            tooltip="Folder under ComfyUI's loras folder to convert."),
             io.Boolean.Input("recursive", default=False,
                              tooltip="Also convert the files in its subfolders.")])

    @classmethod
    def fingerprint_inputs(cls, folder, recursive, **kwargs):
        """Re-run when any file of the folder is added, removed or changed."""
        try:
            return _file_stats([p for r in _folder_roots(folder)
                                for p in iter_adapter_files(r, recursive)])
        except Exception:  # an unknown folder is reported by execute
            return folder

    @classmethod
    def execute(cls, folder, recursive, direction, architecture, output_folder,
                dry_run, portable=False) -> io.NodeOutput:
        source, to = DIRECTIONS[direction]
        out_dir = Path(folder_paths.get_output_directory())
        reports = []
        roots = _folder_roots(folder)
        if portable:
            pairs = [(p, _output_path(output_folder, p.relative_to(r)))
                     for r in roots for p in iter_adapter_files(r, recursive)]
            return _portable(pairs, architecture, dry_run)
        for root in roots:
            bar = comfy.utils.ProgressBar(1)
            reports += convert_folder(
                root, out_dir, to=to, target=architecture, source=source, recursive=recursive,
                dry_run=dry_run, dest=lambda rel: _output_path(output_folder, rel),
                progress=bar.update_absolute)
        text = format_report(reports, [out_dir, *roots])
        log.info("BatchConvertLyCORIS %s:\n%s", folder, text)
        return io.NodeOutput(text, ui=ui.PreviewText(text))


def _portable(pairs: list[tuple[Path, Path]], architecture: str, dry_run: bool,
              raise_on_error: str | None = None) -> io.NodeOutput:
    """The portable export of each (source, output) pair; the report names files relative to
    the output and loras folders. A single file that fails raises (naming `raise_on_error`)."""
    roots = [Path(folder_paths.get_output_directory()),
             *map(Path, folder_paths.get_folder_paths("loras"))]

    def show(p: str) -> str:
        for base in roots:
            try:
                return Path(p).relative_to(base).as_posix()
            except ValueError:
                pass
        return Path(p).name

    results = [(str(s), portable_safely(s, d, architecture, dry_run)) for s, d in pairs]
    if raise_on_error is not None and isinstance(results[0][1], str):
        raise ValueError(f"{raise_on_error}: {results[0][1]}")
    text = portable_reports_text(results, show)
    log.info("portable export:\n%s", text)
    return io.NodeOutput(text, ui=ui.PreviewText(text))


CONVERT_NODES = [ConvertLyCORIS, BatchConvertLyCORIS]
