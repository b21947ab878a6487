"""lycoris_core.convert without ComfyUI: round trips, hashes, failures, folders, CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_convert_factors import (
    adapted_weights,
    comfy_name,
    make_adapter,
    mixed_folder,
    same_bytes,
    sd_name,
)

from lycoris_core import AdapterError, load_adapter, manifest, save_safetensors
from lycoris_core.cli import main as cli_main
from lycoris_core.convert import (
    convert_file,
    convert_folder,
    convert_tensors,
    format_report,
    sdscripts_hashes,
)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """safetensors' own reader (independent of the code under test), in one pass."""
    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def golden_cases(fixtures: Path) -> dict:
    return json.loads((fixtures / "index.json").read_text())["cases"]


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    bad = [k for k in a if not same_bytes(a[k], b[k])]
    assert not bad, f"tensors differ: {bad[:5]}"


def file_digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# --- golden files --------------------------------------------------------------------------

def test_round_trip_every_golden_file(fixtures_dir, tmp_path):
    """sd-scripts → ComfyUI → sd-scripts: names, dtypes and bytes identical; metadata identical
    (so the recomputed hash fields equal the ones sd-scripts / LyCORIS wrote)."""
    cases = golden_cases(fixtures_dir)
    assert len(cases) >= 8
    for case, info in cases.items():
        src = fixtures_dir / info["files"]["adapter"]["file"]
        before = file_digest(src)
        mid, back = tmp_path / f"{case}.comfy.safetensors", tmp_path / f"{case}.sd.safetensors"
        r1 = convert_file(src, mid, to="comfyui")
        assert r1.status == "converted", (case, r1.reason)
        assert r1.architecture == info["arch"]
        r2 = convert_file(mid, back, to="sd-scripts")
        assert r2.status == "converted", (case, r2.reason)
        t0, m0 = load_tensors(src)
        t1, m1 = load_tensors(mid)
        t2, m2 = load_tensors(back)
        assert_identical(t0, t2)
        assert m2 == m0, case
        # the middle file: ComfyUI names of exactly the layers the fixture says, same bytes
        for mod in info["modules"]:
            want = comfy_name(mod["comfyui_key"])
            for key, t in t0.items():
                if key.startswith(mod["lora_name"] + "."):
                    assert same_bytes(t1[want + key[len(mod["lora_name"]):]], t)
        assert all(k.startswith(("diffusion_model.", "text_encoders.")) for k in t1)
        assert file_digest(src) == before  # the input is never touched


def test_sdscripts_hashes_reproduce_the_golden_files(fixtures_dir):
    """Recomputed hashes equal what sd-scripts (sshs_*) and LyCORIS ('0x' form) stored."""
    checked = 0
    for info in golden_cases(fixtures_dir).values():
        tensors, meta = load_tensors(fixtures_dir / info["files"]["adapter"]["file"])
        model_hash, legacy = sdscripts_hashes(tensors, meta)
        stored = meta["sshs_model_hash"]
        assert stored.removeprefix("0x") == model_hash
        if "sshs_legacy_hash" in meta:
            assert meta["sshs_legacy_hash"] == legacy
        checked += 1
    assert checked >= 8


def test_hash_reads_tensor_data_and_only_ss_metadata():
    t = {"lora_unet_a.alpha": torch.tensor(1.0), "lora_unet_a.lora_up.weight": torch.ones(2, 2)}
    h = sdscripts_hashes(t, {"ss_network_dim": "2"})
    assert sdscripts_hashes(t, {"ss_network_dim": "2", "modelspec.title": "x"}) == h
    renamed = {k.replace("_a.", "_b."): v for k, v in t.items()}
    big = {"lora_unet_a.lora_up.weight":  # > 1 MiB: the legacy hash reads bytes at 1 MiB
           torch.randn(600, 600, generator=torch.Generator().manual_seed(0))}
    assert sdscripts_hashes(renamed, {})[0] == sdscripts_hashes(t, {})[0]  # data identical
    assert sdscripts_hashes(big, {})[1] != "e3b0c442"
    assert sdscripts_hashes(big, {"ss_x": "1"})[1] != sdscripts_hashes(big, {})[1]


# --- every module of Anima and SDXL --------------------------------------------------------

