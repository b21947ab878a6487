"""HTTP routes for the frontend extension (web/js): a file's metadata before it runs, schedule curves.

GET `/lycoris/metadata?lora_name=<name>` (also under `/api/...`, as ComfyUI mirrors every route)
returns `Adapter.summary()` as JSON for a file of ComfyUI's `loras` folder, plus its effect map
(`blocks`, `blocks_message`, `blocks_png`: `effect.summary_fields`); the absolute path is
replaced by the name. Only names that ComfyUI itself lists in the loras folder are answered, so
nothing outside it can be read.
GET `/lycoris/schedule?schedule=<text>&interpolation=<linear|cosine|hold>` returns the strength
curve of a schedule text, parsed by the same code as the node, for the live curve on the node.
Registered only inside a running ComfyUI server (PromptServer); the headless test host has none.
"""

from __future__ import annotations

import asyncio
import logging
import sys

import folder_paths

from ..lycoris_core import AdapterError, load_adapter
from ..lycoris_core.effect import summary_fields
from ..lycoris_core.schedule import INTERPOLATIONS, parse_schedule

log = logging.getLogger("lycoris_nodes")

METADATA_ROUTE = "/lycoris/metadata"
SCHEDULE_ROUTE = "/lycoris/schedule"
CURVE_POINTS = 101  # samples of the schedule curve over 0..1
MAX_META_CHARS = 4000  # long metadata values (tag frequencies, dataset dirs) are cut for the panel


def adapter_info(lora_name: str) -> tuple[int, dict]:
    """(HTTP status, JSON body) for one file of the loras folder; errors are data, never raised."""
    if not lora_name:
        return 400, {"error": "lora_name is required"}
    if lora_name not in folder_paths.get_filename_list("loras"):
        return 404, {"error": f"not a file of the loras folder: {lora_name}"}
    path = folder_paths.get_full_path("loras", lora_name)
    if not path:
        return 404, {"error": f"not found: {lora_name}"}
    try:
        adapter = load_adapter(path)
        summary = adapter.summary()
    except (AdapterError, OSError, ValueError) as e:
        return 422, {"error": str(e), "lora_name": lora_name}
    summary |= effect_fields(adapter, path, lora_name)
    summary["file"] = lora_name
    summary["metadata"] = {k: (v if len(str(v)) <= MAX_META_CHARS else str(v)[:MAX_META_CHARS] + " …")
                           for k, v in summary.get("metadata", {}).items()}
    return 200, summary


def effect_fields(adapter, path: str, lora_name: str) -> dict:
    """The effect map for the panel (`effect.summary_fields` with its picture); a file whose
    factors cannot be read gives an empty map and the error (by the file's name), not a 422."""
    try:
        return summary_fields(adapter, with_png=True)
    except (AdapterError, OSError, ValueError) as e:
        return {"blocks": {}, "blocks_message": str(e).replace(path, lora_name), "blocks_png": ""}


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


def register_routes() -> bool:
    """Add the routes to ComfyUI's PromptServer if one is running in this process; True if added."""
    server = sys.modules.get("server")  # ComfyUI's own server module, imported by main.py only
    prompt_server = getattr(getattr(server, "PromptServer", None), "instance", None)
    if prompt_server is None:
        return False
    from aiohttp import web

    async def lycoris_metadata(request: web.Request) -> web.Response:
        status, body = await asyncio.to_thread(adapter_info, request.rel_url.query.get("lora_name", ""))
        return web.json_response(body, status=status)

    async def lycoris_schedule(request: web.Request) -> web.Response:
        q = request.rel_url.query
        status, body = schedule_curve(q.get("schedule", ""), q.get("interpolation", "linear"))
        return web.json_response(body, status=status)

    try:
        prompt_server.routes.get(METADATA_ROUTE)(lycoris_metadata)
        prompt_server.routes.get(SCHEDULE_ROUTE)(lycoris_schedule)
    except Exception as e:  # the nodes must keep working even if the panel's routes cannot be added
        log.warning("lycoris_nodes: could not register the web routes: %s", e)
        return False
    log.debug("lycoris_nodes: registered %s, %s", METADATA_ROUTE, SCHEDULE_ROUTE)
    return True
