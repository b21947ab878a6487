"""The loader panel's file summary as JSON bytes, for the `/lycoris/metadata` route (pure, no ComfyUI).

`summary_json(path, name)` → (HTTP status, UTF-8 JSON body). The file is named by `name` (its
`lora_name`) everywhere, never by its absolute path, and error texts carry no value decoded from
an invalid file. Only the header is read (plus each module's scalar alpha, 4 bytes).

Large headers (a 32 MiB header of 200k modules takes seconds of `json.loads` that holds the
GIL, and hundreds of MiB) are summarised in a child process: `python -m lycoris_core.panel PATH
NAME` writes the status on the first line and the body after it; the route runs it so that the
server's event loop and memory are untouched.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable
from typing import TypeVar

from .adapter import load_adapter
from .effect import summary_fields
from .errors import AdapterError

MAX_META_CHARS = 4000  # long metadata values (tag frequencies, dataset dirs) are cut for the panel
T = TypeVar("T")
MAX_PANEL_MAP_HEADER = 1 << 20  # larger headers (tens of thousands of modules) get no panel map
MAX_NAMES = 200  # name lists (unmatched, unknown_keys) are cut; "<list>_total" gives the full count


def header_length(path: str | os.PathLike) -> int:
    """The header length a safetensors file declares (0 when it has fewer than 8 bytes)."""
    with open(path, "rb") as fh:
        head = fh.read(8)
    return struct.unpack("<Q", head)[0] if len(head) == 8 else 0


def _error(name: str, message: str, status: int = 422) -> tuple[int, bytes]:
    return status, json.dumps({"error": f"{name}: {message}", "lora_name": name}).encode()


def _guarded(name: str, read: Callable[[], T]) -> T | tuple[int, bytes]:
    """`read()` (loading the file), or the error answer naming the file by `name` only."""
    try:
        return read()
    except AdapterError as e:
        where = f"key '{str(e.key)[:200]}': " if e.key else ""
        return _error(name, where + e.detail)
    except OSError as e:
        return _error(name, f"cannot read file: {e.strerror or type(e).__name__}")
    except (ValueError, MemoryError, RecursionError) as e:
        return _error(name, f"cannot summarise the file ({type(e).__name__})")


def summary_json(path: str | os.PathLike, name: str) -> tuple[int, bytes]:
    """(status, JSON bytes): `Adapter.summary()` of the file with "file" = `name`, or an error."""
    summary = _guarded(name, lambda: load_adapter(path).summary())
    if isinstance(summary, tuple):
        return summary
    summary["file"] = name
    for field in ("unmatched", "unknown_keys"):
        names = summary.get(field) or []
        if len(names) > MAX_NAMES:
            summary[field], summary[f"{field}_total"] = names[:MAX_NAMES], len(names)
    summary["metadata"] = {k: (v if len(str(v)) <= MAX_META_CHARS else str(v)[:MAX_META_CHARS] + " …")
                           for k, v in summary.get("metadata", {}).items()}
    try:
        return 200, json.dumps(summary, allow_nan=False).encode()
    except ValueError:
        return _error(name, "the summary holds a value that is not a finite number")


def effect_json(path: str | os.PathLike, name: str) -> tuple[int, bytes]:
    """(status, JSON bytes) for the panel's effect map: `effect.summary_fields` with its picture.
    Reads the factors (not only the header). A file whose header cannot be read is an error like
    `summary_json`'s; a file whose factors cannot be read gives an empty map with the error by the
    file's name, so the panel still shows its metadata. Over `MAX_PANEL_MAP_HEADER` bytes of
    header, the map is left to the LyCORISEffectMap node / `inspect --map`."""
    if header_length(path) > MAX_PANEL_MAP_HEADER:
        return 200, json.dumps({"blocks": {}, "blocks_png": "", "blocks_message":
                                "too many modules to draw here; use the LyCORISEffectMap node"}).encode()
    adapter = _guarded(name, lambda: load_adapter(path))
    if isinstance(adapter, tuple):
        return adapter
    try:
        fields = summary_fields(adapter, with_png=True)
    except (AdapterError, OSError, ValueError) as e:
        fields = {"blocks": {}, "blocks_png": "",
                  "blocks_message": str(e).replace(str(path), name).replace(os.fspath(path), name)}
    fields["file"] = name
    try:
        return 200, json.dumps(fields, allow_nan=False).encode()
    except ValueError:
        return _error(name, "the effect map holds a value that is not a finite number")


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: `python -m lycoris_core.panel PATH NAME`."""
    path, name = (argv if argv is not None else sys.argv[1:])[:2]
    status, body = summary_json(path, name)
    out = sys.stdout.buffer
    out.write(f"{status}\n".encode() + body)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
