"""Sample images while TrainLyCORIS trains (sd-scripts' --sample_every_n_steps / prompt file).

After every N-th optimizer step the model being trained (network attached, dropouts off) samples
each prompt with ComfyUI's own sampler (euler, normal schedule) and the VAE decodes it; the image
is shown as the node's preview at once and all of them are returned as one IMAGE batch. Sampling
runs in a forked random state, so a run with samples trains exactly like one without.
"""

from __future__ import annotations

import logging

import comfy.sample
import comfy.utils
import torch
from comfy_api.latest import io

from ..lycoris_core.train.loop import aside, every_n_steps
from ..lycoris_core.train.samples import parse_sample_prompts
from .train_data import encode_tokens

log = logging.getLogger("lycoris_nodes")


def sample_inputs() -> list:
    """TrainLyCORIS's optional sampling inputs."""
    return [
        io.Int.Input("sample_every_n_steps", default=0, min=0, max=1_000_000, optional=True,
                     tooltip="--sample_every_n_steps: sample the sample_prompts after every N "
                     "steps (0 = off); previews appear on the node, the images are the samples "
                     "output."),
        io.String.Input("sample_prompts", default="", multiline=True, optional=True,
                        tooltip="sd-scripts' prompt file format, one prompt per line: "
                        "'a dog --n blurry --w 1024 --h 1024 --s 20 --l 7 --d 42' (negative, "
                        "width, height, steps, cfg scale, seed). Encoded with the training set's "
                        "CLIP or the connected CLIP."),
        io.Vae.Input("vae", optional=True, tooltip="Decodes the samples (default: the training "
                     "set's VAE)."),
    ]


class TrainingSamples:
    """Makes the samples of a run; `on_step` wraps the trainer's step callback."""

    def __init__(self, o: dict, patcher, clip, vae, network, node_id, total: int, seed: int):
        self.every = int(o.get("sample_every_n_steps") or 0)
        self.prompts = parse_sample_prompts(o.get("sample_prompts") or "") if self.every else []
        if self.every and not self.prompts:
            log.warning("TrainLyCORIS: sample_every_n_steps is set but sample_prompts is empty: "
                        "no samples")
        if self.prompts and (clip is None or vae is None):
            raise ValueError("samples need a CLIP and a VAE: connect a training_set (its CLIP and "
                             "VAE are used) or a CLIP and the vae input")
        self.patcher, self.clip, self.vae, self.network = patcher, clip, vae, network
        self.node_id, self.total, self.seed = node_id, total, seed
        self.images: list[torch.Tensor] = []
        self.steps: list[int] = []
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id) if self.prompts else None

    def _cond(self, text: str) -> list:
        return encode_tokens(self.clip, self.clip.tokenize(text))

    def sample(self, step: int) -> None:
        with aside(self.network):
            for p in self.prompts:
                latent = torch.zeros(1, 4, p.height // 8, p.width // 8)
                latent = comfy.sample.fix_empty_latent_channels(self.patcher, latent)
                seed = self.seed if p.seed is None else p.seed
                noise = comfy.sample.prepare_noise(latent, seed)
                out = comfy.sample.sample(self.patcher, noise, p.steps, p.cfg, "euler", "normal",
                                          self._cond(p.prompt), self._cond(p.negative), latent,
                                          disable_pbar=True, seed=seed)
                img = self.vae.decode(out).float().cpu()
                img = img.reshape(-1, *img.shape[-3:])[:1]  # (1, H, W, 3)
                self.images.append(img)
                self.steps.append(step)
                self._preview(step, img)
        log.info("TrainLyCORIS: %d sample(s) at step %d", len(self.prompts), step)

    def _preview(self, step: int, img: torch.Tensor) -> None:
        from PIL import Image

        arr = (img[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        self.bar.update_absolute(step, self.total, ("JPEG", Image.fromarray(arr), 512))

    def wrap(self, on_step):
        return every_n_steps(on_step, self.every if self.prompts else 0,
                             lambda n, _loss: self.sample(n))

    def batch(self) -> torch.Tensor:
        """All samples as one IMAGE batch: empty (0 images) without samples; images of another
        size than the first are left out (one batch has one size)."""
        if not self.images:
            return torch.zeros(0, 64, 64, 3)
        shape = self.images[0].shape
        return torch.cat([i for i in self.images if i.shape == shape])
