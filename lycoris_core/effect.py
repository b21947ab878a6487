"""Where an adapter acts: ‖ΔW‖ per block and layer kind (the effect map).

Every module of a file is resolved against the bundled SDXL / Anima key sets
(`Adapter.guess_architecture`); its squared Frobenius norm at strength 1 comes from its factors
without forming ΔW (`AdapterModule.delta_norm_sq`, `algos/norms.py`) and is summed into the
cell (block, layer kind) of its weight key. A block's `delta_norm` is the square root of the sum
over its modules.

- blocks: the per-block strength names (`blocks.block_label`): `IN0`–`IN8`, `MID`, `OUT0`–`OUT8`,
  `B0`–`B27`, `LLM`, `TE1`, `TE2`, `QWEN3`, and `OTHER` for the rest;
- layer kinds (`layer_kind`): SDXL `attn1` / `attn2` / `ff` / `proj` / `resnet`; Anima DiT and
  LLM adapter `self_attn` / `cross_attn` / `mlp` / `adaln`; text encoders `self_attn` / `mlp`;
  anything else `other`. The picture's columns are the architecture's kinds; a text encoder's
  self-attention and MLP share the columns of the diffusion model's (SDXL: attn1, ff).

With the model's weights (`weights`), each cell also gets ‖W‖ over the modules whose weight is
known, so the map can show ‖ΔW‖/‖W‖, and DoRA modules give their exact change W' − W0.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .adapter import Adapter
from .blocks import block_label, block_labels
from .manifests import known_architectures
from .png import draw_text, encode_png, fill, text_width

_KIND_PARTS = (("attn1", "attn1"), ("attn2", "attn2"), ("ff", "ff"), ("self_attn", "self_attn"),
               ("cross_attn", "cross_attn"), ("mlp", "mlp"), ("proj_in", "proj"),
               ("proj_out", "proj"), ("in_layers", "resnet"), ("out_layers", "resnet"),
               ("emb_layers", "resnet"), ("skip_connection", "resnet"))

COLUMNS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "sdxl": (("attn1", ("attn1", "self_attn")), ("attn2", ("attn2", "cross_attn")),
             ("ff", ("ff", "mlp")), ("proj", ("proj",)), ("resnet", ("resnet",)),
             ("other", ("other", "adaln"))),
    "anima": (("self_attn", ("self_attn", "attn1")), ("cross_attn", ("cross_attn", "attn2")),
              ("mlp", ("mlp", "ff")), ("adaln", ("adaln",)), ("other", ("other", "proj", "resnet"))),
}
"""The picture's columns per architecture: (label, the layer kinds it sums)."""
COLUMNS["sd_unet"], COLUMNS["cosmos_predict2"] = COLUMNS["sdxl"], COLUMNS["anima"]


def layer_kind(model_key: str) -> str:
    """The layer kind of a ComfyUI weight key (module docstring): 'attn1', 'attn2', 'ff', 'proj',
    'resnet', 'self_attn', 'cross_attn', 'mlp', 'adaln' or 'other'."""
    parts = model_key.split(".")
    if any(p.startswith("adaln_modulation") for p in parts):
        return "adaln"
    names = set(parts)
    return next((kind for part, kind in _KIND_PARTS if part in names), "other")


@dataclass
class Cell:
    """The modules of one (block, layer kind): their count and squared norms."""

    modules: int = 0
    delta_sq: float = 0.0
    weighed: int = 0
    """Modules whose weight W was given (relative maps)."""
    weighed_delta_sq: float = 0.0
    weight_sq: float = 0.0

    def add(self, other: Cell) -> None:
        self.modules += other.modules
        self.delta_sq += other.delta_sq
        self.weighed += other.weighed
        self.weighed_delta_sq += other.weighed_delta_sq
        self.weight_sq += other.weight_sq

    @property
    def delta_norm(self) -> float:
        return math.sqrt(self.delta_sq)

    @property
    def relative(self) -> float | None:
        """‖ΔW‖/‖W‖ over the modules with a known W; None when there is none."""
        if not self.weighed or self.weight_sq <= 0.0:
            return None
        return math.sqrt(self.weighed_delta_sq / self.weight_sq)


