"""Ops without an autograd formula on the training path, and their differentiable twins.

Found by tracing, not by trial: one training step of the real TrainLyCORIS code runs under a
`TorchDispatchMode` that records every op dispatched (forward and backward, with gradient
checkpointing the recomputation too) and whether a tensor argument needs a gradient; each op on
the gradient path is then looked up in torch's dispatcher (a custom op's registered backward, an
Autograd / CompositeImplicitAutograd kernel otherwise), and the autograd graph of every loss is
walked for nodes that can only raise (`NotImplemented`, errors, custom ops without backward).
Models: tiny SDXL (UNet; CLIP-L + CLIP-G when the text encoders train) and the tiny Anima (DiT
with its LLM adapter trained; Qwen3), in float32 and in bf16 autocast with gradient checkpointing.

On current ComfyUI the only such op is comfy-kitchen's `rms_rope_split_half` (Anima's / Cosmos'
self-attention); `nodes/train_ops.differentiable_ops` gives the whole comfy-kitchen rope family a
differentiable twin while training. The tests below prove the twins give the fused ops' values on
the shapes these models use, their gradients match finite differences and an independent
formula, inference after training is bit-identical, and everything is restored after a normal
end, an error and a Cancel.
"""

from __future__ import annotations

import inspect
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_train_graph import DEFAULTS, TEST_DATA, data_node  # noqa: F401  (fixtures)
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.usefixtures("one_thread", "data_node")  # fixtures of test_train_graph

CAPTIONS = ["a red cube on a wooden table by the window", "a blue sphere in the grass"]
AUTOGRAD_KEYS = ("Autograd", "AutogradCPU", "AutogradOther", "CompositeImplicitAutograd")


def _pack(module: str):
    import comfy_host

    return sys.modules[f"{comfy_host.PACK_MODULE}.nodes.{module}"]


def has_formula(op: torch._ops.OpOverload) -> bool:
    """Whether autograd can differentiate `op`: a custom op (`torch.library.custom_op`) needs a
    registered backward; any other op an Autograd or CompositeImplicitAutograd kernel."""
    from torch._library.custom_ops import _maybe_get_opdef

    opdef = _maybe_get_opdef(op)
    if opdef is not None:
        return opdef._backward_fn is not None
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), k) for k in AUTOGRAD_KEYS)


