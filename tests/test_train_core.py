"""lycoris_core.train without ComfyUI: targets vs sd-scripts, gradients vs finite differences,
saved files vs the pack's loader, LoKr bypass, resume equivalence."""

from __future__ import annotations

import goldens
import pytest
import torch
from torch import nn

from lycoris_core import adapter_from_tensors, load_adapter, manifest
from lycoris_core.train import checkpoint as ckpt
from lycoris_core.train.loop import TrainConfig, Trainer, lr_lambda
from lycoris_core.train.modules import ConvArgs, LayerSpec, make_module
from lycoris_core.train.network import LycorisNetwork, NetworkConfig
from lycoris_core.train.targets import (
    TargetOptions,
    parse_kv,
    parse_pattern_list,
    targets_from_shapes,
)

# --- targets ------------------------------------------------------------------------------


def _expected(arch):
    fx = goldens.sdscripts_targets()
    return {n: (v["module"], v["kind"], tuple(v["weight_shape"]), v["comfyui_key"])
            for n, v in fx[arch]["modules"].items()}


@pytest.mark.parametrize("arch,opts", [("sdxl", TargetOptions(conv_dim=4)),
                                       ("anima", TargetOptions(train_llm_adapter=True))])
def test_default_targets_equal_sdscripts(arch, opts):
    got = {t.lora_name: (t.path, t.kind, t.shape, t.model_key)
           for t in targets_from_shapes(manifest(arch), opts, arch)}
    exp = _expected(arch)
    assert len(got) == len(exp) == {"sdxl": 1052, "anima": 536}[arch]
    assert got == exp


def test_target_options_follow_sdscripts():
    sdxl = manifest("sdxl")
    plain = targets_from_shapes(sdxl, TargetOptions(), "sdxl")
    assert sum(not t.is_text_encoder for t in plain) == 722            # no conv_dim: no ResBlocks
    assert all(t.dim == 4 and t.alpha == 1.0 for t in plain)
    conv = targets_from_shapes(sdxl, TargetOptions(network_dim=8, conv_dim=2), "sdxl")
    k3 = [t for t in conv if t.kind == "conv3x3"]
    assert k3 and all(t.dim == 2 and t.alpha == 1.0 for t in k3)       # conv_alpha defaults to 1
    assert all(t.dim == 8 for t in conv if t.kind == "conv1x1")         # 1×1 convs get network_dim
    anima = manifest("anima")
    assert sum(not t.is_text_encoder for t in targets_from_shapes(anima, TargetOptions(), "anima")) == 280
    ex = TargetOptions(exclude_patterns=parse_pattern_list("['blocks\\\\.[0-9]\\\\..*', '.*mlp.*']"),
                       include_patterns=parse_pattern_list("['blocks\\\\.3\\\\.mlp\\\\.layer1']"),
                       reg_dims=parse_kv("blocks\\.1[0-9]\\..*=0,blocks\\.2.*=16,.*=6", int),
                       reg_lrs=parse_kv("blocks\\.27\\..*=0.5", float))
    sel = {t.path: t for t in targets_from_shapes(anima, ex, "anima") if not t.is_text_encoder}
    assert "blocks.3.mlp.layer1" in sel and "blocks.3.mlp.layer2" not in sel   # include rescues
    assert not any(p.startswith(("blocks.1", "blocks.5.")) and not p.startswith("blocks.2")
                   for p in sel if p.split(".")[1] in {str(i) for i in range(10, 20)})
    assert sel["blocks.21.self_attn.q_proj"].dim == 16 and sel["blocks.3.mlp.layer1"].dim == 6
    assert sel["blocks.27.cross_attn.k_proj"].lr == 0.5 and sel["blocks.21.self_attn.q_proj"].lr is None
    with pytest.raises(ValueError):
        parse_pattern_list("[__import__('os')]")


# --- modules: ΔW, gradients, saving ------------------------------------------------------------

