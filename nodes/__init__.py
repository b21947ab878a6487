"""ComfyUI nodes of the pack, one module per capability. `NODES` is what the extension registers."""

NODES: list = []
