"""Reader compatibility: one line per reader (sd-scripts, LyCORIS, ComfyUI core) for a file.

Each line is derived from the measured facts of SPEC §5 about what that reader cannot read or
reads differently; shapes only, no tensor is loaded. Shown by `inspect` and in the loaders'
metadata panel (`Adapter.summary()["readers"]`).

- sd-scripts: cannot read decompose_both (`lokr_w1_a/_b`), a missing `alpha`, a 4-D `lokr_w2` on
  a 1×1 conv (it builds those like Linear); loads a low-rank `lokr_w2` where its layout rule
  expects a full one as ΔW = 0; ignores `dora_scale`; needs `factor=` passed again when not −1;
  reads only sd-scripts naming.
- LyCORIS 4.1.3: cannot read Tucker LoKr, a low-rank `lokr_w2` where the rule expects a full one,
  a 2-D full `lokr_w2` on a 1×1 conv, input-axis DoRA — each refuses the whole file; reads
  sd-scripts naming only.
- ComfyUI core: leaves Tucker LoKr unpatched (only logged); output-axis DoRA uses W0's norm
  (about 8 % off); 0.3.75 maps none of Anima's `lora_te_` text-encoder names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from .algos import AdapterModule, LoKrModule
from .layout import layout_violation
from .naming import naming_style

READERS = ("sd-scripts", "LyCORIS", "ComfyUI core")
PORTABLE_HINT = "convert with --portable"


@dataclass(frozen=True)
class ReaderLine:
    """One reader's verdict: status 'ok', 'needs' (an option), 'partial' (some modules read
    wrong or skipped) or 'cannot' (the file does not load)."""

    reader: str
    status: str
    text: str

    def as_dict(self) -> dict:
        return asdict(self)


def _is_conv1x1(shape: tuple[int, ...] | None) -> bool:
    return shape is not None and len(shape) == 4 and tuple(shape[2:]) == (1, 1)


def _kinds(modules: Mapping[str, AdapterModule], shapes: Mapping[str, tuple[int, ...] | None],
           architecture: str) -> Counter:
    """How many modules have each reader-relevant property."""
    n: Counter = Counter()
    for name, m in modules.items():
        shape = shapes.get(name)
        style = naming_style(name)
        if style not in ("sd-scripts", "lycoris"):
            n["not_sd_naming"] += 1
        if style == "lycoris":
            n["lycoris_prefix"] += 1
        if architecture == "anima" and name.startswith("lora_te_"):
            n["anima_te"] += 1
        if m.alpha_ref is None:
            n["no_alpha"] += 1
        if m.has_dora:
            axis_in = m.dora_ref.shape[:1] == (1,) and len(m.dora_ref.shape) > 1 \
                and m.dora_ref.shape[1] > 1
            n["dora_in" if axis_in else "dora_out"] += 1
        if not isinstance(m, LoKrModule):
            continue
        if m.tucker:
            n["tucker_lokr"] += 1
        if not m.w1_full:
            n["decompose_both"] += 1
        if layout_violation(m, shape) is not None and "lokr_w2" in layout_violation(m, shape):
            n["low_rank_w2"] += 1
        if m.w2_full and len(m.w2_shape) == 4 and tuple(m.w2_shape[2:]) == (1, 1):
            n["w2_4d_1x1"] += 1
        if m.w2_full and len(m.w2_shape) == 2 and _is_conv1x1(shape):
            n["w2_2d_1x1"] += 1
        hint = m.factor_hint()
        if hint != -1:
            n[f"factor={hint}"] += 1
    return n


def _join(parts: list[str]) -> str:
    return "; ".join(parts)


def reader_lines(modules: Mapping[str, AdapterModule],
                 shapes: Mapping[str, tuple[int, ...] | None] | None = None,
                 architecture: str = "unknown") -> list[ReaderLine]:
    """One `ReaderLine` per reader for a file's modules; `shapes` (module name → the patched
    weight's shape, when known) tells 1×1 convs from Linear layers."""
    n = _kinds(modules, shapes or {}, architecture)
    return [_sdscripts(n), _lycoris(n), _comfyui(n)]


