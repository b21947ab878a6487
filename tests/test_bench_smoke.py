"""The benchmarks run end to end on toy shapes (no timing is asserted: speed is only ever read
as ratios from `python -m bench.run`). What is asserted: every contestant ran, agreed with the
pack, and the harness reports what it measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_apply, bench_convert, bench_delta, bench_effectmap, common, report, run
from lycoris_core.algos import loha as loha_algo
from lycoris_core.algos import lokr as lokr_algo


@pytest.fixture()
def tiny_bw():
    return common.copy_bandwidth(1 << 20, repeats=1)


def test_delta_bench_runs_every_variant(host, tiny_bw, monkeypatch):
    monkeypatch.setattr(loha_algo, "_BLOCK_BYTES", 64)  # toy shapes also take the row-blocked path
    cases = bench_delta.tiny_cases()
    res = bench_delta.run(cases, repeats=1, target_s=0.0, bandwidth=tiny_bw)
    rows = res["rows"]
    assert [r["case"] for r in rows] == [c.name for c in cases]
    for r in rows:
        assert r["pack"] > 0 and r["refs"]["lycoris"] > 0 and r["refs"]["bound"] > 0
        assert r["refs"]["pack patch"] > 0 and r["ratios"]["pack/lycoris"] > 0  # the node's path
        numeric = {k: v for k, v in r["agreement"].items() if isinstance(v, float)}
        assert numeric and max(numeric.values()) < bench_delta.TOL
    by_case = {r["case"]: r for r in rows}
    # ComfyUI's LoKr Tucker path fails inside torch.kron (SPEC §5): reported, not timed.
    assert "fails" in by_case["lokr conv tucker"]["agreement"]["comfyui ΔW+add"]
    assert by_case["lokr conv tucker"]["refs"]["comfyui ΔW+add"] is None
    assert by_case["loha linear"]["refs"]["comfyui ΔW+add"] > 0
    checks = run.target_checks(rows)
    assert len(checks) == len(rows) and all("lycoris:" in c for c in checks)
    assert "| loha linear |" in common.format_table(rows)
    table = report.delta_table({"rows": rows})  # the table in bench/README.md
    assert table.count("\n| ") == len(rows) + 1 and "fails (SPEC §5)" in table


def test_delta_bench_rejects_a_wrong_pack(host, monkeypatch):
    """A fast wrong answer cannot win: Kronecker factors swapped → the agreement check fails."""
    monkeypatch.setattr(lokr_algo, "kron", lambda w1, w2: __import__("torch").kron(
        w2.contiguous(), w1.contiguous()))
    case = next(c for c in bench_delta.tiny_cases() if c.name == "lokr both full")
    with pytest.raises(AssertionError, match="disagree"):
        bench_delta.contestants(case)


def test_convert_bench_runs():
    res = bench_convert.run(limit=3, repeats=1, hashes=(True,))
    (r,) = res["rows"]
    assert r["pack"] > 0 and r["refs"]["st read+write"] > 0 and r["file_bytes"] > 0


def test_effectmap_bench_runs():
    mods = dict(list(bench_apply.targets(True).items())[:4])
    rows = bench_effectmap.run(mods, repeats=1)["rows"]
    assert [r["case"].split()[0] for r in rows] == ["loha", "lokr"]
    for r in rows:
        assert r["pack"] > 0 and r["refs"]["materialise"] > 0 and r["modules"] == 4
        assert r["agreement"] < bench_effectmap.TOL


def test_effectmap_bench_rejects_a_wrong_map(monkeypatch, tmp_path):
    """A fast wrong map cannot win: LoKr's norm doubled → the agreement check fails."""
    from lycoris_core.algos import LoKrModule

    right = LoKrModule.frobenius_sq
    monkeypatch.setattr(LoKrModule, "frobenius_sq", staticmethod(lambda f, s: 4.0 * right(f, s)))
    mods = dict(list(bench_apply.targets(True).items())[:2])
    with pytest.raises(AssertionError, match="disagree"):
        bench_effectmap.run(mods, repeats=1, algos=("lokr",))


def test_child_peak_rss_sees_an_allocation():
    """The child's peak during the call, not before it: the probe writes exactly n bytes, from a
    parent holding 8 n more. Reads 1.04 n, with 3x room each way. A probe that misses the child's
    pages reads ~0; one that reads the lifetime peak (ru_maxrss, which Linux carries over from
    the parent's RSS at fork through exec) reads ≥ 8 n (18.8 n measured before the fix; 13.5 n in
    a full pytest run without any ballast)."""
    import torch

    n = 64 << 20
    ballast = torch.ones(2 * n)  # 8 n bytes resident in this (the parent) process
    out = common.child_peak_rss("bench.common:touch_bytes", {"nbytes": n}, timeout=120)
    del ballast
    assert out["result"] == n
    extra = out["peak_rss"] - out["baseline_rss"]
    assert n / 3 <= extra <= 3 * n, extra / n


