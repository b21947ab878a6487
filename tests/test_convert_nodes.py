"""ConvertLyCORIS / BatchConvertLyCORIS run as graphs in the real ComfyUI executor."""

from __future__ import annotations

import hashlib
import shutil

import comfy_host
from safetensors.torch import load_file
from test_convert_factors import comfy_name, golden, mixed_folder, same_bytes

SD2COMFY = "sd-scripts -> ComfyUI"


def convert_prompt(lora_name: str, out: str, dry_run: bool = False,
                   direction: str = SD2COMFY) -> dict:
    return {
        "1": {"class_type": "ConvertLyCORIS", "inputs": {
            "lora_name": lora_name, "direction": direction, "architecture": "auto",
            "output_folder": out, "dry_run": dry_run}},
        "2": {"class_type": "LycorisTestSink", "inputs": {"text": ["1", 0]}},
    }


def digests(folder) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def test_convert_node_writes_with_counters(host, executor, fixtures_dir):
    loras = host.base_dir / "models" / "loras" / "convert_node"
    loras.mkdir(parents=True, exist_ok=True)
    shutil.copy(golden(fixtures_dir, "anima_loha_blocks"), loras / "anima.safetensors")
    before = digests(loras)
    out = host.base_dir / "output" / "loras" / "node_out"

    res = executor.run(convert_prompt("convert_node/anima.safetensors", "loras/node_out", True))
    assert res.ok, (res.node_errors, res.execution_error)
    assert "would convert: convert_node/anima.safetensors -> loras/node_out/anima_00001_" \
        in res.outputs("1")[0]
    assert not out.exists() or not any(out.iterdir())

    for n in (1, 2):  # a second run (fresh cache) never overwrites: the counter moves on
        res = comfy_host.Executor(host).run(convert_prompt("convert_node/anima.safetensors",
                                                           "loras/node_out"))
        assert res.ok, (res.node_errors, res.execution_error)
        report = res.outputs("1")[0]
        assert f"-> loras/node_out/anima_0000{n}_.safetensors (anima, 1 of 1 modules" in report
    files = sorted(p.name for p in out.iterdir())
    assert files == ["anima_00001_.safetensors", "anima_00002_.safetensors"]
    src, dst = load_file(loras / "anima.safetensors"), load_file(out / files[0])
    key = "diffusion_model.blocks.0.adaln_modulation_cross_attn.1.weight"
    prefix = "lora_unet_blocks_0_adaln_modulation_cross_attn_1"
    assert sorted(dst) == sorted(comfy_name(key) + k[len(prefix):] for k in src)
    assert all(same_bytes(dst[comfy_name(key) + k[len(prefix):]], v) for k, v in src.items())
    assert digests(loras) == before

    res = executor.run(convert_prompt("convert_node/anima.safetensors", "loras/node_out",
                                      direction="ComfyUI -> sd-scripts"))
    assert res.ok and "skipped: convert_node/anima.safetensors: already in sd-scripts naming" \
        in res.outputs("1")[0]


def test_convert_node_reports_a_broken_file_as_an_error(host, executor, fixtures_dir):
    loras = host.base_dir / "models" / "loras" / "convert_node_bad"
    loras.mkdir(parents=True, exist_ok=True)
    data = golden(fixtures_dir, "loha_linear").read_bytes()
    (loras / "cut.safetensors").write_bytes(data[:1000])
    res = executor.run(convert_prompt("convert_node_bad/cut.safetensors", "loras/bad_out"))
    assert not res.ok
    msg = res.execution_error["exception_message"]
    assert "convert_node_bad/cut.safetensors" in msg and "truncated" in msg
    assert not (host.base_dir / "output" / "loras" / "bad_out").exists() or \
        not any((host.base_dir / "output" / "loras" / "bad_out").iterdir())


def test_batch_node_converts_good_files_and_reports_broken_ones(host, executor, fixtures_dir):
    loras = host.base_dir / "models" / "loras" / "convert_batch"
    expected = mixed_folder(fixtures_dir, loras)
    before = digests(loras)
    out = host.base_dir / "output" / "loras" / "batch_out"

    def run(recursive: bool) -> str:
        res = comfy_host.Executor(host).run({
            "1": {"class_type": "BatchConvertLyCORIS", "inputs": {
                "folder": "convert_batch", "recursive": recursive, "direction": SD2COMFY,
                "architecture": "auto", "output_folder": "loras/batch_out", "dry_run": False}},
            "2": {"class_type": "LycorisTestSink", "inputs": {"text": ["1", 0]}},
        })
        assert res.ok, (res.node_errors, res.execution_error)
        return res.outputs("1")[0]

    report = run(recursive=False)
    assert "total: 6 file(s): 1 converted, 2 skipped, 3 failed" in report
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()) == \
        ["good_sdxl_00001_.safetensors"]

    report = run(recursive=True)
    lines = report.splitlines()
    for rel, status in expected.items():
        line = next(x for x in lines if f" {rel}" in x and "->" not in x.split(rel)[0])
        assert line.startswith(status if status != "converted" else "converted:"), (rel, line)
    assert "failed: truncated.safetensors: key 'lora_unet_input_blocks_5_1_transformer_blocks_1_" \
        "attn1_to_v.lokr_w2': truncated: tensor data ends at" in report
    assert "failed: unknown_names.safetensors:" in report and "lora_unet_outptu" in report
    assert "converted: sub/good_anima.safetensors -> loras/batch_out/sub/good_anima_00001_" in report
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["good_sdxl_00001_.safetensors", "good_sdxl_00002_.safetensors",
                       "sub/good_anima_00001_.safetensors"]
    got = load_file(out / "sub" / "good_anima_00001_.safetensors")
    assert all(k.startswith("diffusion_model.llm_adapter.blocks.0.self_attn.q_proj.") for k in got)
    assert digests(loras) == before
