"""Device placement and host synchronisation on the patch path, shown without an accelerator.

A tensor on `torch.device("meta")` has a shape, a dtype and a device but no data: every op that
only needs shapes works, and any read of a value on the host (`.item()`, `.cpu()`, `.tolist()`,
`bool(t)`, `float(t)`) raises. Running the pack's patch path on meta weights therefore shows on a
CPU machine that (1) every tensor a patch creates is on the weight's device (a factor left on the
CPU would meet a meta tensor and raise "expected all tensors to be on the same device"), and
(2) nothing on that path reads a value from the weight's device (a GPU would have to wait for its
queue there, once per layer). Covered: ΔW in row blocks and whole, the static patch
(`LycorisPatch` inside ComfyUI's own `comfy.lora.calculate_weight`), the bypass forward, and the
schedule's weight writes, for every golden case (LoHa flat/Tucker, LoKr full/decomposed/Tucker,
Anima blocks).

A second check counts host reads during a real patch by ComfyUI's ModelPatcher on the test device
(`LYCORIS_TEST_DEVICE`, CPU here): patching twice as many layers must not read more values.

DoRA included: its change W' − W0 depends on the base weight's values, but its size does not
(every entry of W' is at most max|m|, `AdapterModule.dora_may_overflow`), so it is not read back
either; the count test shows it, and a DoRA file that does overflow is still refused.
"""

from __future__ import annotations

import contextlib

import comfy_host
import goldens
import pytest
import torch
from safetensors.torch import load_file, save_file

import lycoris_core as lc
from lycoris_core.algos import buffers
from lycoris_core.algos.layer import LayerGeometry

META = torch.device("meta")
CASES = goldens.cases()


def _layers(case: str) -> list[tuple[object, str, tuple[int, ...]]]:
    """(module, ComfyUI key, full-size weight shape) of every module of a golden case."""
    adapter = lc.load_adapter(goldens.adapter_file(case))
    shapes = lc.manifest(goldens.arch(case))
    res = adapter.resolve(lc.KeyMap(shapes))
    assert res.matched, case
    return [(adapter.modules[n], k, tuple(shapes[k])) for n, k in res.matched.items()]


@pytest.fixture(scope="module")
def patching(host):
    return host.pack.nodes.patching


@pytest.mark.parametrize("case", CASES)
def test_delta_row_blocks_and_delta_on_meta(patching, case):
    for module, _, shape in _layers(case):
        if module.has_dora:  # whole rows: W' − W0 needs W0 (a meta one here)
            base = torch.empty(shape, dtype=torch.float32, device=META)
            change = module.delta(torch.float16, base=base)
            assert change.device == META and change.dtype == torch.float16
            assert tuple(change.shape) == shape
            continue
        blocks = list(patching.delta_row_blocks(module, shape, META, max_elements=1 << 14))
        assert blocks[0][0] == 0 and blocks[-1][1] == shape[0]
        assert all(r0 == prev for (r0, _, _), (_, prev, _) in zip(blocks[1:], blocks, strict=False))
        for r0, r1, dw in blocks:
            assert dw.device == META and dw.dtype == torch.float32
            assert tuple(dw.shape) == (r1 - r0, *shape[1:])
        whole = module.delta(torch.float16, shape=shape, device=META)
        assert whole.device == META and whole.dtype == torch.float16 and tuple(whole.shape) == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_static_patch_in_comfy_calculate_weight_on_meta(patching, case, dtype):
    """ComfyUI's own patch entry point (also what low-VRAM's on-the-fly LowVramPatch calls, with
    fp16/bf16 weights) with our patch object, on a meta weight."""
    import comfy.lora

    for module, key, shape in _layers(case):
        w = torch.empty(shape, dtype=dtype, device=META)
        patch = [(0.7, patching.LycorisPatch(module, key), 1.0, None, None)]
        out = comfy.lora.calculate_weight(patch, w, key, intermediate_dtype=dtype)
        assert out.device == META and out.dtype == dtype and tuple(out.shape) == shape


