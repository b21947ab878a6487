"""Conversion throughput: `lycoris_core.convert.convert_file` (sd-scripts → ComfyUI naming) against
a plain safetensors read + write of the same bytes.

The input is a full-size SDXL LoHa in sd-scripts naming (every module sd-scripts creates by
default with conv_dim, from `tests/fixtures/sdscripts_targets.json.gz`), random fp16 factors.
References, interleaved with the pack in the same rounds:
- `st read+write`        `safetensors.torch.load_file` + `save_file` (no fsync)
- `st read+write+fsync`  the same plus `os.fsync` — the durability `save_safetensors` gives, so
                         this is the like-for-like ratio
Every output goes to a fresh path in a temporary folder and is deleted after the sample.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lycoris_core.convert import convert_file
from lycoris_core.safetensors_io import save_safetensors

from .common import interleaved, row, sdscripts_targets

BENCH = "conversion (ms per file)"


def loha_file_tensors(modules: dict[str, dict], rank: int = 8, seed: int = 0,
                      dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Random LoHa tensors (flat convs) for `modules`, as sd-scripts lays them out."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, info in modules.items():
        o, *rest = info["weight_shape"]
        i = math.prod(rest)
        for half in (1, 2):
            out[f"{name}.hada_w{half}_a"] = (torch.randn(o, rank, generator=g) * 0.1).to(dtype)
            out[f"{name}.hada_w{half}_b"] = (torch.randn(rank, i, generator=g) * 0.1).to(dtype)
        out[f"{name}.alpha"] = torch.tensor(float(rank / 2)).to(dtype)
    return out


def write_input(folder: Path, limit: int | None, hashes: bool) -> tuple[Path, int]:
    """The sd-scripts-named input file and its size in bytes."""
    modules = dict(list(sdscripts_targets("sdxl").items())[:limit])
    meta = {"ss_network_module": "networks.loha", "ss_network_dim": "8", "ss_network_alpha": "4",
            "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4"})}
    if hashes:  # sd-scripts writes these on every save; the converter recomputes them
        meta.update(sshs_model_hash="0" * 64, sshs_legacy_hash="00000000")
    path = folder / f"sdxl_loha_{'hashed' if hashes else 'plain'}.safetensors"
    save_safetensors(loha_file_tensors(modules), path, meta)
    return path, path.stat().st_size


class _Outputs:
    """Fresh output paths in one folder; each sample's file is deleted right after it."""

    def __init__(self, folder: Path):
        self.folder, self.n = folder, 0

    def next(self) -> Path:
        self.n += 1
        return self.folder / f"out_{self.n}.safetensors"


def _contestants(src: Path, outs: _Outputs) -> dict:
    def pack():
        dst = outs.next()
        report = convert_file(src, dst, to="comfyui")
        if report.status != "converted":
            raise RuntimeError(f"convert_file: {report.status}: {report.reason}")
        dst.unlink()

    def plain(fsync: bool):
        def go():
            dst = outs.next()
            with safe_open(src, "pt") as fh:
                meta = fh.metadata()
            save_file(load_file(src), dst, metadata=meta)
            if fsync:
                with open(dst, "rb+") as fh:
                    os.fsync(fh.fileno())
            dst.unlink()
        return go

    return {"pack": pack, "st read+write": plain(False), "st read+write+fsync": plain(True)}


def run(limit: int | None = None, repeats: int = 5, target_s: float = 0.0,
        hashes: tuple[bool, ...] = (True, False)) -> dict:
    """Time the conversion of an SDXL LoHa file (the first `limit` modules; None: all)."""
    rows = []
    folder = Path(tempfile.mkdtemp(prefix="lycoris-bench-convert-"))
    try:
        for hashed in hashes:
            src, size = write_input(folder, limit, hashed)
            outs = _Outputs(folder)
            st = interleaved(_contestants(src, outs), repeats=repeats, target_s=target_s)
            ms = {k: v.median * 1e3 for k, v in st.items()}
            mb_s = {k: size / 1e6 / (v / 1e3) for k, v in ms.items()}
            case = (f"SDXL LoHa r8, {len(sdscripts_targets('sdxl')) if limit is None else limit} modules, "
                    f"{size / 1e6:.0f} MB, {'sshs hashes recomputed' if hashed else 'no hash fields'}")
            rows.append(row(BENCH, case, ms["pack"],
                            {"st read+write": ms["st read+write"],
                             "st read+write+fsync": ms["st read+write+fsync"]},
                            "ms", file_bytes=size, mb_per_s=mb_s))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"rows": rows}


def main(quick: bool = False) -> dict:
    """Full SDXL file (5 rounds), or its first 200 modules and 3 rounds with `quick`."""
    return run(limit=200, repeats=3) if quick else run()


if __name__ == "__main__":
    import argparse

    from .common import format_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    print(format_table(main(quick=ap.parse_args().quick)["rows"]))
