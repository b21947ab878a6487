"""Hard-link installed distributions from one venv's site-packages into another's.

The second ComfyUI host gets a venv of its own, but torch, torchvision and the CUDA runtime
wheels they pull (5.5 GB) are the same files as in the first venv: linking them costs no
download, no copy and no disk. Every file listed in a distribution's RECORD (and its dist-info)
is linked, so pip in the target venv sees the distribution as installed. pip never rewrites an
installed file in place (it unlinks, then writes), so the source venv is never changed.

    python scripts/link_dists.py SRC_SITE_PACKAGES DST_SITE_PACKAGES NAME_PATTERN...
"""

from __future__ import annotations

import csv
import fnmatch
import os
import sys
from pathlib import Path


def _dist_name(dist_info: Path) -> str:
    return dist_info.name[: -len(".dist-info")].rsplit("-", 1)[0].lower().replace("_", "-")


def link_dists(src: Path, dst: Path, patterns: list[str]) -> list[str]:
    """Link the distributions of `src` whose normalised names match a pattern; return their names."""
    linked = []
    for info in sorted(src.glob("*.dist-info")):
        name = _dist_name(info)
        if not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        with open(info / "RECORD", newline="") as fh:
            files = [row[0] for row in csv.reader(fh) if row]
        for rel in files:
            path = (src / rel).resolve()
            if not path.is_file() or not path.is_relative_to(src.resolve()):
                continue  # scripts in ../../bin, .pyc files that were never written
            target = dst / path.relative_to(src.resolve())
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                target.unlink()
            os.link(path, target)
        linked.append(name)
    return linked


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    names = link_dists(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
    if not names:
        sys.exit(f"no distribution in {sys.argv[1]} matches {sys.argv[3:]}")
    print(f"linked {len(names)} distributions: {', '.join(names)}")