CASES = {
    "loha_linear": ("loha", LayerSpec("linear", (6, 4)), 2, {}),
    "loha_conv1x1": ("loha", LayerSpec("conv", (6, 4, 1, 1)), 2, {}),
    "loha_conv_flat": ("loha", LayerSpec("conv", (6, 4, 3, 3)), 2, {}),
    "loha_tucker": ("loha", LayerSpec("conv", (6, 4, 3, 3)), 2, {"use_tucker": True}),
    "loha_scalar": ("loha", LayerSpec("linear", (6, 4)), 2, {"use_scalar": True}),
    "lokr_linear": ("lokr", LayerSpec("linear", (16, 36)), 1, {"factor": 4}),
    "lokr_full": ("lokr", LayerSpec("linear", (8, 12)), 4, {}),
    "lokr_decompose_both": ("lokr", LayerSpec("linear", (64, 64)), 1, {"factor": 8,
                                                                      "decompose_both": True}),
    "lokr_conv_flat": ("lokr", LayerSpec("conv", (16, 16, 3, 3)), 1, {"factor": 2}),
    "lokr_conv_tucker": ("lokr", LayerSpec("conv", (16, 16, 3, 3)), 1, {"factor": 2,
                                                                      "use_tucker": True}),
    "lokr_scalar": ("lokr", LayerSpec("linear", (16, 36)), 1, {"factor": 4, "use_scalar": True}),
}


def _module(case: str, dtype=torch.float64, perturb=True):
    algo, spec, rank, kw = CASES[case]
    torch.manual_seed(0)
    m = make_module(algo, "lora_unet_x", spec, rank, 2.0 * rank if algo == "loha" else 0.5 * rank, **kw)
    m = m.to(dtype)
    if perturb:  # leave the zero init, so that every factor has a non-trivial gradient
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return m


