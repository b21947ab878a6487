"""Reading one adapter file the way two other readers do, for the interop tests.

- lycoris-lora 4.1.3: `lycoris.create_lycoris_from_weights` builds its modules from the file's
  tensors (it rebuilds each LoKr layout from the rank and shapes, SPEC §5), then `apply_to()`
  hooks them into plain torch layers; ΔW is read from their FORWARD pass (never the library's
  merge path, which scales twice): `layer(x) − F(x; W0)` on identity / one-hot inputs.
- ComfyUI's own loader: `comfy.utils.load_torch_file`, `model_lora_keys_unet` of a real ComfyUI
  model, `comfy.lora.load_lora`, `calculate_weight` on a zero weight (`test_merge_comfy`).

Module names in these files use sd-scripts naming (`lora_unet_<path>`); LyCORIS' wrapper names
its modules `lycoris_<path>`, so the keys are renamed for it (the tensors are untouched).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

UNET = "lora_unet_"


def layer_for(shape: tuple[int, ...], w0: torch.Tensor | None = None) -> torch.nn.Module:
    """A bias-free torch layer of weight shape (O, I[, k, k]) (conv: no padding), weight W0 or 0."""
    if len(shape) == 2:
        layer = torch.nn.Linear(shape[1], shape[0], bias=False)
    else:
        layer = torch.nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.zeros(shape) if w0 is None else w0.reshape(shape))
    return layer


def probe_delta(layer: torch.nn.Module, w0: torch.Tensor) -> torch.Tensor:
    """The weight change a hooked layer applies, read from its forward: Linear on the identity,
    a k×k conv on one one-hot k×k input per (input channel, kernel position)."""
    w0 = w0.float()
    with torch.no_grad():
        if isinstance(layer, torch.nn.Linear):
            eye = torch.eye(w0.shape[1])
            return (layer(eye) - F.linear(eye, w0)).T.contiguous()
        o, i, *k = w0.shape
        n = i * k[0] * k[1]
        x = torch.eye(n).reshape(n, i, *k)
        out = layer(x) - F.conv2d(x, w0)
        return out.reshape(n, o).T.reshape(o, i, *k).contiguous()


def lycoris_deltas(path: Path, shapes: dict[str, tuple[int, ...]],
                   base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """{module name: ΔW} that lycoris-lora 4.1.3 applies for the file, through its forward.

    Raises what the library raises (e.g. AttributeError for a layout it cannot rebuild).
    `shapes` maps the file's module names to the patched weight shapes; `base` gives W0 (DoRA).
    """
    from lycoris import create_lycoris_from_weights

    base = base or {}
    sd = load_file(str(path))
    names = sorted({k.split(".", 1)[0] for k in sd})
    assert set(names) == set(shapes), sorted(set(names) ^ set(shapes))
    root = torch.nn.Module()
    for name in names:
        assert name.startswith(UNET), name
        root.add_module(name[len(UNET):], layer_for(shapes[name], base.get(name)))
    renamed = {"lycoris_" + k[len(UNET):]: v for k, v in sd.items()}
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    network, _ = create_lycoris_from_weights(1.0, None, root, weights_sd=renamed)
    assert len(network.loras) == len(names), f"LyCORIS built {len(network.loras)} of {len(names)}"
    network.apply_to()
    network.eval()
    out = {}
    for name in names:
        layer = getattr(root, name[len(UNET):])
        w0 = base.get(name, torch.zeros(shapes[name]))
        out[name] = probe_delta(layer, w0.reshape(shapes[name]))
    return out


def comfy_deltas(path: Path, model) -> dict[str, torch.Tensor]:
    """{ComfyUI key: ΔW} from ComfyUI's own loader path on a real model (patch on a zero weight)."""
    from test_merge_comfy import comfy_deltas as deltas

    return deltas(path, model)


def pack_deltas(path: Path, model_keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """{ComfyUI key: ΔW float64} that lycoris_core computes for the file."""
    import lycoris_core as lc

    adapter = lc.load_adapter(path)
    res = adapter.resolve(lc.KeyMap(model_keys.keys()))
    assert not res.unmatched, res.unmatched
    return {key: adapter.modules[name].delta(torch.float64, shape=model_keys[key])
            for name, key in res.matched.items()}


def lycoris_tucker_lokr(path: Path, name: str, shape: tuple[int, ...], rank: int = 4,
                        alpha: float = 2.0, seed: int = 0) -> torch.Tensor:
    """Write a Tucker LoKr conv file the way lycoris-lora 4.1.3 saves it (`custom_state_dict`
    of a `LokrModule(use_tucker=True)` with seeded random factors) and return the golden ΔW: what
    that live module's forward applies (it was built with the true rank; only reloading the
    file goes wrong, SPEC §5)."""
    from lycoris.modules.lokr import LokrModule
    from safetensors.torch import save_file

    layer = layer_for(shape)
    g = torch.Generator().manual_seed(seed)
    mod = LokrModule("lycoris_x", layer, lora_dim=rank, alpha=alpha, use_tucker=True)
    with torch.no_grad():
        for p in mod.parameters():
            if p is not layer.weight:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    assert mod.tucker and not mod.use_w2
    sd = {f"{name}.{k}": v.detach().contiguous() for k, v in mod.custom_state_dict().items()}
    assert f"{name}.lokr_t2" in sd
    save_file(sd, str(path), {"ss_network_module": "lycoris.kohya",
                              "ss_network_args": '{"algo": "lokr", "use_tucker": "True"}'})
    mod.apply_to()
    mod.eval()
    return probe_delta(layer, torch.zeros(shape))
