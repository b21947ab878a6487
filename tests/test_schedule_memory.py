"""LyCORISStrengthSchedule's settings (cache_delta off = the default, on; mode patch / bypass):
the same bits as the loader at constant strength in each, the weights restored bit for bit after
an error and after a Cancel, strength changes written a row block at a time with the loader's
arithmetic, and the extra memory the node reports computed from the connected model.
"""

from __future__ import annotations

import goldens
import pytest
import torch
from safetensors.torch import save_file
from test_loaders_common import loras_dir, make_adapter, run_recorded
from test_loaders_tiny import UNET_KEYS
from test_schedule_host import THREE_KEYFRAMES, _graph, tiny  # noqa: F401  (fixture, through `sched`)

import lycoris_core as lc

SETTINGS = [(False, "patch"), (True, "patch"), (False, "bypass"), (True, "bypass")]


@pytest.fixture(scope="module")
def sched(request):
    """test_schedule_host's `tiny`: adapter files for the tiny SDXL, its base weights."""
    return request.getfixturevalue("tiny")


def _loader(name: str, mode: str) -> dict:
    return {"class_type": "LoadLyCORIS", "inputs": {"lora_name": name, "strength_model": 0.7,
                                                    "block_weights": "", "mode": mode}}


@pytest.mark.parametrize("cache_delta,mode", SETTINGS)
def test_constant_schedule_equals_the_loader_in_every_setting(host, executor, sched, cache_delta, mode):
    """Constant schedule = LoadLyCORIS at the same strength in the same mode: the same latent and
    the same weights at every model call, bit for bit (patch: the loader's written weights;
    bypass: base weights at every call in both)."""
    name, _ = sched["files"]["lokr"]
    rec = ",".join(UNET_KEYS)
    res_l, rec_l = run_recorded(executor, _graph(None, record=rec, steps=4, loader=_loader(name, mode)))
    res_s, rec_s = run_recorded(executor, _graph(
        {"lora_name": name, "strength_model": 0.7, "cache_delta": cache_delta, "mode": mode},
        record=rec, steps=4))
    assert torch.equal(res_s.outputs("6")[0]["samples"], res_l.outputs("6")[0]["samples"])
    assert len(rec_s) == len(rec_l) == 4
    for a, b in zip(rec_s, rec_l, strict=True):
        for key in UNET_KEYS:
            assert torch.equal(a[key], b[key]), key
    changed = not torch.equal(rec_s[0][UNET_KEYS[0]], sched["base"][UNET_KEYS[0]])
    assert changed == (mode == "patch")
    base = run_recorded(executor, _graph(None, record=rec, steps=4))[0].outputs("6")[0]["samples"]
    assert not torch.equal(base, res_s.outputs("6")[0]["samples"])  # the adapter acts at all


