"""The ΔW table of bench/README.md from a results JSON (`python -m bench.report [bench/results/latest.json]`).

Prints the run's settings and one Markdown row per ΔW case: median ms of the pack and its
references, then the paired ratios (ratio < 1: the pack is faster) and the bound ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .bench_delta import BENCH
from .common import RESULTS_DIR, _fmt

COLUMNS = (("pack", "pack"), ("pack cold", "pack cold"), (".delta()", "pack .delta()"),
           ("lycoris", "lycoris"), ("pack patch", "pack patch"), ("ComfyUI ΔW+add", "comfyui ΔW+add"))
RATIOS = (("pack/lycoris", "pack/lycoris"), (".delta()/lycoris", ".delta()/lycoris"),
          ("patch/ComfyUI", "patch/comfyui"), ("pack/bound", "pack/bound"),
          ("cold/bound", "cold/bound"))


def delta_table(payload: dict) -> str:
    """Markdown: a settings line and the ΔW table of one `bench.run` results payload."""
    m = payload.get("machine", {})
    head = (f"Run {m.get('time_utc', '?')}: threads {payload.get('threads') or 'default'}, clock "
            f"{payload.get('clock', 'wall')}, {m.get('cpus', '?')} CPUs ({m.get('cpu', '?')}), "
            f"load {', '.join(f'{x:.1f}' for x in m.get('load_avg', ()))}.")
    lines = [head, "", "| case | " + " | ".join(c for c, _ in COLUMNS + RATIOS) + " |",
             "|---|" + "---|" * (len(COLUMNS) + len(RATIOS))]
    for r in payload["rows"]:
        if r["bench"] != BENCH:
            continue
        cells = [_fmt(r["pack"] if key == "pack" else r["refs"].get(key)) for _, key in COLUMNS]
        cells += [_fmt(r["ratios"].get(key), True) for _, key in RATIOS]
        if isinstance(r["agreement"].get("comfyui ΔW+add"), str):  # ComfyUI failed the case
            cells[5] = "fails (SPEC §5)"
        lines.append(f"| {r['case']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR / "latest.json"
    print(delta_table(json.loads(path.read_text())))
