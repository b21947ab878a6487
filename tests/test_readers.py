"""Reader compatibility lines (issue 17): each line is tested on a file kind that triggers it and
on one that triggers none; the LyCORIS and ComfyUI lines are also checked against the real
readers (lycoris-lora 4.1.3's loader + forward, ComfyUI's own loader on ComfyUI's SDXL at the
golden layers' sizes): "reads it" must read with lycoris_core's ΔW, "cannot" must fail, "skips"
must leave the weight unpatched. sd-scripts is not installed here; its lines come from SPEC §5
and the fixtures' recorded cross-loads (test_portable checks the decompose_both one)."""

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
from test_portable import CONV3, SKIP, golden_sdxl, sd_name

import lycoris_core as lc
from lycoris_core.portable import portable_file

ROOT = Path(__file__).resolve().parents[1]
TO_Q = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"  # 640 × 640


def _rnd(g, *shape):
    return 0.3 * torch.randn(*shape, generator=g)


def lokr(g, key, kind: str) -> dict[str, torch.Tensor]:
    """One LoKr module on a golden-size SDXL layer in a given layout."""
    n = sd_name(key)
    if kind == "factor4":  # 640 = 4 × 160: W1 (4, 4), W2 low rank (160 × 160)
        t = {"lokr_w1": _rnd(g, 4, 4), "lokr_w2_a": _rnd(g, 160, 8), "lokr_w2_b": _rnd(g, 8, 160)}
    elif kind == "low_rank_at_boundary":  # 640 = 20 × 32: readers expect full W2 from R = 16
        t = {"lokr_w1": _rnd(g, 20, 20), "lokr_w2_a": _rnd(g, 32, 16), "lokr_w2_b": _rnd(g, 16, 32)}
    elif kind == "full_2d_1x1":  # SKIP 640 × 320 × 1 × 1 in sd-scripts' (b, d) layout
        t = {"lokr_w1": _rnd(g, 20, 16), "lokr_w2": _rnd(g, 32, 20)}
    elif kind == "full_4d_1x1":  # the same in LyCORIS' (b, d, 1, 1) layout
        t = {"lokr_w1": _rnd(g, 20, 16), "lokr_w2": _rnd(g, 32, 20, 1, 1)}
    else:
        raise ValueError(kind)
    t["alpha"] = torch.tensor(4.0)
    return {f"{n}.{k}": v for k, v in t.items()}


def write(path: Path, tensors: dict) -> Path:
    lc.save_safetensors(tensors, path)
    return path


def statuses(path: Path) -> dict[str, tuple[str, str]]:
    s = lc.load_adapter(path).summary()
    return {r["reader"]: (r["status"], r["text"]) for r in s["readers"]}


def check_real_readers(path: Path, host, lines: dict) -> None:
    """The LyCORIS and ComfyUI lines agree with what those readers do with the file."""
    model, shapes = golden_sdxl(host)
    adapter = lc.load_adapter(path)
    keys = adapter.resolve(lc.KeyMap(shapes.keys())).matched
    module_shapes = {n: shapes[k] for n, k in keys.items()}
    base = {}
    if any(m.has_dora for m in adapter.modules.values()):
        base = {sd_name(k): w for k, w in goldens.base_weights("lyco_loha_dora").items()}
    if lines["LyCORIS"][0] == "ok":
        got = lycoris_deltas(path, module_shapes, base=base)
        if not base:
            ours = pack_deltas(path, {k: shapes[k] for k in keys.values()})
            assert all(rel_err(got[n].reshape(ours[k].shape), ours[k]) < 1e-5 for n, k in keys.items())
    else:
        with pytest.raises((AttributeError, RuntimeError, KeyError)):
            lycoris_deltas(path, module_shapes, base=base)
    comfy = comfy_deltas(path, model)
    skipped = [k for k in keys.values() if float(comfy[k].abs().max()) == 0.0]
    if "skips" in lines["ComfyUI core"][1]:
        assert skipped == list(keys.values())
    else:
        assert skipped == []


CASES = {
    # name: (builder, {reader: (status, substring)})
    "loha_golden": ("loha_linear", {"sd-scripts": ("ok", "reads it"), "LyCORIS": ("ok", "reads it"),
                                    "ComfyUI core": ("ok", "reads it")}),
    "decompose_both": ("lyco_lokr_decompose_both", {
        "sd-scripts": ("cannot", "decompose_both on 1 module"), "LyCORIS": ("ok", "reads it"),
        "ComfyUI core": ("ok", "reads it")}),
    "dora_output_axis": ("lyco_loha_dora", {
        "sd-scripts": ("partial", "ignores dora_scale on 1 module"), "LyCORIS": ("ok", "reads it"),
        "ComfyUI core": ("partial", "normalised by W0 instead of W0 + ΔW")}),
    "tucker_lokr": ("tucker", {
        "sd-scripts": ("ok", "reads it"), "LyCORIS": ("cannot", "Tucker LoKr, 1 module"),
        "ComfyUI core": ("partial", "skips 1 module(s) (Tucker LoKr)")}),
    "factor4": ("factor4", {
        "sd-scripts": ("needs", "needs network_args factor=4"), "LyCORIS": ("ok", "reads it"),
        "ComfyUI core": ("ok", "reads it")}),
    "low_rank_at_boundary": ("low_rank_at_boundary", {
        "sd-scripts": ("partial", "as ΔW = 0 (low-rank lokr_w2"),
        "LyCORIS": ("cannot", "low-rank lokr_w2 where it expects a full one"),
        "ComfyUI core": ("ok", "reads it")}),
    "full_2d_1x1": ("full_2d_1x1", {
        "sd-scripts": ("ok", "reads it"), "LyCORIS": ("cannot", "2-D full lokr_w2 on 1 1×1 conv"),
        "ComfyUI core": ("ok", "reads it")}),
    "full_4d_1x1": ("full_4d_1x1", {
        "sd-scripts": ("cannot", "4-D lokr_w2 on 1 1×1 conv"), "LyCORIS": ("ok", "reads it"),
        "ComfyUI core": ("ok", "reads it")}),
}