class _CancelAt(list):
    """RECORDS that raises ComfyUI's interrupt (what Cancel raises) at the n-th model call, after
    the schedule has written that call's weights."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def append(self, item) -> None:
        super().append(item)
        if len(self) >= self.n:
            import comfy.model_management

            raise comfy.model_management.InterruptProcessingException()


def _host_nodes():
    import sys

    return next(m for n, m in sys.modules.items() if n.endswith("host_nodes") and hasattr(m, "RECORDS"))


def _assert_base_model_clean(executor, sched, failed) -> None:
    """The base model the failed prompt sampled (node 1's cached output, whose weights the
    schedule wrote in place) holds the base weights bit for bit, and the next prompt on the same
    executor samples with them."""
    sd = failed.outputs("1")[0].model.state_dict()
    for key in UNET_KEYS:
        assert torch.equal(sd[key], sched["base"][key]), key
    _, after = run_recorded(executor, _graph(None, record=",".join(UNET_KEYS), steps=2))
    for rec in after:
        for key in UNET_KEYS:
            assert torch.equal(rec[key], sched["base"][key]), key


@pytest.mark.parametrize("cache_delta,mode", SETTINGS[:3])
def test_cancel_restores_the_weights(host, executor, sched, monkeypatch, cache_delta, mode):
    """Cancel at the 3rd model call of a 10-step linear schedule (the strength changes every
    step): the run stops, and the base model is bit for bit the base afterwards."""
    name, deltas = sched["files"]["loha"]
    cancel = _CancelAt(3)
    monkeypatch.setattr(_host_nodes(), "RECORDS", cancel)
    res = executor.run(_graph({"lora_name": name, "schedule": THREE_KEYFRAMES, "cache_delta": cache_delta,
                               "mode": mode}, record=",".join(UNET_KEYS)))
    assert not res.ok and len(cancel) == 3
    key = UNET_KEYS[0]
    written = [not torch.equal(r[key], sched["base"][key]) for r in cancel]
    assert written == [mode == "patch"] * 3  # the weights were really written when cancelled
    monkeypatch.undo()
    _assert_base_model_clean(executor, sched, res)


@pytest.mark.parametrize("cache_delta", [False, True])
def test_error_while_writing_restores_the_weights(host, executor, sched, cache_delta):
    """ΔW of the last module overflows float32 (finite factors, found only when ΔW is built):
    the prompt fails naming the file and the module, after the weights before it were written;
    the base model is bit for bit the base afterwards."""
    shapes = {k: tuple(sched["base"][k].shape) for k in UNET_KEYS}
    tensors, _ = make_adapter(shapes, "loha", seed=7)
    bad = sorted(k for k in tensors if k.endswith("hada_w1_a"))[-1]
    for k in (bad, bad.replace("w1_a", "w2_a")):
        tensors[k] = torch.full_like(tensors[k], 1e30)
    path = loras_dir(host) / "sched_overflow.safetensors"
    if not path.exists():
        lc.save_safetensors(tensors, path)
    res = executor.run(_graph({"lora_name": path.name, "schedule": THREE_KEYFRAMES,
                               "cache_delta": cache_delta}, record=",".join(UNET_KEYS)))
    assert not res.ok
    msg = res.execution_error["exception_message"]
    assert "sched_overflow.safetensors" in msg and bad.rsplit(".", 1)[0] in msg and "overflow" in msg, msg
    _assert_base_model_clean(executor, sched, res)


def _module_and_base(host, fixtures_dir, case: str, dtype: torch.dtype):
    pt = host.pack.nodes.patching
    adapter, _ = pt.cached_adapter(str(fixtures_dir / f"{case}.safetensors"))
    (module,) = adapter.modules.values()
    (key, dw), = goldens.expected(case).items()
    w0 = goldens.base_weights(case).get(key)
    w0 = 0.02 * torch.randn(dw.shape, generator=torch.Generator().manual_seed(0)) if w0 is None else w0
    return module, key, w0.to(dtype)


@pytest.mark.parametrize("case", ["lokr_linear_default_factor", "loha_conv_tucker", "lyco_loha_dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cache_delta", [False, True])
def test_row_blocks_give_the_loaders_bits(host, fixtures_dir, monkeypatch, case, dtype, cache_delta):
    """With row blocks of 64 values (many blocks per weight; the loader's blocks made as small,
    since a ΔW block's GEMM may round differently at another block size), every write after
    several strength changes equals, bit for bit, ComfyUI's patcher on the loader's patch at that
    strength (fp32 copy, LycorisPatch, ComfyUI's rounding); restore gives the base back."""
    import comfy.float
    import comfy.model_patcher

    sp, pt = host.pack.nodes.patching.scheduled, host.pack.nodes.patching
    assert sp.ROW_BLOCK_ELEMENTS == pt.static.CHUNK_ELEMENTS  # the loader's blocks, as shipped
    blocks_of = pt.static.delta_row_blocks
    for mod in (sp, pt.static):
        monkeypatch.setattr(mod, "delta_row_blocks",
                            lambda m, shape, device, max_elements=64: blocks_of(m, shape, device, 64))
    monkeypatch.setattr(sp, "ROW_BLOCK_ELEMENTS", 64)
    module, key, w0 = _module_and_base(host, fixtures_dir, case, dtype)

    def loader(s: float) -> torch.Tensor:
        temp = w0.to(torch.float32, copy=True)
        temp = pt.LycorisPatch(module, key).calculate_weight(temp, key, s, 1.0, None, None)
        return comfy.float.stochastic_rounding(temp, dtype, seed=comfy.model_patcher.string_to_seed(key))

    w = sp._Weight(key, w0.clone(), w0.clone(), None, None)
    w.add_term(None, module, 0.8, cache_delta)
    assert w._blocked() == (cache_delta or not module.has_dora)
    blocks = list(w._term_blocks(w.terms[0], 1.0, w0.device))
    assert len(blocks) > 1 or module.has_dora  # the test really splits the weight
    for s in (1.0, 0.25, 0.0, 1.3, -0.5):
        w.write((0.8 * s,))
        assert torch.equal(w.param, loader(0.8 * s)), s
    w.restore()
    assert torch.equal(w.param, w0)


@pytest.mark.parametrize("cache_delta", [False, True])
def test_a_write_that_fails_half_way_is_restored(host, tmp_path, monkeypatch, cache_delta):
    """ΔW overflows only in the last rows: without the cache the first row blocks are already
    written when the error comes; restore() still gives W_base bit for bit (the weight is
    marked dirty before its first byte is written). With the cache the error comes before."""
    sp, pt = host.pack.nodes.patching.scheduled, host.pack.nodes.patching
    monkeypatch.setattr(sp, "ROW_BLOCK_ELEMENTS", 64)
    key = "diffusion_model.x.weight"
    tensors, _ = make_adapter({key: (32, 16)}, "loha", seed=2, module_names=lambda k: "lora_unet_x")
    for k in ("lora_unet_x.hada_w1_a", "lora_unet_x.hada_w2_a"):
        tensors[k][-1] = 1e30
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "half.safetensors"))
    adapter, _ = pt.cached_adapter(str(tmp_path / "half.safetensors"))
    (module,) = adapter.modules.values()
    w0 = 0.02 * torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    w = sp._Weight(key, w0.clone(), w0.clone(), None, None)
    with pytest.raises(sp.AdapterError, match="overflow"):  # the pack's own class
        w.add_term(None, module, 1.0, cache_delta)
        w.write((1.0,))
    if not cache_delta:
        assert not torch.equal(w.param, w0)  # the first blocks were written
    w.restore()
    assert torch.equal(w.param, w0)


