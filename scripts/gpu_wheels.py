"""Which installed distributions a GPU check needs: run with a host's Python (scripts/gpu_prepare.sh).

Boots the host's ComfyUI headless on the CPU exactly as the tests do (tests/comfy_host.py: the pack
loaded by ComfyUI's own loader), imports the test tools and the oracle, then maps every module now
loaded from site-packages to its distribution. Prints one `name==version` per line, without the
distributions a GPU machine brings (`PREINSTALLED`: torch and its CUDA stack, torchvision,
transformers and their dependencies, safetensors, numpy) and those ComfyUI runs without that the
folder leaves out (`LEFT_OUT`, blocked during this boot).

    python gpu_wheels.py [--loaded KEEP_FILE]

With `--loaded`, also appends to KEEP_FILE, one per line, the files of the `TRIMMED` distributions
that this boot loaded as modules (paths inside the wheel, the ABI tag of extension modules dropped:
`scipy/special/_ufuncs.so`), for `gpu_pack.py pack --trim`.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import re
import sys
import tempfile
from pathlib import Path

from gpu_pack import EXT_TAG

ROOT = Path(__file__).resolve().parents[1]
PREINSTALLED = re.compile(
    r"^(torch|torchvision|triton|nvidia-.*|cuda-.*|transformers|tokenizers|huggingface-hub|hf-xet|"
    r"safetensors|numpy|pillow|regex|requests|urllib3|idna|certifi|charset-normalizer|packaging|"
    r"pyyaml|tqdm|filelock|fsspec|typing-extensions|jinja2|markupsafe|networkx|sympy|mpmath|"
    r"setuptools|pip|wheel)$")
"""Distributions a machine with CUDA torch, torchvision, transformers, safetensors and numpy has
(torch's, torchvision's and transformers' own requirements)."""
TOOLS = ("pytest", "pytest_timeout", "lycoris", "lycoris.functional")
"""Imported besides ComfyUI by the GPU check's tests: the test runner, its timeout plugin, the oracle
(the property tests, which need hypothesis, exercise no host and stay with the CPU suite)."""
LEFT_OUT = ("alembic", "sqlalchemy")
"""Imported by ComfyUI inside a try (its asset database, which it runs without, with a warning) and
never by the GPU tests: the boot here blocks them, which shows ComfyUI starts without them, and
the folder does not carry them (1.6 MiB packed that its 50 MiB budget lacks room for)."""
TRIMMED = ("scipy",)
"""Distributions the GPU folder carries only in part (see gpu_pack.py): their loaded modules."""


def loaded_files(top: str) -> list[str]:
    """Files of package `top` that are loaded as modules now, relative to its site-packages."""
    package = Path(importlib.import_module(top).__file__).resolve().parent
    out = set()
    for mod in list(sys.modules.values()):
        # by file, not by name: an extension module may be registered under its bare name
        # (scipy/_lib/_uarray/_uarray.so is `_uarray`)
        file = getattr(mod, "__file__", None)
        path = Path(file).resolve() if isinstance(file, str) else None
        if path is not None and path.is_relative_to(package):
            out.add(EXT_TAG.sub(".so", path.relative_to(package.parent).as_posix()))
    return sorted(out)


def main(argv: list[str]) -> int:
    keep_file = Path(argv[1]) if len(argv) == 2 and argv[0] == "--loaded" else None
    if argv and keep_file is None:
        print(__doc__, file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "tests"))
    for name in LEFT_OUT:
        sys.modules[name] = None  # `import name` raises ImportError, as on the GPU machine
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
            if name in needed or name in LEFT_OUT or PREINSTALLED.match(name):
                continue
            try:
                needed[name] = md.version(name)
            except md.PackageNotFoundError:
                continue
            todo.append(name)
    for name in sorted(needed):
        print(f"{name}=={needed[name]}")
    if keep_file is not None:
        with keep_file.open("a") as f:
            for top in TRIMMED:
                if top in sys.modules:
                    f.writelines(line + "\n" for line in loaded_files(top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