def _input(spec: LayerSpec, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    if spec.kind == "linear":
        return torch.randn(3, 5, spec.in_dim, generator=g, dtype=dtype)
    return torch.randn(2, spec.in_dim, 5, 5, generator=g, dtype=dtype)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_match_finite_differences(case):
    m = _module(case)
    x = _input(m.spec)
    conv = ConvArgs(padding=(1, 1)) if m.spec.kind == "conv" else None
    w = torch.randn_like(m.adapter_output(x, conv), generator=torch.Generator().manual_seed(2))

    def loss() -> torch.Tensor:
        return (m.adapter_output(x, conv) * w).sum()

    params = dict(m.named_parameters())
    assert {n for n in params if n.startswith(("hada_t", "lokr_t"))} or "tucker" not in case
    grads = torch.autograd.grad(loss(), list(params.values()))
    eps = 1e-6
    for (name, p), g in zip(params.items(), grads, strict=True):
        fd = torch.empty_like(p)
        flat, fdf = p.data.view(-1), fd.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            hi = loss().item()
            flat[i] = old - eps
            lo = loss().item()
            flat[i] = old
            fdf[i] = (hi - lo) / (2 * eps)
        err = (g - fd).abs().max() / fd.abs().max().clamp_min(1e-12)
        assert err < 1e-6, f"{case}.{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_tensors_reload_to_the_same_delta(case):
    m = _module(case)
    tensors = {f"lora_unet_x.{k}": v for k, v in m.saved_tensors().items()}
    assert not any(k.endswith("scalar") for k in tensors)
    loaded = adapter_from_tensors(tensors).modules["lora_unet_x"]
    ref = loaded.delta(torch.float64, shape=m.spec.shape)
    got = m.delta().detach()
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()
    # ΔW applied to activations (bypass or dense) equals the layer op with ΔW
    x = _input(m.spec)
    if m.spec.kind == "linear":
        want = torch.nn.functional.linear(x, ref)
        got_out = m.adapter_output(x)
    else:
        want = torch.nn.functional.conv2d(x, ref, padding=1)
        got_out = m.adapter_output(x, ConvArgs(padding=(1, 1)))
    assert (got_out - want).abs().max() <= 1e-10 * want.abs().max()


@pytest.mark.parametrize("case", sorted(CASES))
def test_initial_delta_is_zero_and_layout_follows_sdscripts(case):
    m = _module(case, perturb=False)
    assert torch.count_nonzero(m.delta().detach()) == 0
    names = set(m.saved_tensors())
    expect = {
        "loha_tucker": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
        "lokr_full": {"lokr_w1", "lokr_w2"},
        "lokr_decompose_both": {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"},
        "lokr_conv_tucker": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
    }.get(case)
    if expect:
        assert names == expect | {"alpha"}
    if case == "lokr_full":  # both halves full: sd-scripts stores alpha = R, scale 1
        assert m.saved_tensors()["alpha"].item() == 4 and m.scale == 1.0
    if case == "loha_tucker":
        assert tuple(m.hada_w1_a.shape) == (2, 6) and tuple(m.hada_t1.shape) == (2, 2, 3, 3)


def test_lokr_full_matrix_rule_and_factor():
    # 640 → (20, 32) at factor -1: R ≥ 16 gives a full w2
    low = make_module("lokr", "n", LayerSpec("linear", (640, 640)), 15, 1.0)
    full = make_module("lokr", "n", LayerSpec("linear", (640, 640)), 16, 1.0)
    assert not low.w2_full and full.w2_full
    assert tuple(low.lokr_w1.shape) == (20, 20) and tuple(low.lokr_w2_a.shape) == (32, 15)
    f4 = make_module("lokr", "n", LayerSpec("linear", (512, 512)), 4, 1.0, factor=4)
    assert tuple(f4.lokr_w1.shape) == (4, 4) and tuple(f4.lokr_w2_b.shape) == (4, 128)


def test_dropouts_follow_sdscripts():
    m = _module("loha_linear")
    m.rank_dropout = 0.5
    x = _input(m.spec)
    torch.manual_seed(0)
    y = m.adapter_output(x)
    full = torch.nn.functional.linear(x, m.delta())
    zero = (y.abs().amax(dim=(0, 1)) == 0)
    assert 0 < int(zero.sum()) < m.spec.out_dim             # whole output rows dropped
    kept = ~zero
    assert torch.allclose(y[..., kept], 2.0 * full[..., kept])  # rescaled by 1/(1-p)
    m.eval()
    assert torch.allclose(m.adapter_output(x), full)          # no dropout outside training
    m.train()
    m.rank_dropout, m.module_dropout = 0.0, 0.999
    assert m.adapter_output(x) is None


def test_lr_schedules():
    f = lr_lambda("cosine", 10, 110)
    assert f(0) == 0 and f(5) == 0.5 and f(10) == 1.0 and abs(f(60) - 0.5) < 1e-12 and f(110) == 0
    g = lr_lambda("linear", 0, 100)
    assert g(25) == 0.75
    assert lr_lambda("constant_with_warmup", 4, 100)(2) == 0.5


# --- network on a small torch model: loraplus, resume ------------------------------------------


class Tiny(nn.Module):
    """Names like ComfyUI's SDXL UNet, so that sd-scripts' target rules apply."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.diffusion_model = nn.Module()
        blk = nn.Module()
        blk.proj_in = nn.Linear(8, 16)
        blk.transformer_blocks = nn.ModuleList([nn.Linear(16, 16)])
        blk.proj_out = nn.Linear(16, 8)
        res = nn.Module()
        res.in_layers = nn.ModuleList([nn.Identity(), nn.Identity(), nn.Conv2d(2, 2, 3, padding=1)])
        self.diffusion_model.middle_block = nn.ModuleList([res, blk])

    def forward(self, x):
        res, blk = self.diffusion_model.middle_block
        h = res.in_layers[2](x.reshape(-1, 2, 2, 2)).reshape(x.shape)
        return blk.proj_out(blk.transformer_blocks[0](blk.proj_in(h)))


def _setup(algo="loha", steps=6, save_every=0, **netkw):
    model = Tiny().requires_grad_(False)
    cfg = NetworkConfig(algo, TargetOptions(network_dim=2, network_alpha=1.0, conv_dim=2),
                        rank_dropout=0.2, module_dropout=0.1, use_scalar=True, **netkw)
    torch.manual_seed(5)
    net = LycorisNetwork.for_model(model.named_modules(), cfg, "sdxl")
    net.attach(model.named_modules())
    X, Y = torch.randn(4, 8, generator=torch.Generator().manual_seed(7)), torch.zeros(4, 8)

    def loss_fn(idx):
        noise = 0.1 * torch.randn(len(idx), 8)
        return torch.nn.functional.mse_loss(model(X[idx] + noise), Y[idx] + 1.0)
    tc = TrainConfig(steps=steps, learning_rate=1e-2, lr_scheduler="cosine", lr_warmup_steps=2,
                     batch_size=2, grad_accumulation=2, seed=11, save_every=save_every)
    return net, Trainer(net, tc, loss_fn, 4)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_resume_equals_uninterrupted(tmp_path, algo):
    net_a, tr_a = _setup(algo)
    tr_a.run()
    saved = []
    net_b, tr_b = _setup(algo, save_every=3)
    tr_b.run(until=3, on_save=None)
    path = tmp_path / "half.safetensors"
    ckpt.save_checkpoint(tr_b, path, "sdxl")
    saved.append(path)
    net_c, tr_c = _setup(algo)
    assert ckpt.resume(tr_c, path) is True and tr_c.step == 3
    tr_c.run()
    a, c = net_a.named_trainables(), net_c.named_trainables()
    assert set(a) == set(c) and all(torch.equal(a[k], c[k]) for k in a)
    assert tr_a.losses == tr_c.losses
    # and it really trained something / differs from a non-resumed restart
    net_d, tr_d = _setup(algo)
    tr_d.run(until=3)
    assert not all(torch.equal(a[k], net_d.named_trainables()[k]) for k in a)
    # the file itself is a normal sd-scripts adapter
    ad = load_adapter(path)
    assert ad.metadata["ss_network_module"] == f"networks.{algo}" and ad.metadata["ss_steps"] == "3"
    with pytest.raises(FileExistsError):
        ckpt.save_checkpoint(tr_c, path, "sdxl")


def _with_sampler(trainer):
    """sd-scripts epochs on the 4 items: buckets a, a, b, b with repeats 2, 1, 1, 3 and batch 2
    give 2 + 2 = 4 micro-batches per epoch, 2 optimizer steps (2 micro-batches each)."""
    from lycoris_core.train.dataset import EpochSampler

    trainer.sampler = EpochSampler(["a", "a", "b", "b"], [2, 1, 1, 3], 2, seed=3)
    return trainer.sampler


def test_resume_mid_epoch_equals_uninterrupted(tmp_path):
    net_a, tr_a = _setup("loha")
    _with_sampler(tr_a)
    seen: list[list[int]] = []
    loss_fn = tr_a.loss_fn
    tr_a.loss_fn = lambda idx: (seen.append(list(idx)), loss_fn(idx))[1]
    tr_a.run()
    assert tr_a.sampler.state()["epoch"] == 3 and len(seen) == 12
    for e in range(3):  # every epoch: each item × its repeats, one bucket per batch
        ep = seen[4 * e: 4 * e + 4]
        assert sorted(i for b in ep for i in b) == [0, 0, 1, 2, 3, 3, 3]
        assert all(len({i // 2 for i in b}) == 1 for b in ep)
    net_b, tr_b = _setup("loha")
    _with_sampler(tr_b)
    tr_b.run(until=3)  # 6 micro-batches: mid-way through the second epoch
    assert tr_b.sampler.state()["epoch"] == 1 and tr_b.sampler.state()["position"] == 2
    path = tmp_path / "mid.safetensors"
    ckpt.save_checkpoint(tr_b, path, "sdxl")
    net_c, tr_c = _setup("loha")
    _with_sampler(tr_c)
    assert ckpt.resume(tr_c, path) is True and tr_c.sampler.state()["position"] == 2
    tr_c.run()
    a, c = net_a.named_trainables(), net_c.named_trainables()
    assert all(torch.equal(a[k], c[k]) for k in a) and tr_a.losses == tr_c.losses
    # a resume that does not restore the position draws other batches: the state matters
    net_d, tr_d = _setup("loha")
    _with_sampler(tr_d)
    ckpt.resume(tr_d, path)
    tr_d.sampler.load_state({**tr_d.sampler.state(), "position": 0})
    tr_d.run()
    assert not all(torch.equal(a[k], net_d.named_trainables()[k]) for k in a)
    # a state saved with epochs does not resume a run without them, and vice versa
    net_e, tr_e = _setup("loha")
    with pytest.raises(ValueError, match="epochs"):
        ckpt.resume(tr_e, path)


def test_nan_message_fits_the_training_dtype():
    from lycoris_core.train.loop import nan_hint

    net, tr = _setup("loha")
    tr.loss_fn = lambda idx: torch.tensor(float("nan"), requires_grad=True)
    with pytest.raises(FloatingPointError, match="already runs in float32"):
        tr.run()
    tr.nan_hint = nan_hint(torch.bfloat16)
    with pytest.raises(FloatingPointError, match=r"train in fp32 .*used bf16"):
        tr.run()
    assert "float32" not in nan_hint(torch.float16).split("(")[0]


def test_resume_without_sidecar_loads_weights(tmp_path):
    net_a, tr_a = _setup("lokr")
    tr_a.run(until=2)
    path = tmp_path / "w.safetensors"
    ckpt.save_adapter(tr_a, path, "sdxl")
    net_b, tr_b = _setup("lokr")
    assert ckpt.resume(tr_b, path) is False and tr_b.step == 0
    for name, mod in net_b.lora_modules.items():
        assert torch.allclose(mod.delta(), net_a.lora_modules[name].delta(), atol=1e-7)


def test_loraplus_groups():
    net, tr = _setup("loha", loraplus_lr_ratio=16.0)
    lrs = {g["name"]: g["initial_lr"] for g in tr.optimizer.param_groups}
    assert lrs == {"unet lr=0.01": 0.01, "unet plus lr=0.01": 0.16}
    plus = {id(p) for g in tr.optimizer.param_groups if "plus" in g["name"] for p in g["params"]}
    assert all((id(p) in plus) == ("hada_w2_a" in n) for n, p in net.named_trainables().items())


def test_gradient_checkpointing_gives_the_same_gradients():
    from lycoris_core.train.objective import gradient_checkpointing

    grads = []
    for enabled in (False, True):
        net, tr = _setup("lokr")
        blocks = _tiny_blocks(tr)
        calls = []
        counter = blocks[1].register_forward_hook(lambda *a, _c=calls: _c.append(1))
        with gradient_checkpointing(blocks[:1], enabled), torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            loss = tr.loss_fn([0, 1])  # dropouts active: checkpointing must replay the RNG
            loss.backward()
        counter.remove()
        assert len(calls) == (2 if enabled else 1)  # recomputed in the backward pass
        grads.append({k: p.grad.clone() for k, p in net.named_trainables().items()
                      if p.grad is not None})
        assert all(b.__dict__.get("forward") is None for b in blocks)  # forwards restored
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(torch.allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-7) for k in grads[0])


def _tiny_blocks(trainer):
    """The whole Tiny model as one checkpointed block, and a hooked layer inside it."""
    model = trainer.loss_fn.__closure__[
        trainer.loss_fn.__code__.co_freevars.index("model")].cell_contents
    return [model, model.diffusion_model.middle_block[1].proj_in]


def test_sdscripts_command_and_dataset_toml():
    import shlex

    import tomllib

    from lycoris_core.train.sdscripts import dataset_toml, sdscripts_command

    net = NetworkConfig("lokr", TargetOptions(network_dim=8, network_alpha=4.0, conv_dim=4,
                                              exclude_patterns=[".*attn2.*"]),
                        use_tucker=True, factor=8)
    cmd = shlex.split(sdscripts_command("sdxl", net, TrainConfig(steps=500, learning_rate=2e-4,
                                                                 lr_scheduler="cosine",
                                                                 lr_warmup_steps=50, seed=7),
                                        output_name="x", dataset_toml="d.toml"))
    assert cmd[:2] == ["accelerate", "launch"] and "sdxl_train_network.py" in cmd
    val = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert val["--network_module"] == "networks.lokr" and val["--network_dim"] == "8"
    assert val["--network_alpha"] == "4" and val["--max_train_steps"] == "500"
    assert val["--lr_scheduler"] == "cosine" and val["--seed"] == "7"
    nargs = cmd[cmd.index("--network_args") + 1: cmd.index("--optimizer_type")]
    assert set(nargs) == {"conv_dim=4", "conv_alpha=1", "use_tucker=true", "factor=8",
                          "exclude_patterns=['.*attn2.*']"}
    toml = tomllib.loads(dataset_toml("C:\\data \"x\"", batch_size=2))
    assert toml["datasets"][0]["batch_size"] == 2
    assert toml["datasets"][0]["subsets"][0]["image_dir"] == "C:\\data \"x\""