def build(kind: str, tmp_path: Path, fixtures_dir: Path) -> Path:
    if (fixtures_dir / f"{kind}.safetensors").is_file():
        return fixtures_dir / f"{kind}.safetensors"
    path = tmp_path / f"{kind}.safetensors"
    if kind == "tucker":
        lycoris_tucker_lokr(path, sd_name(CONV3), (320, 320, 3, 3), seed=2)
        return path
    key = SKIP if "1x1" in kind else TO_Q
    return write(path, lokr(torch.Generator().manual_seed(7), key, kind))


@pytest.mark.parametrize("case", sorted(CASES))
def test_reader_lines(host, tmp_path, fixtures_dir, case):
    kind, want = CASES[case]
    path = build(kind, tmp_path, fixtures_dir)
    lines = statuses(path)
    assert list(lines) == ["sd-scripts", "LyCORIS", "ComfyUI core"]
    for reader, (status, text) in want.items():
        assert lines[reader][0] == status and text in lines[reader][1], (reader, lines[reader])
    check_real_readers(path, host, lines)


@pytest.mark.parametrize("case", ["tucker_lokr", "low_rank_at_boundary", "decompose_both"])
def test_portable_clears_the_lines_it_is_for(host, tmp_path, fixtures_dir, case):
    path = build(CASES[case][0], tmp_path, fixtures_dir)
    out = tmp_path / "portable.safetensors"
    portable_file(path, out)
    lines = statuses(out)
    assert all(status == "ok" for status, _ in lines.values()), lines
    check_real_readers(out, host, lines)


def test_text_only_lines():
    """Lines for file kinds that need no reader run: input-axis DoRA, ComfyUI naming, no alpha,
    Anima's lora_te_ names (ComfyUI 0.3.75 maps none of them: test_convert_comfy)."""
    from lycoris_core.readers import reader_lines

    g = torch.Generator().manual_seed(1)
    lora = {"lora_up.weight": _rnd(g, 64, 4), "lora_down.weight": _rnd(g, 4, 32)}
    t = {f"lora_unet_x.{k}": v for k, v in lora.items()}
    t["lora_unet_x.alpha"] = torch.tensor(2.0)
    t["lora_unet_x.dora_scale"] = torch.ones(1, 32)
    lines = {r.reader: r for r in reader_lines(lc.adapter_from_tensors(t).modules)}
    assert lines["LyCORIS"].status == "cannot" and "input-axis DoRA" in lines["LyCORIS"].text
    assert lines["ComfyUI core"].status == "ok"  # ComfyUI handles the input axis right
    comfy_named = {f"diffusion_model.x.{k}": v for k, v in lora.items()}
    lines = {r.reader: r for r in reader_lines(lc.adapter_from_tensors(comfy_named).modules)}
    assert "not in sd-scripts naming" in lines["sd-scripts"].text
    assert "no alpha on 1" in lines["sd-scripts"].text
    te = lc.adapter_from_tensors({f"lora_te_layers_0_mlp_down_proj.{k}": v for k, v in lora.items()})
    lines = {r.reader: r for r in reader_lines(te.modules, {}, "anima")}
    assert "0.3.75 maps none of the 1 lora_te_" in lines["ComfyUI core"].text


def test_inspect_shows_the_lines(fixtures_dir):
    f = str(fixtures_dir / "lyco_lokr_decompose_both.safetensors")
    run = lambda *a: subprocess.run([sys.executable, "-m", "lycoris_core", "inspect", *a, f],  # noqa: E731
                                    cwd=ROOT, capture_output=True, text=True, timeout=300)
    text = run().stdout
    assert "readers:\n  sd-scripts: cannot read (decompose_both on 1 module(s)) — convert with " \
        "--portable\n  LyCORIS: reads it\n  ComfyUI core: reads it" in text, text
    js = json.loads(run("--json").stdout)
    assert js["readers"][0] == {"reader": "sd-scripts", "status": "cannot",
                                "text": "sd-scripts: cannot read (decompose_both on 1 module(s)) "
                                        "— convert with --portable"}


def test_metadata_route_body_has_readers(host, fixtures_dir):
    """The JSON of GET /lycoris/metadata (nodes/web_api.adapter_info) carries the lines."""
    import shutil

    from test_loaders_common import loras_dir

    shutil.copy(fixtures_dir / "lyco_loha_dora.safetensors", loras_dir(host) / "readers_dora.safetensors")
    web_api = sys.modules[f"{host.pack.__name__}.nodes.web_api"]
    status, body = web_api.adapter_info("readers_dora.safetensors")
    assert status == 200
    assert [r["status"] for r in body["readers"]] == ["partial", "ok", "partial"]
