"""Shared fixtures: the reference fixtures folder and the real ComfyUI host."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))          # lycoris_core as a top-level package
sys.path.insert(0, str(ROOT / "tests"))  # comfy_host, helpers

FIXTURES = Path(os.environ.get("LYCORIS_FIXTURES", ROOT.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "index.json").is_file():
        pytest.fail(f"reference fixtures not found at {FIXTURES} (set LYCORIS_FIXTURES)")
    return FIXTURES


def pytest_report_header(config):
    import comfy_host

    return f"host: {comfy_host.HOST_NAME} ({comfy_host.COMFY_DIR})"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    import comfy_host

    counts = {k: len(terminalreporter.stats.get(k, [])) for k in ("passed", "failed", "error", "skipped")}
    terminalreporter.write_line(f"host {comfy_host.HOST_NAME}: " + ", ".join(
        f"{n} {k}" for k, n in counts.items() if n) + f" (exit status {int(exitstatus)})")


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """The host's ComfyUI (0.3.75 or current, see comfy_host) booted headless on CPU, with this
    pack loaded by ComfyUI's own loader."""
    import comfy_host

    return comfy_host.boot(tmp_path_factory.mktemp("comfyui_base"))


@pytest.fixture()
def executor(host):
    import comfy_host

    return comfy_host.Executor(host)
