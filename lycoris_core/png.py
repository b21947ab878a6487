"""Small RGB pictures without an imaging library: a PNG writer (zlib + struct), a 3×5 bitmap
font and rectangle / text drawing on numpy arrays (H, W, 3) uint8. Used by the effect map."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_GLYPHS = {
    "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.", "C": ".## #.. #.. #.. .##", "D": "##. #.# #.# #.# ##.",
    "E": "### #.. ##. #.. ###", "F": "### #.. ##. #.. #..", "G": ".## #.. #.# #.# .##", "H": "#.# #.# ### #.# #.#",
    "I": "### .#. .#. .#. ###", "J": "..# ..# ..# #.# .#.", "K": "#.# #.# ##. #.# #.#", "L": "#.. #.. #.. #.. ###",
    "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#", "O": ".#. #.# #.# #.# .#.", "P": "##. #.# ##. #.. #..",
    "Q": ".#. #.# #.# ##. .##", "R": "##. #.# ##. #.# #.#", "S": ".## #.. .#. ..# ##.", "T": "### .#. .#. .#. .#.",
    "U": "#.# #.# #.# #.# ###", "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#", "X": "#.# #.# .#. #.# #.#",
    "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###", "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###",
    "2": "##. ..# .#. #.. ###", "3": "##. ..# .#. ..# ##.", "4": "#.# #.# ### ..# ..#", "5": "### #.. ##. ..# ##.",
    "6": ".## #.. ### #.# ###", "7": "### ..# .#. .#. .#.", "8": "### #.# ### #.# ###", "9": "### #.# ### ..# ##.",
    "_": "... ... ... ... ###", ".": "... ... ... ... .#.", "-": "... ... ### ... ...", "+": "... .#. ### .#. ...",
    "/": "..# ..# .#. #.. #..", ":": "... .#. ... .#. ...", "%": "#.. ..# .#. #.. ..#", "(": ".#. #.. #.. #.. .#.",
    ")": ".#. ..# ..# ..# .#.", "=": "... ### ... ### ...", "|": ".#. .#. .#. .#. .#.", " ": "... ... ... ... ...",
    "?": "##. ..# .#. ... .#.", ",": "... ... ... .#. #..", ">": "#.. .#. ..# .#. #..", "<": "..# .#. #.. .#. ..#",
}
"""3×5 glyphs, rows top to bottom ('#' set); lower case is drawn as upper case, unknown as '?'."""
GLYPH_W, GLYPH_H = 3, 5


def _glyph(ch: str) -> np.ndarray:
    rows = _GLYPHS.get(ch.upper(), _GLYPHS["?"]).split()
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def text_width(text: str, scale: int = 1) -> int:
    """Width in pixels of `text` drawn at `scale` (one blank column between glyphs)."""
    return max(0, len(text) * (GLYPH_W + 1) * scale - scale)


def draw_text(img: np.ndarray, x: int, y: int, text: str, color, scale: int = 1) -> None:
    """Draw `text` with its top-left corner at (x, y); clipped at the image's edges."""
    h, w = img.shape[:2]
    for i, ch in enumerate(text):
        g = np.kron(_glyph(ch), np.ones((scale, scale), dtype=bool))
        x0 = x + i * (GLYPH_W + 1) * scale
        ys, xs = np.nonzero(g)
        ys, xs = ys + y, xs + x0
        keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        img[ys[keep], xs[keep]] = color


def fill(img: np.ndarray, x: int, y: int, w: int, h: int, color) -> None:
    img[max(0, y):max(0, y + h), max(0, x):max(0, x + w)] = color


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(rgb: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 array as PNG bytes (8-bit RGB, no filter, zlib level 6)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape[:2]:
        raise ValueError(f"expected a non-empty (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()
    return (PNG_SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b""))


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write `rgb` as a PNG file: to a temporary name beside it, then renamed (never half-written)."""
    data = encode_png(rgb)
    tmp = f"{os.fspath(path)}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
