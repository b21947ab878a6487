"""Shared benchmark machinery: interleaved timing, memory peaks, copy bandwidth, output.

Timing: every contestant of one case runs in the same process, interleaved round by round (in a
new seeded random order each round, so no contestant always follows the same one), after a
warm-up; each sample is one untimed call (whatever the previous contestant left in the allocator,
e.g. a trimmed heap to fault in again, is not billed to this one) and then `number` timed calls
(calibrated so one sample lasts about `target_s`); the median per-call time over the rounds is
reported, and ratios are medians of per-round paired ratios (`paired_ratio`). The machine is
shared and noisy, so results are only ever read as ratios pack / reference.

Memory: `child_peak_rss` runs a function in a fresh Python process and reads the kernel's RSS
high-water mark of the call (VmHWM, reset after the child's imports; `ru_maxrss` would also hold
the parent's RSS at fork, which Linux carries through exec), so nothing the parent allocated
counts; `RSSSampler` polls this process' RSS (psutil) from a thread, for in-process peaks
(approximate: spikes shorter than the poll interval can be missed).

Bandwidth: `copy_bandwidth` times `dst.copy_(src)` on buffers several times larger than the L3
cache and counts bytes read + written; a kernel that has to write N bytes and read M bytes
cannot beat (N + M) / that bandwidth.
"""

from __future__ import annotations

import gc
import gzip
import importlib
import json
import logging
import os
import platform
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
RESULTS_DIR = ROOT / "bench" / "results"


# ------------------------------------------------------------------------------------- timing
@dataclass(frozen=True)
class Stats:
    """Per-call seconds: median, quartiles, samples taken, calls per sample, and every sample
    (in round order, for paired ratios)."""

    median: float
    q1: float
    q3: float
    samples: int
    number: int
    values: tuple[float, ...] = ()
    faults: float = 0.0
    """Median minor page faults per call (fresh memory being mapped in: a cost to explain)."""

    @property
    def ms(self) -> float:
        return self.median * 1e3


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""`wall`: elapsed time. `cpu`: CPU seconds of this process (all its threads): on a machine
shared with other jobs this is what the work itself costs, unaffected by waiting for a core."""


def sdscripts_targets(arch: str) -> dict[str, dict]:
    """sd-scripts' default LoHa/LoKr module list for `arch` ('sdxl' with conv_dim, 'anima'):
    {lora_name: {module, kind, weight_shape, comfyui_key}}, from the test fixtures."""
    with gzip.open(FIXTURES / "sdscripts_targets.json.gz", "rt", encoding="utf-8") as fh:
        return json.load(fh)[arch]["modules"]


def default_clock() -> str:
    """The clock the benches use: $LYCORIS_BENCH_CLOCK (`wall` or `cpu`), else `wall`."""
    clock = os.environ.get("LYCORIS_BENCH_CLOCK", "wall")
    if clock not in CLOCKS:
        raise ValueError(f"LYCORIS_BENCH_CLOCK must be one of {sorted(CLOCKS)}, not {clock!r}")
    return clock


def _time_calls(fn: Callable[[], object], number: int, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    sync()  # on a GPU: the clock starts and stops with the device's queue empty
    t0 = now()
    for _ in range(number):
        fn()
    sync()
    return (now() - t0) / number


# ------------------------------------------------------------------------------------- device
DEVICE_ENV = "LYCORIS_BENCH_DEVICE"
"""`cpu` (default) or `cuda`: where the benches run (`python -m bench.run --device cuda`)."""


def bench_device() -> torch.device:
    """The device the benches put their tensors on ($LYCORIS_BENCH_DEVICE, default cpu)."""
    return torch.device(os.environ.get(DEVICE_ENV, "").strip().lower() or "cpu")


def check_device(name: str) -> torch.device:
    """`name` as a torch.device the benches can use; a clear error otherwise (no CUDA device)."""
    if name not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device cuda: torch {torch.__version__} finds no CUDA device "
                           "(torch.cuda.is_available() is False); use --device cpu")
    return torch.device(name)


def use_device(name: str) -> torch.device:
    """Run this process's benches on `name` (checked): tensors of the benches on it, ComfyUI
    booted on it (tests/comfy_host reads $LYCORIS_TEST_DEVICE), and on a GPU every wall-clock
    read synchronised with the device (`time.perf_counter` and the `wall` clock wait for the
    queue to drain first), so timers measure finished work, not queued launches."""
    device = check_device(name)
    os.environ[DEVICE_ENV] = os.environ["LYCORIS_TEST_DEVICE"] = device.type
    if device.type == "cuda" and not getattr(time.perf_counter, "synchronised", False):
        raw = time.perf_counter

        def perf_counter() -> float:
            torch.cuda.synchronize()
            return raw()

        perf_counter.synchronised = True
        time.perf_counter = CLOCKS["wall"] = perf_counter
        torch.backends.cuda.matmul.allow_tf32 = False  # the agreement checks use float32's TOL
        torch.backends.cudnn.allow_tf32 = False
    return device


def sync() -> None:
    """Wait for the bench device's queued work (no-op on the CPU)."""
    if bench_device().type == "cuda":
        torch.cuda.synchronize()


