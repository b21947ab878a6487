"""Which installed distributions a GPU check needs: run with a host's Python (scripts/gpu_prepare.sh).

Boots the host's ComfyUI headless on the CPU exactly as the tests do (tests/comfy_host.py: the pack
loaded by ComfyUI's own loader), imports the test tools and the oracle, then maps every module now
loaded from site-packages to its distribution. Prints one `name==version` per line, without the
distributions a GPU machine brings (`PREINSTALLED`: torch and its CUDA stack, torchvision,
transformers and their dependencies, safetensors, numpy).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PREINSTALLED = re.compile(
    r"^(torch|torchvision|triton|nvidia-.*|cuda-.*|transformers|tokenizers|huggingface-hub|hf-xet|"
    r"safetensors|numpy|pillow|regex|requests|urllib3|idna|certifi|charset-normalizer|packaging|"
    r"pyyaml|tqdm|filelock|fsspec|typing-extensions|jinja2|markupsafe|networkx|sympy|mpmath|"
    r"setuptools|pip|wheel)$")
"""Distributions a machine with CUDA torch, torchvision, transformers, safetensors and numpy has
(torch's, torchvision's and transformers' own requirements)."""
TOOLS = ("pytest", "pytest_timeout", "hypothesis", "lycoris", "lycoris.functional")
"""Imported besides ComfyUI: the test runner, its timeout plugin, property tests, the oracle."""


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    import comfy_host

    comfy_host.boot(Path(tempfile.mkdtemp(prefix="lycoris-gpu-wheels-")))
    for name in TOOLS:
        importlib.import_module(name)
    dists = md.packages_distributions()
    needed: dict[str, str] = {}
    for mod in list(sys.modules.values()):
        top = (getattr(mod, "__name__", "") or "").split(".")[0]
        for dist in dists.get(top, []):
            key = dist.lower().replace("_", "-")
            if not PREINSTALLED.match(key):
                needed[key] = md.version(dist)
    # requirements of the needed ones that were not imported here (e.g. lazily imported)
    todo = list(needed)
    while todo:
        for req in md.requires(todo.pop()) or []:
            if "extra ==" in req:
                continue
            name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")
            if name in needed or PREINSTALLED.match(name):
                continue
            try:
                needed[name] = md.version(name)
            except md.PackageNotFoundError:
                continue
            todo.append(name)
    for name in sorted(needed):
        print(f"{name}=={needed[name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
