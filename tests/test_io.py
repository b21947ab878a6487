"""Lazy reading, atomic writing, and bad files refused with the file and the key named."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import lycoris_core as lc

MOD = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
KEY = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"


def loha_tensors(o=16, i=12, r=4):
    g = torch.Generator().manual_seed(0)
    return {f"{MOD}.hada_w1_a": torch.randn(o, r, generator=g), f"{MOD}.hada_w1_b": torch.randn(r, i, generator=g),
            f"{MOD}.hada_w2_a": torch.randn(o, r, generator=g), f"{MOD}.hada_w2_b": torch.randn(r, i, generator=g),
            f"{MOD}.alpha": torch.tensor(2.0)}


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_listing_reads_no_tensor(fixtures_dir):
    ad = lc.load_adapter(fixtures_dir / "loha_conv_tucker.safetensors")
    listing = [(n, m.algo, m.rank, m.natural_shape, m.describe()) for n, m in ad.modules.items()]
    assert listing and ad.metadata["ss_network_module"] == "networks.loha"
    assert ad.network_args["use_tucker"] == "true"
    assert ad.source.tensors_loaded == 0
    ad.modules[next(iter(ad.modules))].delta()
    assert ad.source.tensors_loaded > 0


def test_missing_or_zero_alpha_means_rank(tmp_path):
    t = loha_tensors()
    del t[f"{MOD}.alpha"]
    a = lc.load_adapter(write(tmp_path / "noalpha.safetensors", t))
    assert a.modules[MOD].alpha == 4 and a.modules[MOD].scale == 1.0
    t[f"{MOD}.alpha"] = torch.tensor(0, dtype=torch.int64)
    a = lc.load_adapter(write(tmp_path / "zero.safetensors", t))
    assert a.modules[MOD].scale == 1.0


def test_fp16_factors_computed_in_fp32(tmp_path):
    """Large fp16 factors whose fp16 products overflow still give a finite fp32 ΔW."""
    t = {k: (v * 40).half() if k.endswith(("_a", "_b")) else v for k, v in loha_tensors().items()}
    a = lc.load_adapter(write(tmp_path / "h.safetensors", t))
    d = a.modules[MOD].delta()
    assert d.dtype == torch.float32 and bool(d.isfinite().all())
    want = 0.5 * (t[f"{MOD}.hada_w1_a"].double() @ t[f"{MOD}.hada_w1_b"].double()) * (
        t[f"{MOD}.hada_w2_a"].double() @ t[f"{MOD}.hada_w2_b"].double())
    assert float((d.double() - want).abs().max() / want.abs().max()) < 1e-6


# ------------------------------------------------------------------------------- writing
def test_save_is_atomic_and_never_clobbers(tmp_path):
    dst = tmp_path / "out" / "a.safetensors"
    lc.save_safetensors({"x": torch.ones(2)}, dst, {"k": "v"})
    assert lc.read_metadata(dst) == {"k": "v"}
    before = dst.read_bytes()
    with pytest.raises(FileExistsError):
        lc.save_safetensors({"x": torch.zeros(3)}, dst)
    assert dst.read_bytes() == before
    lc.save_safetensors({"x": torch.zeros(3)}, dst, overwrite=True)
    assert lc.load_tensors(dst)[0]["x"].shape == (3,)
    assert [p.name for p in dst.parent.iterdir()] == ["a.safetensors"]  # no temp files left


def test_failed_save_leaves_no_file(tmp_path):
    dst = tmp_path / "bad.safetensors"
    with pytest.raises(AttributeError):
        lc.save_safetensors({"x": "not a tensor"}, dst)  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- bad files
def _assert_names(exc, path, key=None):
    msg = str(exc.value)
    assert str(path) in msg, msg
    if key:
        assert key in msg, msg


def test_truncated(tmp_path):
    p = write(tmp_path / "t.safetensors", loha_tensors())
    data = p.read_bytes()
    p.write_bytes(data[:-10])
    with pytest.raises(lc.AdapterError, match="truncated") as e:
        lc.load_adapter(p)
    _assert_names(e, p)
    p.write_bytes(data[:5])
    with pytest.raises(lc.AdapterError, match="too short"):
        lc.load_adapter(p)


BAD_HEADERS = [
    b"not json at all",
    b"[1, 2]",
    json.dumps({"a": {"dtype": "F32"}}).encode(),
    json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode(),
    json.dumps({"__metadata__": {"x": 1}}).encode(),
]


@pytest.mark.parametrize("header", BAD_HEADERS)
def test_bad_header(tmp_path, header):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(lc.AdapterError) as e:
        lc.load_adapter(p)
    _assert_names(e, p)


def test_oversized_header(tmp_path):
    p = tmp_path / "big.safetensors"
    p.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(lc.AdapterError, match="header length"):
        lc.load_adapter(p)


def test_missing_factor(tmp_path):
    t = loha_tensors()
    del t[f"{MOD}.hada_w2_b"]
    p = write(tmp_path / "m.safetensors", t)
    with pytest.raises(lc.AdapterError, match="hada_w2_b") as e:
        lc.load_adapter(p)
    _assert_names(e, p, f"{MOD}.hada_w2_b")


@pytest.mark.parametrize("key, shape", [("hada_w1_b", (3, 12)), ("hada_w2_a", (15, 4)), ("hada_w2_b", (4, 11))])
def test_mismatched_shapes(tmp_path, key, shape):
    t = loha_tensors()
    t[f"{MOD}.{key}"] = torch.zeros(shape)
    p = write(tmp_path / "s.safetensors", t)
    with pytest.raises(lc.AdapterError) as e:
        lc.load_adapter(p)
    _assert_names(e, p, MOD)


def test_shape_mismatch_with_model(tmp_path):
    p = write(tmp_path / "x.safetensors", loha_tensors())
    with pytest.raises(lc.AdapterError, match=r"\[640, 640\]") as e:
        lc.delta_weights(lc.load_adapter(p), {KEY: (640, 640)})
    _assert_names(e, p, MOD)


def test_nan_factor(tmp_path):
    t = loha_tensors()
    t[f"{MOD}.hada_w1_a"][3, 1] = float("nan")
    p = write(tmp_path / "n.safetensors", t)
    ad = lc.load_adapter(p)  # lazy: found when the factor is read
    with pytest.raises(lc.AdapterError, match="NaN") as e:
        lc.delta_weights(ad, {KEY: (16, 12)})
    _assert_names(e, p, f"{MOD}.hada_w1_a")


def test_pickles_and_non_files_refused(tmp_path):
    pt = tmp_path / "evil.pt"
    pt.write_bytes(b"\x80\x04 pickle")
    with pytest.raises(lc.AdapterError, match="pickle"):
        lc.load_adapter(pt)
    with pytest.raises(lc.AdapterError, match="not a regular file"):
        lc.load_adapter(tmp_path)
    with pytest.raises(lc.AdapterError, match="does not exist"):
        lc.load_adapter(tmp_path / "nope.safetensors")


def test_no_adapter_tensors(tmp_path):
    p = write(tmp_path / "ckpt.safetensors", {"model.diffusion_model.x.weight": torch.zeros(2, 2)})
    with pytest.raises(lc.AdapterError, match="no LoRA, LoHa or LoKr") as e:
        lc.load_adapter(p)
    _assert_names(e, p)


def test_integer_factor_refused(tmp_path):
    t = loha_tensors()
    t[f"{MOD}.hada_w1_a"] = torch.zeros(16, 4, dtype=torch.int32)
    p = write(tmp_path / "i.safetensors", t)
    with pytest.raises(lc.AdapterError, match="dtype") as e:
        lc.load_adapter(p)
    _assert_names(e, p, f"{MOD}.hada_w1_a")