def peak_vram(fn: Callable[[], object]) -> int | None:
    """Bytes of device memory `fn()` allocates at its peak above what was allocated before
    (torch.cuda.max_memory_allocated); None on the CPU."""
    if bench_device().type != "cuda":
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


def calibrate(fn: Callable[[], object], target_s: float) -> int:
    """Calls per sample so that one sample lasts about `target_s` (at least 1)."""
    number = 1
    while True:
        dt = _time_calls(fn, number) * number
        if dt >= target_s / 2 or number >= 1 << 16:
            return max(1, int(number * target_s / max(dt, 1e-9)))
        number *= 4


def interleaved(fns: Mapping[str, Callable[[], object]], *, repeats: int = 7, warmup: int = 1,
                target_s: float = 0.02, clock: str | None = None) -> dict[str, Stats]:
    """Time every callable of `fns` in the same rounds; per-call median seconds for each.

    `clock`: "wall" or "cpu" (see `CLOCKS`); default `default_clock()`.
    """
    clock = clock or default_clock()
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    numbers = {name: calibrate(fns[name], target_s) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name in order.sample(names, len(names)):
                fns[name]()  # untimed: the previous contestant's memory state is not billed here
                f0 = _minor_faults()
                samples[name].append(_time_calls(fns[name], numbers[name], clock))
                faults[name].append((_minor_faults() - f0) / numbers[name])
    finally:
        if was_enabled:
            gc.enable()
    return {name: summarise(xs, numbers[name], statistics.median(faults[name]))
            for name, xs in samples.items()}


def _minor_faults() -> int:
    try:
        import resource
    except ImportError:  # not a Unix: no fault counts
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarise(xs: list[float], number: int = 1, faults: float = 0.0) -> Stats:
    """Median and quartiles of `xs` (kept in order)."""
    qs = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return Stats(statistics.median(xs), qs[0], qs[2], len(xs), number, tuple(xs), faults)


def paired_ratio(a: Stats, b: Stats) -> Stats | None:
    """The per-round ratios a_i / b_i of two contestants timed in the same rounds (median,
    quartiles). Each pair was measured seconds apart, so a change of the machine's load between
    rounds cancels out of it, which it does not in median(a) / median(b)."""
    pairs = [x / y for x, y in zip(a.values, b.values, strict=True) if y > 0]
    return summarise(pairs) if pairs else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either side is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


# ---------------------------------------------------------------------------------- bandwidth
def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 7) -> dict:
    """Bytes per second of `dst.copy_(src)` (read + written) on float32 buffers of `nbytes`.

    Both buffers are touched before timing (no page faults inside the timed copies). Also
    reports `clone()` (a fresh allocation each time, so page faults included) for context.
    """
    n = nbytes // 4
    src = torch.ones(n, device=bench_device())
    dst = torch.zeros(n, device=bench_device())
    stats = interleaved({"copy_": lambda: dst.copy_(src), "clone": lambda: src.clone()},
                        repeats=repeats, target_s=0.05)
    copy_s, clone_s = stats["copy_"].median, stats["clone"].median
    return {
        "method": "median time of dst.copy_(src), float32, buffers touched first; "
                  "bytes = read + written",
        "buffer_bytes": n * 4,
        "bytes_per_s": 2 * n * 4 / copy_s,
        "clone_bytes_per_s": 2 * n * 4 / clone_s,
    }