class OpTrace(TorchDispatchMode):
    """Every op dispatched while active; `on_grad_path`: those with a tensor argument that
    requires grad (what autograd records and the backward runs through)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.on_grad_path: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[func] += 1
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in leaves):
            self.on_grad_path[func] += 1
        return func(*args, **kwargs)

    def without_formula(self) -> set[str]:
        return {op.name() for op in self.on_grad_path if not has_formula(op)}


def raising_nodes(loss: torch.Tensor) -> set[str]:
    """Autograd graph nodes of `loss` that cannot compute a gradient."""
    seen, todo, bad = set(), [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if "NotImplemented" in name or "Error" in name:
            bad.add(name)
        if name.startswith("GeneratedBackwardFor_"):
            ns_op = name[len("GeneratedBackwardFor_"):]
            opdef = next((d for q, d in _opdefs() if ns_op.startswith(q.replace("::", "_"))), None)
            if opdef is None or opdef._backward_fn is None:
                bad.add(name)
        todo += [n for n, _ in node.next_functions]
    return bad


def _opdefs():
    from torch._library.custom_ops import OPDEFS

    return list(OPDEFS.items())


def _models(kind: str, te: bool):
    from host_nodes import models

    with torch.inference_mode():  # as a ComfyUI loader node makes them
        if kind == "sdxl":
            return models.sdxl_model("tiny", 0), models.sdxl_clip(0) if te else None
        return models.dit_model("tiny", 0), models.anima_clip(0) if te else None


def train_once(kind: str, te: bool, precision: str, trace: OpTrace, monkeypatch, **over):
    """One real TrainLyCORIS step (`nodes.train.train`) under `trace`; returns the graph nodes
    of every loss that cannot compute a gradient."""
    train, data = _pack("train"), _pack("train_data")
    model, clip = _models(kind, te)
    lat, cond = TEST_DATA["sdxl" if kind == "sdxl" else "dit"]()
    bad: set[str] = set()
    call = data.Objective.__call__

    def objective(self, idx):
        loss = call(self, idx)
        bad.update(raising_nodes(loss))
        return loss
    monkeypatch.setattr(data.Objective, "__call__", objective)
    opts = {**DEFAULTS, "steps": 1, "batch_size": 2, "train_llm_adapter": True,
            "training_dtype": precision, "gradient_checkpointing": precision == "bf16",
            "output_name": f"lycoris/trace_{kind}", **over}
    with trace:
        train.train(model, [lat], None if te else [cond], opts, clip=clip,
                    captions=CAPTIONS if te else None)
    return bad


def expected_without_twins(kind: str) -> set[str]:
    import comfy_host

    # measured: Anima's (and Cosmos') self-attention calls the fused rms_rope_split_half at
    # every forward since comfy-kitchen; nothing else on SDXL's or Anima's training path
    return {"comfy_kitchen::rms_rope_split_half"} if comfy_host.CURRENT and kind == "dit" else set()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: autocast + gradient checkpointing
@pytest.mark.parametrize("te", [False, True], ids=["model", "with_te"])
@pytest.mark.parametrize("kind", ["sdxl", "dit"])
def test_ops_without_autograd_on_the_training_path(host, monkeypatch, kind, te, precision):
    ops = _pack("train_ops")
    # 1. without the twins: what fails, and only that
    bare = OpTrace()
    with monkeypatch.context() as m:
        m.setattr(ops, "substitutes", lambda: [])
        want = expected_without_twins(kind)
        if want:
            with pytest.raises(RuntimeError, match="no autograd formula was registered"):
                train_once(kind, te, precision, bare, m)
        else:
            assert train_once(kind, te, precision, bare, m) == set()
    assert len(bare.on_grad_path) > 20  # the trace saw the model's forward
    assert bare.without_formula() == want, sorted(bare.without_formula())
    assert {n.split("::")[1] for n in want} <= set(ops.KITCHEN_OPS)
    # 2. with them (the node's own code path): no op without formula, the backward runs
    traced = OpTrace()
    assert train_once(kind, te, precision, traced, monkeypatch) == set()
    assert traced.without_formula() == set(), sorted(traced.without_formula())
    # the fused ops never see a tensor that needs a gradient: their twins ran instead
    assert not {op.name() for op in traced.on_grad_path} & want
    assert {op.name() for op in bare.on_grad_path} >= want


# --- the twins ---------------------------------------------------------------------------------

def kitchen():
    import comfy_host

    if not comfy_host.CURRENT:
        pytest.skip("ComfyUI 0.3.75 has no comfy-kitchen ops (nothing to substitute)")
    import comfy_kitchen
    import comfy_kitchen.backends.eager as eager

    return comfy_kitchen, eager


def test_every_kitchen_op_lacks_autograd_and_has_a_twin(host):
    """The twin table is still needed (no formula registered) and each twin takes the public
    function's arguments."""
    ck, eager = kitchen()
    ops = _pack("train_ops")
    assert [name for _, name, _ in ops.substitutes()] == list(ops.KITCHEN_OPS)
    for name in ops.KITCHEN_OPS:
        op = getattr(torch.ops.comfy_kitchen, name).default
        assert not has_formula(op), f"comfy_kitchen::{name} has a backward now"
        public, twin = inspect.signature(getattr(ck, name)), inspect.signature(getattr(eager, name))
        assert [(p.name, p.default) for p in public.parameters.values()] == \
               [(p.name, p.default) for p in twin.parameters.values()], name


def recorded_calls(variant: str) -> list[tuple]:
    """The arguments of every `rms_rope_split_half` call of one Anima sampling step."""
    import comfy.sample
    import comfy_kitchen as ck
    from host_nodes import models

    fused, calls = ck.rms_rope_split_half, []

    def spy(*args):
        calls.append(tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
        return fused(*args)
    model = models.dit_model(variant, 0)
    g = torch.Generator().manual_seed(0)
    cond = [models.dit_conditioning(g)]
    latent = torch.zeros(1, 16, 1, 8, 8)
    ck.rms_rope_split_half = spy
    try:
        with torch.inference_mode():
            comfy.sample.sample(model, torch.randn(latent.shape, generator=g), 1, 1.0, "euler",
                                "normal", cond, cond, latent, disable_pbar=True, seed=0)
    finally:
        ck.rms_rope_split_half = fused
    assert calls
    return calls


def _synthetic(name: str, dtype=torch.float32) -> tuple:
    """Arguments of the rope family in the layouts ComfyUI passes them: (B, S, H, D) with a
    rotation per pair, 2×2 matrices (B, S, 1, D/2, 2, 2)."""
    g = torch.Generator().manual_seed(len(name))
    q, k = (torch.randn(1, 16, 4, 32, generator=g, dtype=dtype) for _ in range(2))
    angle = torch.rand(1, 16, 1, 16, generator=g, dtype=torch.float64) * 6.3
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1),
                       torch.stack([angle.sin(), angle.cos()], -1)], -2).to(dtype)
    scale = 1.0 + 0.1 * torch.randn(32, generator=g, dtype=dtype)
    one = name.endswith("1")
    if name.startswith("rms_rope"):
        return (q, rot, scale, 1e-6) if one else (q, k, rot, scale, scale * 0.9, 1e-6)
    return (q, rot) if one else (q, k, rot)


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_twins_give_the_fused_values(host, autocast):
    """Bit for bit: the twin and the fused op on every call of a tiny and a golden (real-width)
    Anima sampling step, and the whole family on synthetic shapes, in float32 and under bf16
    autocast with bf16 activations (as training runs them)."""
    ck, _ = kitchen()
    twins = {name: twin for _, name, twin in _pack("train_ops").substitutes()}
    cases = [("rms_rope_split_half", args) for v in ("tiny", "golden") for args in recorded_calls(v)]
    cases += [(name, _synthetic(name)) for name in twins]
    for name, args in cases:
        if autocast:
            args = tuple(a.bfloat16() if isinstance(a, torch.Tensor) and a.dim() <= 4 else a
                         for a in args)
        ctx = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)
        with ctx:
            fused, twin = _as_tuple(getattr(ck, name)(*args)), _as_tuple(twins[name](*args))
        assert len(fused) == len(twin)
        for a, b in zip(fused, twin, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b), name