def test_interleaved_reports_every_contestant():
    st = common.interleaved({"a": lambda: sum(range(100)), "b": lambda: None}, repeats=3,
                            target_s=0.001, clock="cpu")
    assert set(st) == {"a", "b"} and all(s.samples == 3 and s.number >= 1 for s in st.values())


def test_runner_reports_a_missing_bench(tmp_path, monkeypatch):
    monkeypatch.setitem(run.BENCHES, "train", "bench.no_such_bench")
    run._child("train", True, str(tmp_path / "r.json"))
    import json

    res = json.loads((tmp_path / "r.json").read_text())
    assert res["status"] == "missing" and "no_such_bench" in res["error"]


def test_apply_result_becomes_rows():
    runs = {w: [{"total_s": t, "peak_extra_bytes": m << 20}] for w, t, m in
            (("ours", 2.0, 100), ("comfy", 4.0, 300))}
    rows = run._rows_of("apply", {"results": [{"algo": "lokr", "rank": 16, "modules": 788,
                                               "runs": runs}]})
    assert [r["unit"] for r in rows] == ["s", "MiB"]
    assert rows[0]["ratios"]["pack/comfyui"] == pytest.approx(0.5)
    assert rows[1]["ratios"]["pack/comfyui"] == pytest.approx(1 / 3)


def test_bypass_bench_runs_every_variant(host):
    """The per-layer bypass bench on toy shapes (current ComfyUI: core's bypass adapters): ours
    equals W + ΔW, core is timed where it works, its LoKr Tucker failure and its DoRA omission are
    reported, and the LoHa strategy check runs."""
    import comfy_host

    from bench import bench_bypass as bb

    if not comfy_host.at_least("0.28"):
        pytest.skip("ComfyUI 0.3.75 has no bypass adapters to compare with")
    toy = [bb.Case("loha", (48, 40), 64, "loha", rank=4), bb.Case("lokr", (48, 40), 64, "lokr", rank=4),
           bb.Case("loha tucker", (16, 12, 3, 3), 64, "loha", rank=2, layout="tucker"),
           bb.Case("lokr tucker", (16, 12, 3, 3), 64, "lokr", rank=2, layout="tucker"),
           bb.Case("loha dora", (48, 40), 64, "loha", rank=4, dora=True),
           bb.Case("lora conv", (16, 12, 3, 3), 64, "lora", rank=4)]
    rows = {r["case"]: r for r in (bb.run_case(host, c, repeats=1, target_s=0.0) for c in toy)}
    for name, r in rows.items():
        assert r["ours_error"] < bb.TOL and r["pack"] > 0 and r["layer_ms"] > 0, name
    for name in ("loha", "lokr", "loha tucker", "lora conv"):
        assert rows[name]["ratios"]["ours/core"] > 0 and not rows[name]["note"], name
        assert rows[name]["core_error"] < 1e-2
    assert "core fails" in rows["lokr tucker"]["note"] and rows["lokr tucker"]["refs"]["core"] is None
    assert "core differs" in rows["loha dora"]["note"]  # core's bypass ignores dora_scale
    strat = bb.run_strategy((48, 40), 4, 64, repeats=1, target_s=0.0)
    assert strat["chosen"] in ("khatri_rao", "dense") and strat["ratios"]["khatri_rao/dense"] > 0
    checks = run.bypass_checks(list(rows.values()), {})
    assert len(checks) == len(rows) and any("n/a" in c for c in checks)


def test_bypass_bench_rejects_a_wrong_pack(host, monkeypatch):
    """A fast wrong bypass cannot be timed: Kronecker halves swapped → the check against W + ΔW."""
    import comfy_host
    import torch

    from bench import bench_bypass as bb

    if not comfy_host.at_least("0.28"):
        pytest.skip("ComfyUI 0.3.75 has no bypass adapters to compare with")
    monkeypatch.setattr(lokr_algo, "rebuild_w1", lambda f: torch.zeros_like(lokr_algo._half(
        f.w1, f.w1_a, f.w1_b, f.t1)))
    with pytest.raises(AssertionError, match="disagrees"):
        bb.run_case(host, bb.Case("lokr", (48, 40), 64, "lokr", rank=4), repeats=1, target_s=0.0)