@pytest.mark.parametrize("arch", ["anima", "sdxl"])
def test_round_trip_every_module(arch, tmp_path):
    """A file with one module on every adaptable weight of the real model (Anima: DiT blocks
    incl. adaln_modulation_*, t_embedder, x_embedder, final_layer, llm_adapter, Qwen3 TE; SDXL:
    UNet, CLIP-L, CLIP-G) converts to exactly the expected ComfyUI names and back, bit for bit."""
    weights = adapted_weights(manifest(arch))
    tensors = make_adapter(weights, dora_every=7)
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "2", "modelspec.title": arch}
    src = save_safetensors(tensors, tmp_path / "src.safetensors", meta)
    mid, back = tmp_path / "comfy.safetensors", tmp_path / "back.safetensors"
    r1 = convert_file(src, mid, to="comfyui", target=arch)
    assert (r1.status, r1.reason, r1.modules, r1.renamed) == ("converted", "", len(weights),
                                                              len(weights))
    t1, m1 = load_tensors(mid)
    expected = {comfy_name(k) + key[len(sd_name(k)):]: key
                for k in weights for key in tensors if key.startswith(sd_name(k) + ".")}
    assert sorted(t1) == sorted(expected)
    assert all(same_bytes(t1[new], tensors[old]) for new, old in expected.items())
    assert m1 == meta  # no hash fields before, none added for ComfyUI naming
    r2 = convert_file(mid, back, to="sd-scripts", target="auto")
    assert r2.status == "converted" and r2.architecture == arch
    t2, m2 = load_tensors(back)
    assert_identical(tensors, t2)
    assert (m2["sshs_model_hash"], m2["sshs_legacy_hash"]) == sdscripts_hashes(t2, m2)
    assert {k: v for k, v in m2.items() if not k.startswith("sshs_")} == meta


def test_anima_names_that_string_rules_get_wrong():
    """The names sd-scripts' own Anima converter mangles come out as the real layer paths."""
    pairs = {
        "lora_unet_blocks_3_adaln_modulation_self_attn_1": "diffusion_model.blocks.3.adaln_modulation_self_attn.1",
        "lora_unet_blocks_0_adaln_modulation_cross_attn_2": "diffusion_model.blocks.0.adaln_modulation_cross_attn.2",
        "lora_unet_t_embedder_1_linear_1": "diffusion_model.t_embedder.1.linear_1",
        "lora_unet_x_embedder_proj_1": "diffusion_model.x_embedder.proj.1",
        "lora_unet_final_layer_adaln_modulation_1": "diffusion_model.final_layer.adaln_modulation.1",
        "lora_unet_llm_adapter_blocks_0_self_attn_o_proj": "diffusion_model.llm_adapter.blocks.0.self_attn.o_proj",
        "lora_unet_blocks_27_mlp_layer2": "diffusion_model.blocks.27.mlp.layer2",
        "lora_te_layers_3_mlp_down_proj": "text_encoders.qwen3_06b.transformer.model.layers.3.mlp.down_proj",
        "lora_te_layers_0_self_attn_o_proj": "text_encoders.qwen3_06b.transformer.model.layers.0.self_attn.o_proj",
    }
    m = manifest("anima")
    tensors = {}
    g = torch.Generator().manual_seed(1)
    for sd, comfy in pairs.items():
        out_dim, in_dim = m[comfy.removeprefix("text_encoders.") + ".weight"]
        tensors[f"{sd}.lora_down.weight"] = torch.randn(2, in_dim, generator=g)
        tensors[f"{sd}.lora_up.weight"] = torch.randn(out_dim, 2, generator=g)
    out, _, plan = convert_tensors(tensors, {}, to="comfyui")
    assert plan.architecture == "anima"
    assert plan.module_renames == pairs
    assert sorted(out) == sorted(f"{c}.{s}" for c in pairs.values() for s in
                                 ("lora_down.weight", "lora_up.weight"))


def test_lycoris_te1_spelling_of_anima_te_converts():
    """lycoris.kohya names Anima's Qwen3 `lora_te1_` (SPEC §5, item 10); both map to one layer."""
    shape = manifest("anima")["qwen3_06b.transformer.model.layers.0.mlp.up_proj.weight"]
    t = {"lora_te1_layers_0_mlp_up_proj.lora_down.weight": torch.zeros(1, shape[1]),
         "lora_te1_layers_0_mlp_up_proj.lora_up.weight": torch.zeros(shape[0], 1)}
    out, _, _ = convert_tensors(t, {}, to="comfyui", target="anima")
    assert sorted(out) == ["text_encoders.qwen3_06b.transformer.model.layers.0.mlp.up_proj.lora_down.weight",
                           "text_encoders.qwen3_06b.transformer.model.layers.0.mlp.up_proj.lora_up.weight"]
    back, _, _ = convert_tensors(out, {}, to="sd-scripts", target="anima")
    assert sorted(back) == ["lora_te_layers_0_mlp_up_proj.lora_down.weight",
                            "lora_te_layers_0_mlp_up_proj.lora_up.weight"]


