"""Float inputs of every node: finite and within the schema's declared min/max, checked by the pack.

ComfyUI checks FLOAT widgets against min/max with `<` / `>`, which NaN passes (a JSON `NaN` sent
through POST /prompt). `guard_node(cls)` wraps a node class's `execute` so that, before anything
runs, every `io.Float.Input` of its schema holds a finite number inside its `min`/`max` (when
declared); otherwise the node fails with an error naming the input, and nothing is written or
patched. `nodes/__init__.py` applies it to every class in `NODES`, so a node added there is
covered by declaring `min=` / `max=` on its float inputs (strength widgets: ±100).

The same wrapper keeps absolute server paths out of error answers: an exception leaving a node
has ComfyUI's folders (loras, output, input, models, …) cut from its message, so a file is named
as the user picked it (its `lora_name`, or its path under the output folder).
"""

from __future__ import annotations

import functools
import inspect
import math
import os

import folder_paths
from comfy_api.latest import io

_GUARDED = "_lycoris_float_guard"


def float_bounds(cls: type) -> tuple[str, dict[str, tuple[float | None, float | None]]]:
    """(node id, {input id: (min, max)}) of the node's top-level `io.Float` inputs (None: not
    declared)."""
    schema = cls.define_schema()
    return schema.node_id, {i.id: (i.min, i.max) for i in schema.inputs if isinstance(i, io.Float.Input)}


def check_float_inputs(cls: type, values: dict) -> None:
    """Raise `ValueError` naming the node and input when a float input is not finite or out of
    its declared range. Absent optional inputs (None) are skipped."""
    node, bounds = float_bounds(cls)
    for name, (lo, hi) in bounds.items():
        v = values.get(name)
        for item in v if isinstance(v, (list, tuple)) else [v]:  # list inputs (is_input_list)
            _check_one(node, name, item, lo, hi)


def _check_one(node: str, name: str, v, lo: float | None, hi: float | None) -> None:
    if v is None or isinstance(v, bool):
        return
    if not isinstance(v, (int, float)):
        raise ValueError(f"{node}: input '{name}' must be a number, got {type(v).__name__}")
    bad = not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi)
    if bad:
        span = f"[{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
        raise ValueError(f"{node}: input '{name}' is {v!r}; it must be a finite number in {span}")


def _roots() -> list[str]:
    """ComfyUI's folders (as configured and resolved), longest first, each ending in a separator."""
    roots = {folder_paths.base_path, folder_paths.models_dir, folder_paths.get_output_directory(),
             folder_paths.get_input_directory(), folder_paths.get_temp_directory()}
    for paths, _ in folder_paths.folder_names_and_paths.values():
        roots.update(paths)
    out = set()
    for r in roots:
        if r:
            out.update({os.path.join(r, ""), os.path.join(os.path.realpath(r), "")})
    return sorted(out, key=len, reverse=True)


def scrub_paths(text: str) -> str:
    """`text` with ComfyUI's folders cut off the paths it holds (the file's name relative to them)."""
    for root in _roots():
        if root in text:
            text = text.replace(root, "")
    return text


def scrub_exception(exc: BaseException) -> None:
    """Cut absolute folder paths from the exception's message in place (type and traceback kept)."""
    try:
        if exc.args and any(isinstance(a, str) for a in exc.args):
            exc.args = tuple(scrub_paths(a) if isinstance(a, str) else a for a in exc.args)
    except Exception:  # never let the scrubbing hide the original error
        pass


def guard_node(cls: type) -> type:
    """Wrap `cls.execute` (sync or async) with `check_float_inputs` before and path scrubbing of
    any exception after; idempotent. Returns `cls`."""
    raw = inspect.getattr_static(cls, "execute")
    func = raw.__func__ if isinstance(raw, classmethod) else raw
    if getattr(func, _GUARDED, False) and "execute" in vars(cls):
        return cls
    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def wrapped(c, *args, **kwargs):
            check_float_inputs(c, kwargs)
            try:
                return await func(c, *args, **kwargs)
            except Exception as exc:
                scrub_exception(exc)
                raise
    else:
        @functools.wraps(func)
        def wrapped(c, *args, **kwargs):
            check_float_inputs(c, kwargs)
            try:
                return func(c, *args, **kwargs)
            except Exception as exc:
                scrub_exception(exc)
                raise
    setattr(wrapped, _GUARDED, True)
    cls.execute = classmethod(wrapped)
    return cls


def guard_nodes(classes: list) -> list:
    """`guard_node` on each class; the same list back."""
    for cls in classes:
        guard_node(cls)
    return classes
