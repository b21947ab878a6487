"""The training set of TrainLyCORIS as the host model sees it: latents, conditionings, captions.

Without a CLIP, each item's conditioning is fixed (encoded once, outside training). With a CLIP
the text encoders are trained too: each item's caption is re-encoded at every step, with
gradients flowing into the text-encoder modules, and turned into the model's inputs the way
the sampler does it (`encode_model_conds`: SDXL's pooled `y` vector included).
"""

from __future__ import annotations

import logging

import comfy.sampler_helpers
import comfy.samplers
import torch

from ..lycoris_core.train.objective import diffusion_loss, sample_sigmas

log = logging.getLogger("lycoris_nodes")


def flatten_latents(latents: list[dict]) -> list[torch.Tensor]:
    """LATENT batches → one (1, C, [T,] H, W) tensor per training item."""
    out: list[torch.Tensor] = []
    for lat in latents:
        samples = lat["samples"]
        out += [samples[i: i + 1] for i in range(samples.shape[0])]
    return out


def flatten_conds(conds: list) -> list:
    """CONDITIONING lists → one single-entry CONDITIONING per training item."""
    out = []
    for c in conds:
        out += [[item] for item in c]
    return out


def split_captions(captions: list[str] | None, n: int | None = None) -> list[str]:
    """Captions from the node input, one per training item; empty captions count.

    Several strings (a list input, e.g. from ComfyUI's dataset nodes) are one caption each, kept
    as they are: an image without a caption file trains with an empty caption, as in sd-scripts
    and ComfyUI's MakeTrainingDataset. A single string holds one caption per line, unless there
    is a single training item (`n == 1`): then the whole text, line breaks included, is its
    caption. Empty lines between captions are empty captions; a trailing line break is not one.
    A single blank string (the empty caption field) gives no captions.
    """
    texts = [c if isinstance(c, str) else "" for c in (captions or []) if c is not None]
    if len(texts) == 1:
        if not texts[0].strip():  # a blank caption field: no captions given
            return []
        if n != 1:
            texts = texts[0].splitlines()
    return [t.strip() for t in texts]


def per_item(values: list, n: int, what: str) -> list:
    """`values` for `n` items: one value is used for every item, otherwise one per item."""
    if len(values) == 1 and n > 1:
        values = values * n
    if len(values) != n:
        raise ValueError(f"{n} training latents but {len(values)} {what}: give one per latent "
                         "(in the same order), or a single one for all")
    return values


def training_items(latents: list[dict], positive: list | None, clip, captions: list[str] | None):
    """The node's training set: (latents, conditionings or None, captions or None), one entry
    per item. With a CLIP the captions are used (re-encoded every step), otherwise `positive`."""
    lat = flatten_latents(latents or [])
    if not lat:
        raise ValueError("no training latents")
    if clip is not None:
        texts = split_captions(captions, len(lat))
        if not texts:
            raise ValueError("a CLIP is connected (text-encoder training) but the captions are "
                             "empty: give one caption per line, in the order of the latents")
        if positive:
            log.info("TrainLyCORIS: a CLIP is connected, so the captions are encoded at every "
                     "step and the positive conditionings are not used")
        return lat, None, per_item(texts, len(lat), "captions")
    if not positive:
        raise ValueError("connect the conditionings (positive), or a CLIP with captions")
    return lat, per_item(flatten_conds(positive), len(lat), "conditionings"), None


def _keep_saved(t: torch.Tensor) -> torch.Tensor:
    """Pack hook: a private copy of an activation saved for backward (parameters as they are).

    ComfyUI's text encoders add residuals in place (`x += attn(norm(x))`), which is fine for
    inference but overwrites activations that autograd saved once the text encoder carries
    trainable modules. Copying the saved activations at save time keeps their values; frozen
    weights and the trainable factors are never copied.
    """
    if isinstance(t, torch.nn.Parameter) or (t.grad_fn is None and not t.requires_grad):
        return t
    return t.clone()


class CaptionEncoder:
    """Encodes item i's caption with a CLIP whose text-encoder modules are being trained.

    The CLIP must already be loaded (the trainer loads it with the diffusion model); encoding
    reuses the CLIP's own layer choice (CLIP Set Last Layer) and returns a CONDITIONING entry.
    """

    def __init__(self, clip, captions: list[str]):
        self.clip = clip
        self.tokens = [clip.tokenize(c) for c in captions]

    def __call__(self, i: int) -> list:
        return encode_tokens(self.clip, self.tokens[i])


