"""Bad adapter files in a real ComfyUI graph: a visible execution error naming the file (and key),
the model left unpatched, nothing written, and the SAME executor then serves a good file exactly.
"""

from __future__ import annotations

import hashlib
import re

import bad_inputs as bi
import pytest
import torch
from helpers import rel_err
from safetensors.torch import save_file
from test_loaders_common import loras_dir, make_adapter, run_recorded, sampler_graph

import lycoris_core as lc

TOL = 1e-5  # relative on the change; a 1 % wrong scale or a wrong formula is far outside
STRENGTH = 0.8


def _folder_state(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def tiny(host):
    """Two UNet weight keys of the tiny SDXL model and their shapes."""
    import comfy_host

    res = comfy_host.Executor(host).run({
        "1": {"class_type": "LycorisTestModel", "inputs": {"kind": "tiny_sdxl", "seed": 0}},
        "9": {"class_type": "LycorisTestSink", "inputs": {"model": ["1", 0]}}})
    assert res.ok, res.execution_error
    sd = res.outputs("1")[0].model.state_dict()
    keys = [k for k in sd if k.endswith(("attn1.to_q.weight", "attn2.to_v.weight"))][:2]
    assert len(keys) == 2
    return {k: tuple(sd[k].shape) for k in keys}


def _bad_files(tiny: dict[str, tuple[int, ...]], folder) -> list[tuple[str, str | None, str]]:
    """(lora_name, key the error must name or None, regex) for bad files written to `folder`."""
    good, _ = make_adapter(tiny, "loha", seed=3)
    (k1, s1), _ = tiny.items()
    mod1 = next(n.rsplit(".", 1)[0] for n in good if n.endswith("hada_w1_a"))
    out: list[tuple[str, str | None, str]] = []

    def put(name: str, tensors: dict, key: str | None, match: str) -> None:
        save_file(tensors, str(folder / name))
        out.append((name, key, match))

    raw = bi._bytes_of(good)
    (folder / "rel_truncated.safetensors").write_bytes(raw[: len(raw) - 100])
    out.append(("rel_truncated.safetensors", None, "truncated"))
    (folder / "rel_huge_header.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    out.append(("rel_huge_header.safetensors", None, "header length"))
    nan = dict(good)
    nan[f"{mod1}.hada_w2_b"] = nan[f"{mod1}.hada_w2_b"].clone()
    nan[f"{mod1}.hada_w2_b"][0, 1] = float("nan")
    put("rel_nan.safetensors", nan, f"{mod1}.hada_w2_b", "NaN or Inf")
    wrong = dict(good)
    wrong[f"{mod1}.hada_w1_b"] = torch.zeros(4, s1[1] + 1)
    wrong[f"{mod1}.hada_w2_b"] = torch.zeros(4, s1[1] + 1)
    put("rel_shape.safetensors", wrong, mod1, "change, the layer weight is")
    put("rel_other_arch.safetensors", bi.loha(bi.ANIMA_MOD, o=64, i=64), None, "none of its 1 modules")
    comfy_spelling = {k.replace(mod1, k1[: -len(".weight")]): v.clone() for k, v in good.items() if k.startswith(mod1)}
    put("rel_two_spellings.safetensors", {**good, **comfy_spelling}, mod1, "two spellings")
    put("rel_alpha_only.safetensors", {f"{mod1}.alpha": torch.tensor(1.0)}, f"{mod1}.alpha", "no factor")
    bi.pickle_file(folder / "rel_evil.pt", zipped=True)
    out.append(("rel_evil.pt", None, "pickle"))
    return out


def test_bad_files_fail_visibly_then_good_file_is_exact(host, executor, tiny):
    loras = loras_dir(host)
    scratch = loras / "reliability"
    scratch.mkdir(exist_ok=True)
    bad = [(f"reliability/{n}", k, m) for n, k, m in _bad_files(tiny, scratch)]
    good_tensors, oracle = make_adapter(tiny, "loha", seed=3)
    lc.save_safetensors(good_tensors, scratch / "rel_good.safetensors")
    keys = ",".join(tiny)

    base_res, base_records = run_recorded(executor, sampler_graph("tiny_sdxl", None, record=keys))
    model = base_res.outputs("1")[0]
    base_w = {k: v.detach().clone() for k, v in model.model.state_dict().items() if k in tiny}
    before_loras, before_out = _folder_state(loras), _folder_state(host.base_dir / "output")

    for lora_name, key, match in bad:
        res = executor.run(sampler_graph("tiny_sdxl", "LoadLyCORIS", lora_name, STRENGTH, record=keys))
        assert not res.ok, lora_name
        err = res.execution_error
        assert err is not None and err["node_id"] == "2", (lora_name, res.node_errors)
        msg = err["exception_message"]
        assert "AdapterError" in err["exception_type"], (lora_name, err["exception_type"], msg)
        assert lora_name.rsplit("/", 1)[-1] in msg, msg
        assert key is None or key in msg, (key, msg)
        assert re.search(match, msg), (match, msg)
        # the (cached) input model is untouched: no patches, same weights
        assert model.patches == {} and model is executor.cached_output("1").outputs[0][0]
        sd = model.model.state_dict()
        assert all(torch.equal(sd[k], base_w[k]) for k in tiny)
    assert not (scratch / bi.PICKLE_MARKER).exists()
    assert _folder_state(loras) == before_loras and _folder_state(host.base_dir / "output") == before_out

    res, records = run_recorded(executor, sampler_graph(
        "tiny_sdxl", "LoadLyCORIS", "reliability/rel_good.safetensors", STRENGTH, record=keys))
    assert len(records) == len(base_records) >= 2
    for rec, base in zip(records, base_records, strict=True):
        for key, dw in oracle.items():
            assert rel_err(rec[key].double() - base[key].double(), STRENGTH * dw) < TOL, key
    assert "matched: 2 of 2 modules" in res.outputs("2")[2]
    assert model.patches == {}  # the loader patched a clone


def test_fixed_file_under_the_same_name_is_reloaded(host, executor, tiny):
    """A file that failed, then was repaired in place (atomic replace), works on the next prompt:
    neither the failure nor the bad content is cached."""
    scratch = loras_dir(host) / "reliability"
    scratch.mkdir(exist_ok=True)
    name = "rel_repaired.safetensors"
    good_tensors, oracle = make_adapter(tiny, "loha", seed=5)
    nan = {k: v.clone() for k, v in good_tensors.items()}
    first = next(k for k in nan if k.endswith("hada_w1_a"))
    nan[first][0, 0] = float("inf")
    path = scratch / name
    if path.exists():
        path.unlink()
    lc.save_safetensors(nan, path)
    keys = ",".join(tiny)
    res = executor.run(sampler_graph("tiny_sdxl", "LoadLyCORIS", f"reliability/{name}", 1.0, record=keys))
    assert not res.ok and first in res.execution_error["exception_message"]
    lc.save_safetensors(good_tensors, path, overwrite=True)
    _, base_records = run_recorded(executor, sampler_graph("tiny_sdxl", None, record=keys))
    _, records = run_recorded(executor, sampler_graph("tiny_sdxl", "LoadLyCORIS", f"reliability/{name}", 1.0,
                                                      record=keys))
    for rec, base in zip(records, base_records, strict=True):
        for key, dw in oracle.items():
            assert rel_err(rec[key].double() - base[key].double(), dw) < TOL, key


def test_overflow_found_at_sampling_leaves_base_model_clean(host, executor, tiny):
    """Finite factors whose ΔW overflows float32 can only be found when ΔW is built (ComfyUI loads
    the model for the sampler): that prompt fails naming file and key, and the next prompt's base
    model has exactly its old weights (no half-applied patch survives the failure)."""
    scratch = loras_dir(host) / "reliability"
    scratch.mkdir(exist_ok=True)
    tensors, _ = make_adapter(tiny, "loha", seed=7)
    bad_key = sorted(k for k in tensors if k.endswith("hada_w1_a"))[-1]
    for k in (bad_key, bad_key.replace("w1_a", "w2_a")):
        tensors[k] = torch.full_like(tensors[k], 1e30)
    path = scratch / "rel_overflow.safetensors"
    if not path.exists():
        lc.save_safetensors(tensors, path)
    keys = ",".join(tiny)
    _, before = run_recorded(executor, sampler_graph("tiny_sdxl", None, record=keys))
    res = executor.run(sampler_graph("tiny_sdxl", "LoadLyCORIS", "reliability/rel_overflow.safetensors", 1.0,
                                     record=keys))
    assert not res.ok
    msg = res.execution_error["exception_message"]
    assert "rel_overflow.safetensors" in msg and bad_key.rsplit(".", 1)[0] in msg and "overflow" in msg, msg
    _, after = run_recorded(executor, sampler_graph("tiny_sdxl", None, record=keys))
    for a, b in zip(after, before, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in tiny)
