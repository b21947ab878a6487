"""A generated corpus of bad adapter inputs: each item is a path plus what its error must say.

`build_corpus(folder)` writes every item under `folder` and returns a list of `BadInput`. Every
item must make `load_adapter(path)` or `delta_weights(adapter, MODEL)` raise `AdapterError` whose
message names the file (always) and `key` (when the item has one), and matches `match`.

Note: a module WITHOUT `alpha` is not bad input (alpha defaults to the rank, as in LyCORIS and
ComfyUI; tests/test_io.py covers it). The corpus's "missing alpha" items are modules whose alpha
is present but unusable (wrong shape, empty, NaN, Inf, wrong dtype) or present alone without any
factor tensor.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

# Real SDXL layers (ComfyUI keys) and their sd-scripts module names.
Q_KEY = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"  # (640, 640)
Q_MOD = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
Q_COMFY = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"  # ComfyUI spelling
CONV_KEY = "diffusion_model.input_blocks.1.0.in_layers.2.weight"  # (320, 320, 3, 3)
CONV_MOD = "lora_unet_input_blocks_1_0_in_layers_2"
TE_KEY = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"  # (768, 768)
TE_MOD = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
ANIMA_MOD = "lora_unet_blocks_0_self_attn_q_proj"  # an Anima DiT layer: no SDXL counterpart

PICKLE_MARKER = "UNPICKLED_MARKER"
"""A file of this name appears next to the pickles if anything ever unpickles one of them."""


def model_weights() -> dict[str, object]:
    """The full-size SDXL manifest as shapes, with real (seeded) tensors for the targeted layers
    (DoRA modules need W0's values)."""
    from lycoris_core import manifest

    weights: dict[str, object] = dict(manifest("sdxl"))
    g = torch.Generator().manual_seed(1)
    for key in (Q_KEY, CONV_KEY, TE_KEY):
        weights[key] = torch.randn(*weights[key], generator=g) * 0.02
    return weights


@dataclass(frozen=True)
class BadInput:
    """One corpus item: the error must name `path`, name `key` if given, and match `match`."""

    name: str
    path: Path
    key: str | None
    match: str
    at_load: bool
    """True: `load_adapter` itself must refuse it (nothing is read beyond the header)."""


# ------------------------------------------------------------------------------ good modules
def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 7 * len(shape)))


def loha(mod: str = Q_MOD, o: int = 640, i: int = 640, r: int = 4) -> dict[str, torch.Tensor]:
    return {f"{mod}.hada_w1_a": _rand(o, r, seed=1) * 0.1, f"{mod}.hada_w1_b": _rand(r, i, seed=2) * 0.1,
            f"{mod}.hada_w2_a": _rand(o, r, seed=3) * 0.1, f"{mod}.hada_w2_b": _rand(r, i, seed=4) * 0.1,
            f"{mod}.alpha": torch.tensor(2.0)}


def lokr(mod: str = Q_MOD) -> dict[str, torch.Tensor]:
    """640 = 8·80: W1 full (8, 8), W2 = w2_a (80, 4) @ w2_b (4, 80)."""
    return {f"{mod}.lokr_w1": _rand(8, 8, seed=5), f"{mod}.lokr_w2_a": _rand(80, 4, seed=6),
            f"{mod}.lokr_w2_b": _rand(4, 80, seed=7), f"{mod}.alpha": torch.tensor(4.0)}


def lora(mod: str = Q_MOD, o: int = 640, i: int = 640, r: int = 4) -> dict[str, torch.Tensor]:
    return {f"{mod}.lora_up.weight": _rand(o, r, seed=8), f"{mod}.lora_down.weight": _rand(r, i, seed=9),
            f"{mod}.alpha": torch.tensor(4.0)}


def good_file(folder: Path) -> Path:
    """A valid LoHa on the SDXL layer `Q_KEY` (the corpus checks its own sanity with it)."""
    p = folder / "good_loha.safetensors"
    save_file(loha(), str(p))
    return p


