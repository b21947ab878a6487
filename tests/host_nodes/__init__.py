"""Test-only ComfyUI nodes: tiny real models and a recorder of the weights a sampler used.

Loaded by the test host with ComfyUI's own custom-node loader; never shipped with the pack.
"""

from __future__ import annotations

import torch
from comfy_api.latest import ComfyExtension, io

from . import models

RECORDS: list[dict[str, torch.Tensor]] = []
"""Weights seen by the diffusion model at each call, appended by LycorisTestRecorder."""


class LycorisTestModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LycorisTestModel",
            inputs=[io.Combo.Input("kind", options=["tiny_sdxl", "golden_sdxl", "tiny_dit",
                                                    "golden_dit", "tiny_anima"]),
                    io.Int.Input("seed", default=0)],
            outputs=[io.Model.Output(), io.Clip.Output()],
        )

    @classmethod
    def execute(cls, kind, seed) -> io.NodeOutput:
        if kind == "tiny_anima":  # the tiny DiT with a tiny Qwen3 text encoder
            return io.NodeOutput(models.dit_model("tiny", seed), models.anima_clip(seed))
        variant, family = kind.split("_")
        if family == "sdxl":
            return io.NodeOutput(models.sdxl_model(variant, seed), models.sdxl_clip(seed))
        return io.NodeOutput(models.dit_model(variant, seed), None)


class LycorisTestVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="LycorisTestVAE", inputs=[io.Int.Input("seed", default=0)],
                         outputs=[io.Vae.Output()])

    @classmethod
    def execute(cls, seed) -> io.NodeOutput:
        return io.NodeOutput(models.tiny_vae(seed))


class LycorisTestRecorder(io.ComfyNode):
    """Wraps the model call so that the listed weights are copied every time it runs."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LycorisTestRecorder",
            inputs=[io.Model.Input("model"), io.String.Input("keys", default="")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, keys) -> io.NodeOutput:
        names = [k.strip() for k in keys.split(",") if k.strip()]
        m = model.clone()

        def wrapper(apply_model, args):
            sd = dict(m.model.named_parameters())
            sigma = args["timestep"]
            # copies on the CPU whatever device ComfyUI runs on (LYCORIS_TEST_DEVICE)
            RECORDS.append({"sigma": sigma.detach().to("cpu", copy=True),
                            **{k: sd[k].detach().to("cpu", torch.float32, copy=True) for k in names}})
            return apply_model(args["input"], args["timestep"], **args["c"])

        m.set_model_unet_function_wrapper(wrapper)
        return io.NodeOutput(m)


class LycorisTestSink(io.ComfyNode):
    """An output node so that a test graph executes; the values are read from the executor."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LycorisTestSink",
            inputs=[io.Latent.Input("latent", optional=True), io.Model.Input("model", optional=True),
                    io.Clip.Input("clip", optional=True),
                    io.String.Input("text", optional=True, force_input=True)],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, latent=None, model=None, clip=None, text=None) -> io.NodeOutput:
        return io.NodeOutput()


class _Extension(ComfyExtension):
    async def get_node_list(self):
        return [LycorisTestModel, LycorisTestVAE, LycorisTestRecorder, LycorisTestSink]


async def comfy_entrypoint() -> ComfyExtension:
    return _Extension()
