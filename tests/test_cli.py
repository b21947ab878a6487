"""`python -m lycoris_core inspect` as a user runs it (a real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lycoris_core", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_inspect_text(fixtures_dir):
    p = run("inspect", str(fixtures_dir / "lyco_lokr_decompose_both.safetensors"))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "architecture: sdxl" in out
    assert "modules: 1 (lokr: 1)" in out
    assert "lokr w1 decomposed / w2 decomposed: 1" in out
    assert "lokr factor: -1: 1" in out
    assert "matched: 1 of 1 (unet: 1)" in out
    assert "ss_network_module: lycoris.kohya" in out


def test_inspect_json(fixtures_dir):
    p = run("inspect", "--json", str(fixtures_dir / "anima_lokr_llm_adapter.safetensors"))
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["architecture"] == "anima"
    assert s["algorithms"] == {"lokr": 1}
    assert s["ranks"] == {"4": 1} and s["alphas"] == {"2": 1}
    assert s["matched_by_component"] == {"llm_adapter": 1}
    assert s["network_args"]["train_llm_adapter"] == "true"
    assert s["metadata"]["ss_network_module"] == "networks.lokr"


def test_inspect_full_matrix_and_tucker(fixtures_dir):
    s = json.loads(run("inspect", "--json", str(fixtures_dir / "lokr_full_w2.safetensors")).stdout)
    assert s["ranks"] == {"full": 1} and s["modes"] == {"lokr w1 full / w2 full": 1}
    s = json.loads(run("inspect", "--json", str(fixtures_dir / "loha_conv_tucker.safetensors")).stdout)
    assert s["modes"] == {"loha tucker": 1}


def test_inspect_bad_file_exit_code(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{")
    p = run("inspect", str(bad))
    assert p.returncode == 2
    assert str(bad) in p.stderr and "error:" in p.stderr
