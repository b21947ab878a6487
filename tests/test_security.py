"""The pack's own Python never evaluates strings or unpickles: no eval/exec, no pickle, no
`torch.load` without `weights_only=True` (in lycoris_core/, nodes/ and the pack's __init__.py).

Checked on the syntax tree (calls and imports), plus a plain-text scan for the words so that
aliasing tricks such as `getattr(builtins, "ev" + "al")` would still need the word spelled out.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.joinpath("lycoris_core").rglob("*.py"), *ROOT.joinpath("nodes").rglob("*.py"),
                  ROOT / "__init__.py"])
BANNED_CALLS = {"eval", "exec", "compile", "__import__"}
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}
WORDS = re.compile(r"(?<![.\w])(eval|exec|pickle|marshal|shelve|dill)\s*\(|\bimport\s+(pickle|marshal|shelve|dill)\b")


def problems_in(source: str, name: str) -> list[str]:
    """Every banned construct in `source` (one Python file), as 'name:line: what'."""
    found: list[str] = []
    tree = ast.parse(source, filename=name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            builtin = isinstance(func, ast.Name) or _dotted(getattr(func, "value", None)) == "builtins"
            if called in BANNED_CALLS and builtin:  # `module.eval()` (torch train/eval mode) is fine
                found.append(f"{name}:{node.lineno}: call to {called}()")
            if called == "load" and isinstance(func, ast.Attribute) and _dotted(func.value) == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    found.append(f"{name}:{node.lineno}: torch.load without weights_only=True")
            if called in {"load", "loads", "Unpickler"} and _dotted(getattr(func, "value", None)) in BANNED_MODULES:
                found.append(f"{name}:{node.lineno}: {_dotted(func.value)}.{called}()")
        elif isinstance(node, ast.Import):
            found += [f"{name}:{node.lineno}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            found.append(f"{name}:{node.lineno}: from {node.module} import …")
    for lineno, line in enumerate(source.splitlines(), 1):
        code = line.split("#", 1)[0]
        if WORDS.search(code) and not any(f"{name}:{lineno}:" in f for f in found):
            found.append(f"{name}:{lineno}: {code.strip()}")
    return found


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def test_sources_found():
    assert len(SOURCES) >= 15 and ROOT / "nodes" / "loaders.py" in SOURCES


def test_no_eval_exec_pickle_or_unsafe_torch_load():
    found = [p for f in SOURCES for p in problems_in(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "x = eval('1')", "exec(code)", "import builtins\nbuiltins.eval('1')", "import pickle", "from pickle import loads",
    "import torch\nsd = torch.load(p)", "import torch\nsd = torch.load(p, weights_only=False)",
    "import pickle as p2\np2.loads(b)", "import marshal", "f = __import__('os')", "y = compile(s, 'f', 'exec')",
])
def test_checker_catches(snippet):
    """The checker itself finds each banned construct (so a clean result means something)."""
    assert problems_in(snippet, "snippet.py")


@pytest.mark.parametrize("snippet", [
    "import torch\nsd = torch.load(p, weights_only=True)", "model.eval()", "x = evaluate(y)",
    "s = 'never unpickled'  # no pickle here",
])
def test_checker_allows(snippet):
    assert not problems_in(snippet, "snippet.py")