def test_trainer_file_to_sdscripts_keeps_diff_tensors():
    """ComfyUI trainer layout: ComfyUI names, no metadata, `.diff` / `.diff_b` full differences."""
    weights = manifest("sdxl")
    lin = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    norm = "diffusion_model.input_blocks.4.1.transformer_blocks.0.norm1"
    ff = "diffusion_model.input_blocks.4.1.transformer_blocks.0.ff.net.2"
    o, i = weights[lin + ".weight"]
    t = {f"{lin}.lora_up.weight": torch.randn(o, 1).bfloat16(),
         f"{lin}.lora_down.weight": torch.randn(1, i).bfloat16(),
         f"{lin}.alpha": torch.tensor(1.0),
         f"{norm}.diff": torch.randn(weights[norm + ".weight"]),
         f"{ff}.hada_w1_a": torch.randn(weights[ff + ".weight"][0], 1),
         f"{ff}.hada_w1_b": torch.randn(1, weights[ff + ".weight"][1]),
         f"{ff}.hada_w2_a": torch.randn(weights[ff + ".weight"][0], 1),
         f"{ff}.hada_w2_b": torch.randn(1, weights[ff + ".weight"][1]),
         f"{ff}.diff_b": torch.randn(weights[ff + ".weight"][0])}
    out, meta, plan = convert_tensors(t, {}, to="sd-scripts", source="comfyui-trainer")
    assert plan.extras == 2
    sd = "lora_unet_input_blocks_4_1_transformer_blocks_0_"
    assert sorted(out) == sorted([f"{sd}attn1_to_q.lora_up.weight", f"{sd}attn1_to_q.lora_down.weight",
                                  f"{sd}attn1_to_q.alpha", f"{sd}norm1.diff",
                                  *(f"{sd}ff_net_2.hada_w{h}_{x}" for h in (1, 2) for x in "ab"),
                                  f"{sd}ff_net_2.diff_b"])
    assert same_bytes(out[f"{sd}attn1_to_q.lora_up.weight"], t[f"{lin}.lora_up.weight"])
    assert same_bytes(out[f"{sd}norm1.diff"], t[f"{norm}.diff"])
    assert set(meta) == {"sshs_model_hash", "sshs_legacy_hash"}
    back, _, _ = convert_tensors(out, meta, to="comfyui")
    assert_identical(back, t)


# --- what is refused -----------------------------------------------------------------------

def _golden(fixtures_dir: Path, name: str = "loha_linear") -> Path:
    return fixtures_dir / f"{name}.safetensors"


def test_unresolvable_name_fails_and_writes_nothing(fixtures_dir, tmp_path):
    t, m = load_tensors(_golden(fixtures_dir))
    bad = {k.replace("input_blocks_4_1", "input_blocks_4_7"): v for k, v in t.items()}
    src = save_safetensors(bad, tmp_path / "bad.safetensors", m)
    r = convert_file(src, tmp_path / "out.safetensors", to="comfyui", target="sdxl")
    assert r.status == "failed" and "match no single sdxl layer" in r.reason
    assert "lora_unet_input_blocks_4_7_transformer_blocks_0_attn1_to_q" in r.reason
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(AdapterError, match="input_blocks_4_7"):
        convert_tensors(bad, m, to="comfyui", target="sdxl")


def test_layer_of_the_wrong_shape_fails(fixtures_dir):
    """A name that exists but whose factors cannot patch that layer is refused, not renamed."""
    t, m = load_tensors(_golden(fixtures_dir, "anima_loha_blocks"))
    wrong = {k.replace("adaln_modulation_cross_attn_1", "self_attn_q_proj"): v for k, v in t.items()}
    with pytest.raises(AdapterError, match=r"change, the layer weight is \[2048, 2048\]"):
        convert_tensors(wrong, m, to="comfyui", target="anima")


def test_unknown_suffix_and_wrong_source_naming_fail(fixtures_dir):
    t, m = load_tensors(_golden(fixtures_dir))
    extra = dict(t, **{"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.scalar":
                       torch.tensor(1.0)})
    with pytest.raises(AdapterError, match="unknown suffix"):
        convert_tensors(extra, m, to="comfyui")
    with pytest.raises(AdapterError, match="sd-scripts naming, not the comfyui naming"):
        convert_tensors(t, m, to="comfyui", source="comfyui")


def test_same_spelling_twice_fails(fixtures_dir):
    t, m = load_tensors(_golden(fixtures_dir))
    comfy, _, _ = convert_tensors(t, m, to="comfyui")
    with pytest.raises(AdapterError, match="both patch"):
        convert_tensors({**t, **comfy}, m, to="comfyui")


