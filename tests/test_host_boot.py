"""The test host is the real ComfyUI and loads the pack through its own custom-node loader."""

import os
from pathlib import Path

import comfy_host
import pytest


def test_comfyui_version_and_pack_loaded(host):
    import comfyui_version

    assert comfyui_version.__version__ == comfy_host.VERSION
    assert comfy_host.VERSION == "0.3.75" or comfy_host.CURRENT
    # both sides resolved: in a worktree .cache is a link to the main checkout's
    assert Path(comfyui_version.__file__).resolve().is_relative_to(comfy_host.COMFY_DIR.resolve())
    assert comfy_host.PACK_MODULE in __import__("sys").modules
    assert "LycorisTestModel" in host.nodes.NODE_CLASS_MAPPINGS


def test_tiny_models_sample(executor):
    prompt = {
        "1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0],
            "seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "5": {"class_type": "LycorisTestSink", "inputs": {"latent": ["4", 0]}},
    }
    res = executor.run(prompt)
    assert res.ok, (res.validation_error, res.node_errors, res.execution_error)
    latent = res.outputs("4")[0]["samples"]
    assert latent.shape == (1, 4, 8, 8)
    assert bool(latent.isfinite().all())


def test_second_host_is_at_hand():
    """scripts/test.sh runs the suite on current ComfyUI too; say so when it cannot."""
    reason = os.environ.get("LYCORIS_HOST2_SKIP", "")
    if reason:
        pytest.skip(f"second ComfyUI host not run: {reason}")
