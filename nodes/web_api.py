"""HTTP routes for the frontend extension (web/js): a file's metadata before it runs, schedule curves.

GET `/lycoris/metadata?lora_name=<name>` (also under `/api/...`, as ComfyUI mirrors every route)
returns `Adapter.summary()` as JSON for a file of ComfyUI's `loras` folder (`lycoris_core.panel`);
files are named by their `lora_name`, never by an absolute path. Only names that ComfyUI itself
lists in the loras folder are answered, so nothing outside it can be read.
It never stalls the server: only the header is read; results are cached by (path, mtime, size)
(`MetadataCache`, bounded); concurrent requests for one file share one computation; at most
`MAX_CONCURRENT` computations run at once, off the event loop (a thread), and a header over
`INLINE_HEADER_BYTES` is summarised in a child process (its `json.loads` would hold the GIL for
seconds and take hundreds of MiB).
GET `/lycoris/effectmap?lora_name=<name>` returns the file's effect map for the same panel
(`lycoris_core.panel.effect_json`: `blocks`, `blocks_message`, `blocks_png`). It reads the factors,
so it is its own route with its own bounded cache, off the event loop under the same concurrency
limit; files with a header over `INLINE_HEADER_BYTES` get an empty map with a message.
GET `/lycoris/schedule?schedule=<text>&interpolation=<linear|cosine|hold>` returns the strength
curve of a schedule text, parsed by the same code as the node, for the live curve on the node;
its JSON is always valid (no NaN / Infinity).
Registered only inside a running ComfyUI server (PromptServer); the headless test host has none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections import OrderedDict
from pathlib import Path

import folder_paths

from ..lycoris_core.panel import effect_json, header_length, summary_json
from ..lycoris_core.safetensors_io import MAX_HEADER_BYTES
from ..lycoris_core.schedule import INTERPOLATIONS, parse_schedule

log = logging.getLogger("lycoris_nodes")

METADATA_ROUTE = "/lycoris/metadata"
EFFECT_ROUTE = "/lycoris/effectmap"
SCHEDULE_ROUTE = "/lycoris/schedule"
CURVE_POINTS = 101  # samples of the schedule curve over 0..1
INLINE_HEADER_BYTES = 1 << 20  # larger headers are summarised in a child process
MAX_CONCURRENT = 2  # metadata computations at once (threads or child processes)
CHILD_TIMEOUT_S = 300.0
PACK_ROOT = Path(__file__).resolve().parents[1]


def _json(body: dict) -> bytes:
    return json.dumps(body, allow_nan=False).encode()


def resolve_lora(lora_name: str) -> tuple[int, bytes] | tuple[str, tuple]:
    """(path, cache key) of a file of the loras folder, or (status, error body)."""
    if not lora_name:
        return 400, _json({"error": "lora_name is required"})
    if lora_name not in folder_paths.get_filename_list("loras"):
        return 404, _json({"error": f"not a file of the loras folder: {lora_name[:200]}"})
    path = folder_paths.get_full_path("loras", lora_name)
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    if st is None:
        return 404, _json({"error": f"not found: {lora_name}"})
    return path, (os.path.realpath(path), st.st_mtime_ns, st.st_size, lora_name)


def adapter_info(lora_name: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) for one file of the loras folder, computed in this thread."""
    return _answer_now(lora_name, summary_json)


def effect_info(lora_name: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) of the effect-map route for one file, computed in this thread."""
    return _answer_now(lora_name, effect_json)


def _answer_now(lora_name: str, summarise) -> tuple[int, dict]:
    found = resolve_lora(lora_name)
    if isinstance(found[0], int):
        return found[0], json.loads(found[1])
    status, body = summarise(found[0], lora_name)
    return status, json.loads(body)


class MetadataCache:
    """Answers by (real path, mtime, size, name): bounded LRU, one computation per key at a time.
    `summarise(path, name)` → (status, JSON bytes) runs in a thread; with `child`, headers over
    `INLINE_HEADER_BYTES` are summarised in a child process, else `summarise` answers them itself."""

    def __init__(self, max_entries: int = 64, max_bytes: int = 64 << 20,
                 summarise=summary_json, child: bool = True):
        self.summarise, self.child = summarise, child
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict[tuple, tuple[int, bytes]] = OrderedDict()
        self.pending: dict[tuple, asyncio.Future] = {}
        self.computed = 0  # how many summaries were actually computed (tests, stats)
        self._sem: asyncio.Semaphore | None = None

    def _put(self, key: tuple, value: tuple[int, bytes]) -> None:
        self.entries[key] = value
        while len(self.entries) > self.max_entries or (
                len(self.entries) > 1 and sum(len(b) for _, b in self.entries.values()) > self.max_bytes):
            self.entries.popitem(last=False)

    async def get(self, path: str, key: tuple) -> tuple[int, bytes]:
        if key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key]
        fut = self.pending.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._compute(path, key))
            self.pending[key] = fut
            fut.add_done_callback(lambda _f: self.pending.pop(key, None))
        return await asyncio.shield(fut)

    async def _compute(self, path: str, key: tuple) -> tuple[int, bytes]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(MAX_CONCURRENT)
        name = key[-1]
        async with self._sem:
            self.computed += 1
            try:
                n = await asyncio.to_thread(header_length, path)
                if not self.child or n <= INLINE_HEADER_BYTES or n > MAX_HEADER_BYTES or n + 8 > key[2]:
                    value = await asyncio.to_thread(self.summarise, path, name)  # small, or refused unread
                else:
                    value = await _summary_in_child(path, name)
            except OSError as e:
                return 422, _json({"error": f"{name}: cannot read file: {e.strerror}"})
            except Exception as e:  # never a traceback or a path in the answer; not cached
                log.warning("lycoris_nodes: metadata of %s failed: %r", name, e)
                return 500, _json({"error": f"{name}: the file could not be summarised "
                                            f"({type(e).__name__})"})
        self._put(key, value)
        return value


async def _summary_in_child(path: str, name: str) -> tuple[int, bytes]:
    """`lycoris_core.panel` in a child process: (status, body); the server's GIL and heap stay free."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from lycoris_core.panel import main; "
            "sys.exit(main(sys.argv[2:]))")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(PACK_ROOT), path, name,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), CHILD_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return 422, _json({"error": f"{name}: summarising the file took too long"})
    first, _, body = out.partition(b"\n")
    if proc.returncode != 0 or not first.strip().isdigit():
        return 422, _json({"error": f"{name}: the file could not be summarised"})
    return int(first), body


