"""Bypass forward overhead per layer: this pack's hooks vs current ComfyUI's own bypass adapters.

    .venv-host2/bin/python -m bench.bench_bypass [--quick]   (LYCORIS_COMFYUI_DIR = ComfyUI 0.28)

`python -m bench.run` runs this bench with the current-ComfyUI host (`.cache/hosts.env`), since
ComfyUI 0.3.75 has no bypass adapters. Each case is one real ComfyUI layer (`comfy.ops` Linear /
Conv2d, float32, CPU) at a real SDXL / Anima / CLIP shape and token count (SDXL at 1024²: 4096
tokens for the 640-wide blocks, 1024 for the 1280-wide ones, 77 context tokens for the cross-
attention k/v; Anima at 1024²: 4096 tokens; CLIP: 77), three copies sharing one weight:

- base: the layer alone (its own matmul / convolution);
- ours: + this pack's forward hook (`nodes.patching.bypass.BypassInjection`, injected through a
  real ModelPatcher), strength 1;
- core: + ComfyUI's `weight_adapter.BypassInjectionManager` with its LoRA/LoHa/LoKr adapter on
  the same tensors (it replaces `module.forward`).

Timed in the same rounds (`common.interleaved`: order shuffled per round): the layer; the adapter
part of each bypass alone (ours: `BypassPlan.apply`, h(x) added into the layer's output in place;
core: `adapter.g(f(x) + adapter.h(x, f(x)))`), so that the overhead is measured directly and not
as a small difference of two large times; and each whole layer with its bypass. Figures: the
overhead as a fraction of the layer's own time (median / median), and per-round paired ratios
ours/core of the adapter parts and of the whole layers (≤ 1: ours is cheaper). Before timing,
ours and core are checked against the layer op with W + ΔW (float64); where core gives another
result (DoRA: core's bypass ignores `dora_scale`) or fails (LoKr Tucker, SPEC §5), that is
reported and such a case is left out of the summary.

A second part checks LoHa's strategy choice (`loha.choose_strategy`): both strategies timed on
1280² / 640² layers over ranks and token counts, and whether the cost model picked the faster.
--quick: smaller token counts, fewer rounds and cases (the smoke test's size).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .common import (
    bench_device,
    comfy_host,
    interleaved,
    machine_info,
    peak_vram,
    row,
    summarise,
    write_json,
)

BENCH = "bypass forward overhead per layer vs ComfyUI 0.28's bypass (fraction of the layer)"
STRATEGY_BENCH = "LoHa bypass strategy: Khatri–Rao vs dense ΔW (cost model check)"
TOL = 2e-3  # ours vs W + ΔW (float64), relative to |ΔW x|: float32 rounding is ≤ 7.2e-5 of it (toys)


@dataclass
class Case:
    name: str
    shape: tuple[int, ...]          # weight (O, I[, k, k])
    tokens: int                     # linear: tokens; conv: H = W = sqrt(tokens)
    algo: str                       # loha / lokr / lora
    rank: int = 16
    layout: str = "flat"            # loha: flat / tucker; lokr: low / full / both_low / tucker
    dora: bool = False
    extra: dict = field(default_factory=dict)


def cases(quick: bool) -> list[Case]:
    """The per-layer cases (real SDXL / Anima / CLIP shapes)."""
    t = (lambda n: max(64, n // 16)) if quick else (lambda n: n)  # noqa: E731
    out = [
        Case("SDXL attn 640² LoHa r16", (640, 640), t(4096), "loha"),
        Case("SDXL attn 640² LoHa r32", (640, 640), t(4096), "loha", rank=32),
        Case("SDXL attn 640² LoKr r16 (w2 full by rule)", (640, 640), t(4096), "lokr", layout="full"),
        Case("SDXL attn 1280² LoHa r16", (1280, 1280), t(1024), "loha"),
        Case("SDXL attn 1280² LoKr r16", (1280, 1280), t(1024), "lokr"),
        Case("SDXL attn 1280² LoKr decompose_both r8", (1280, 1280), t(1024), "lokr", rank=8,
             layout="both_low"),
        Case("SDXL ff.net.0 10240×1280 LoHa r16", (10240, 1280), t(1024), "loha"),
        Case("SDXL ff.net.0 10240×1280 LoKr r16", (10240, 1280), t(1024), "lokr"),
        Case("SDXL attn2.to_k 640×2048 LoHa r16 (77 ctx)", (640, 2048), 77, "loha"),
        Case("SDXL attn2.to_k 640×2048 LoKr r16 (77 ctx)", (640, 2048), 77, "lokr"),
        Case("SDXL conv 640²×3×3 LoHa r8", (640, 640, 3, 3), t(4096), "loha", rank=8),
        Case("SDXL conv 640²×3×3 LoHa Tucker r8", (640, 640, 3, 3), t(4096), "loha", rank=8,
             layout="tucker"),
        Case("SDXL conv 640²×3×3 LoKr r8", (640, 640, 3, 3), t(4096), "lokr", rank=8),
        Case("SDXL conv 640²×3×3 LoKr Tucker r8", (640, 640, 3, 3), t(4096), "lokr", rank=8,
             layout="tucker"),
        Case("SDXL attn 640² LoHa r16 + DoRA", (640, 640), t(4096), "loha", dora=True),
        Case("SDXL attn 640² LoRA r16", (640, 640), t(4096), "lora"),
        Case("CLIP-L q_proj 768² LoHa r16 (77)", (768, 768), 77, "loha"),
        Case("CLIP-L q_proj 768² LoKr r16 (77)", (768, 768), 77, "lokr"),
        Case("Anima attn 2048² LoHa r16", (2048, 2048), t(4096), "loha"),
        Case("Anima attn 2048² LoKr r16", (2048, 2048), t(4096), "lokr"),
        Case("Anima mlp 8192×2048 LoKr r16", (8192, 2048), t(4096), "lokr"),
    ]
    if quick:
        keep = {"SDXL attn 640² LoHa r16", "SDXL attn 1280² LoKr r16", "SDXL conv 640²×3×3 LoHa Tucker r8",
                "SDXL conv 640²×3×3 LoKr Tucker r8", "SDXL attn 640² LoHa r16 + DoRA",
                "SDXL attn 640² LoRA r16", "CLIP-L q_proj 768² LoKr r16 (77)"}
        out = [c for c in out if c.name in keep]
    return out


def adapter_tensors(case: Case, seed: int = 0) -> tuple[dict[str, torch.Tensor], float]:
    """{sd-scripts suffixed name under module 'm': tensor} and alpha for `case`."""
    import lycoris_core as lc

    g = torch.Generator().manual_seed(seed)
    o, i, *k = case.shape
    kk = math.prod(k) if k else 1
    r = case.rank

    def rnd(*s, std=0.1):
        return torch.randn(*s, generator=g) * std

    t: dict[str, torch.Tensor] = {}
    if case.algo == "loha":
        # factors at std 0.3: ΔW is a product of four of them, and at 0.1 a toy Tucker layer's
        # effect was so small that float32 rounding of the base output was 2e-3 of it (the check
        # below allows 2e-3); at 0.3 it is 81x larger
        if case.layout == "tucker":
            t |= {"hada_w1_a": rnd(r, o, std=0.3), "hada_w1_b": rnd(r, i, std=0.3),
                  "hada_w2_a": rnd(r, o, std=0.3), "hada_w2_b": rnd(r, i, std=0.3),
                  "hada_t1": rnd(r, r, *k, std=0.3), "hada_t2": rnd(r, r, *k, std=0.3)}
        else:
            t |= {"hada_w1_a": rnd(o, r, std=0.3), "hada_w1_b": rnd(r, i * kk, std=0.3),
                  "hada_w2_a": rnd(o, r, std=0.3), "hada_w2_b": rnd(r, i * kk, std=0.3)}
    elif case.algo == "lora":
        t |= {"lora_down.weight": rnd(r, i, *k), "lora_up.weight": rnd(o, r, *([1] * len(k)))}
    else:
        (a, b), (c, d) = lc.factorization(o), lc.factorization(i)
        if case.layout == "both_low":
            t |= {"lokr_w1_a": rnd(a, r), "lokr_w1_b": rnd(r, c)}
        else:
            t["lokr_w1"] = rnd(a, c)
        if case.layout == "full":
            t["lokr_w2"] = rnd(b, d, *k)
        elif case.layout == "tucker":
            t |= {"lokr_w2_a": rnd(r, b), "lokr_w2_b": rnd(r, d), "lokr_t2": rnd(r, r, *k, std=0.3)}
        else:  # low rank (flat for a conv)
            t |= {"lokr_w2_a": rnd(b, r), "lokr_w2_b": rnd(r, d * kk)}
    alpha = float(r) / 2
    if case.dora:
        t["dora_scale"] = 1 + 0.1 * torch.rand(o, *([1] * (len(case.shape) - 1)), generator=g)
    out = {f"m.{n}": v for n, v in t.items()}
    out["m.alpha"] = torch.tensor(alpha)
    return out, alpha


class _Setup:
    """Three copies of one real ComfyUI layer sharing a weight: base, ours, core."""

    def __init__(self, host, case: Case, tensors: dict, alpha: float):
        import comfy.model_patcher
        import comfy.ops

        import lycoris_core as lc

        bypass = sys.modules[host.pack.__name__ + ".nodes.patching.bypass"]
        ops = comfy.ops.disable_weight_init
        g = torch.Generator().manual_seed(1)
        shape = case.shape
        dev = bench_device()  # the layer and its input there; the adapter's factors stay on the CPU
        w = torch.nn.Parameter((torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:])))
                               .to(dev), requires_grad=False)
        bias = torch.nn.Parameter((0.02 * torch.randn(shape[0], generator=g)).to(dev),
                                  requires_grad=False)

        def layer():
            if len(shape) == 2:
                m = ops.Linear(shape[1], shape[0], bias=True)
            else:
                m = ops.Conv2d(shape[1], shape[0], shape[2:], padding=shape[2] // 2, bias=True)
            m.weight, m.bias = w, bias
            return m

        self.base, self.ours, self.core = layer(), layer(), layer()
        side = int(math.isqrt(case.tokens))
        gx = torch.Generator().manual_seed(2)
        self.x = (torch.randn(1, case.tokens, shape[1], generator=gx) if len(shape) == 2
                  else torch.randn(1, shape[1], side, side, generator=gx)).to(dev)
        # ours: the pack's injection on a real ModelPatcher
        root = torch.nn.Module()
        root.add_module("layer", self.ours)
        self.patcher = comfy.model_patcher.ModelPatcher(root, load_device=dev, offload_device=dev)
        module = lc.adapter_from_tensors(tensors).modules["m"]
        geometry = bypass.geometry_of(self.ours, shape)
        dora = module.dora_output_scale(w.detach().float()) if case.dora else None
        self.module = module
        plan = module.bypass_plan(geometry, dora)
        self.injection = bypass.BypassInjection([bypass.BypassLayer("layer.weight", "layer", plan, 1.0)])
        self.injection.inject(self.patcher)
        # core: ComfyUI 0.28's adapter for the same tensors, through its bypass manager
        self.core_error = None
        try:
            import comfy.weight_adapter as wa

            cls = {"loha": wa.LoHaAdapter, "lokr": wa.LoKrAdapter, "lora": wa.LoRAAdapter}[case.algo]
            on_dev = {k: v.to(dev) for k, v in tensors.items()}
            adapter = self.core_adapter = cls.load("m", on_dev, alpha, on_dev.get("m.dora_scale"))
            core_root = torch.nn.Module()
            core_root.add_module("layer", self.core)
            manager = wa.BypassInjectionManager()
            manager.add_adapter("layer.weight", adapter, strength=1.0)
            for inj in manager.create_injections(core_root):
                inj.inject(None)
            self.core(self.x)
        except Exception as exc:  # reported, not timed
            self.core_error = f"{type(exc).__name__}: {exc}"[:200]

    def exact(self) -> torch.Tensor:
        """The layer with W + ΔW in float64 (ΔW by lycoris_core, DoRA included)."""
        w0 = self.base.weight.detach().double()
        w = w0 + self.module.delta(torch.float64, base=w0) if self.module.has_dora else \
            w0 + self.module.delta(torch.float64, shape=tuple(w0.shape))
        x, b = self.x.double(), self.base.bias.double()
        if w.dim() == 2:
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, padding=self.base.padding)

    def close(self) -> None:
        self.injection.eject(self.patcher)


def _rel(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> float:
    """|got − want| relative to the adapter's effect |want − base| (max-abs)."""
    return float((got.double() - want).abs().max() / (want - base.double()).abs().max())


