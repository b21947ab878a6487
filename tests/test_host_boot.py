"""The test host is the real ComfyUI and loads the pack through its own custom-node loader."""

import comfy_host


def test_comfyui_version_and_pack_loaded(host):
    import comfyui_version

    assert comfyui_version.__version__ == "0.3.75"
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
