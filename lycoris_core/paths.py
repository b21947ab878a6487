"""Output file names that cannot escape their folder or overwrite anything.

Policy (chosen: REFUSE, not sanitise): a user-given name that is not a plain file name raises
`ValueError` saying what is wrong, instead of being silently rewritten into something the user did
not ask for. Refused: empty names, `.`/`..`, absolute paths, drive letters, backslashes, `/`
(unless `subdirs=True`, then each `/`-separated part is checked on its own), control/format/
unassigned Unicode characters (categories C*: NUL, newlines, zero-width and bidi overrides),
Windows-reserved characters `<>:"|?*` and device names (CON, NUL, COM1, …), names starting with a
dot (hidden files, and the `.name.tmp` files `save_safetensors` writes) or ending with a dot or a
space, and parts longer than `MAX_NAME_CHARS`. Ordinary Unicode letters, spaces, `-_.()[]` are fine.

The folder itself is trusted (it comes from ComfyUI, not from the user); symlinks are resolved on
both sides and the result must lie inside the resolved folder, so a symlinked subfolder or a
dangling symlink pointing elsewhere is refused too.
"""

from __future__ import annotations

import os
import re
import unicodedata
from pathlib import Path

MAX_NAME_CHARS = 180
"""Longest accepted name part, leaving room for `_00001_` and the extension under 255 bytes."""
WINDOWS_RESERVED_CHARS = set('<>:"|?*\\')
WINDOWS_DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                        *(f"LPT{i}" for i in range(1, 10))}


def is_within(folder: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True when `path` (symlinks resolved, need not exist) is `folder` or lies below it."""
    root = Path(folder).resolve()
    target = Path(path).resolve()
    return target == root or root in target.parents


def check_name_part(part: str, *, what: str = "file name") -> str:
    """Return `part` unchanged if it is a safe single path component, else raise `ValueError`."""
    if not part or not part.strip():
        raise ValueError(f"{what} is empty")
    if part in {".", ".."}:
        raise ValueError(f"{what} {part!r} is not allowed")
    if len(part) > MAX_NAME_CHARS:
        raise ValueError(f"{what} is {len(part)} characters long (at most {MAX_NAME_CHARS})")
    for ch in part:
        if unicodedata.category(ch).startswith("C"):
            raise ValueError(f"{what} {part!r} contains the control/invisible character U+{ord(ch):04X}")
        if ch in WINDOWS_RESERVED_CHARS or ch == "/":
            raise ValueError(f"{what} {part!r} contains the character {ch!r}, which is not allowed in "
                             "file names")
    if part.startswith("."):
        raise ValueError(f"{what} {part!r} starts with a dot (hidden/temporary files are not allowed)")
    if part != part.rstrip(". "):
        raise ValueError(f"{what} {part!r} ends with a dot or a space")
    if part.split(".", 1)[0].upper() in WINDOWS_DEVICE_NAMES:
        raise ValueError(f"{what} {part!r} is a reserved device name on Windows")
    return part


def split_name(name: str, *, subdirs: bool = False) -> list[str]:
    """The checked parts of a user-given `name` (one part unless `subdirs` allows `a/b/c`)."""
    if not isinstance(name, str):
        raise ValueError(f"file name must be a string, got {type(name).__name__}")
    if os.path.isabs(name) or name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise ValueError(f"file name {name!r} is an absolute path or has a drive letter; give a name "
                         "inside the output folder")
    if not subdirs:
        return [check_name_part(name)]
    return [check_name_part(p, what="path part") for p in name.split("/")]


def safe_output_path(
    folder: str | os.PathLike,
    name: str,
    ext: str = ".safetensors",
    *,
    counter: bool = True,
    subdirs: bool = False,
) -> Path:
    """A path for a new output file `<folder>/<name>[_NNNNN_]<ext>`, guaranteed inside `folder`.

    `name` is checked (see the module docstring; bad names raise `ValueError`); a trailing `ext`
    the user typed is dropped so `x.safetensors` does not become `x.safetensors.safetensors`.
    With `counter` (the default) the name gets ComfyUI SaveImage-style counters
    (`name_00001_.safetensors`, one past the highest existing one, skipping taken names), so an
    existing file is never reused. With `counter=False` the plain name is returned even if that
    file exists: write it with `save_safetensors(..., overwrite=False)` to refuse clobbering, or
    `overwrite=True` only when the user asked for it.
    Returns the resolved (symlink-free) path; the folder is not created.
    """
    if ext and not ext.startswith("."):
        raise ValueError(f"extension {ext!r} must start with a dot")
    if ext and name.lower().endswith(ext.lower()) and len(name) > len(ext):
        name = name[: -len(ext)]
    parts = split_name(name, subdirs=subdirs)
    root = Path(folder).resolve()
    parent = root.joinpath(*parts[:-1])
    stem = parts[-1]
    if counter:
        taken = highest_counter(parent, stem, ext)
        n = taken + 1
        while (parent / f"{stem}_{n:05}_{ext}").exists() or (parent / f"{stem}_{n:05}_{ext}").is_symlink():
            n += 1
        candidate = parent / f"{stem}_{n:05}_{ext}"
    else:
        candidate = parent / f"{stem}{ext}"
    resolved = candidate.resolve()
    if not is_within(root, resolved):
        raise ValueError(f"{name!r} would be written to {resolved}, outside the output folder {root}")
    return resolved


def highest_counter(parent: Path, stem: str, ext: str) -> int:
    """The largest N among files `<stem>_N_<ext>` in `parent` (0 when none / no folder)."""
    pattern = re.compile(rf"^{re.escape(stem)}_(\d+)_{re.escape(ext)}$")
    try:
        names = os.listdir(parent)
    except OSError:
        return 0
    found = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return max(found, default=0)
