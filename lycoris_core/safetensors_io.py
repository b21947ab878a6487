"""Safetensors reading (lazy, validated header) and writing (atomic, never clobbering).

Reading parses and checks the header ourselves, so listing keys, shapes and metadata never
touches tensor data, and a truncated or malformed file is refused before anything is loaded.
Writing goes to a temporary file in the destination folder and is renamed into place.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import AdapterError

log = logging.getLogger("lycoris_nodes")

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Upper bound on the JSON header (safetensors' own limit is the same order)."""
MAX_METADATA_BYTES = 16 * 1024 * 1024

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: enough to validate shapes without loading."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsFile:
    """A lazily read safetensors file: header parsed and checked now, tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.tensors_loaded = 0  # count of get() calls, so tests can prove laziness
        p = Path(self.path)
        if p.suffix.lower() in {".pt", ".pth", ".ckpt", ".bin", ".pkl"}:
            raise AdapterError(
                "pickled checkpoints are never loaded (they can run code); convert the file to "
                ".safetensors first", file=self.path)
        if not p.exists():
            raise AdapterError("file does not exist", file=self.path)
        if not p.is_file():
            raise AdapterError("not a regular file", file=self.path)
        try:
            size = p.stat().st_size
            with open(p, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise AdapterError(f"too short to be safetensors ({size} bytes)", file=self.path)
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER_BYTES:
                    raise AdapterError(f"header length {n} exceeds {MAX_HEADER_BYTES} bytes",
                                       file=self.path)
                if 8 + n > size:
                    raise AdapterError(f"truncated: header says {n} bytes, file has {size}",
                                       file=self.path)
                raw = fh.read(n)
        except OSError as exc:
            raise AdapterError(f"cannot read file: {exc.strerror or exc}", file=self.path) from exc
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterError(f"header is not valid JSON ({exc})", file=self.path) from exc
        if not isinstance(header, dict):
            raise AdapterError("header is not a JSON object", file=self.path)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise AdapterError("__metadata__ must map strings to strings", file=self.path)
        if sum(len(k) + len(v) for k, v in meta.items()) > MAX_METADATA_BYTES:
            raise AdapterError("metadata too large", file=self.path)
        self.metadata: dict[str, str] = dict(meta)
        self.infos: dict[str, TensorInfo] = {}
        data_len = size - 8 - n
        for key, entry in header.items():
            self.infos[key] = self._check_entry(key, entry, data_len)

    def _check_entry(self, key: str, entry: object, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise AdapterError("header entry is not an object", file=self.path, key=key)
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise AdapterError(f"unsupported dtype {dtype!r}", file=self.path, key=key)
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise AdapterError(f"bad shape {shape!r}", file=self.path, key=key)
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise AdapterError(f"bad data_offsets {offs!r}", file=self.path, key=key)
        begin, end = offs
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if not 0 <= begin <= end or end - begin != expected:
            raise AdapterError(f"data_offsets {offs} do not fit shape {shape} of {dtype}",
                               file=self.path, key=key)
        if end > data_len:
            raise AdapterError(f"truncated: tensor data ends at {end}, file holds {data_len}",
                               file=self.path, key=key)
        return TensorInfo(key, dtype, tuple(shape))

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor (never the whole file)."""
        if key not in self.infos:
            raise AdapterError("no such tensor", file=self.path, key=key)
        self.tensors_loaded += 1
        dev = str(device) if str(device).startswith(("cpu", "cuda")) else "cpu"
        try:
            with safe_open(self.path, framework="pt", device=dev) as fh:
                t = fh.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error types
            raise AdapterError(f"cannot read tensor ({exc})", file=self.path, key=key) from exc
        return t if str(t.device) == str(device) else t.to(device)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, without reading any tensor."""
    return dict(SafetensorsFile(path).metadata)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a file (validated header first)."""
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}, dict(f.metadata)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write `tensors` atomically: a temporary file in the same folder, fsync, then rename.

    A reader sees either the old file or the complete new one, never a half-written file.
    Without `overwrite`, an existing file is left alone and `FileExistsError` is raised.
    """
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; refusing to overwrite it")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=meta)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, dst)
        else:
            try:  # link fails if dst appeared meanwhile: no clobbering even under a race
                os.link(tmp, dst)
            except FileExistsError:
                raise FileExistsError(f"{dst} exists; refusing to overwrite it") from None
            except OSError:  # filesystems without hard links
                if dst.exists():
                    raise FileExistsError(f"{dst} exists; refusing to overwrite it") from None
                os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.debug("wrote %s (%d tensors)", dst, len(clean))
    return dst