METADATA_CACHE = MetadataCache()
EFFECT_CACHE = MetadataCache(max_entries=32, summarise=effect_json, child=False)


async def metadata_response(lora_name: str) -> tuple[int, bytes]:
    """(status, JSON bytes) for GET /lycoris/metadata; never blocks the event loop."""
    found = await asyncio.to_thread(resolve_lora, lora_name)
    if isinstance(found[0], int):
        return found
    return await METADATA_CACHE.get(*found)


async def effect_response(lora_name: str) -> tuple[int, bytes]:
    """(status, JSON bytes) for GET /lycoris/effectmap; never blocks the event loop."""
    found = await asyncio.to_thread(resolve_lora, lora_name)
    if isinstance(found[0], int):
        return found
    return await EFFECT_CACHE.get(*found)


def schedule_curve(text: str, interpolation: str) -> tuple[int, dict]:
    """(HTTP status, JSON body): the schedule's strength at CURVE_POINTS percents in [0, 1]."""
    if interpolation not in INTERPOLATIONS:
        return 400, {"error": f"interpolation must be one of {list(INTERPOLATIONS)}"}
    try:
        sched = parse_schedule(text, interpolation)
    except ValueError as e:
        return 422, {"error": str(e)}
    percents = [i / (CURVE_POINTS - 1) for i in range(CURVE_POINTS)]
    return 200, {"percent": percents, "strength": [sched.at(p) for p in percents],
                 "keyframes": [[k.percent, k.strength] for k in sched.keyframes],
                 "describe": sched.describe()}


def schedule_response(text: str, interpolation: str) -> tuple[int, bytes]:
    """`schedule_curve` as JSON bytes, always valid JSON (a non-finite value is an error)."""
    status, body = schedule_curve(text, interpolation)
    try:
        return status, _json(body)
    except ValueError:
        return 422, _json({"error": "the schedule gives a strength that is not a finite number"})


def register_routes() -> bool:
    """Add the routes to ComfyUI's PromptServer if one is running in this process; True if added."""
    server = sys.modules.get("server")  # ComfyUI's own server module, imported by main.py only
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None:
        return False
    from aiohttp import web

    def reply(status: int, body: bytes) -> web.Response:
        return web.Response(body=body, status=status, content_type="application/json")

    async def lycoris_metadata(request: web.Request) -> web.Response:
        return reply(*await metadata_response(request.rel_url.query.get("lora_name", "")))

    async def lycoris_effectmap(request: web.Request) -> web.Response:
        return reply(*await effect_response(request.rel_url.query.get("lora_name", "")))

    async def lycoris_schedule(request: web.Request) -> web.Response:
        q = request.rel_url.query
        return reply(*await asyncio.to_thread(schedule_response, q.get("schedule", ""),
                                              q.get("interpolation", "linear")))

    try:
        prompt_server.routes.get(METADATA_ROUTE)(lycoris_metadata)
        prompt_server.routes.get(EFFECT_ROUTE)(lycoris_effectmap)
        prompt_server.routes.get(SCHEDULE_ROUTE)(lycoris_schedule)
    except Exception as e:  # the nodes must keep working even if the panel's routes cannot be added
        log.warning("lycoris_nodes: could not register the web routes: %s", e)
        return False
    log.debug("lycoris_nodes: registered %s, %s, %s", METADATA_ROUTE, EFFECT_ROUTE, SCHEDULE_ROUTE)
    return True