def run_case(host, case: Case, repeats: int, target_s: float) -> dict:
    """Time the layer, the adapter part of each bypass (ours: `BypassPlan.apply` adding into the
    layer's output in place; core: `adapter.g(f(x) + adapter.h(x, f(x)))`), and both whole
    layers with their bypass; all in the same rounds."""
    tensors, alpha = adapter_tensors(case)
    s = _Setup(host, case, tensors, alpha)
    try:
        with torch.inference_mode():
            exact, base_out = s.exact(), s.base(s.x)
            ours_err = _rel(s.ours(s.x), exact, base_out)
            assert ours_err < TOL, f"{case.name}: ours disagrees with W + ΔW ({ours_err:.2e})"
            core_err = None if s.core_error else _rel(s.core(s.x), exact, base_out)
            plan, bias = s.injection.layers[0].plan, s.ours.bias
            acc = base_out.clone()  # ours adds into the layer's output in place (values grow: fine)
            fns = {"layer": lambda: s.base(s.x),
                   "ours": lambda: plan.apply(s.x, acc, 1.0, bias=bias, inplace=True),
                   "ours layer+bypass": lambda: s.ours(s.x)}
            if s.core_error is None:
                ad = s.core_adapter
                fns["core"] = lambda: ad.g(base_out + ad.h(s.x, base_out))
                fns["core layer+bypass"] = lambda: s.core(s.x)
            st = interleaved(fns, repeats=repeats, warmup=1, target_s=target_s)
            vram = {k: peak_vram(fns[k]) for k in ("ours", "core") if k in fns} \
                if bench_device().type == "cuda" else None
    finally:
        s.close()
    layer = st["layer"].median
    frac = {w: st[w].median / layer for w in ("ours", "core") if w in st}
    pair = whole = None
    if "core" in st:
        pair = summarise([a / b for a, b in zip(st["ours"].values, st["core"].values, strict=True)])
        whole = summarise([a / b for a, b in zip(st["ours layer+bypass"].values,
                                                 st["core layer+bypass"].values, strict=True)])
    note = ("core fails: " + s.core_error if s.core_error else
            f"core differs from W + ΔW by {core_err:.1e} of the effect" if core_err > 1e-2 else "")
    r = row(BENCH, case.name, frac["ours"], {"core": frac.get("core")}, unit="× layer",
            ratios={"ours/core": pair.median if pair else None,
                    "layer+bypass ours/core": whole.median if whole else None},
            layer_ms=st["layer"].ms, ours_ms=st["ours"].ms,
            core_ms=st["core"].ms if "core" in st else None,
            ratio_quartiles=[pair.q1, pair.q3] if pair else None,
            ours_error=ours_err, core_error=core_err, note=note, tokens=case.tokens,
            shape=list(case.shape), device=bench_device().type, peak_vram_bytes=vram)
    print(f"  {case.name}: layer {st['layer'].ms:.2f} ms, ours {frac['ours']:.3f}×"
          + (f", core {frac['core']:.3f}×, ours/core {pair.median:.2f} (IQR {pair.q1:.2f}–"
             f"{pair.q3:.2f}), whole layer ours/core {whole.median:.2f}" if pair else ", core —")
          + (f"  [{note}]" if note else ""), flush=True)
    return r


