"""Portable export (issue 17): files the readers cannot read (SPEC §5) become an exactly
equivalent layout that lycoris-lora 4.1.3 (forward path) and ComfyUI's own loader read with the
golden ΔW.

Golden inputs: `lyco_lokr_decompose_both` and `lyco_loha_dora` (tests/fixtures, written by
lycoris-lora) and a Tucker LoKr conv written by lycoris-lora 4.1.3 itself in the test
(`interop.lycoris_tucker_lokr`; the fixtures hold no Tucker LoKr), whose golden ΔW is what the
live LyCORIS module's forward applies. Each original is first shown to fail where SPEC §5 says it
does, so the portable result means something.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import goldens
import pytest
import torch
from helpers import rel_err
from interop import comfy_deltas, lycoris_deltas, lycoris_tucker_lokr, pack_deltas
from safetensors.torch import load_file

import lycoris_core as lc
from lycoris_core.errors import AdapterError
from lycoris_core.layout import layout_violation
from lycoris_core.portable import MAX_REL_DIFF, make_portable, portable_file

ROOT = Path(__file__).resolve().parents[1]
REL = 1e-5
CONV3 = "diffusion_model.input_blocks.1.0.in_layers.2.weight"  # 320 × 320 × 3 × 3
SKIP = "diffusion_model.input_blocks.4.0.skip_connection.weight"  # 640 × 320 × 1 × 1 (decompose_both)
DORA = "diffusion_model.output_blocks.6.0.skip_connection.weight"  # 320 × 960 × 1 × 1

_MODEL: list = []


def golden_sdxl(host):
    """ComfyUI's SDXL at the golden layers' real sizes (tests/host_nodes/models.py), built once."""
    if not _MODEL:
        from host_nodes import models

        model = models.sdxl_model("golden", seed=0)
        _MODEL.append((model, {k: tuple(v.shape) for k, v in model.model.state_dict().items()}))
    return _MODEL[0]


def sd_name(key: str) -> str:
    return "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")


@pytest.fixture()
def tucker_file(tmp_path):
    shape = (320, 320, 3, 3)
    path = tmp_path / "lyco_tucker_lokr.safetensors"
    golden = lycoris_tucker_lokr(path, sd_name(CONV3), shape, rank=4, alpha=2.0, seed=11)
    return path, golden


def test_tucker_lokr_portable_reads_with_the_golden_delta(host, tmp_path, tucker_file):
    model, shapes = golden_sdxl(host)
    src, golden = tucker_file
    name, shape = sd_name(CONV3), shapes[CONV3]
    # today: LyCORIS cannot reload its own Tucker LoKr file, ComfyUI leaves the weight unpatched
    with pytest.raises(AttributeError):
        lycoris_deltas(src, {name: shape})
    assert float(comfy_deltas(src, model)[CONV3].abs().max()) == 0.0
    assert rel_err(pack_deltas(src, {CONV3: shape})[CONV3], golden) < REL  # the pack reads it

    out = tmp_path / "portable.safetensors"
    report = portable_file(src, out)
    assert report.changes == {"Tucker W2 multiplied out": 1}
    assert report.max_rel_diff <= MAX_REL_DIFF / 3
    tensors = load_file(out)
    assert f"{name}.lokr_t2" not in tensors and tensors[f"{name}.lokr_w2_b"].shape == (4, 20 * 9)
    assert rel_err(lycoris_deltas(out, {name: shape})[name], golden) < REL
    assert rel_err(comfy_deltas(out, model)[CONV3], golden) < REL
    assert rel_err(pack_deltas(out, {CONV3: shape})[CONV3], golden) < REL
    meta = lc.read_metadata(out)
    args = json.loads(meta["ss_network_args"])
    assert "use_tucker" not in args and args["conv_dim"] == "4"
    assert json.loads(meta["lycoris_portable"])["changes"] == report.changes


def test_decompose_both_portable_reads_with_the_golden_delta(host, tmp_path, fixtures_dir):
    """sd-scripts cannot read decompose_both (no `lokr_w1`; the references measured ΔW 0 on its
    merge path, a random W1 in its loader: fixtures index). The portable file stores W1 full."""
    model, shapes = golden_sdxl(host)
    src = fixtures_dir / "lyco_lokr_decompose_both.safetensors"
    name, golden = sd_name(SKIP), goldens.expected("lyco_lokr_decompose_both")[SKIP]
    merge = goldens.index()["lyco_lokr_decompose_both"]["cross_load_sdscripts_merge"][SKIP]
    assert merge["rel"] == 1.0 and f"{name}.lokr_w1_a" in merge["unconsumed_keys"]
    assert f"{name}.lokr_w1" not in load_file(src)

    out = tmp_path / "portable.safetensors"
    report = portable_file(src, out)
    assert report.changes == {"decompose_both W1 multiplied out": 1}
    tensors = load_file(out)
    assert tensors[f"{name}.lokr_w1"].shape == (20, 16) and f"{name}.lokr_w1_a" not in tensors
    assert {f"{name}.{s}" for s in ("lokr_w2_a", "lokr_w2_b", "alpha")} <= set(tensors)
    assert report.size_after > report.size_before
    assert rel_err(lycoris_deltas(out, {name: shapes[SKIP]})[name].reshape(golden.shape), golden) < REL
    assert rel_err(comfy_deltas(out, model)[SKIP], golden) < REL
    assert "decompose_both" not in json.loads(lc.read_metadata(out)["ss_network_args"])


def test_dora_is_kept_and_the_report_names_the_readers_that_ignore_it(host, tmp_path, fixtures_dir):
    model, shapes = golden_sdxl(host)
    src = fixtures_dir / "lyco_loha_dora.safetensors"
    name = sd_name(DORA)
    out = tmp_path / "portable.safetensors"
    report = portable_file(src, out)
    text = report.text()
    assert "DoRA kept on 1 module" in text and "sd-scripts ignores dora_scale" in text
    assert "ComfyUI core" in text
    assert torch.equal(load_file(out)[f"{name}.dora_scale"], load_file(src)[f"{name}.dora_scale"])
    w0 = goldens.base_weights("lyco_loha_dora")[DORA]
    golden = goldens.expected("lyco_loha_dora")[DORA]
    lyco = lycoris_deltas(out, {name: shapes[DORA]}, base={name: w0})[name]
    assert rel_err(lyco.reshape(golden.shape), golden) < REL


def test_low_rank_w2_where_readers_expect_full_is_repaired(host, tmp_path):
    """A file of the old merge writer (low-rank W2 at R = max(b, d)/2) fails in LyCORIS; its
    portable form stores W2 = w2_a @ w2_b full, W1 scaled by alpha/R, and reads the same."""
    model, shapes = golden_sdxl(host)
    key = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"  # 640 × 640
    name, shape = sd_name(key), shapes[key]
    g = torch.Generator().manual_seed(5)
    r = 16  # 640 = 20 × 32: the readers expect a full W2 from R = 16 on
    bad = {f"{name}.lokr_w1": torch.randn(20, 20, generator=g),
           f"{name}.lokr_w2_a": torch.randn(32, r, generator=g),
           f"{name}.lokr_w2_b": torch.randn(r, 32, generator=g), f"{name}.alpha": torch.tensor(4.0)}
    src = tmp_path / "old_merge.safetensors"
    lc.save_safetensors(bad, src)
    assert "full lokr_w2" in layout_violation(lc.load_adapter(src).modules[name])
    with pytest.raises(AttributeError):
        lycoris_deltas(src, {name: shape})
    want = pack_deltas(src, {key: shape})[key]
    out = tmp_path / "portable.safetensors"
    assert portable_file(src, out).changes == {"low-rank W2 stored full (readers' layout rule)": 1}
    assert layout_violation(lc.load_adapter(out).modules[name]) is None
    assert rel_err(lycoris_deltas(out, {name: shape})[name], want) < REL
    assert rel_err(comfy_deltas(out, model)[key], want) < REL


def test_writer_refuses_above_the_limit_and_never_overwrites(tmp_path, fixtures_dir, monkeypatch):
    import lycoris_core.portable as portable

    src = fixtures_dir / "lyco_lokr_decompose_both.safetensors"
    out = tmp_path / "p.safetensors"
    exact = portable.portable_lokr

    def off_by_1e5(module, shape):  # a rewrite 1e-5 off (10× the limit) must be refused
        tensors, what = exact(module, shape)
        return {**tensors, "lokr_w1": tensors["lokr_w1"] * (1 + 1e-5)}, what

    monkeypatch.setattr(portable, "portable_lokr", off_by_1e5)
    with pytest.raises(AdapterError, match="would change ΔW by 1.0"):
        portable_file(src, out)
    monkeypatch.undo()
    assert not out.exists() and list(tmp_path.iterdir()) == []
    copy = tmp_path / "in.safetensors"
    copy.write_bytes(src.read_bytes())
    before = copy.read_bytes()
    with pytest.raises(AdapterError, match="input"):
        portable_file(copy, copy)
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        portable_file(copy, out)
    assert out.read_bytes() == b"keep" and copy.read_bytes() == before


def test_half_precision_products_are_stored_in_float32(tmp_path, fixtures_dir):
    """fp16 factors: the multiplied-out W1 is kept in float32 (an fp16 product would be ~5e-4 off)."""
    sd = {k: (v.half() if v.dim() else v) for k, v in load_file(
        fixtures_dir / "lyco_lokr_decompose_both.safetensors").items()}
    result = make_portable(lc.adapter_from_tensors(sd, name="fp16.safetensors"))
    w1 = result.tensors[sd_name(SKIP) + ".lokr_w1"]
    assert w1.dtype == torch.float32 and result.report.max_rel_diff <= MAX_REL_DIFF


def test_cli_portable(tmp_path, fixtures_dir):
    out = tmp_path / "p.safetensors"
    cmd = [sys.executable, "-m", "lycoris_core", "convert",
           str(fixtures_dir / "lyco_lokr_decompose_both.safetensors"), "--portable", "-o", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "size 2,740 -> 3,532 bytes" in res.stdout and "largest ΔW difference" in res.stdout
    assert out.is_file()
    dry = tmp_path / "dry.safetensors"
    res = subprocess.run(cmd[:-1] + [str(dry), "--dry-run"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "would write" in res.stdout and "-> 3,532 bytes" in res.stdout
    assert not dry.exists()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1 and "exists" in again.stdout


def test_convert_nodes_portable_option(host, executor, fixtures_dir):
    import shutil

    loras = host.base_dir / "models" / "loras" / "portable_node"
    loras.mkdir(parents=True, exist_ok=True)
    shutil.copy(fixtures_dir / "lyco_lokr_decompose_both.safetensors", loras / "db.safetensors")
    shutil.copy(fixtures_dir / "loha_linear.safetensors", loras / "loha.safetensors")
    common = {"direction": "sd-scripts -> ComfyUI", "architecture": "auto",
              "output_folder": "loras/portable_out", "dry_run": False, "portable": True}
    res = executor.run({
        "1": {"class_type": "ConvertLyCORIS", "inputs": {"lora_name": "portable_node/db.safetensors",
                                                         **common}},
        "2": {"class_type": "LycorisTestSink", "inputs": {"text": ["1", 0]}}})
    assert res.ok, (res.node_errors, res.execution_error)
    report = res.outputs("1")[0]
    assert "portable: wrote loras/portable_out/db_00001_.safetensors" in report
    assert "1 decompose_both W1 multiplied out" in report and str(host.base_dir) not in report
    out = host.base_dir / "output" / "loras" / "portable_out" / "db_00001_.safetensors"
    assert "lora_unet_input_blocks_4_0_skip_connection.lokr_w1" in load_file(out)
    res = executor.run({
        "1": {"class_type": "BatchConvertLyCORIS", "inputs": {"folder": "portable_node",
                                                              "recursive": False, **common}},
        "2": {"class_type": "LycorisTestSink", "inputs": {"text": ["1", 0]}}})
    assert res.ok, (res.node_errors, res.execution_error)
    assert "total: 2 file(s): 2 portable, 0 failed" in res.outputs("1")[0]


def test_full_w2_on_a_1x1_conv_is_reported_as_unservable(tmp_path):
    """No layout serves sd-scripts and LyCORIS both for a full W2 on a 1×1 conv (layout.py):
    the export keeps sd-scripts' (b, d) and says so."""
    g = torch.Generator().manual_seed(3)
    n = sd_name(SKIP)
    src = tmp_path / "full_1x1.safetensors"
    lc.save_safetensors({f"{n}.lokr_w1": torch.randn(20, 16, generator=g),
                         f"{n}.lokr_w2": torch.randn(32, 20, generator=g),
                         f"{n}.alpha": torch.tensor(1.0)}, src)
    report = portable_file(src, tmp_path / "out.safetensors")
    assert report.changes == {} and report.max_rel_diff == 0.0
    assert "1 1×1-conv module(s) with a full lokr_w2, written (b, d)" in report.text()
