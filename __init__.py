"""lycoris-nodes: LoHa / LoKr adapters for ComfyUI (SDXL and Anima).

ComfyUI loads this folder as a custom-node pack and calls `comfy_entrypoint`. All math lives in
`lycoris_core` (pure torch); `nodes/` is the thin ComfyUI glue.
"""

from comfy_api.latest import ComfyExtension, io

from .nodes import NODES

WEB_DIRECTORY = "./web"


class LycorisExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> ComfyExtension:
    return LycorisExtension()