def independent_rms_rope_split_half(x, rot, scale, eps):
    """RMS norm over the head dim, then each pair (x_i, x_{i+D/2}) rotated by its 2×2 matrix,
    written from the definition (float64 here)."""
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    r = rot.squeeze(-3) if rot.dim() == x.dim() + 2 else rot
    r = r.reshape(r.shape[0], r.shape[1], 1, half, 2, 2)
    return torch.cat([r[..., 0, 0] * a + r[..., 0, 1] * b, r[..., 1, 0] * a + r[..., 1, 1] * b], -1)


def test_twin_gradients_match_finite_differences_and_an_independent_formula(host):
    """The routed op (what training calls) against finite differences (`gradcheck`, float64)
    and against autograd through the independent formula above, on a slice of a real tiny
    Anima call; its forward equals the independent formula too."""
    kitchen()
    ops = _pack("train_ops")
    import comfy_kitchen as ck

    q, k, rot, qs, ks, eps = recorded_calls("tiny")[0]
    q, k = q[:, :3].double(), k[:, :3].double()        # 3 tokens, 4 heads, 16 channels
    rot, qs, ks = rot[:, :3].double(), qs.double(), ks.double()
    g = torch.Generator().manual_seed(3)
    qs, ks = qs + 0.1 * torch.randn(qs.shape, generator=g, dtype=qs.dtype), ks * 1.1
    leaves = [t.clone().requires_grad_() for t in (q, k, qs, ks)]
    routed = ops.routed(ck.rms_rope_split_half, ops.substitutes()[-2][2])
    assert ops.substitutes()[-2][1] == "rms_rope_split_half"

    def f(q_, k_, qs_, ks_):
        return routed(q_, k_, rot, qs_, ks_, eps)
    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-8, rtol=1e-6)
    out = f(*leaves)
    ref = (independent_rms_rope_split_half(leaves[0], rot, leaves[2], eps),
           independent_rms_rope_split_half(leaves[1], rot, leaves[3], eps))
    w = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in out]
    for o, r in zip(out, ref, strict=True):
        assert (o - r).abs().max() < 1e-12
    mine = torch.autograd.grad(sum((o * wi).sum() for o, wi in zip(out, w, strict=True)), leaves)
    theirs = torch.autograd.grad(sum((r * wi).sum() for r, wi in zip(ref, w, strict=True)), leaves)
    for a, b in zip(mine, theirs, strict=True):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()
    calls = []
    spy = ops.routed(lambda *a: calls.append("fused") or ck.rms_rope_split_half(*a),
                     lambda *a: calls.append("twin") or routed(*a))
    with torch.no_grad():  # no gradient recorded: the fused op itself runs
        spy(*(t.float() for t in (q, k, rot, leaves[2].detach(), leaves[3].detach())), eps)
    spy(*(t.float() for t in (q, k, rot)), leaves[2].float(), leaves[3].detach().float(), eps)
    assert calls == ["fused", "twin"]


# --- only while training, restored after ------------------------------------------------------

def _state():
    """(module, attribute, current object) of everything the context manager may replace."""
    import comfy.model_management as mm

    ops = _pack("train_ops")
    out = [(m, n, getattr(m, n)) for m, n, _ in ops.substitutes()]
    if hasattr(mm, "in_training"):
        out.append((mm, "in_training", mm.in_training))
    return out


def assert_restored(before):
    for module, name, value in before:
        assert getattr(module, name) is value, f"{module.__name__}.{name} not restored"


