"""ComfyUI nodes of the pack, one module per capability. `NODES` is what the extension registers."""

from .convert import CONVERT_NODES
from .dataset import DATASET_NODES
from .effect_map import EFFECT_MAP_NODES
from .guard import guard_nodes
from .loaders import LOADER_NODES
from .merge import MERGE_NODES
from .schedule import SCHEDULE_NODES
from .train import TRAIN_NODES
from .web_api import register_routes

NODES: list = []
NODES += LOADER_NODES
NODES += CONVERT_NODES
NODES += MERGE_NODES
NODES += SCHEDULE_NODES
NODES += TRAIN_NODES
NODES += DATASET_NODES
NODES += EFFECT_MAP_NODES

guard_nodes(NODES)  # every float input finite and in its declared range (nodes/guard.py)

register_routes()  # HTTP routes for web/js, only inside a running ComfyUI server