# ---------------------------------------------------------------- LoHa strategy (cost model)
def strategy_cases(quick: bool) -> list[tuple[tuple[int, int], int, int]]:
    """(shape, rank, tokens) where both LoHa strategies are timed."""
    if quick:
        return [((640, 640), 8, 256), ((640, 640), 32, 256)]
    out = [((1280, 1280), r, n) for r in (8, 16, 24, 32, 48) for n in (1024, 4096)]
    out += [((640, 640), r, 4096) for r in (12, 16, 24)]
    out += [((768, 768), r, 77) for r in (16, 32, 64)]
    return out


def run_strategy(shape, rank: int, tokens: int, repeats: int, target_s: float) -> dict:
    import lycoris_core as lc
    from lycoris_core.algos import loha
    from lycoris_core.algos.layer import LayerGeometry

    case = Case("", shape, tokens, "loha", rank=rank)
    tensors, _ = adapter_tensors(case)
    module = lc.adapter_from_tensors(tensors).modules["m"]
    layer = LayerGeometry.linear(*shape)
    f = module.factors(bench_device(), torch.float32)
    x = torch.randn(1, tokens, shape[1], generator=torch.Generator().manual_seed(3)).to(bench_device())
    with torch.inference_mode():
        ref = loha.bypass_diff(x, f, layer, 0.5, "dense")
        assert float((loha.bypass_diff(x, f, layer, 0.5, "khatri_rao") - ref).abs().max()
                     / ref.abs().max()) < 1e-5
        st = interleaved({s: (lambda s=s: loha.bypass_diff(x, f, layer, 0.5, s))
                          for s in loha.STRATEGIES}, repeats=repeats, target_s=target_s)
    pair = summarise([a / b for a, b in zip(st["khatri_rao"].values, st["dense"].values, strict=True)])
    chosen = loha.choose_strategy(f, layer, tokens, tokens)
    faster = "khatri_rao" if pair.median < 1 else "dense"
    costs = loha.strategy_costs(f, layer, tokens, tokens)
    name = f"{shape[0]}×{shape[1]} r{rank}, {tokens} tokens"
    ok = chosen == faster or 0.85 < pair.median < 1.15  # within noise either is fine
    print(f"  strategy {name}: khatri_rao/dense {pair.median:.2f}, model picks {chosen} "
          f"({'ok' if ok else 'WRONG'})", flush=True)
    return row(STRATEGY_BENCH, name, st["khatri_rao"].ms, {"dense": st["dense"].ms}, unit="ms",
               ratios={"khatri_rao/dense": pair.median}, chosen=chosen, faster=faster,
               choice_ok=ok, model_cost_ratio=costs["khatri_rao"] / costs["dense"])