# ------------------------------------------------------------------------------ raw writers
def raw_file(path: Path, header: bytes | dict, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors-like file with an arbitrary header (and declared header length)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


class _Evil:
    """Unpickling this creates the marker file (the proof that a pickle was loaded)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def pickle_file(path: Path, zipped: bool = False) -> Path:
    marker = str(path.parent / PICKLE_MARKER)
    if zipped:  # torch.save's zip format (what .ckpt / .pt usually are)
        torch.save({"state_dict": {"x": torch.zeros(2)}, "evil": _Evil(marker)}, str(path))
    else:
        path.write_bytes(pickle.dumps({"x": _Evil(marker)}, protocol=4))
    return path


# ------------------------------------------------------------------------------ the corpus
def build_corpus(folder: str | os.PathLike) -> list[BadInput]:
    """Write every bad input under `folder`; return the items."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    items: list[BadInput] = []

    def add(name: str, key: str | None, match: str, at_load: bool, make: Callable[[Path], Path]) -> None:
        items.append(BadInput(name, make(root / f"{name}.safetensors"), key, match, at_load))

    def tensors_file(tensors: dict[str, torch.Tensor], metadata: dict | None = None):
        def make(p: Path) -> Path:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(p), metadata=metadata)
            return p
        return make

    def edited(base: dict[str, torch.Tensor], drop=(), **changes: torch.Tensor):
        t = {k: v for k, v in base.items() if k.rsplit(".", 1)[-1] not in drop and k not in drop}
        for suffix, value in changes.items():
            t[f"{_module_of(base)}.{suffix}"] = value
        return tensors_file(t)

    good = loha()
    good_bytes = _bytes_of(good)

    # --- truncated files (cut inside the length prefix, the header, the data) ---
    for cut_name, cut in (("empty", 0), ("len_prefix", 5), ("header_mid", 40), ("data_end", -1),
                          ("data_mid", len(good_bytes) // 2)):
        add(f"truncated_{cut_name}", None, r"truncated|too short", True,
            lambda p, cut=cut: _write(p, good_bytes[:cut]))

    # --- bad or oversized headers ---
    headers: list[tuple[str, bytes | dict, str | None, str]] = [
        ("hdr_not_json", b"not json at all", None, "not valid JSON"),
        ("hdr_not_utf8", b'{"\xff\xfe": 1}', None, "not valid JSON"),
        ("hdr_list", b"[1, 2]", None, "not a JSON object"),
        ("hdr_deep_nesting", b"[" * 100_000 + b"]" * 100_000, None, "JSON"),
        ("hdr_huge_int", b'{"a": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
         None, "JSON"),
        ("hdr_entry_not_object", {f"{Q_MOD}.hada_w1_a": [1, 2]}, f"{Q_MOD}.hada_w1_a", "not an object"),
        ("hdr_missing_fields", {f"{Q_MOD}.hada_w1_a": {"dtype": "F32"}}, f"{Q_MOD}.hada_w1_a", "bad shape"),
        ("hdr_unknown_dtype", {f"{Q_MOD}.hada_w1_a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
         f"{Q_MOD}.hada_w1_a", "unsupported dtype"),
        ("hdr_negative_shape", {f"{Q_MOD}.hada_w1_a": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 0]}},
         f"{Q_MOD}.hada_w1_a", "bad shape"),
        ("hdr_float_shape", {f"{Q_MOD}.hada_w1_a": {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]}},
         f"{Q_MOD}.hada_w1_a", "bad shape"),
        ("hdr_bool_shape", {f"{Q_MOD}.hada_w1_a": {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}},
         f"{Q_MOD}.hada_w1_a", "bad shape"),
        ("hdr_offsets_reversed", {f"{Q_MOD}.hada_w1_a": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}},
         f"{Q_MOD}.hada_w1_a", "data_offsets"),
        ("hdr_offsets_past_end", {f"{Q_MOD}.hada_w1_a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}},
         f"{Q_MOD}.hada_w1_a", "truncated"),
        ("hdr_huge_shape", {f"{Q_MOD}.hada_w1_a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}},
         f"{Q_MOD}.hada_w1_a", "data_offsets"),
        ("hdr_metadata_not_strings", {"__metadata__": {"x": 1}}, None, "__metadata__"),
        ("hdr_metadata_nested", {"__metadata__": {"x": {"y": "z"}}}, None, "__metadata__"),
    ]
    for name, header, key, match in headers:
        add(name, key, match, True, lambda p, h=header: raw_file(p, h, b"\0" * 16))
    add("hdr_length_2_40", None, "header length", True, lambda p: raw_file(p, b"{}", length=2**40))
    add("hdr_length_over_limit", None, "header length", True,
        lambda p: raw_file(p, b"{}", length=100 * 1024 * 1024 + 1))
    add("hdr_overlapping_offsets", f"{Q_MOD}.hada_w1_b", "overlap|offsets", True, lambda p: raw_file(p, {
        f"{Q_MOD}.hada_w1_a": {"dtype": "F32", "shape": [4, 1], "data_offsets": [0, 16]},
        f"{Q_MOD}.hada_w1_b": {"dtype": "F32", "shape": [1, 4], "data_offsets": [0, 16]},
        f"{Q_MOD}.hada_w2_a": {"dtype": "F32", "shape": [4, 1], "data_offsets": [16, 32]},
        f"{Q_MOD}.hada_w2_b": {"dtype": "F32", "shape": [1, 4], "data_offsets": [32, 48]},
    }, b"\0" * 48))
    add("metadata_oversized", None, "metadata too large", True,
        lambda p: raw_file(p, {"__metadata__": {"blob": "x" * (16 * 1024 * 1024 + 1)}}))

    # --- wrong dtypes ---
    for st_name, dt in (("i32", torch.int32), ("u8", torch.uint8), ("bool", torch.bool), ("i64", torch.int64)):
        add(f"dtype_factor_{st_name}", f"{Q_MOD}.hada_w1_a", "dtype", True,
            edited(good, hada_w1_a=torch.zeros(640, 4, dtype=dt)))
    if hasattr(torch, "float8_e4m3fn"):
        add("dtype_factor_f8", f"{Q_MOD}.hada_w1_a", "dtype", True,
            edited(good, hada_w1_a=torch.zeros(640, 4).to(torch.float8_e4m3fn)))
    add("dtype_alpha_bool", f"{Q_MOD}.alpha", "dtype", True, edited(good, alpha=torch.tensor(True)))

    # --- 0-size factors ---
    add("zero_rank_loha", f"{Q_MOD}.hada_w1_a", "non-empty", True,
        edited(good, hada_w1_a=torch.zeros(640, 0), hada_w1_b=torch.zeros(0, 640)))
    add("zero_rows_lora", f"{Q_MOD}.lora_up.weight", "bad shape", True,
        edited(lora(), **{"lora_up.weight": torch.zeros(0, 4)}))
    add("zero_lokr_w1", f"{Q_MOD}.lokr_w1", "bad shape", True, edited(lokr(), lokr_w1=torch.zeros(0, 8)))
    add("one_dim_factor", f"{Q_MOD}.hada_w2_b", "non-empty", True, edited(good, hada_w2_b=torch.zeros(640)))

    # --- mismatched factor shapes / rank mismatch between factors ---
    add("rank_mismatch_loha_w1", f"{Q_MOD}.hada_w1_b", "rank mismatch", True,
        edited(good, hada_w1_b=_rand(3, 640)))
    add("rank_mismatch_lora", f"{Q_MOD}.lora_down.weight", "rank mismatch", True,
        edited(lora(), **{"lora_down.weight": _rand(5, 640)}))
    add("rank_mismatch_lokr_w2", f"{Q_MOD}.lokr_w2_b", "rank mismatch", True,
        edited(lokr(), lokr_w2_b=_rand(3, 80)))
    add("out_mismatch_loha", f"{Q_MOD}.hada_w2_a", "outputs", True, edited(good, hada_w2_a=_rand(600, 4)))
    add("in_mismatch_loha", f"{Q_MOD}.hada_w2_b", "input size", True, edited(good, hada_w2_b=_rand(4, 600)))
    add("tucker_core_mismatch", f"{CONV_MOD}.hada_t1", "Tucker core", True, tensors_file({
        f"{CONV_MOD}.hada_w1_a": _rand(4, 320), f"{CONV_MOD}.hada_w1_b": _rand(4, 320),
        f"{CONV_MOD}.hada_t1": _rand(5, 4, 3, 3), f"{CONV_MOD}.hada_w2_a": _rand(4, 320),
        f"{CONV_MOD}.hada_w2_b": _rand(4, 320), f"{CONV_MOD}.hada_t2": _rand(4, 4, 3, 3)}))
    add("lokr_full_and_factors", f"{Q_MOD}.lokr_w1", "both lokr_w1", True,
        edited(lokr(), lokr_w1_a=_rand(8, 2), lokr_w1_b=_rand(2, 8)))
    add("lokr_tucker_w1", f"{Q_MOD}.lokr_t1", "Tucker W1", True, edited(
        lokr(), drop=("lokr_w1",), lokr_w1_a=_rand(2, 8), lokr_w1_b=_rand(2, 8), lokr_t1=_rand(2, 2, 1, 1)))
    add("shape_vs_model", Q_MOD, r"\[640, 640\]", False, tensors_file(loha(o=640, i=320)))
    add("conv_shape_vs_model", CONV_MOD, r"\[320, 320, 3, 3\]", False,
        tensors_file(loha(CONV_MOD, o=320, i=320 * 4)))
    add("mixed_algorithms", Q_MOD, "mixes", True, tensors_file({**loha(), f"{Q_MOD}.lokr_w1": _rand(8, 8)}))

    # --- NaN / Inf ---
    for fname, value in (("nan", float("nan")), ("inf", float("inf")), ("neg_inf", float("-inf"))):
        bad = good[f"{Q_MOD}.hada_w2_b"].clone()
        bad[1, 7] = value
        add(f"{fname}_factor", f"{Q_MOD}.hada_w2_b", "NaN or Inf", False, edited(good, hada_w2_b=bad))
        add(f"{fname}_alpha", f"{Q_MOD}.alpha", "NaN or Inf", False, edited(good, alpha=torch.tensor(value)))
    half = lokr()[f"{Q_MOD}.lokr_w1"].half()
    half[0, 0] = float("inf")
    add("inf_fp16_lokr_w1", f"{Q_MOD}.lokr_w1", "NaN or Inf", False, edited(lokr(), lokr_w1=half))
    add("overflow_delta", Q_MOD, "overflow|NaN or Inf", False,
        edited(good, hada_w1_a=torch.full((640, 4), 1e30), hada_w2_a=torch.full((640, 4), 1e30)))

    # --- missing / unusable alpha, missing factor tensors ---
    add("alpha_only", f"{Q_MOD}.alpha", "no factor tensors", True, tensors_file({f"{Q_MOD}.alpha": torch.tensor(4.0)}))
    add("alpha_and_dora_only", Q_MOD, "no factor tensors", True,
        tensors_file({f"{Q_MOD}.alpha": torch.tensor(4.0), f"{Q_MOD}.dora_scale": torch.ones(640, 1)}))
    add("alpha_vector", f"{Q_MOD}.alpha", "scalar", True, edited(good, alpha=torch.tensor([1.0, 2.0])))
    add("alpha_matrix", f"{Q_MOD}.alpha", "scalar", True, edited(good, alpha=torch.ones(1, 1)))
    add("alpha_empty", f"{Q_MOD}.alpha", "scalar", True, edited(good, alpha=torch.zeros(0)))
    for suffix in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
        add(f"missing_{suffix}", f"{Q_MOD}.{suffix}", suffix, True, edited(good, drop=(suffix,)))
    add("missing_lora_down", f"{Q_MOD}.lora_down", "lora_down", True,
        edited(lora(), drop=(f"{Q_MOD}.lora_down.weight",)))
    add("missing_lokr_w2", f"{Q_MOD}.lokr_w2_a", "lokr_w2", True, edited(lokr(), drop=("lokr_w2_a", "lokr_w2_b")))
    add("missing_tucker_t2", f"{CONV_MOD}.hada_t2", "hada_t2", True, tensors_file({
        f"{CONV_MOD}.hada_w1_a": _rand(4, 320), f"{CONV_MOD}.hada_w1_b": _rand(4, 320),
        f"{CONV_MOD}.hada_t1": _rand(4, 4, 3, 3), f"{CONV_MOD}.hada_w2_a": _rand(4, 320),
        f"{CONV_MOD}.hada_w2_b": _rand(4, 320)}))
    add("no_adapter_tensors", None, "no LoRA, LoHa or LoKr", True,
        tensors_file({"model.diffusion_model.x.weight": torch.zeros(2, 2)}))
    add("no_tensors_at_all", None, "no LoRA, LoHa or LoKr", True, lambda p: raw_file(p, {}))
    add("dora_wrong_shape", f"{Q_MOD}.dora_scale", "dora_scale", False, edited(good, dora_scale=torch.ones(7, 1)))

    # --- the same module in two spellings ---
    add("two_spellings_module", Q_MOD, "two spellings", False,
        tensors_file({**loha(), **loha(Q_COMFY)}))
    add("two_spellings_suffix", f"{Q_MOD}.lora_B.weight", "twice", True,
        tensors_file({**lora(), f"{Q_MOD}.lora_B.weight": _rand(640, 4)}))

    # --- an adapter for another architecture (Anima DiT layer, SDXL model) ---
    add("other_architecture", ANIMA_MOD, "matches any|none of its", False,
        tensors_file(loha(ANIMA_MOD, o=2048, i=2048, r=2)))

    # --- pickles (never unpickled: a marker file would appear) ---
    for ext, zipped in ((".pt", True), (".ckpt", True), (".pth", False), (".bin", False), (".pkl", False)):
        p = pickle_file(root / f"pickle{ext}", zipped)
        items.append(BadInput(f"pickle{ext}", p, None, "pickle", True))
    add("pickle_named_safetensors", None, "header length|truncated|not valid JSON", True,
        lambda p: pickle_file(p, zipped=False))
    add("zip_ckpt_named_safetensors", None, "header length|truncated|not valid JSON", True,
        lambda p: pickle_file(p, zipped=True))

    # --- non-files and unreadable paths (root reads any mode, so: no chmod tricks) ---
    (root / "a_directory.safetensors").mkdir(exist_ok=True)
    items.append(BadInput("directory", root / "a_directory.safetensors", None, "not a regular file", True))
    _symlink(root / "missing_target.safetensors", root / "dangling.safetensors")
    items.append(BadInput("dangling_symlink", root / "dangling.safetensors", None, "does not exist", True))
    _symlink(root / "loop_b.safetensors", root / "loop_a.safetensors")
    _symlink(root / "loop_a.safetensors", root / "loop_b.safetensors")
    items.append(BadInput("symlink_loop", root / "loop_a.safetensors", None, "does not exist|cannot", True))
    items.append(BadInput("missing_file", root / "nope.safetensors", None, "does not exist", True))
    fifo = root / "a_fifo.safetensors"
    if not fifo.exists():
        os.mkfifo(fifo)
    items.append(BadInput("fifo", fifo, None, "not a regular file", True))
    items.append(BadInput("device", Path("/dev/zero"), None, "not a regular file", True))
    under_file = root / "truncated_empty.safetensors" / "inside.safetensors"
    items.append(BadInput("path_under_a_file", under_file, None, "does not exist|cannot", True))
    items.append(BadInput("name_too_long", root / ("x" * 300 + ".safetensors"), None,
                          "does not exist|cannot|too long", True))
    items.append(BadInput("nul_in_path", Path(str(root / "a\0b.safetensors")), None, "does not exist|cannot", True))
    return items


def _module_of(tensors: dict[str, torch.Tensor]) -> str:
    return next(iter(tensors)).rsplit(".", 1)[0].removesuffix(".lora_up").removesuffix(".lora_down")


def _bytes_of(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _symlink(target: Path, link: Path) -> None:
    if not link.is_symlink():
        link.symlink_to(target)


TOCTOU_MATCH = "changed|truncated|cannot read"
"""What reading a tensor must say when the file was changed after `load_adapter` read its header."""
