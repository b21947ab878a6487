"""Property-based tests (hypothesis) over shapes, ranks and factors.

ΔW formulas against independent float64 computations, LoKr's Kronecker identities (entry-wise,
rank, bypass = materialised), LoHa's rank bound, `factorization` against LyCORIS itself, lossless
save/load round trips, fuzzed files that may only ever raise `AdapterError`, and output names
that never leave their folder. Example counts are kept small so the file runs in seconds.
"""

from __future__ import annotations

import math
import os
import struct
import tempfile
from pathlib import Path

import bad_inputs as bi
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lycoris.functional.general import factorization as lycoris_factorization
from safetensors.torch import save

import lycoris_core as lc
from lycoris_core.algos import LoHaFactors, LoKrFactors, loha, lokr, lora
from lycoris_core.algos.lora import LoRAFactors
from lycoris_core.paths import is_within, safe_output_path


def quick(n: int) -> settings:
    """Few examples, no deadline (shared CPU), no example database written into the checkout, and
    the same examples on every run (derandomize): a verdict must not depend on which inputs a run
    happened to draw."""
    return settings(max_examples=n, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


FAST = quick(30)
MOD = "lora_unet_x"

dims = st.integers(1, 12)
ranks = st.integers(1, 4)
seeds = st.integers(0, 2**31 - 1)


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def matrix_rank(w: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(w.double(), rtol=1e-9))


# ------------------------------------------------------------------------------ ΔW formulas
@FAST
@given(o=dims, i=dims, r1=ranks, r2=ranks, seed=seeds)
def test_loha_entrywise_and_rank_bound(o, i, r1, r2, seed):
    f = LoHaFactors(randn(seed, o, r1), randn(seed + 1, r1, i), randn(seed + 2, o, r2), randn(seed + 3, r2, i))
    dw = loha.diff_weight(f, 0.5)
    want = torch.zeros(o, i, dtype=torch.float64)
    for p in range(o):  # written out element by element: no shared matmul code path
        for q in range(i):
            s1 = sum(float(f.w1_a[p, k] * f.w1_b[k, q]) for k in range(r1))
            s2 = sum(float(f.w2_a[p, k] * f.w2_b[k, q]) for k in range(r2))
            want[p, q] = 0.5 * s1 * s2
    assert dw.shape == (o, i)
    assert torch.allclose(dw, want, rtol=1e-10, atol=1e-12)
    assert matrix_rank(dw) <= min(r1 * r2, o, i)


@FAST
@given(o=dims, i=dims, r=ranks, seed=seeds)
def test_lora_rank_and_shape(o, i, r, seed):
    f = LoRAFactors(randn(seed, o, r), randn(seed + 1, r, i))
    dw = lora.diff_weight(f, 2.0)
    assert dw.shape == (o, i)
    assert torch.allclose(dw, 2.0 * torch.einsum("or,ri->oi", f.up, f.down), rtol=1e-12, atol=1e-12)
    assert matrix_rank(dw) == min(r, o, i)  # generic random factors: exactly the rank


lokr_sides = st.integers(1, 5)


@FAST
@given(a=lokr_sides, c=lokr_sides, b=lokr_sides, d=lokr_sides, r=ranks, seed=seeds,
       w2_decomposed=st.booleans(),
       # 0 or |scale| ≥ 1e-3: a scale like 5e-324 underflows scale·W1⊗W2 to 0 and the rank with it
       scale=st.one_of(st.just(0.0), st.floats(1e-3, 3), st.floats(-3, -1e-3)))
def test_lokr_kron_entrywise_rank_and_bypass(a, c, b, d, r, seed, w2_decomposed, scale):
    w1 = randn(seed, a, c)
    if w2_decomposed:
        f = LoKrFactors(w1=w1, w2_a=randn(seed + 1, b, r), w2_b=randn(seed + 2, r, d))
        w2 = f.w2_a @ f.w2_b
    else:
        f = LoKrFactors(w1=w1, w2=randn(seed + 1, b, d))
        w2 = f.w2
    dw = lokr.diff_weight(f, scale)
    assert dw.shape == (a * b, c * d)
    # entry (i·b + k, j·d + l) = scale · W1[i, j] · W2[k, l], for every entry
    blocks = dw.reshape(a, b, c, d).permute(0, 2, 1, 3)
    assert torch.allclose(blocks, scale * w1[:, :, None, None] * w2[None, None], rtol=1e-12, atol=1e-12)
    assert matrix_rank(dw) == (matrix_rank(w1) * matrix_rank(w2) if scale else 0)
    x = randn(seed + 3, 3, c * d)
    assert torch.allclose(lokr.bypass_linear(x, f, scale), x @ dw.T, rtol=1e-10, atol=1e-10)


@FAST
@given(o=dims, i=dims, r=ranks, alpha=st.floats(0.25, 16), seed=seeds,
       algo=st.sampled_from(["loha", "lokr_w2_decomposed", "lokr_full", "lora"]))
def test_module_delta_scale_is_alpha_over_rank(o, i, r, alpha, seed, algo):
    """Through adapter_from_tensors: the module's ΔW = alpha/R · formula (1 when LoKr is full)."""
    g = lambda k, *s: randn(seed + k, *s).float()  # noqa: E731
    if algo == "loha":
        t = {"hada_w1_a": g(1, o, r), "hada_w1_b": g(2, r, i), "hada_w2_a": g(3, o, r), "hada_w2_b": g(4, r, i)}
        raw = (t["hada_w1_a"].double() @ t["hada_w1_b"].double()) * (t["hada_w2_a"].double() @ t["hada_w2_b"].double())
        rank = r
    elif algo == "lora":
        t = {"lora_up.weight": g(1, o, r), "lora_down.weight": g(2, r, i)}
        raw, rank = t["lora_up.weight"].double() @ t["lora_down.weight"].double(), r
    else:
        (a, b), (c, d) = lc.factorization(o), lc.factorization(i)
        t = {"lokr_w1": g(1, a, c)}
        if algo == "lokr_full":
            t["lokr_w2"] = g(2, b, d)
            w2, rank = t["lokr_w2"].double(), None
        else:
            t["lokr_w2_a"], t["lokr_w2_b"] = g(2, b, r), g(3, r, d)
            w2, rank = t["lokr_w2_a"].double() @ t["lokr_w2_b"].double(), r
        raw = torch.kron(t["lokr_w1"].double(), w2)
    tensors = {f"{MOD}.{k}": v for k, v in t.items()} | {f"{MOD}.alpha": torch.tensor(alpha)}
    m = lc.adapter_from_tensors(tensors).modules[MOD]
    scale = alpha / rank if rank else 1.0
    assert m.rank == rank and math.isclose(m.scale, scale, rel_tol=1e-6)
    got = m.delta(torch.float64, shape=(o, i))
    assert got.shape == (o, i)
    assert torch.allclose(got, scale * raw, rtol=1e-5, atol=1e-6 * float(raw.abs().max()) * scale)


# ------------------------------------------------------------------------------ factorization
@quick(200)
@given(dim=st.integers(1, 20000), factor=st.one_of(st.just(-1), st.integers(1, 64)))
def test_factorization_invariants_and_lycoris_parity(dim, factor):
    m, n = lc.factorization(dim, factor)
    assert m * n == dim and 1 <= m <= n
    if factor > 0:
        assert m <= factor or (dim % factor == 0 and n == factor)
    if factor > 0 and dim % factor == 0:
        assert {m, n} == {factor, dim // factor}
    assert (m, n) == tuple(lycoris_factorization(dim, factor))


# ------------------------------------------------------------------------------ round trips
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8]
tensor_specs = st.dictionaries(
    st.text("abcdefgh_.0123456789", min_size=1, max_size=12).filter(lambda k: k != "__metadata__"),
    st.tuples(st.lists(st.integers(0, 5), max_size=3), st.sampled_from(DTYPES), seeds),
    min_size=1, max_size=5)
metadata = st.dictionaries(st.text(max_size=8), st.text(max_size=30), max_size=4)


@FAST
@given(specs=tensor_specs, meta=metadata)
def test_save_load_round_trip_is_lossless(specs, meta):
    tensors = {k: (randn(s, *shape) * 100).to(dt) for k, (shape, dt, s) in specs.items()}
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "rt.safetensors"
        lc.save_safetensors(tensors, dst, meta)
        back, back_meta = lc.load_tensors(dst)
        assert back_meta == meta
        assert set(back) == set(tensors)
        for k, v in tensors.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v)
        before = dst.read_bytes()
        with pytest.raises(FileExistsError):
            lc.save_safetensors({"other": torch.zeros(1)}, dst)
        assert dst.read_bytes() == before and os.listdir(d) == ["rt.safetensors"]