def main(quick: bool = False, argv: list[str] | None = None) -> dict:
    host = comfy_host()
    import comfy_host as host_mod

    if not host_mod.at_least("0.28"):
        raise RuntimeError(f"bench_bypass needs current ComfyUI (0.28+) for core's bypass adapters; "
                           f"this is {host_mod.HOST_NAME} (set LYCORIS_COMFYUI_DIR)")
    torch.set_grad_enabled(False)
    repeats, target_s = (2, 0.0) if quick else (7, 0.05)
    rows = [run_case(host, c, repeats, target_s) for c in cases(quick)]
    rows += [run_strategy(*c, repeats=repeats, target_s=target_s) for c in strategy_cases(quick)]
    timed = [r["ratios"]["ours/core"] for r in rows
             if r["bench"] == BENCH and r["ratios"]["ours/core"] is not None and not r["note"]]
    summary = {"max_ours_over_core": max(timed, default=None),
               "median_ours_over_core": statistics.median(timed) if timed else None,
               "strategy_choices_ok": all(r["choice_ok"] for r in rows if r["bench"] == STRATEGY_BENCH),
               "host": host_mod.HOST_NAME}
    return {"rows": rows, "summary": summary, "machine": machine_info()}


def _cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small token counts, few cases and rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = main(quick=args.quick)
    from .common import format_table

    print(format_table(res["rows"]))
    print(res["summary"])
    path = write_json(res, "bypass_quick" if args.quick else "bypass")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_cli())
