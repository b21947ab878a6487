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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
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
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: dt for name, dt in (
        ("F64", torch.float64), ("F32", torch.float32), ("F16", torch.float16),
        ("BF16", torch.bfloat16), ("I64", torch.int64), ("I32", torch.int32), ("I16", torch.int16),
        ("I8", torch.int8), ("U8", torch.uint8), ("BOOL", torch.bool),
        ("U16", getattr(torch, "uint16", None)), ("U32", getattr(torch, "uint32", None)),
        ("U64", getattr(torch, "uint64", None)), ("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
        ("F8_E5M2", getattr(torch, "float8_e5m2", None)),
    ) if dt is not None
}
"""safetensors dtype name → torch dtype (little-endian data, as the format specifies)."""
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: enough to validate shapes without loading."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0  # byte span inside the data section (after the header)
    end: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    """Identity of a file's content as the OS sees it (size, mtime, inode)."""
    return st.st_size, st.st_mtime_ns, st.st_ino


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
        try:  # ENAMETOOLONG, EACCES, NUL bytes: all refused as AdapterError, never escaping
            exists, regular = p.exists(), p.is_file()
        except (OSError, ValueError) as exc:
            raise AdapterError(f"cannot access file: {getattr(exc, 'strerror', None) or exc}",
                               file=self.path) from exc
        if not exists:
            raise AdapterError("file does not exist", file=self.path)
        if not regular:
            raise AdapterError("not a regular file", file=self.path)
        try:
            st = p.stat()
            size, self._stamp = st.st_size, _stamp(st)
            with open(p, "rb") as fh:
                head = fh.read(8)
                # No number read from the file goes into a message: it may be any file (a
                # symlink to a secret), and its first 8 bytes must not come back as "a length".
                if len(head) < 8:
                    raise AdapterError("not a safetensors file (too short)", file=self.path)
                (n,) = struct.unpack("<Q", head)
                if 8 + n > size:  # checked before anything is read: a huge sparse file costs nothing
                    raise AdapterError("not a safetensors file, or a truncated one (the header "
                                       "length it starts with does not fit the file)", file=self.path)
                if n > MAX_HEADER_BYTES:
                    raise AdapterError(f"header is larger than the {MAX_HEADER_BYTES // 2**20} MiB "
                                       "limit", file=self.path)
                raw = fh.read(n)
        except OSError as exc:
            raise AdapterError(f"cannot read file: {exc.strerror or type(exc).__name__}",
                               file=self.path) from exc
        try:
            header = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:  # its message quotes the offending byte
            raise AdapterError("not a safetensors file (header is not valid JSON: not UTF-8 text)",
                              file=self.path) from None
        except (ValueError, RecursionError) as exc:  # bad JSON, over-deep nesting, huge ints
            raise AdapterError(f"not a safetensors file (header is not valid JSON: "
                               f"{type(exc).__name__})", file=self.path) from None
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
        self._data_start = 8 + n
        data_len = size - 8 - n
        spans: list[tuple[int, int, str]] = []
        for key, entry in header.items():
            self.infos[key] = self._check_entry(key, entry, data_len)
            spans.append((*entry["data_offsets"], key))
        spans.sort(key=lambda s: (s[0], s[1]))
        for (_, prev_end, prev), (begin, end, key) in zip(spans, spans[1:], strict=False):
            if begin < prev_end and end > begin:  # aliased data: one write would change two tensors
                raise AdapterError(f"data_offsets overlap those of '{prev}'", file=self.path, key=key)

    def _check_entry(self, key: str, entry: object, data_len: int) -> TensorInfo:
        if not isinstance(entry, dict):
            raise AdapterError("header entry is not an object", file=self.path, key=key)
        dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_SIZES:
            raise AdapterError(f"unsupported dtype {dtype!r}", file=self.path, key=key)
        if not (isinstance(shape, list) and all(_is_count(s) for s in shape)):
            raise AdapterError(f"bad shape {shape!r}", file=self.path, key=key)
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_count(o) for o in offs)):
            raise AdapterError(f"bad data_offsets {offs!r}", file=self.path, key=key)
        begin, end = offs
        expected = math.prod(shape) * DTYPE_SIZES[dtype]
        if not 0 <= begin <= end or end - begin != expected:
            raise AdapterError(f"data_offsets {offs} do not fit shape {shape} of {dtype}",
                               file=self.path, key=key)
        if end > data_len:
            raise AdapterError(f"truncated: tensor data ends at {end}, file holds {data_len}",
                               file=self.path, key=key)
        return TensorInfo(key, dtype, tuple(shape), begin, end)

    def keys(self) -> list[str]:
        return list(self.infos)

    def get(self, key: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor (never the whole file): its bytes at the offsets the header gave."""
        return self.get_many([key], device)[key]

    def get_many(self, keys: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read several tensors with one open of the file; no header is parsed again.

        The file must be the one whose header was read (same size, mtime and inode): a file
        replaced or rewritten since is refused rather than read at stale offsets.
        """
        infos = []
        for key in keys:
            if key not in self.infos:
                raise AdapterError("no such tensor", file=self.path, key=key)
            infos.append(self.infos[key])
        out: dict[str, torch.Tensor] = {}
        try:
            with open(self.path, "rb") as fh:
                if _stamp(os.fstat(fh.fileno())) != self._stamp:
                    raise AdapterError("file changed since it was opened; load it again",
                                       file=self.path, key=keys[0] if keys else None)
                for info in infos:
                    self.tensors_loaded += 1
                    buf = bytearray(info.end - info.begin)
                    fh.seek(self._data_start + info.begin)
                    if fh.readinto(buf) != len(buf):
                        raise AdapterError("truncated while reading", file=self.path, key=info.key)
                    dtype = TORCH_DTYPES[info.dtype]
                    t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                    t = t.reshape(info.shape)
                    out[info.key] = t if str(device) == "cpu" else t.to(device)
        except OSError as exc:
            raise AdapterError(f"cannot read file: {exc.strerror or exc}", file=self.path,
                               key=keys[0] if keys else None) from exc
        return out


def _is_count(value: object) -> bool:
    """A JSON non-negative integer (not a bool: `true` is an int in Python)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file, without reading any tensor."""
    return dict(SafetensorsFile(path).metadata)


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a file (validated header first)."""
    f = SafetensorsFile(path)
    return f.get_many(f.keys()), dict(f.metadata)


def _commit(tmp: str, dst: Path, overwrite: bool) -> None:
    """Move a complete, fsynced temporary file into place; never clobbers unless `overwrite`."""
    if overwrite:
        os.replace(tmp, dst)
        return
    try:  # link fails if dst appeared meanwhile: no clobbering even under a race
        os.link(tmp, dst)
    except FileExistsError:
        raise FileExistsError(f"{dst} exists; refusing to overwrite it") from None
    except OSError:  # filesystems without hard links
        if dst.exists():
            raise FileExistsError(f"{dst} exists; refusing to overwrite it") from None
        os.replace(tmp, dst)


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
        _commit(tmp, dst, overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.debug("wrote %s (%d tensors)", dst, len(clean))
    return dst


ST_DTYPE_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in TORCH_DTYPES.items()}
"""torch dtype → safetensors dtype name (the ones `save_safetensors_streaming` writes)."""


def save_safetensors_streaming(
    path: str | os.PathLike,
    specs: Sequence[TensorInfo],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a safetensors file one tensor at a time: peak memory is one tensor, not the file.

    `specs` (key, dtype name, shape) fixes the header up front; `tensors` must then yield exactly
    those tensors in that order (checked; a mismatch aborts and leaves nothing behind). Same
    atomicity as `save_safetensors`: temporary file in the destination folder, fsync, then a
    no-clobber link (or a replace with `overwrite`).
    """
    dst = Path(path)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; refusing to overwrite it")
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for spec in specs:
        nbytes = spec.numel * DTYPE_SIZES[spec.dtype]
        header[spec.key] = {"dtype": spec.dtype, "shape": list(spec.shape),
                            "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            it = iter(tensors)
            for spec in specs:
                key, t = next(it, (None, None))
                if key != spec.key or t is None:
                    raise ValueError(f"streamed tensor {key!r} where the header expects {spec.key!r}")
                name = ST_DTYPE_NAMES.get(t.dtype)
                if name != spec.dtype or tuple(t.shape) != tuple(spec.shape):
                    raise ValueError(f"{key}: got {name} {list(t.shape)}, header says {spec.dtype} "
                                     f"{list(spec.shape)}")
                flat = t.detach().cpu().contiguous().reshape(-1)
                if flat.numel():
                    fh.write(memoryview(flat.view(torch.uint8).numpy()))
            if next(it, None) is not None:
                raise ValueError("more tensors streamed than the header lists")
            fh.flush()
            os.fsync(fh.fileno())
        _commit(tmp, dst, overwrite)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.debug("streamed %s (%d tensors)", dst, len(specs))
    return dst