# ------------------------------------------------------------------------------------- memory
def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSSampler:
    """`with RSSSampler() as s: work()` → `s.peak - s.baseline` bytes (polled every `interval`)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> RSSSampler:
        gc.collect()
        self.baseline = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def child_peak_rss(target: str, kwargs: Mapping | None = None, timeout: float = 600) -> dict:
    """Run `module:function(**kwargs)` in a fresh interpreter; its peak RSS and its result.

    Returns {"result": <JSON result>, "peak_rss": bytes during the call (imports excluded where
    Linux can reset the peak), "baseline_rss": bytes after imports, "wall_s": seconds of the
    call}. The function must return something JSON-serialisable.
    """
    cmd = [sys.executable, "-m", "bench.common", "--child", target, json.dumps(dict(kwargs or {}))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{target} failed in its child process:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def touch_bytes(nbytes: int) -> int:
    """Allocate and write `nbytes` (a probe for `child_peak_rss`); returns the count."""
    return int(torch.ones(nbytes // 4).numel() * 4)


def _reset_peak_rss() -> bool:
    """Start this process's peak-RSS count afresh (Linux: writing 5 to /proc/self/clear_refs
    resets VmHWM), so that a peak read later is the call's and not the imports' before it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_rss(since_reset: bool) -> int:
    """Peak RSS in bytes: VmHWM since `_reset_peak_rss` when it worked, else the process's
    lifetime peak (ru_maxrss, imports included)."""
    if since_reset:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _child_main(target: str, kwargs_json: str) -> None:
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)
    gc.collect()
    baseline = rss_bytes()
    reset = _reset_peak_rss()
    t0 = time.perf_counter()
    result = fn(**json.loads(kwargs_json))
    wall = time.perf_counter() - t0
    peak = _peak_rss(reset)
    print(json.dumps({"result": result, "peak_rss": peak, "baseline_rss": baseline,
                      "wall_s": wall}))


# ------------------------------------------------------------------------------------ ComfyUI
_COMFY_BASE: list[Path] = []


HOSTS_ENV = ROOT / ".cache" / "hosts.env"
"""The hosts scripts/bootstrap.sh set up: HOST{1,2}_PY, HOST{1,2}_DIR, or HOST2_SKIP (why not)."""


def hosts_values() -> dict[str, str]:
    """The KEY=value lines of `HOSTS_ENV` ({} without the file)."""
    if not HOSTS_ENV.is_file():
        return {}
    return {k: v.strip() for k, v in (line.split("=", 1) for line in HOSTS_ENV.read_text().splitlines()
                                      if "=" in line and not line.startswith("#"))}