@FAST
@given(o=dims, i=dims, r=ranks, seed=seeds, dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
def test_adapter_round_trip_same_delta(o, i, r, seed, dtype):
    t = {f"{MOD}.hada_w1_a": randn(seed, o, r), f"{MOD}.hada_w1_b": randn(seed + 1, r, i),
         f"{MOD}.hada_w2_a": randn(seed + 2, o, r), f"{MOD}.hada_w2_b": randn(seed + 3, r, i),
         f"{MOD}.alpha": torch.tensor(float(r) / 2)}
    t = {k: v.to(dtype) for k, v in t.items()}
    mem = lc.adapter_from_tensors(t).modules[MOD].delta()
    with tempfile.TemporaryDirectory() as d:
        lc.save_safetensors(t, Path(d) / "a.safetensors")
        disk = lc.load_adapter(Path(d) / "a.safetensors").modules[MOD].delta()
    assert torch.equal(mem, disk)


# ------------------------------------------------------------------------------ fuzzing
GOOD = save(bi.loha())
HEADER_END = 8 + struct.unpack("<Q", GOOD[:8])[0]
MODEL = bi.model_weights()


def _only_adapter_errors(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fuzz.safetensors"
        p.write_bytes(data)
        try:
            lc.delta_weights(lc.load_adapter(p), MODEL)
        except lc.AdapterError as exc:
            assert str(p) in str(exc)


@quick(60)
@given(edits=st.lists(st.tuples(st.integers(0, HEADER_END - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_header_byte_flips_only_raise_adapter_error(edits):
    data = bytearray(GOOD)
    for pos, value in edits:
        data[pos] = value
    _only_adapter_errors(bytes(data))


@quick(40)
@given(cut=st.integers(0, len(GOOD) - 1))
def test_truncation_anywhere_only_raises_adapter_error(cut):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "cut.safetensors"
        p.write_bytes(GOOD[:cut])
        with pytest.raises(lc.AdapterError, match="truncated|too short|not valid JSON") as e:
            lc.load_adapter(p)
        assert str(p) in str(e.value)


@quick(60)
@given(header=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
       declared=st.one_of(st.none(), st.integers(0, 2**64 - 1)))
def test_random_headers_only_raise_adapter_error(header, declared):
    n = len(header) if declared is None else declared
    _only_adapter_errors(struct.pack("<Q", n) + header + b"\0" * 64)


# ------------------------------------------------------------------------------ output names
@quick(150)
@given(name=st.text(max_size=40))
def test_output_names_never_escape(name):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "taken_00001_.safetensors").touch()
        try:
            p = safe_output_path(d, name)
        except ValueError:
            return
        assert p.parent == Path(d).resolve() and is_within(d, p)
        assert p.name.endswith("_.safetensors") and not p.exists()
        assert not p.name.startswith(".")


@quick(80)
@given(parts=st.lists(st.sampled_from(["a", "..", ".", "", "b c", "/", "\\", "x\x00", "~", "C:"]),
                      min_size=1, max_size=5))
def test_subdir_names_never_escape(parts):
    name = "/".join(parts)
    with tempfile.TemporaryDirectory() as d:
        try:
            p = safe_output_path(d, name, subdirs=True)
        except ValueError:
            return
        assert is_within(d, p) and ".." not in p.relative_to(Path(d).resolve()).parts


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/etc/passwd", "C:evil", "\\\\server\\share", "a\\b",
                                  "x\x00y", "line\nbreak", "rtl\u202eexe", "zero\u200bwidth", ".hidden", "..",
                                  "trailing.", "trailing ", "CON", "nul.txt", "", "   ", "a" * 181, "<x>", "a:b"])
def test_bad_output_names_refused(tmp_path, name):
    with pytest.raises(ValueError):
        safe_output_path(tmp_path, name)
    with pytest.raises(ValueError):
        safe_output_path(tmp_path, f"ok/{name}", subdirs=True)


def test_counters_never_reuse_a_name(tmp_path):
    assert safe_output_path(tmp_path, "run").name == "run_00001_.safetensors"
    assert safe_output_path(tmp_path, "run.safetensors").name == "run_00001_.safetensors"
    (tmp_path / "run_00001_.safetensors").touch()
    (tmp_path / "run_00007_.png").touch()  # other extensions do not count
    (tmp_path / "run_00003_.safetensors").mkdir()  # any entry of that name is taken
    assert safe_output_path(tmp_path, "run").name == "run_00004_.safetensors"
    (tmp_path / "run_00004_.safetensors").symlink_to(tmp_path / "nowhere")  # dangling: still taken
    assert safe_output_path(tmp_path, "run").name == "run_00005_.safetensors"
    assert safe_output_path(tmp_path, "run", counter=False).name == "run.safetensors"
    assert safe_output_path(tmp_path, "Ünïcode name (v2)").name == "Ünïcode name (v2)_00001_.safetensors"
    want = (tmp_path / "sub" / "dir" / "x_00001_.safetensors").resolve()
    assert safe_output_path(tmp_path, "sub/dir/x", subdirs=True) == want


def test_symlinks_out_of_the_folder_are_refused(tmp_path):
    out, elsewhere = tmp_path / "output", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "link").symlink_to(elsewhere)
    (out / "x.safetensors").symlink_to(elsewhere / "x.safetensors")  # dangling, pointing out
    with pytest.raises(ValueError, match="outside the output folder"):
        safe_output_path(out, "link/x", subdirs=True)
    with pytest.raises(ValueError, match="outside the output folder"):
        safe_output_path(out, "x", counter=False)
    assert is_within(out, out / "a" / "b") and not is_within(out, out / "link" / "b")
    assert not is_within(out, tmp_path / "output2" / "x")  # a sibling sharing the name prefix
