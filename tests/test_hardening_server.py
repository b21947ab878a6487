"""Issue 18 (hardening) against ComfyUI's real HTTP server (main.py in a subprocess, loopback only):

- the metadata route under load: 20 concurrent requests for a file with a 32 MiB header (150k
  modules) while the server keeps answering other routes, memory bounded, one computation;
- a sparse 1 GiB file costs nothing; errors name files by their lora_name, carry no byte of a
  file outside the loras folder (a symlink) and no absolute path;
- the schedule route always answers valid JSON (no NaN / Infinity).
Latencies are compared with the same route's baseline measured in the same run (the machine is
shared and slow); the figures are printed (`-s`) for the closing note.
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import comfy_server
import pytest
from test_loaders_common import make_adapter
from ui_workflows import TINY_UNET_KEYS, tiny_sdxl_shapes

import lycoris_core as lc

SECRET = b"SECRET-C" + b"ontent outside the loras folder: api_key=hunter2\n" * 20
SECRET_NUMBER = str(int.from_bytes(SECRET[:8], "little"))  # 4840617831202768211
GOOD = "harden_good.safetensors"
BIG = "harden_big_header.safetensors"
MiB = 1 << 20


def _strict_json(raw: bytes):
    def refuse(name):
        raise ValueError(f"invalid JSON constant {name}")
    return json.loads(raw, parse_constant=refuse)


def _get(url: str, timeout: float = 600) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def write_big_header(path: Path, header_bytes: int) -> int:
    """A valid LoKr file whose JSON header is at least `header_bytes` long (1×1 factors); returns
    the module count."""
    header: dict = {"__metadata__": {"ss_network_module": "networks.lokr"}}
    off, i, size = 0, 0, 40
    while size < header_bytes:
        for t in ("lokr_w1", "lokr_w2"):
            key = f"lora_unet_bogus_block_{i}_transformer_blocks_0_attn1_to_q.{t}"
            header[key] = {"dtype": "F32", "shape": [1, 1], "data_offsets": [off, off + 4]}
            size += len(key) + 60
            off += 4
        i += 1
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.write(b"\0" * off)
    return i


def _rss(pid: int) -> int:
    """Resident bytes of one process (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *_descendants(k)]
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, host):
    base = comfy_server.prepare_base(tmp_path_factory.mktemp("harden_server"))
    loras = base / "models" / "loras"
    tensors, _ = make_adapter(tiny_sdxl_shapes(TINY_UNET_KEYS), "lokr", rank=4, alpha=2.0, seed=7)
    lc.save_safetensors(tensors, loras / GOOD, {"ss_network_module": "networks.lokr"})
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret").write_bytes(SECRET)
    (loras / "harden_secret.safetensors").symlink_to(outside / "secret")
    (loras / "harden_bad_json.safetensors").write_bytes(
        (40).to_bytes(8, "little") + b"{SECRET 987654321, this is not json at all}")
    with open(loras / "harden_sparse.safetensors", "wb") as fh:  # 1 GiB apparent, 4 KiB on disk
        fh.write(struct.pack("<Q", (1 << 30) - 64))
        fh.truncate(1 << 30)
    modules = write_big_header(loras / BIG, 32 * MiB)
    try:
        with comfy_server.running_server(base) as (url, proc, _log):
            yield {"url": url, "pid": proc.pid, "base": base, "outside": outside, "modules": modules}
    except RuntimeError as e:
        pytest.fail(str(e))


def _meta(server, name: str, timeout: float = 600) -> tuple[int, dict, bytes]:
    status, raw = _get(f"{server['url']}/api/lycoris/metadata?lora_name={urllib.parse.quote(name)}",
                       timeout)
    return status, _strict_json(raw), raw


def _no_leak(server, raw: bytes) -> None:
    text = raw.decode("utf-8", "replace")
    assert SECRET_NUMBER not in text and "SECRET" not in text and "hunter2" not in text, text
    assert "987654321" not in text, text
    for root in (server["base"], server["outside"]):
        assert str(root) not in text and os.path.realpath(root) not in text, text


@pytest.mark.parametrize("name,reason", [
    ("harden_secret.safetensors", "not a safetensors file"),
    ("harden_bad_json.safetensors", "not a safetensors file"),
    ("harden_sparse.safetensors", "larger than the 100 MiB limit"),
])
def test_route_errors_leak_nothing(server, name, reason):
    before = _rss(server["pid"])
    t0 = time.perf_counter()
    status, body, raw = _meta(server, name)
    elapsed = time.perf_counter() - t0
    assert status == 422, body
    assert body["error"].startswith(f"{name}: ") and reason in body["error"], body
    assert body["lora_name"] == name
    _no_leak(server, raw)
    assert elapsed < 30, elapsed  # liveness (typical: milliseconds)
    assert _rss(server["pid"]) - before < 64 * MiB  # the sparse 1 GiB file is never read