def hosts_env(values: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """{"1" | "2": (python, ComfyUI tree)} of the hosts in `HOSTS_ENV` (or in `values` read from
    it); {} without the file, a host without both paths left out. The file holds the paths of the
    checkout that last bootstrapped: the venv and the tree are taken from this checkout when they
    are there (worktrees link the same ones)."""
    values = hosts_values() if values is None else values
    out = {}
    for n in ("1", "2"):
        py, tree = values.get(f"HOST{n}_PY", "").strip(), values.get(f"HOST{n}_DIR", "").strip()
        if py and tree:
            local_py = ROOT / Path(py).parent.parent.name / "bin" / Path(py).name
            local = ROOT / ".cache" / Path(tree).name
            out[n] = (str(local_py) if local_py.is_file() else py, str(local) if local.is_dir() else tree)
    return out


def select_host() -> str:
    """The ComfyUI tree the benches boot, also for their child processes (exported as
    $LYCORIS_COMFYUI_DIR): $LYCORIS_COMFYUI_DIR if set, else the host whose venv runs this
    Python (`.cache/hosts.env` of scripts/bootstrap.sh: `.venv` → 0.3.75, `.venv-host2` →
    current ComfyUI), else tests/comfy_host's default (0.3.75)."""
    chosen = os.environ.get("LYCORIS_COMFYUI_DIR")
    if not chosen:
        here = Path(sys.prefix).resolve()
        for py, tree in hosts_env().values():
            if Path(py).parent.parent.resolve() == here:
                chosen = tree
    if chosen:
        os.environ["LYCORIS_COMFYUI_DIR"] = chosen
    return chosen or str(ROOT / ".cache" / "comfyui-0.3.75")


def comfy_host():
    """The real ComfyUI of `select_host()` (tests/comfy_host.py: 0.3.75 or current), booted
    once per process in a temp dir."""
    import atexit
    import shutil
    import tempfile

    select_host()
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    import comfy_host as host_mod

    if not _COMFY_BASE:
        base = Path(tempfile.mkdtemp(prefix="lycoris-bench-"))
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        _COMFY_BASE.append(base)
    logging.disable(logging.WARNING)  # ComfyUI's optional-node import warnings (torchaudio, …)
    try:
        return host_mod.boot(_COMFY_BASE[0])
    finally:
        logging.disable(logging.NOTSET)


# ------------------------------------------------------------------------------------- output
def row(bench: str, case: str, pack: float | None, refs: Mapping[str, float | None],
        unit: str = "ms", ratios: Mapping[str, float | None] | None = None, **extra) -> dict:
    """One result line: the pack's figure, each reference's, and the ratios.

    By default the ratios are `pack/<ref>` for every reference (for times: < 1 means the pack
    is faster); pass `ratios` to choose them. Extra keyword fields are kept in the JSON.
    """
    if ratios is None:
        ratios = {f"pack/{k}": ratio(pack, v) for k, v in refs.items()}
    return {"bench": bench, "case": case, "unit": unit, "pack": pack, "refs": dict(refs),
            "ratios": dict(ratios), **extra}


def _fmt(x: float | None, ratio_col: bool = False) -> str:
    if x is None:
        return "—"
    if ratio_col:
        return f"{x:.2f}"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def format_table(rows: Iterable[dict]) -> str:
    """Markdown tables, one per bench, with the ratio columns last (ratio < 1: pack wins)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["bench"], []).append(r)
    parts = []
    for bench, rs in groups.items():
        refs: list[str] = []
        rats: list[str] = []
        for r in rs:
            refs += [k for k in r["refs"] if k not in refs]
            rats += [k for k in r["ratios"] if k not in rats]
        head = ["case", "unit", "pack", *refs, *rats]
        lines = [f"**{bench}**", "", "| " + " | ".join(head) + " |",
                 "|" + "---|" * len(head)]
        for r in rs:
            cells = [r["case"], r["unit"], _fmt(r["pack"]),
                     *[_fmt(r["refs"].get(k)) for k in refs],
                     *[_fmt(r["ratios"].get(k), True) for k in rats]]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def machine_info() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "load_avg": os.getloadavg(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                  time.gmtime())}


def write_json(payload: dict, name: str = "latest", directory: Path = RESULTS_DIR) -> Path:
    """Write `payload` to `<directory>/<name>.json` (directory created); returns the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=_jsonable))
    return path


def _jsonable(o):
    if isinstance(o, Stats):
        return asdict(o)
    if isinstance(o, (tuple, set, frozenset)):
        return list(o)
    return repr(o)  # anything else a bench returned: kept readable rather than failing the run


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--child":
    _child_main(sys.argv[2], sys.argv[3])