def encode_tokens(clip, tokens) -> list:
    """One CONDITIONING entry for `tokens` from a loaded CLIP, with its own layer choice (CLIP
    Set Last Layer); activations saved for backward are kept (see `_keep_saved`)."""
    model = clip.cond_stage_model
    model.reset_clip_options()
    if clip.layer_idx is not None:
        model.set_clip_options({"layer": clip.layer_idx})
    with torch.autograd.graph.saved_tensors_hooks(_keep_saved, lambda t: t):
        out = model.encode_token_weights(tokens)
    extra = {"pooled_output": out[1], **(out[2] if len(out) > 2 else {})}
    return [[out[0], extra]]


class Objective:
    """loss(indices) on the host model: conditionings, noise, sigma, x0 prediction.

    `conds` holds one CONDITIONING per item, or None when `encoder` produces them every call.
    """

    def __init__(self, patcher, latents: list[torch.Tensor], conds: list | None, device, dtype,
                 min_t: int, max_t: int, encoder: CaptionEncoder | None = None):
        self.base = patcher.model
        self.sampling = patcher.get_model_object("model_sampling")
        self.options = patcher.model_options.get("transformer_options", {})
        self.device, self.dtype, self.min_t, self.max_t = device, dtype, min_t, max_t
        self.encoder = encoder
        self.x0 = [self.base.process_latent_in(x.to(device, torch.float32)) for x in latents]
        self.conds = None if encoder is not None else \
            [self._model_conds(c, x) for x, c in zip(self.x0, conds, strict=True)]

    def _model_conds(self, cond: list, x: torch.Tensor) -> dict:
        converted = comfy.sampler_helpers.convert_cond(cond)
        enc = comfy.samplers.encode_model_conds(self.base.extra_conds, converted, x, self.device,
                                                "positive", latent_image=x)
        return {k: v.process_cond(batch_size=1, device=self.device)
                for k, v in enc[0]["model_conds"].items()}

    def _item_conds(self, i: int) -> dict:
        """Item i's model conditions (re-encoded from its caption when training a CLIP)."""
        if self.encoder is None:
            return self.conds[i]
        return self._model_conds(self.encoder(i), self.x0[i])

    def _groups(self, idx: list[int]) -> list[tuple[list[int], list[dict]]]:
        """Items that can run as one batch: same latent shape and conditions ComfyUI can
        concatenate (`can_concat`, as its sampler batches them). Anima's Qwen3 captions of
        different token counts give conditions of different lengths: those run separately."""
        groups: list[tuple[list[int], list[dict]]] = []
        for i in idx:
            conds = self._item_conds(i)
            for members, group_conds in groups:
                first = group_conds[0]
                if (self.x0[members[0]].shape == self.x0[i].shape and first.keys() == conds.keys()
                        and all(first[k].can_concat(conds[k]) for k in first)):
                    members.append(i)
                    group_conds.append(conds)
                    break
            else:
                groups.append(([i], [conds]))
        return groups

    def _kwargs(self, items: list[dict]) -> dict:
        out = {}
        for k, v in items[0].items():
            others = [c[k] for c in items[1:]]
            out[k] = v.concat(others) if others else v.cond
        # fixed conditionings come from nodes run under inference mode: plain copies for autograd
        return {k: (v.to(self.device).clone() if isinstance(v, torch.Tensor) else v)
                for k, v in out.items() if v is not None}

    def _autocast(self):
        device = self.x0[0].device.type
        if self.dtype == torch.float32:
            return torch.autocast(device, enabled=False)
        return torch.autocast(device, dtype=self.dtype)

    def __call__(self, idx: list[int]) -> torch.Tensor:
        total = 0.0
        with self._autocast():  # the text encoders too run in the training dtype
            groups = self._groups(idx)
        for members, conds in groups:
            total = total + self._group_loss(members, conds) * (len(members) / len(idx))
        return total

    def _group_loss(self, members: list[int], conds: list[dict]) -> torch.Tensor:
        """The loss of items that run as one batch (noise and timesteps drawn here)."""
        x0 = torch.cat([self.x0[i] for i in members])
        noise = torch.randn(x0.shape).to(self.device)
        sigma = sample_sigmas(self.sampling, len(members), self.min_t, self.max_t)
        with self._autocast():
            return diffusion_loss(self.base.apply_model, self.sampling, x0, noise, sigma,
                                  transformer_options=self.options, **self._kwargs(conds))