def test_bypass_runner_pieces(tmp_path, monkeypatch):
    """bench.run: the bypass bench runs on the current-ComfyUI host named in .cache/hosts.env;
    the real-load part of bench_apply and the schedule's bypass rows become target lines."""
    host = run.current_comfyui()
    assert isinstance(host, str) or (host[0].endswith("python") and "LYCORIS_COMFYUI_DIR" in host[1])
    real = [{"algo": "lokr", "rank": 16, "modules": 788, "bypass_goal_bytes": 100 << 20,
             "best": {w: {"load_s": t, "load_cpu_s": t, "peak_extra_bytes": m << 20}
                      for w, t, m in (("comfy", 4.0, 5000), ("patch", 3.0, 4900), ("bypass", 0.2, 40))}}]
    rows = run._rows_of("apply", {"results": [], "real_load": real})
    assert [r["unit"] for r in rows] == ["s", "MiB"]
    assert rows[0]["ratios"]["pack/patch"] == pytest.approx(0.2 / 3.0)
    sched = common.row("schedule", "bypass: schedule_linear vs bypass constant", 1.0,
                       {"bypass constant": 1.0}, unit="cpu_s",
                       ratios={"pack/bypass constant": 1.01})
    checks = run.bypass_checks([*rows, sched], {"apply": {"result": {"real_load": real}}})
    assert any("goal ≤ 1.02" in c and "ok" in c for c in checks)
    assert any("apply lokr bypass peak extra 40 MiB" in c and c.endswith("ok") for c in checks)


def test_train_paired_result_becomes_rows():
    """bench_train's paired rounds: one step-time row per contestant, the paired median ratio
    (not the ratio of medians) kept, and Anima rows say what ComfyUI's own trainer does there."""
    paired = {"host": "ComfyUI 0.28.0", "comfyui_on_anima": "fails: RuntimeError: x", "rows": [
        {"kind": "sdxl", "algo": "loha", "rank": 4, "lycoris_step_s": 0.2,
         "comfyui_sdxl_step_s": 0.4, "ratio": 0.55, "ratio_q1": 0.5, "ratio_q3": 0.6},
        {"kind": "anima", "algo": "loha", "rank": 4, "lycoris_step_s": 0.05,
         "comfyui_sdxl_step_s": 0.4, "ratio": 0.13, "ratio_q1": 0.12, "ratio_q3": 0.14}]}
    rows = run._train_rows({"paired_steps": paired})
    assert [r["case"] for r in rows] == [
        "loha r4 on the tiny sdxl — step time",
        "loha r4 on the tiny anima — step time (ComfyUI's trainer fails on Anima: vs its "
        "tiny-SDXL step)"]
    assert [r["ratios"]["pack/comfyui"] for r in rows] == [0.55, 0.13]
    assert "note" not in rows[0] and "fails" in rows[1]["note"]


def test_bench_host_is_the_venv_host(monkeypatch):
    """`.venv-host2/bin/python -m bench...` boots current ComfyUI without any variable set; an
    explicit LYCORIS_COMFYUI_DIR wins."""
    import comfy_host

    monkeypatch.delenv("LYCORIS_COMFYUI_DIR", raising=False)
    assert (common.ROOT / ".cache" / "hosts.env").is_file()  # written by scripts/bootstrap.sh
    chosen = Path(common.select_host()).resolve()
    assert chosen == Path(comfy_host.COMFY_DIR).resolve()  # this pytest's venv → its host
    monkeypatch.setenv("LYCORIS_COMFYUI_DIR", "/elsewhere")
    assert common.select_host() == "/elsewhere"


def test_schedule_memory_bench_runs_every_contestant(host, tmp_path, monkeypatch):
    """bench_schedule_memory's contestants in this process on 3 of the SDXL targets (every 20th):
    hooks and the schedule's three settings write W0 + 0.4·ΔW at the change and restore W0 bit
    for bit; the memory figures are the formula's; a schedule that misses the change is caught."""
    import torch

    from bench import bench_schedule_memory as bsm

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this session's threads
    path = bsm.write_file(True, 1, 3, str(tmp_path))
    out = {k: bsm.contestant(k, path, quick=True, limit=3, extras=k == "default") for k in bsm.KINDS}
    params = out["hooks"]["params"]
    for kind, r in out.items():
        assert r["restored"] and r["weights"] == 3, kind
        if kind != "bypass":
            assert r["change_rel_err"] < 0.25 and r["cpu_s"]["change"] > 0, kind
    assert out["default"]["memory"]["base_bytes"] == 2 * params  # fp16 weights
    assert out["cache"]["memory"]["extra_bytes"] == 6 * params
    assert out["bypass"]["memory"]["extra_bytes"] == 0
    assert out["default"]["one_patch_cpu_s"] > 0 and out["default"]["factors_fp32_cpu_s"] > 0
    monkeypatch.setattr(bsm, "SCHEDULE", "hold; 0:1")  # the strength never changes
    assert bsm.contestant("default", path, quick=True, limit=3)["change_rel_err"] > 0.25