@dataclass
class EffectMap:
    """‖ΔW‖ of one adapter per block and layer kind."""

    file: str
    architecture: str
    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)
    """block name → layer kind → `Cell` (only cells with modules)."""
    unmatched: list[str] = field(default_factory=list)
    dora_without_base: list[str] = field(default_factory=list)
    with_weights: bool = False

    def block(self, name: str) -> Cell:
        total = Cell()
        for cell in self.cells.get(name, {}).values():
            total.add(cell)
        return total

    def rows(self) -> list[str]:
        """The picture's rows: every block of the architecture (in block-weight order)."""
        known = block_labels(self.architecture)
        return known + [b for b in self.cells if b not in known]

    def columns(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        return COLUMNS.get(self.architecture, ())

    def blocks(self) -> dict[str, dict]:
        """The JSON of `inspect`: {NAME: {"modules": n, "delta_norm": x, "kinds": {kind: x}}}
        (plus "relative" = ‖ΔW‖/‖W‖ when weights were given), blocks in map order."""
        out = {}
        for name in self.rows():
            if name not in self.cells:
                continue
            total = self.block(name)
            entry = {"modules": total.modules, "delta_norm": total.delta_norm,
                     "kinds": {k: c.delta_norm for k, c in sorted(self.cells[name].items())}}
            if self.with_weights:
                entry["relative"] = total.relative
            out[name] = entry
        return out

    def grid(self, relative: bool = False) -> list[list[float | None]]:
        """Values per (row, column) of the picture; None where the cell has no module (or, for
        `relative`, no module with a known weight)."""
        out = []
        for name in self.rows():
            kinds = self.cells.get(name, {})
            row = []
            for _, members in self.columns():
                cell = Cell()
                for kind in members:
                    if kind in kinds:
                        cell.add(kinds[kind])
                if not cell.modules:
                    row.append(None)
                else:
                    row.append(cell.relative if relative else cell.delta_norm)
            out.append(row)
        return out

    @property
    def message(self) -> str:
        """Why the map is empty or partial ("" when every module is in it)."""
        notes = []
        if not self.cells:
            notes.append(f"no module of this file matches a known block ({', '.join(known_architectures())}"
                         f"): the map is empty ({len(self.unmatched)} modules unmatched)")
        elif self.unmatched:
            notes.append(f"{len(self.unmatched)} modules match no {self.architecture} layer and are "
                         f"not in the map (e.g. {', '.join(self.unmatched[:3])})")
        if self.dora_without_base:
            notes.append(f"{len(self.dora_without_base)} DoRA modules: ‖ΔW‖ before the magnitude "
                         "rescale (it needs the base weights)")
        if self.with_weights:
            missing = sum(c.modules - c.weighed for kinds in self.cells.values() for c in kinds.values())
            if missing:
                notes.append(f"{missing} modules have no weight in the model: left out of ‖ΔW‖/‖W‖")
        return "; ".join(notes)


def effect_map(adapter: Adapter, weights: Mapping[str, torch.Tensor] | None = None) -> EffectMap:
    """The effect map of `adapter` at strength 1 (module docstring).

    `weights`: {ComfyUI key: weight tensor} of the model (optional): relative values, and DoRA
    modules' exact change. Raises `AdapterError` (naming the file and key) for a broken file."""
    arch, res = adapter.guess_architecture()
    emap = EffectMap(os.path.basename(adapter.path), arch, unmatched=list(res.unmatched),
                     with_weights=weights is not None)
    for name, key in res.matched.items():
        module = adapter.modules[name]
        w = weights.get(key) if weights is not None else None
        if module.has_dora and w is None:
            emap.dora_without_base.append(name)
        sq = module.delta_norm_sq(base=w if module.has_dora else None)
        cell = emap.cells.setdefault(block_label(key), {}).setdefault(layer_kind(key), Cell())
        cell.modules += 1
        cell.delta_sq += sq
        if w is not None:
            cell.weighed += 1
            cell.weighed_delta_sq += sq
            cell.weight_sq += float(torch.linalg.vector_norm(w.to(torch.float32), dtype=torch.float64) ** 2)
    return emap


def summary_fields(adapter: Adapter, with_png: bool = False) -> dict:
    """What `inspect --json` and the loaders' metadata panel add to `Adapter.summary()`:
    "blocks" (`EffectMap.blocks`), "blocks_message" (`EffectMap.message`) and, `with_png`,
    "blocks_png": the picture as base64 PNG."""
    emap = effect_map(adapter)
    out = {"blocks": emap.blocks(), "blocks_message": emap.message}
    if with_png:
        out["blocks_png"] = base64.b64encode(encode_png(picture(emap).rgb)).decode("ascii")
    return out


# --- text --------------------------------------------------------------------------------------

def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3e}"