def _sample_graph(kind: str) -> dict:
    model = {"sdxl": "tiny_sdxl", "dit": "tiny_anima"}[kind]
    latent = ({"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                            "batch_size": 1}}
              if kind == "sdxl" else
              {"class_type": "EmptyCosmosLatentVideo", "inputs": {"width": 64, "height": 64,
                                                                  "length": 1, "batch_size": 1}})
    return {
        "1": {"class_type": "LycorisTestModel", "inputs": {"kind": model, "seed": 0}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cube", "clip": ["1", 1]}},
        "3": latent,
        "4": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0], "latent_image": ["3", 0],
            "seed": 5, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "5": {"class_type": "LycorisTestSink", "inputs": {"latent": ["4", 0]}},
    }


def _sample_direct(model, kind: str) -> torch.Tensor:
    """Two sampler steps on `model` (ComfyUI's `comfy.sample.sample`), the training set's first
    conditioning, fixed seed."""
    import comfy.model_management as mm
    import comfy.sample

    lat, cond = TEST_DATA["sdxl" if kind == "sdxl" else "dit"]()
    latent = torch.zeros_like(lat["samples"][:1])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        out = comfy.sample.sample(model, noise, 2, 2.0, "euler", "normal", [cond[0]], [cond[1]],
                                  latent, disable_pbar=True, seed=7)
    mm.unload_all_models()
    return out


@pytest.mark.parametrize("kind", ["sdxl", "dit"])
def test_inference_after_training_is_bit_identical(host, monkeypatch, kind):
    """Same graph, same seed: the sampler's output after a TrainLyCORIS run equals the one
    before, bit for bit; the fused ops are the host's own again and run at inference. Also on
    the very model object the trainer was given."""
    import comfy_host
    from test_train_graph import graph as train_graph

    before_state = _state()
    model, _ = _models(kind, False)
    first_direct = _sample_direct(model, kind)
    lat, cond = TEST_DATA["sdxl" if kind == "sdxl" else "dit"]()
    with torch.inference_mode():
        _pack("train").train(model, [lat], [cond], {**DEFAULTS, "steps": 2,
                                                    "output_name": f"lycoris/same_{kind}"})
    assert_restored(before_state)
    assert torch.equal(_sample_direct(model, kind), first_direct)

    def sample():
        res = comfy_host.Executor(host).run(_sample_graph(kind))
        assert res.ok, (res.node_errors, res.execution_error)
        return res.outputs("4")[0]["samples"].clone()
    first = sample()
    res = comfy_host.Executor(host).run(train_graph(kind, steps=2, output_name=f"lycoris/inf_{kind}"))
    assert res.ok, (res.node_errors, res.execution_error)
    assert_restored(before_state)
    trace = OpTrace()
    with trace:
        second = sample()
    assert torch.equal(first, second)
    fused = {op.name() for op in trace.ops if op.namespace == "comfy_kitchen"}
    assert fused == ({"comfy_kitchen::rms_rope_split_half"} if comfy_host.CURRENT and kind == "dit"
                     else set())


def test_twins_only_while_training_and_restored_after_an_error(host, monkeypatch):
    kitchen()
    import comfy.model_management as mm
    import comfy_host
    import comfy_kitchen as ck

    loop = sys.modules[comfy_host.PACK_MODULE + ".lycoris_core.train.loop"]
    before, fused = _state(), ck.rms_rope_split_half
    seen = {}

    def failing_step(self):
        seen["routed"] = ck.rms_rope_split_half is not fused
        seen["wrapped"] = getattr(ck.rms_rope_split_half, "__wrapped__", None) is fused
        seen["in_training"] = mm.in_training
        raise RuntimeError("boom inside training")
    monkeypatch.setattr(loop.Trainer, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="boom inside training"):
        train_once("dit", False, "fp32", OpTrace(), monkeypatch)
    assert seen == {"routed": True, "wrapped": True, "in_training": True}
    assert_restored(before)
    assert mm.in_training is False


def test_twins_restored_after_cancel(host, executor):
    kitchen()
    import comfy.model_management as mm
    import comfy_kitchen as ck
    from test_train_graph import graph as train_graph
    from test_train_graph import run_cancelled

    before, fused, seen = _state(), ck.rms_rope_split_half, []
    res, step = run_cancelled(executor, train_graph("dit", steps=30, output_name="lycoris/cancel_ops"),
                              2, watch=lambda: seen.append(ck.rms_rope_split_half is not fused
                                                           and mm.in_training))
    assert not res.ok and seen and all(seen) and step < 30
    assert_restored(before)
    out = Path(host.base_dir) / "output" / "lycoris"
    assert len(sorted(out.glob(f"cancel_ops_*step{step:06d}.safetensors"))) == 1
