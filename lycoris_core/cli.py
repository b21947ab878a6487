"""`python -m lycoris_core …`: the pack's features for servers and scripts, without ComfyUI."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from .adapter import load_adapter
from .errors import AdapterError


def format_summary(s: dict) -> str:
    """Human-readable report of `Adapter.summary()` (also the loader nodes' report)."""
    kv = lambda d: ", ".join(f"{k}: {v}" for k, v in d.items()) or "-"  # noqa: E731
    lines = [
        f"file: {s['file']}",
        f"architecture: {s['architecture']}",
        f"modules: {s['modules']} ({kv(s['algorithms'])})",
        f"rank: {kv(s['ranks'])}",
        f"alpha: {kv(s['alphas'])}",
        f"modes: {kv(s['modes'])}",
    ]
    if s["lokr_factor"]:
        lines.append(f"lokr factor: {kv(s['lokr_factor'])}")
    lines.append(f"matched: {s['matched']} of {s['modules']} ({kv(s['matched_by_component'])})")
    if s["unmatched"]:
        shown = ", ".join(s["unmatched"][:10])
        more = f" … and {len(s['unmatched']) - 10} more" if len(s["unmatched"]) > 10 else ""
        lines.append(f"UNMATCHED: {len(s['unmatched'])}: {shown}{more}")
    if s["unknown_keys"]:
        lines.append(f"ignored keys: {len(s['unknown_keys'])} (e.g. {', '.join(s['unknown_keys'][:3])})")
    if s["network_args"]:
        lines.append(f"network_args: {json.dumps(s['network_args'])}")
    if s.get("readers"):
        lines.append("readers:")
        lines += [f"  {r['text']}" for r in s["readers"]]
    for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version",
              "modelspec.architecture", "modelspec.title"):
        if k in s["metadata"]:
            lines.append(f"{k}: {s['metadata'][k]}")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .effect import effect_map, format_table, picture
    from .png import write_png

    adapter = load_adapter(args.file)
    summary = adapter.summary()
    emap = effect_map(adapter)
    summary |= {"blocks": emap.blocks(), "blocks_message": emap.message}  # = effect.summary_fields
    if args.map:
        _check_map_output(args.map, args.file, args.overwrite)
        write_png(args.map, picture(emap).rgb)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(format_summary(summary))
        print(format_table(emap))
    return 0


def _check_map_output(out: str, src: str, overwrite: bool) -> None:
    """The effect-map picture never replaces the adapter file, nor another file unless asked."""
    import os

    if os.path.exists(out) and (os.path.samefile(out, src) or not overwrite):
        raise FileExistsError(f"{out} exists; refusing to overwrite it"
                              + ("" if os.path.samefile(out, src) else " (use --overwrite)"))


def add_inspect_cli(sub) -> None:
    ins = sub.add_parser("inspect", help="algorithms, ranks, modes, architecture, metadata, "
                                         "‖ΔW‖ per block (effect map)")
    ins.add_argument("file")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.add_argument("--map", metavar="OUT.png",
                     help="write the effect map (‖ΔW‖ per block and layer kind) as a PNG picture")
    ins.add_argument("--overwrite", action="store_true", help="let --map replace an existing file")
    ins.set_defaults(func=cmd_inspect)


def build_parser() -> argparse.ArgumentParser:
    """Each feature module contributes its subcommand through an `add_cli(subparsers)` function."""
    p = argparse.ArgumentParser(prog="python -m lycoris_core",
                                description="LoHa/LoKr/LoRA adapter tools (no ComfyUI needed).")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    for add_cli in _subcommands():
        add_cli(sub)
    return p


def _subcommands() -> list:
    """The `add_cli` of every feature module, in help order (imported here to keep start-up lazy)."""
    from .bake import add_cli as add_bake_cli
    from .convert import add_cli as add_convert_cli
    from .merge import add_cli as add_merge_cli
    from .resize import add_cli as add_resize_cli
    return [add_inspect_cli, add_convert_cli, add_merge_cli, add_resize_cli, add_bake_cli]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except AdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