def test_report_shows_the_extra_memory(host, executor, sched):
    """The node's report: W_base of the scheduled weights in their dtype (+ one row block), and
    the float32 ΔW the cache would add, computed from the connected model's weights."""
    name, _ = sched["files"]["lokr"]
    sd = sched["model"].model.state_dict()
    base = sum(sd[k].numel() * sd[k].element_size() for k in UNET_KEYS)
    delta = sum(sd[k].numel() * 4 for k in UNET_KEYS)
    for cache_delta in (False, True):
        res = executor.run(_graph({"lora_name": name, "cache_delta": cache_delta}))
        assert res.ok, res.execution_error
        (text,) = res.ui["2"]["text"]
        assert f"{len(UNET_KEYS)} weights scheduled" in text
        if cache_delta:
            assert f"+{(base + delta) / 1e6:.1f} MB while sampling" in text, text
        else:
            assert f"W_base {base / 1e6:.1f} MB" in text and f"would add {delta / 1e6:.1f} MB" in text, text
    res = executor.run(_graph({"lora_name": name, "mode": "bypass"}))
    (text,) = res.ui["2"]["text"]
    assert f"bypass: {len(UNET_KEYS)} weights hooked" in text and "W_base" not in text, text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_memory_counts_each_weights_dtype(host, fixtures_dir, dtype):
    """`ScheduledAdapter.memory` on a model holding the weight in `dtype`: W_base at the dtype's
    size, ΔW at 4 bytes per parameter (cache on), one row block of float32 ΔW + the W_base rows
    (cache off)."""
    import comfy.model_patcher

    from lycoris_core.schedule import parse_schedule

    sp = host.pack.nodes.patching.scheduled
    module, key, w0 = _module_and_base(host, fixtures_dir, "lokr_linear_default_factor", dtype)
    root = torch.nn.Module()
    root.register_parameter("w", torch.nn.Parameter(w0, requires_grad=False))
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(root, load_device=cpu, offload_device=cpu)
    n, size = w0.numel(), w0.element_size()
    for cache in (False, True):
        m = sp.ScheduledAdapter({"w": (module, 1.0)}, parse_schedule("constant"), cache_delta=cache).memory(patcher)
        assert (m.weights, m.base_bytes, m.delta_bytes) == (1, n * size, n * 4)
        assert m.block_bytes == n * (4 + size)  # this small weight is one row block
        assert m.extra_bytes == n * size + (n * 4 if cache else n * (4 + size))