def test_route_names_the_file_by_lora_name(server):
    status, body, raw = _meta(server, GOOD)
    assert status == 200 and body["file"] == GOOD and body["algorithms"] == {"lokr": 2}, body
    _no_leak(server, raw)


@pytest.mark.parametrize("text", ["0:1e308", "0:1e308, 1:-1e308", "0:nan", "0:1, 1:-inf", "0:101"])
def test_schedule_route_always_valid_json(server, text):
    q = urllib.parse.urlencode({"schedule": text, "interpolation": "linear"})
    status, raw = _get(f"{server['url']}/api/lycoris/schedule?{q}", 60)
    body = _strict_json(raw)
    assert status == 422 and ("finite" in body["error"] or "outside" in body["error"]), body


def _latency(url: str) -> float:
    t0 = time.perf_counter()
    status, raw = _get(url, 120)
    assert status == 200, raw[:200]
    return time.perf_counter() - t0


def test_metadata_route_under_load(server):
    """20 concurrent requests for a file with a 32 MiB header (the old route: 7 s and +421 MiB per
    request, other routes stalled for seconds). Now the other routes keep answering, the server's
    memory barely moves, and a second burst is answered from the cache."""
    url, pid = server["url"], server["pid"]
    other = [f"{url}/api/lycoris/schedule?schedule=0%3A1%2C1%3A0", f"{url}/api/system_stats"]
    for u in other:  # warm up
        _latency(u)
    baseline = [_latency(u) for _ in range(10) for u in other]
    rss0 = _rss(pid)
    tree0 = rss0 + sum(_rss(k) for k in _descendants(pid))
    lat: list[float] = []
    peak = {"server": rss0, "tree": tree0}
    done = threading.Event()

    def poll():
        i = 0
        while not done.is_set():
            lat.append(_latency(other[i % 2]))
            i += 1
            peak["server"] = max(peak["server"], _rss(pid))
            peak["tree"] = max(peak["tree"], _rss(pid) + sum(_rss(k) for k in _descendants(pid)))
            time.sleep(0.05)

    poller = threading.Thread(target=poll)
    poller.start()
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(lambda _: _get(
                f"{url}/api/lycoris/metadata?lora_name={BIG}", 900), range(20)))
    finally:
        first_burst = time.perf_counter() - t0
        done.set()
        poller.join()
    lat.sort()
    figures = {
        "modules": server["modules"], "header_MiB": round(os.path.getsize(
            server["base"] / "models" / "loras" / BIG) / MiB, 1),
        "first_burst_s": round(first_burst, 2),
        "baseline_ms": {"median": round(statistics.median(baseline) * 1e3, 1),
                        "max": round(max(baseline) * 1e3, 1)},
        "under_load_ms": {"n": len(lat), "median": round(statistics.median(lat) * 1e3, 1),
                          "p95": round(lat[int(0.95 * (len(lat) - 1))] * 1e3, 1),
                          "max": round(lat[-1] * 1e3, 1)},
        "server_rss_MiB": {"before": rss0 // MiB, "peak": peak["server"] // MiB},
        "tree_rss_MiB": {"before": tree0 // MiB, "peak": peak["tree"] // MiB},
    }
    print("\nmetadata load test:", json.dumps(figures))
    assert len(lat) >= 5, figures  # the other routes were polled while the burst ran
    # liveness bounds with a wide margin (see the module docstring; the real figures are printed):
    # every answer of the other routes within 1 s (typically tens of ms; the old route: 10.7 s)
    assert lat[-1] < max(1.0, 10 * max(baseline)), figures
    # the server process itself holds no parsed header: < 256 MiB growth (old: +2.5 GiB for 12)
    assert peak["server"] - rss0 < 256 * MiB, figures
    # one child process summarises the file once, for all 20 requests: the tree stays < 2 GiB more
    assert peak["tree"] - tree0 < 2048 * MiB, figures

    t1 = time.perf_counter()  # a second burst is answered from the cache
    with ThreadPoolExecutor(20) as pool:
        cached = list(pool.map(lambda _: _get(f"{url}/api/lycoris/metadata?lora_name={BIG}", 120),
                               range(20)))
    second_burst = time.perf_counter() - t1
    print("second burst (cached):", round(second_burst, 3), "s; server RSS after:", _rss(pid) // MiB, "MiB")
    assert second_burst < 30, second_burst  # typically < 0.05 s
    statuses = {s for s, _ in answers + cached}
    bodies = {raw for _, raw in answers + cached}
    assert statuses == {200} and len(bodies) == 1, (statuses, [r[:300] for r in list(bodies)[:2]])
    body = _strict_json(bodies.pop())
    assert body["modules"] == server["modules"] and body["file"] == BIG
    assert body["unmatched_total"] == server["modules"] and len(body["unmatched"]) == 200