def _sdscripts(n: Counter) -> ReaderLine:
    cannot = []
    if n["decompose_both"]:
        cannot.append(f"decompose_both on {n['decompose_both']} module(s)")
    if n["w2_4d_1x1"]:
        cannot.append(f"a 4-D lokr_w2 on {n['w2_4d_1x1']} 1×1 conv(s)")
    if n["no_alpha"]:
        cannot.append(f"no alpha on {n['no_alpha']} module(s)")
    if n["not_sd_naming"] or n["lycoris_prefix"]:
        cannot.append(f"{n['not_sd_naming'] + n['lycoris_prefix']} module(s) not in sd-scripts naming")
    if cannot:
        return ReaderLine("sd-scripts", "cannot",
                          f"sd-scripts: cannot read ({_join(cannot)}) — {PORTABLE_HINT}")
    partial = []
    if n["low_rank_w2"]:
        partial.append(f"loads {n['low_rank_w2']} module(s) as ΔW = 0 (low-rank lokr_w2 where it "
                       f"expects a full one) — {PORTABLE_HINT}")
    if n["dora_in"] + n["dora_out"]:
        partial.append(f"ignores dora_scale on {n['dora_in'] + n['dora_out']} module(s) "
                       "(applies the plain ΔW)")
    factors = sorted(k for k in n if k.startswith("factor="))
    needs = ""
    if len(factors) == 1 and factors[0][len("factor="):].lstrip("-").isdigit():
        needs = f"needs network_args {factors[0]}"
    elif factors:
        partial.append(f"cannot rebuild the factor split ({', '.join(f[7:] for f in factors)})")
    parts = ([needs] if needs else []) + partial
    if not parts:
        return ReaderLine("sd-scripts", "ok", "sd-scripts: reads it")
    status = "partial" if partial else "needs"
    return ReaderLine("sd-scripts", status, "sd-scripts: " + _join(parts))


def _lycoris(n: Counter) -> ReaderLine:
    cannot = []
    if n["tucker_lokr"]:
        cannot.append(f"Tucker LoKr, {n['tucker_lokr']} module(s)")
    if n["low_rank_w2"]:
        cannot.append(f"low-rank lokr_w2 where it expects a full one, {n['low_rank_w2']} module(s)")
    if n["w2_2d_1x1"]:
        cannot.append(f"a 2-D full lokr_w2 on {n['w2_2d_1x1']} 1×1 conv(s)")
    if n["dora_in"]:
        cannot.append(f"input-axis DoRA, {n['dora_in']} module(s)")
    if n["not_sd_naming"]:
        cannot.append(f"{n['not_sd_naming']} module(s) not in sd-scripts naming")
    if cannot:
        hint = f" — {PORTABLE_HINT}" if n["tucker_lokr"] or n["low_rank_w2"] \
            or n["not_sd_naming"] else ""
        return ReaderLine("LyCORIS", "cannot", f"LyCORIS: cannot read ({_join(cannot)}){hint}")
    return ReaderLine("LyCORIS", "ok", "LyCORIS: reads it")


def _comfyui(n: Counter) -> ReaderLine:
    parts = []
    if n["tucker_lokr"]:
        parts.append(f"skips {n['tucker_lokr']} module(s) (Tucker LoKr) — {PORTABLE_HINT}")
    if n["dora_out"]:
        parts.append(f"DoRA on {n['dora_out']} module(s) normalised by W0 instead of W0 + ΔW "
                     "(about 8 % off; this pack's loaders are exact)")
    if n["anima_te"]:
        parts.append(f"0.3.75 maps none of the {n['anima_te']} lora_te_ text-encoder module(s) "
                     "(newer versions do; or convert --to comfyui)")
    if not parts:
        return ReaderLine("ComfyUI core", "ok", "ComfyUI core: reads it")
    return ReaderLine("ComfyUI core", "partial", "ComfyUI core: " + _join(parts))