def format_table(emap: EffectMap, relative: bool = False) -> str:
    """The map as text: one line per block with modules (count, ‖ΔW‖ or ‖ΔW‖/‖W‖, per column)."""
    what = "‖ΔW‖/‖W‖" if relative else "‖ΔW‖ (Frobenius, strength 1)"
    lines = [f"effect map: {emap.file} ({emap.architecture}), {what} per block"]
    if emap.message:
        lines.append(f"note: {emap.message}")
    if not emap.cells:
        return "\n".join(lines)
    cols = [label for label, _ in emap.columns()]
    lines.append(f"{'block':<6} {'modules':>7} {'total':>10} " + " ".join(f"{c:>10}" for c in cols))
    for name, values in zip(emap.rows(), emap.grid(relative), strict=True):
        if name not in emap.cells:
            continue
        total = emap.block(name)
        lines.append(f"{name:<6} {total.modules:>7} {_num(total.relative if relative else total.delta_norm):>10} "
                     + " ".join(f"{_num(v):>10}" for v in values))
    return "\n".join(lines)


# --- picture -----------------------------------------------------------------------------------

BACKGROUND, INK, EMPTY = (24, 24, 28), (220, 220, 220), (58, 58, 62)
HEAT = np.array([[16, 16, 48], [110, 30, 120], [220, 80, 50], [250, 235, 110]], dtype=np.float64)
COOL = np.array([[16, 16, 48], [40, 90, 200], [120, 200, 250]], dtype=np.float64)
SCALE = 2                     # font scale
CELL_H, CELL_MIN_W = 14, 36
PAD, GAP, LINE = 6, 14, 14


def heat_color(t: float, ramp: np.ndarray = HEAT) -> tuple[int, int, int]:
    """The colour of t in [0, 1] on a ramp of evenly spaced key colours."""
    t = min(1.0, max(0.0, float(t))) * (len(ramp) - 1)
    i = min(int(t), len(ramp) - 2)
    c = ramp[i] + (ramp[i + 1] - ramp[i]) * (t - i)
    return tuple(int(round(v)) for v in c)


@dataclass
class MapPanel:
    """One grid of the picture: title, row and column labels, values (None: no module)."""

    title: str
    rows: list[str]
    columns: list[str]
    values: list[list[float | None]]


@dataclass
class Picture:
    rgb: np.ndarray
    """(H, W, 3) uint8."""
    cells: dict[tuple[int, str, str], tuple[int, int, int, int]]
    """(panel index, row, column) → (x, y, w, h) of the cell's rectangle."""
    vmax: float


def panels_for(emap: EffectMap, relative: bool = False, title: str | None = None) -> MapPanel:
    return MapPanel(title if title is not None else emap.file, emap.rows(),
                    [label for label, _ in emap.columns()], emap.grid(relative))


def difference_panel(a: EffectMap, b: EffectMap, relative: bool = False) -> MapPanel:
    """Per cell ‖ΔW_a‖ − ‖ΔW_b‖ (None where neither has a module), on a's rows and columns."""
    ga, gb = a.grid(relative), b.grid(relative)
    rows_b = {r: i for i, r in enumerate(b.rows())}
    cols_b = {c: j for j, (c, _) in enumerate(b.columns())}
    values = []
    for i, r in enumerate(a.rows()):
        row = []
        for j, (c, _) in enumerate(a.columns()):
            va = ga[i][j]
            vb = gb[rows_b[r]][cols_b[c]] if r in rows_b and c in cols_b else None
            row.append(None if va is None and vb is None else (va or 0.0) - (vb or 0.0))
        values.append(row)
    return MapPanel(f"{a.file} - {b.file}", a.rows(), [c for c, _ in a.columns()], values)