def test_never_writes_over_input_or_existing_file(fixtures_dir, tmp_path):
    src = tmp_path / "a.safetensors"
    shutil.copy(_golden(fixtures_dir), src)
    before = file_digest(src)
    r = convert_file(src, src, to="comfyui")
    assert r.status == "failed" and "refusing to overwrite an input" in r.reason
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    r = convert_file(src, existing, to="comfyui")
    assert r.status == "failed" and "exists" in r.reason
    assert existing.read_bytes() == b"keep me" and file_digest(src) == before


def test_dry_run_and_already_converted(fixtures_dir, tmp_path):
    dst = tmp_path / "out.safetensors"
    r = convert_file(_golden(fixtures_dir), dst, to="comfyui", dry_run=True)
    assert (r.status, r.output, r.renamed) == ("converted", str(dst), 1) and not dst.exists()
    r = convert_file(_golden(fixtures_dir), tmp_path / "x.safetensors", to="sd-scripts")
    assert (r.status, r.reason) == ("skipped", "already in sd-scripts naming")
    assert not (tmp_path / "x.safetensors").exists()


# --- folders and CLI -----------------------------------------------------------------------

def test_folder_of_good_and_broken_files(fixtures_dir, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    expected = mixed_folder(fixtures_dir, src)
    digests = {p: file_digest(p) for p in src.rglob("*") if p.is_file()}
    seen = []
    flat = convert_folder(src, out, to="comfyui", progress=lambda d, n: seen.append((d, n)))
    assert {Path(r.source).relative_to(src).as_posix(): r.status for r in flat} == \
        {k: v for k, v in expected.items() if "/" not in k}
    assert seen == [(i, 6) for i in range(1, 7)]
    shutil.rmtree(out)
    reports = convert_folder(src, out, to="comfyui", recursive=True)
    got = {Path(r.source).relative_to(src).as_posix(): r for r in reports}
    assert {k: r.status for k, r in got.items()} == expected
    assert "truncated" in got["truncated.safetensors"].reason
    assert "not valid JSON" in got["garbage.safetensors"].reason
    assert "lora_unet_outptu" in got["unknown_names.safetensors"].reason
    assert "pickled" in got["pickle.pt"].reason
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == ["good_sdxl.safetensors", "sub/good_anima.safetensors"]
    for rel in written:
        t_in, _ = load_tensors(src / rel)
        t_out, _ = load_tensors(out / rel)
        assert sorted(t_out) != sorted(t_in) and len(t_out) == len(t_in)
    assert {p: file_digest(p) for p in src.rglob("*") if p.is_file()} == digests
    text = format_report(reports, [src, out])
    assert "total: 7 file(s): 2 converted, 2 skipped, 3 failed" in text
    assert "converted: good_sdxl.safetensors -> good_sdxl.safetensors (sdxl" in text


def test_folder_output_inside_input_is_not_rescanned(fixtures_dir, tmp_path):
    src = tmp_path / "in"
    mixed_folder(fixtures_dir, src)
    out = src / "converted"
    convert_folder(src, out, to="comfyui", recursive=True)
    again = convert_folder(src, out, to="comfyui", recursive=True)
    assert all("converted/" not in Path(r.source).relative_to(src).as_posix() for r in again)
    assert [r.status for r in again].count("failed") == 5  # 3 broken + 2 outputs now exist


def test_cli_convert(fixtures_dir, tmp_path, capsys):
    src = tmp_path / "in"
    mixed_folder(fixtures_dir, src)
    rc = cli_main(["convert", str(src), "-o", str(tmp_path / "dry"), "--to", "comfyui", "-r",
                   "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 1 and "would convert" in out and "dry run: nothing written" in out
    assert not (tmp_path / "dry").exists()
    one = tmp_path / "one.safetensors"
    rc = cli_main(["convert", str(_golden(fixtures_dir, "anima_loha_blocks")), "-o", str(one),
                   "--to", "comfyui", "--arch", "anima"])
    assert rc == 0 and "1 converted" in capsys.readouterr().out
    back = tmp_path / "back.safetensors"
    rc = cli_main(["convert", str(one), "-o", str(back), "--to", "sd-scripts", "--from", "comfyui"])
    assert rc == 0
    assert_identical(load_tensors(back)[0], load_tensors(_golden(fixtures_dir, "anima_loha_blocks"))[0])
    assert load_adapter(back).metadata == load_adapter(_golden(fixtures_dir, "anima_loha_blocks")).metadata
