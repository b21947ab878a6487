"""Loader graphs on the tiny SDXL (UNet + CLIP-L + CLIP-G): CLIP patches, per-block strengths,
ComfyUI's own LoraLoader where it agrees and where it does not, errors and the cache."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from helpers import rel_err
from test_loaders_common import (
    loaded_weights,
    loras_dir,
    make_adapter,
    run_recorded,
    sampler_graph,
    write_adapter,
)

import lycoris_core as lc

TOL = 1e-5
UNET_KEYS = [
    "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "diffusion_model.input_blocks.1.0.in_layers.2.weight",
    "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight",
    "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight",
    "diffusion_model.output_blocks.8.0.skip_connection.weight",
]
CLIP_KEYS = [
    "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "clip_l.transformer.text_model.encoder.layers.2.mlp.fc1.weight",
    "clip_g.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight",
]


@pytest.fixture(scope="module")
def tiny(host):
    """The tiny SDXL objects as the test node builds them, and the base sampler run."""
    import comfy_host

    ex = comfy_host.Executor(host)
    res, records = run_recorded(ex, sampler_graph("tiny_sdxl", None, record=",".join(UNET_KEYS)))
    model, clip = res.outputs("1")[0], res.outputs("1")[1]
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items() if k in UNET_KEYS}
    shapes.update({k: tuple(v.shape) for k, v in clip.cond_stage_model.state_dict().items()
                   if k in CLIP_KEYS})
    assert len(shapes) == len(UNET_KEYS) + len(CLIP_KEYS)
    cond = res.outputs("5")[0][0][0].clone()
    return {"shapes": shapes, "records": records, "latent": res.outputs("6")[0]["samples"].clone(),
            "cond": cond, "clip_base": loaded_weights(clip.patcher, CLIP_KEYS)}


def _file(host, tiny, algo: str, keys, name: str, **kw):
    tensors, deltas = make_adapter({k: tiny["shapes"][k] for k in keys}, algo, **kw)
    return write_adapter(host, name, tensors, algo), deltas


def _check_unet(records, base_records, deltas, strengths):
    assert len(records) == len(base_records) >= 2
    for rec, base in zip(records, base_records, strict=True):
        for key, s in strengths.items():
            change = rec[key].double() - base[key].double()
            if s == 0.0:
                assert torch.equal(rec[key], base[key]), key
            else:
                assert rel_err(change, s * deltas[key]) < TOL, key


@pytest.mark.parametrize("loader,algo", [("LoadLoHa", "loha"), ("LoadLoKr", "lokr"),
                                         ("LoadLyCORIS", "lokr")])
def test_unet_and_clip_patched(host, executor, tiny, loader, algo):
    name, deltas = _file(host, tiny, algo, UNET_KEYS + CLIP_KEYS, f"tiny_{algo}_all.safetensors")
    graph = sampler_graph("tiny_sdxl", loader, name, strength_model=0.8, strength_clip=0.6,
                          record=",".join(UNET_KEYS))
    res, records = run_recorded(executor, graph)
    _check_unet(records, tiny["records"], deltas, dict.fromkeys(UNET_KEYS, 0.8))
    clip = res.outputs("2")[1]
    got = loaded_weights(clip.patcher, CLIP_KEYS)
    for key in CLIP_KEYS:
        assert rel_err(got[key] - tiny["clip_base"][key], 0.6 * deltas[key]) < TOL, key
    assert not torch.equal(res.outputs("5")[0][0][0], tiny["cond"])      # CLIP output moved
    assert not torch.equal(res.outputs("6")[0]["samples"], tiny["latent"])
    report = res.outputs("2")[2]
    assert "clip_l ×2" in report and "clip_g ×1" in report and "unet ×5" in report
    assert f"matched: {len(deltas)} of {len(deltas)} modules" in report


def test_strength_clip_zero_leaves_clip_exact(host, executor, tiny):
    name, deltas = _file(host, tiny, "loha", UNET_KEYS + CLIP_KEYS, "tiny_loha_all.safetensors")
    graph = sampler_graph("tiny_sdxl", "LoadLoHa", name, strength_model=1.0, strength_clip=0.0,
                          record=",".join(UNET_KEYS))
    res, records = run_recorded(executor, graph)
    assert res.outputs("2")[1] is res.outputs("1")[1]                    # the input CLIP itself
    assert torch.equal(res.outputs("5")[0][0][0], tiny["cond"])
    _check_unet(records, tiny["records"], deltas, dict.fromkeys(UNET_KEYS, 1.0))


def test_block_weights_change_exactly_the_targeted_weights(host, executor, tiny):
    name, deltas = _file(host, tiny, "lokr", UNET_KEYS + CLIP_KEYS, "tiny_lokr_all.safetensors")
    graph = sampler_graph("tiny_sdxl", "LoadLoKr", name, strength_model=0.9, strength_clip=1.0,
                          block_weights="IN4=0, OUT0-8=0.5, TE1=0, B3=0",
                          record=",".join(UNET_KEYS))
    res, records = run_recorded(executor, graph)
    _check_unet(records, tiny["records"], deltas, {
        UNET_KEYS[0]: 0.0,         # IN4 off
        UNET_KEYS[1]: 0.9,         # IN1 untouched by the rules
        UNET_KEYS[2]: 0.9,         # MID
        UNET_KEYS[3]: 0.45,        # OUT3
        UNET_KEYS[4]: 0.45,        # OUT8
    })
    got = loaded_weights(res.outputs("2")[1].patcher, CLIP_KEYS)
    for key in CLIP_KEYS:
        if key.startswith("clip_l."):
            assert torch.equal(got[key], tiny["clip_base"][key])
        else:
            assert rel_err(got[key] - tiny["clip_base"][key], deltas[key]) < TOL
    report = res.outputs("2")[2]
    assert "strength 0 (not applied): 3 modules" in report
    assert report.startswith("WARNING: block weight rules that hit no module: B3=0\n")


def _lokr_tucker_conv(key: str, shape) -> tuple[dict, torch.Tensor]:
    """A conv 3×3 LoKr with a Tucker w2 (lokr_t2) and its ΔW from SPEC §3 (float64)."""
    o, i, k, _ = shape
    (a, b), (c, d) = lc.factorization(o, -1), lc.factorization(i, -1)
    g = torch.Generator().manual_seed(7)
    r = 3
    t = {"lokr_w1": torch.randn(a, c, generator=g), "lokr_t2": torch.randn(r, r, k, k, generator=g),
         "lokr_w2_a": torch.randn(r, b, generator=g), "lokr_w2_b": torch.randn(r, d, generator=g)}
    w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["lokr_t2"].double(), t["lokr_w2_a"].double(),
                      t["lokr_w2_b"].double()).contiguous()
    dw = torch.kron(t["lokr_w1"].double()[:, :, None, None], w2) * (1.5 / r)
    mod = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
    return {f"{mod}.{n}": v for n, v in t.items()} | {f"{mod}.alpha": torch.tensor(1.5)}, dw


def test_comfyui_loraloader_same_where_right_pinned_where_wrong(host, executor, tiny):
    """One mixed file through LoadLyCORIS and ComfyUI's LoraLoader in the same graph style:
    LoHa, LoKr (w2 low-rank) and LoKr both-full (alpha ignored, scale 1) give identical weights;
    LoKr with a Tucker w2 fails inside ComfyUI's torch.kron (non-contiguous w2), is only logged
    and the weight stays unpatched (SPEC §5) — pinned here; ours applies it."""
    sh = tiny["shapes"]
    loha_t, loha_d = make_adapter({k: sh[k] for k in (UNET_KEYS[0], UNET_KEYS[2])}, "loha", seed=1)
    lokr_t, lokr_d = make_adapter({UNET_KEYS[3]: sh[UNET_KEYS[3]]}, "lokr", seed=2)
    full_t, full_d = make_adapter({UNET_KEYS[4]: sh[UNET_KEYS[4]]}, "lokr", seed=3, lokr_full=True,
                                  alpha=5.0)
    tucker_t, tucker_d = _lokr_tucker_conv(UNET_KEYS[1], sh[UNET_KEYS[1]])
    deltas = loha_d | lokr_d | full_d | {UNET_KEYS[1]: tucker_d}
    name = write_adapter(host, "tiny_mixed_unet.safetensors",
                         loha_t | lokr_t | full_t | tucker_t, "lycoris")
    runs = {}
    for loader in ("LoadLyCORIS", "LoraLoader"):
        graph = sampler_graph("tiny_sdxl", loader, name, strength_model=1.3, strength_clip=1.0,
                              record=",".join(UNET_KEYS))
        runs[loader] = run_recorded(executor, graph)[1]
    ours, theirs = runs["LoadLyCORIS"], runs["LoraLoader"]
    _check_unet(ours, tiny["records"], deltas, dict.fromkeys(UNET_KEYS, 1.3))
    base = tiny["records"][0]
    for a, b in zip(ours, theirs, strict=True):
        for key in (UNET_KEYS[0], UNET_KEYS[2], UNET_KEYS[3], UNET_KEYS[4]):
            assert rel_err(b[key].double() - base[key].double(),
                           a[key].double() - base[key].double()) < 1e-6, key
        assert torch.equal(b[UNET_KEYS[1]], base[UNET_KEYS[1]])      # ComfyUI: silently unpatched


def test_some_unmatched_is_a_visible_warning(host, executor, tiny):
    tensors, _ = make_adapter({k: tiny["shapes"][k] for k in UNET_KEYS[:2]}, "loha")
    tensors["lora_unet_not_a_layer_to_q.hada_w1_a"] = torch.ones(4, 2)
    tensors["lora_unet_not_a_layer_to_q.hada_w1_b"] = torch.ones(2, 4)
    tensors["lora_unet_not_a_layer_to_q.hada_w2_a"] = torch.ones(4, 2)
    tensors["lora_unet_not_a_layer_to_q.hada_w2_b"] = torch.ones(2, 4)
    name = write_adapter(host, "tiny_loha_partial.safetensors", tensors, "loha")
    res, _ = run_recorded(executor, sampler_graph("tiny_sdxl", "LoadLoHa", name, record=""))
    report = res.outputs("2")[2]
    assert report.startswith("WARNING: 1 of 3 modules match nothing")
    assert "lora_unet_not_a_layer_to_q" in report.splitlines()[0]
    assert res.ui["2"]["text"][0].startswith("WARNING")


def _error_run(executor, name: str, loader: str = "LoadLyCORIS"):
    graph = sampler_graph("tiny_sdxl", loader, name, record="")
    res = executor.run(graph)
    assert not res.ok and res.execution_error is not None
    assert res.execution_error["node_id"] == "2"
    base_model = res.outputs("1")[0]
    assert base_model.patches == {}                                  # the input is untouched
    return res.execution_error["exception_message"]


def test_file_of_other_architecture_is_a_ui_error(host, executor, fixtures_dir, tiny):
    shutil.copyfile(fixtures_dir / "anima_loha_blocks.safetensors",
                    loras_dir(host) / "anima_on_sdxl.safetensors")
    msg = _error_run(executor, "anima_on_sdxl.safetensors")
    assert "none of its 1 modules matches" in msg and "anima_on_sdxl.safetensors" in msg
    assert "looks like anima" in msg


def test_corrupt_file_is_a_ui_error(host, executor, tiny):
    name, _ = _file(host, tiny, "loha", UNET_KEYS, "tiny_loha_unet.safetensors")
    data = (loras_dir(host) / name).read_bytes()
    (loras_dir(host) / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    msg = _error_run(executor, "truncated.safetensors")
    assert "truncated.safetensors" in msg and "truncated" in msg.split("safetensors", 1)[1]


def test_nan_in_a_factor_is_a_ui_error_naming_the_key(host, executor, tiny):
    tensors, _ = make_adapter({k: tiny["shapes"][k] for k in UNET_KEYS[:2]}, "loha", seed=9)
    bad = next(k for k in tensors if k.endswith("hada_w2_b"))
    tensors[bad][0, 1] = float("nan")
    name = write_adapter(host, "tiny_loha_nan.safetensors", tensors, "loha")
    msg = _error_run(executor, name)
    assert "NaN or Inf" in msg and bad in msg


def test_wrong_algorithm_is_refused_naming_it(host, executor, tiny):
    name, _ = _file(host, tiny, "lokr", UNET_KEYS, "tiny_lokr_unet.safetensors")
    msg = _error_run(executor, name, loader="LoadLoHa")
    assert "LoadLoHa loads LoHa files only" in msg and "holds 5 LoKr modules" in msg
    name, _ = _file(host, tiny, "loha", UNET_KEYS, "tiny_loha_unet.safetensors")
    msg = _error_run(executor, name, loader="LoadLoKr")
    assert "LoadLoKr loads LoKr files only" in msg and "holds 5 LoHa modules" in msg


def test_repeated_loads_hit_the_cache_until_the_file_changes(host, tiny):
    patching = host.pack.nodes.patching
    name, _ = _file(host, tiny, "loha", UNET_KEYS, "tiny_loha_cache.safetensors")
    path = str(loras_dir(host) / name)
    patching.clear_cache()
    first, hit1 = patching.cached_adapter(path)
    second, hit2 = patching.cached_adapter(path)
    assert (hit1, hit2) == (False, True) and first is second
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third, hit3 = patching.cached_adapter(path)
    assert not hit3 and third is not first