def _geometry(shape: tuple[int, ...]) -> LayerGeometry:
    if len(shape) == 2:
        return LayerGeometry.linear(*shape)
    return LayerGeometry.convolution(shape, padding=shape[2] // 2)


def _input(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if len(shape) == 2:
        return torch.empty(2, 7, shape[1], dtype=dtype, device=META)
    return torch.empty(2, shape[1], 8, 8, dtype=dtype, device=META)


@pytest.mark.parametrize("case", CASES)
def test_bypass_forward_on_meta(case):
    """The forward-time change for every module (DoRA with its output scale on the CPU, as the
    plan makes it), both LoHa strategies, fp16 and fp32 activations: factors and the DoRA scale
    are moved to the activation's device, the result has the layer's output shape and dtype."""
    for module, _, shape in _layers(case):
        geometry = _geometry(shape)
        dora = torch.rand(shape[0]) + 0.5 if module.has_dora else None
        strategies = ("khatri_rao", "dense") if module.algo == "loha" else (None,)
        for strategy in strategies:
            plan = module.bypass_plan(geometry, dora)
            plan.strategy = strategy
            for dtype in (torch.float16, torch.float32):
                x = _input(shape, dtype)
                out = torch.nn.functional.linear(x, torch.empty(shape, dtype=dtype, device=META)) \
                    if len(shape) == 2 else geometry.kernel_op(x, torch.empty(shape, dtype=dtype,
                                                                                device=META))
                y = plan.apply(x, out, 0.6, bias=torch.empty(shape[0], dtype=dtype, device=META))
                assert y.device == META and y.dtype == dtype and y.shape == out.shape
                y = plan.apply(x, out, 0.6, inplace=True)
                assert y is out
            assert {d.type for d in plan._factors} == {"meta"}  # nothing left on the CPU
            plan.release()
            assert not plan._factors and not plan._dora


@pytest.mark.parametrize("cache_delta", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_schedule_weight_writes_on_meta(patching, dtype, cache_delta):
    """The schedule's per-step writes W = W_base + s·ΔW (fast fp32 path and ComfyUI's rounding to
    fp16) and its restore, on a meta weight: no per-step host read."""
    from importlib import import_module

    scheduled = import_module(patching.__name__ + ".scheduled")
    for case in ("loha_conv_tucker", "lokr_full_w2", "anima_loha_blocks"):
        for module, key, shape in _layers(case)[:3]:
            param = torch.empty(shape, dtype=dtype, device=META)
            w = scheduled._Weight(key, param, param.detach().clone(), None, None)
            w.add_term(None, module, 0.8, cache_delta)
            if cache_delta:
                assert w.terms[0].delta.device == META
            for s in (0.8, 0.3, 0.0, 0.5):
                w.write((s,))
            w.restore()
            assert w.current is None


def test_huge_page_pool_serves_cpu_tensors_only():
    before = buffers.pool_stats()
    big = (4096, 4096)  # 64 MiB of float32: a pooled huge-page mapping on the CPU
    t = buffers.empty(big, torch.float32, META)
    assert t.device == META and tuple(t.shape) == big
    assert buffers.pool_stats()["fresh"] == before["fresh"]
    assert buffers.pool_stats()["reused"] == before["reused"]
    if buffers._HUGE_OK:
        c = buffers.empty(big, torch.float32, "cpu")
        after = buffers.pool_stats()
        assert c.device.type == "cpu"
        assert after["fresh"] + after["reused"] == before["fresh"] + before["reused"] + 1
        del c


# ------------------------------------------------------------------------------ host-read counts
_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_reads():
    """Count calls of the Tensor methods that read values on the host, by the tensor's device."""
    counts: dict[tuple[str, str], int] = {}
    saved = {n: getattr(torch.Tensor, n) for n in _READS}

    def wrap(name, fn):
        def reader(self, *args, **kwargs):
            key = (name, self.device.type)
            counts[key] = counts.get(key, 0) + 1
            return fn(self, *args, **kwargs)
        return reader

    for n, fn in saved.items():
        setattr(torch.Tensor, n, wrap(n, fn))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


def _file(tmp_path, layers: int, dora: bool = False, amp: float = 0.1):
    """A LoHa/LoKr/LoRA file over `layers` Linear (32 → 48) layers l0…, cycling the three
    algorithms; factors ~ N(0, amp²)."""
    g = torch.Generator().manual_seed(layers)
    t: dict[str, torch.Tensor] = {}
    for i in range(layers):
        m = f"l{i}"
        algo = ("loha", "lokr", "lora")[i % 3]
        if algo == "loha":
            for h in (1, 2):
                t[f"{m}.hada_w{h}_a"] = torch.randn(48, 4, generator=g) * amp
                t[f"{m}.hada_w{h}_b"] = torch.randn(4, 32, generator=g) * amp
        elif algo == "lokr":
            t[f"{m}.lokr_w1"] = torch.randn(4, 4, generator=g) * amp
            t[f"{m}.lokr_w2_a"] = torch.randn(12, 4, generator=g) * amp
            t[f"{m}.lokr_w2_b"] = torch.randn(4, 8, generator=g) * amp
        else:
            t[f"{m}.lora_up.weight"] = torch.randn(48, 4, generator=g) * amp
            t[f"{m}.lora_down.weight"] = torch.randn(4, 32, generator=g) * amp
        t[f"{m}.alpha"] = torch.tensor(2.0)
        if dora:
            t[f"{m}.dora_scale"] = torch.rand(48, 1, generator=g) + 0.5
    path = tmp_path / f"n{layers}{'_dora' * dora}_{amp}.safetensors"
    save_file(t, str(path))
    return path


def _patch_counts(patching, path, layers: int, device: torch.device) -> tuple[dict, float]:
    """Host reads while ComfyUI's ModelPatcher patches `layers` Linear layers on `device` with the
    file at `path` (read through the loaders' adapter cache), and the largest weight change."""
    from importlib import import_module

    import comfy.model_patcher

    static = import_module(patching.__name__ + ".static")
    adapter, _ = static.cached_adapter(str(path))
    root = torch.nn.Module()
    for i in range(layers):
        root.add_module(f"l{i}", torch.nn.Linear(32, 48, bias=False, device=device))
    before = {k: v.detach().clone() for k, v in root.state_dict().items()}
    patcher = comfy.model_patcher.ModelPatcher(root, load_device=device, offload_device=device)
    items = {f"l{i}.weight": (adapter.modules[f"l{i}"], 0.5) for i in range(layers)}
    static.add_lycoris_patches(patcher, items, str(path))
    with count_host_reads() as counts:
        patcher.patch_model(device_to=device)
    change = max(float((root.state_dict()[k] - before[k]).abs().max()) for k in before)
    patcher.unpatch_model(device_to=device)
    return dict(counts), change


def test_patch_path_host_reads_do_not_grow_with_layers(patching, tmp_path):
    device = comfy_host.DEVICE
    small, change_small = _patch_counts(patching, _file(tmp_path, 6), 6, device)
    large, change_large = _patch_counts(patching, _file(tmp_path, 24), 24, device)
    assert change_small > 1e-4 and change_large > 1e-4  # the weights really were patched
    assert large == small, f"host reads grew with the layer count: {small} → {large}"


def test_dora_patch_host_reads_do_not_grow_with_layers(patching, tmp_path):
    device = comfy_host.DEVICE
    small, change_small = _patch_counts(patching, _file(tmp_path, 6, dora=True), 6, device)
    large, change_large = _patch_counts(patching, _file(tmp_path, 24, dora=True), 24, device)
    assert change_small > 1e-4 and change_large > 1e-4  # the weights really were patched
    assert large == small, f"DoRA host reads grew with the layer count: {small} → {large}"


@pytest.mark.parametrize("axis", [0, 1])
def test_dora_change_is_bounded_by_the_magnitude(axis):
    """What lets DoRA skip reading its change: every entry of W' = w·m/(‖w‖ + eps) is at most
    max|m|, whatever W0 and ΔW are (here up to 1e4 in size, one column of w exactly zero)."""
    from lycoris_core.algos.dora import apply_dora

    g = torch.Generator().manual_seed(3 + axis)
    for shape in ((48, 32), (16, 8, 3, 3)):
        w0 = torch.randn(shape, generator=g) * 1e4
        dw = torch.randn(shape, generator=g)
        if axis == 0:
            dw[0] = -w0[0]
            m = torch.rand(shape[0], 1, generator=g) * 3
        else:
            dw[:, 0] = -w0[:, 0]
            m = torch.rand(1, shape[1], generator=g) * 3
        out = apply_dora(w0, dw, m)
        assert torch.isfinite(out).all()
        assert float(out.abs().max()) <= float(m.abs().max()) * (1 + 1e-5)
        assert float(out.abs().max()) > 0.1 * float(m.abs().max())  # near the bound, not slack


def test_dora_overflow_is_still_refused(patching, tmp_path):
    """A magnitude whose ratio m/eps can reach float32's range is checked: the patch raises the
    pack's error naming the file."""
    path = _file(tmp_path, 3, dora=True)
    tensors = load_file(str(path))
    tensors["l1.dora_scale"] = torch.full((48, 1), 3e38)
    bad = tmp_path / "dora_huge.safetensors"
    save_file(tensors, str(bad))
    with pytest.raises(Exception, match=r"dora_huge\.safetensors.*'l1'.*overflows") as info:
        _patch_counts(patching, bad, 3, comfy_host.DEVICE)
    assert type(info.value).__name__ == "AdapterError"  # the pack's own (loaded by ComfyUI)


@pytest.mark.parametrize("layers", [6, 24])
def test_low_vram_partial_load_patches_on_the_fly(patching, tmp_path, layers):
    """ComfyUI's low-VRAM mode: a partially loaded model keeps its fp16 weights unpatched and
    each layer's forward patches a cast copy on the fly (`LowVramPatch` → our patch, fp32 sums).
    Outputs equal x·(W0 + s·ΔW)ᵀ (ΔW in float64 by lycoris_core) to fp16 rounding, the stored
    weights are never written, and the forwards of 24 layers read no more host values than
    those of 6 (the patch runs in every forward: a per-layer read would show)."""
    from importlib import import_module

    import comfy.model_patcher
    import comfy.ops

    static = import_module(patching.__name__ + ".static")
    device, s = comfy_host.DEVICE, 0.5
    path = _file(tmp_path, layers, amp=0.5)
    adapter, _ = static.cached_adapter(str(path))
    g = torch.Generator().manual_seed(7)
    root = torch.nn.Module()
    for i in range(layers):
        layer = comfy.ops.disable_weight_init.Linear(32, 48, bias=False, dtype=torch.float16)
        layer.weight = torch.nn.Parameter((0.1 * torch.randn(48, 32, generator=g)).half(),
                                          requires_grad=False)
        root.add_module(f"l{i}", layer)
    w0 = {k: v.detach().clone() for k, v in root.state_dict().items()}
    patcher = comfy.model_patcher.ModelPatcher(root, load_device=device,
                                               offload_device=torch.device("cpu"))
    static.add_lycoris_patches(patcher, {f"l{i}.weight": (adapter.modules[f"l{i}"], s)
                                         for i in range(layers)}, str(path))
    x = torch.randn(5, 32, generator=g).half()
    patcher.load(device, lowvram_model_memory=1)  # nothing fits: every layer is low-VRAM
    try:
        on_the_fly = [type(f).__name__ for i in range(layers)
                      for f in getattr(root.get_submodule(f"l{i}"), "weight_function", [])]
        assert on_the_fly == ["LowVramPatch"] * layers
        with torch.inference_mode(), count_host_reads() as counts:
            ys = [root.get_submodule(f"l{i}")(x.to(device)) for i in range(layers)]
        for i, y in enumerate(ys):
            key = f"l{i}.weight"
            assert y.dtype == torch.float16 and y.device.type == device.type
            assert torch.equal(root.state_dict()[key].cpu(), w0[key])  # never written
            dw = adapter.modules[f"l{i}"].delta(torch.float64, shape=(48, 32))
            want_change = x.double() @ (s * dw).T
            got_change = y.cpu().double() - x.double() @ w0[key].double().T
            # fp16: the patched weight and the output are each rounded once (≈ 1e-3 relative)
            assert float((got_change - want_change).abs().max()) < 0.02 * float(want_change.abs().max())
    finally:
        patcher.unpatch_model(torch.device("cpu"))
    _LOW_VRAM_READS[layers] = dict(counts)
    if len(_LOW_VRAM_READS) == 2:
        assert _LOW_VRAM_READS[24] == _LOW_VRAM_READS[6], _LOW_VRAM_READS


_LOW_VRAM_READS: dict[int, dict] = {}