def render(panels: list[MapPanel], *, title: str = "", signed: bool = False,
           notes: list[str] = ()) -> Picture:
    """Draw the panels side by side on one colour scale (0 … max, or −max … max when `signed`)
    with labels, a colour bar and `notes` lines. Empty panels draw only their title."""
    ch = text_width("W", SCALE)
    label_w = max([text_width(r, SCALE) for p in panels for r in p.rows] + [0]) + 6
    col_w = max([text_width(c, SCALE) for p in panels for c in p.columns] + [CELL_MIN_W - 6]) + 6
    found = [abs(v) for p in panels for row in p.values for v in row if v is not None]
    vmax = max(found) if found and max(found) > 0 else 1.0
    header = PAD + (LINE if title else 0)
    widths = [label_w + col_w * len(p.columns) if p.columns else
              max(text_width(p.title, SCALE), 10) for p in panels]
    widths = [max(w, text_width(p.title, SCALE)) for w, p in zip(widths, panels, strict=True)]
    grid_top = header + LINE + LINE          # panel title, column labels
    grid_h = max([CELL_H * len(p.rows) for p in panels if p.columns] + [0])
    bar_top = grid_top + grid_h + PAD
    lines = [n for n in notes if n]
    height = bar_top + (LINE + LINE if found else 0) + LINE * len(lines) + PAD
    width = max(PAD * 2 + sum(widths) + GAP * (len(panels) - 1), 260,
                *(PAD * 2 + text_width(n, SCALE) for n in [title, *lines]))
    img = np.empty((height, width, 3), np.uint8)
    img[:] = BACKGROUND
    if title:
        draw_text(img, PAD, PAD, title, INK, SCALE)
    cells = {}
    x0 = PAD
    for k, p in enumerate(panels):
        draw_text(img, x0, header, p.title, INK, SCALE)
        for j, c in enumerate(p.columns):
            draw_text(img, x0 + label_w + col_w * j + 3, header + LINE, c, INK, SCALE)
        for i, r in enumerate(p.rows if p.columns else []):
            y = grid_top + CELL_H * i
            draw_text(img, x0, y + 2, r, INK, SCALE)
            for j, c in enumerate(p.columns):
                v = p.values[i][j]
                box = (x0 + label_w + col_w * j, y, col_w - 1, CELL_H - 1)
                if v is None:
                    color = EMPTY
                elif signed:
                    color = heat_color(v / vmax) if v >= 0 else heat_color(-v / vmax, COOL)
                else:
                    color = heat_color(v / vmax)
                fill(img, *box, color)
                cells[(k, r, c)] = box
        x0 += widths[k] + GAP
    if found:
        lo, hi = (f"-{vmax:.2e}" if signed else "0"), f"{vmax:.2e}"
        bar_w = max(120, text_width(lo, SCALE) + text_width(hi, SCALE) + 3 * ch)
        for x in range(bar_w):
            t = x / (bar_w - 1)
            color = heat_color(2 * t - 1 if t >= 0.5 else 1 - 2 * t, HEAT if t >= 0.5 else COOL) \
                if signed else heat_color(t)
            fill(img, PAD + x, bar_top, 1, LINE - 4, color)
        draw_text(img, PAD, bar_top + LINE, lo, INK, SCALE)
        draw_text(img, PAD + bar_w - text_width(hi, SCALE), bar_top + LINE, hi, INK, SCALE)
        draw_text(img, PAD + bar_w + ch, bar_top, "EMPTY", INK, SCALE)
        fill(img, PAD + bar_w + ch + text_width("EMPTY ", SCALE), bar_top, CELL_H, LINE - 4, EMPTY)
    y = bar_top + (LINE + LINE if found else 0)
    for n in lines:
        draw_text(img, PAD, y, n, INK, SCALE)
        y += LINE
    return Picture(img, cells, vmax)


def picture(emap: EffectMap, relative: bool = False, other: EffectMap | None = None,
            mode: str = "same scale") -> Picture:
    """The picture of a map: one panel; with `other`, both on one scale (`mode` "same scale")
    or their difference (`mode` "difference", ‖ΔW‖ of emap minus other's per cell)."""
    what = "|DW|/|W|" if relative else "|DW| PER BLOCK AND LAYER KIND"
    notes = [emap.message]
    if other is None:
        return render([panels_for(emap, relative)], title=f"{emap.architecture} {what}",
                      notes=_wrap(notes))
    notes.append(other.message)
    if mode == "difference":
        return render([difference_panel(emap, other, relative)], signed=True,
                      title=f"{emap.architecture} {what}: DIFFERENCE", notes=_wrap(notes))
    return render([panels_for(emap, relative), panels_for(other, relative)],
                  title=f"{emap.architecture} {what}: SAME SCALE", notes=_wrap(notes))


def _wrap(notes: list[str], width: int = 70) -> list[str]:
    out = []
    for note in notes:
        words, line = note.replace("‖", "|").replace("Δ", "D").replace("−", "-").split(), ""
        for w in words:
            if line and len(line) + 1 + len(w) > width:
                out.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        if line:
            out.append(line)
    return out
