"""Demo: a LoKr applied by this pack inside a real, headless ComfyUI 0.3.75 on CPU.

1. Boots ComfyUI (extracted from PyPI by scripts/bootstrap.sh) with this pack loaded by ComfyUI's
   own custom-node loader.
2. Builds a tiny SDXL from ComfyUI's own classes (real SDXL key names, 7.9 M parameters) and writes
   a LoKr for every attention and feed-forward layer of its UNet and both CLIP encoders into the
   `loras` folder, in sd-scripts naming with ss_* metadata.
3. Runs the graph  tiny SDXL → LoadLoKr → CLIPTextEncode → KSampler  at strength 0.8 and at 0.
4. Prints the node's load report, checks every patched weight against W0 + s·ΔW computed
   independently by lycoris_core, and shows how much the sampled latent moved.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import comfy_host  # noqa: E402  (tests/comfy_host.py: the headless ComfyUI bootstrap)

import lycoris_core as lc  # noqa: E402
from lycoris_core.algos import factorization  # noqa: E402

TARGET = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
          "ff.net.0.proj", "ff.net.2", "self_attn.q_proj", "self_attn.v_proj", "mlp.fc1", "mlp.fc2")


def sdscripts_name(key: str) -> str:
    base = key[: -len(".weight")]
    if base.startswith("diffusion_model."):
        return "lora_unet_" + base[len("diffusion_model."):].replace(".", "_")
    te, path = base.split(".transformer.", 1)
    return {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}[te] + path.replace(".", "_")


def write_lokr(weights: dict[str, torch.Size], path: Path, rank: int = 4, alpha: float = 2.0) -> int:
    """A seeded LoKr (w1 full, w2 low-rank) for every targeted Linear weight."""
    g = torch.Generator().manual_seed(1234)
    tensors = {}
    for key, shape in sorted(weights.items()):
        if len(shape) != 2 or not any(f".{t}.weight" in key for t in TARGET):
            continue
        (a, b), (c, d) = factorization(shape[0]), factorization(shape[1])
        r = min(rank, b, d)
        name = sdscripts_name(key)
        tensors[f"{name}.lokr_w1"] = torch.randn(a, c, generator=g)
        tensors[f"{name}.lokr_w2_a"] = torch.randn(b, r, generator=g) * 0.25
        tensors[f"{name}.lokr_w2_b"] = torch.randn(r, d, generator=g) * 0.25
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
    meta = {"ss_network_module": "networks.lokr", "ss_network_dim": str(rank),
            "ss_network_alpha": str(alpha), "ss_base_model_version": "sdxl_base_v1-0",
            "ss_network_args": '{"factor": "-1"}', "modelspec.title": "lycoris-nodes demo LoKr"}
    lc.save_safetensors(tensors, path, meta, overwrite=True)
    return len(tensors) // 4


def graph(strength: float) -> dict:
    return {
        "1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}},
        "2": {"class_type": "LoadLoKr", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": "demo_lokr.safetensors",
            "strength_model": strength, "strength_clip": strength, "block_weights": ""}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a watercolor fox", "clip": ["2", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 7, "steps": 4, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "LycorisTestSink", "inputs": {"latent": ["5", 0], "text": ["2", 2]}},
    }


def patched_weights(patcher) -> dict[str, torch.Tensor]:
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    out = {k: v.detach().float().clone() for k, v in patcher.model.state_dict().items()}
    mm.unload_all_models()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--strength", type=float, default=0.8)
    args = ap.parse_args()
    t0 = time.time()
    base = Path(tempfile.mkdtemp(prefix="lycoris_demo_"))
    print(f"[1/4] booting ComfyUI headless on CPU (base directory {base})")
    host = comfy_host.boot(base)
    import comfyui_version

    print(f"      ComfyUI {comfyui_version.__version__}; lycoris-nodes loaded: "
          f"{', '.join(n for n in ('LoadLoHa', 'LoadLoKr', 'LoadLyCORIS') if n in host.nodes.NODE_CLASS_MAPPINGS)}")

    models = next(m for k, m in sys.modules.items() if k.endswith("host_nodes.models"))
    model, clip = models.sdxl_model("tiny", 0), models.sdxl_clip(0)
    unet_w = {k: v.shape for k, v in model.model.state_dict().items()}
    clip_w = {k: v.shape for k, v in clip.cond_stage_model.state_dict().items()}
    lora = base / "models" / "loras" / "demo_lokr.safetensors"
    n = write_lokr({**unet_w, **clip_w}, lora)
    print(f"[2/4] wrote {lora.name}: LoKr on {n} layers of a tiny SDXL "
          f"({sum(v.numel() for v in model.model.parameters()) / 1e6:.1f} M parameters, real SDXL names)")

    print(f"[3/4] running  tiny SDXL → LoadLoKr (strength {args.strength}) → KSampler, and at strength 0")
    ex = comfy_host.Executor(host)
    runs = {}
    for s in (args.strength, 0.0):
        res = ex.run(graph(s))
        if not res.ok:
            print("graph failed:", res.validation_error or res.node_errors or res.execution_error)
            return 1
        runs[s] = res
    res = runs[args.strength]
    report = res.outputs("2")[2]
    print("      load report (also shown on the node):")
    print("\n".join("        " + line for line in report.splitlines()))

    print("[4/4] checks")
    adapter = lc.load_adapter(lora)
    m_out, c_out = res.outputs("2")[0], res.outputs("2")[1]
    w0 = patched_weights(model)
    w1 = patched_weights(m_out)
    deltas, _ = lc.delta_weights(adapter, w0)
    worst = max(float((w1[k] - (w0[k] + args.strength * d)).abs().max()) for k, d in deltas.items())
    changed = sum(1 for k in w0 if not torch.equal(w0[k], w1[k]))
    print(f"      UNet: {len(deltas)} weights patched, {changed} changed; "
          f"max |W − (W0 + s·ΔW)| = {worst:.2e} (float32)")
    c0 = patched_weights(clip.patcher)
    c1 = patched_weights(c_out.patcher)
    cd, _ = lc.delta_weights(adapter, c0)
    unmatched = lc.delta_weights(adapter, {**w0, **c0})[1]
    cworst = max(float((c1[k] - (c0[k] + args.strength * d)).abs().max()) for k, d in cd.items())
    print(f"      CLIP: {len(cd)} weights patched; max |W − (W0 + s·ΔW)| = {cworst:.2e}")
    la, lb = runs[args.strength].outputs("5")[0]["samples"], runs[0.0].outputs("5")[0]["samples"]
    moved = float((la - lb).abs().max())
    rel = float((la - lb).norm() / lb.norm())
    print(f"      sampled latent vs the strength-0 run (= base model): relative change {rel:.1%}")
    ok = worst < 1e-5 and cworst < 1e-5 and not unmatched and changed == len(deltas) and moved > 0
    print(f"done in {time.time() - t0:.1f} s: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
