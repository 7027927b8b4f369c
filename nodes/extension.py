"""HeadSeg's ComfyUI extension: the list of nodes ComfyUI registers (V3 entry point)."""

from __future__ import annotations

import sys

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from . import output_links, prompt_migration
from .head_pca_node import HeadPCA
from .kmeans_node import MultiKMeans
from .label_map_nodes import NODES as LABEL_MAP_NODES
from .mask_merge_node import MaskMerge
from .mask_select_node import MaskSelectAtPixel
from .record_node import RecordSelfAttention
from .recording_io_nodes import NODES as RECORDING_IO_NODES
from .upsample_nodes import Upsample, UpsamplingErrorMap

# The pipeline's stages, in order: recording -> HeadPCA -> Upsample -> MultiKMeans -> MaskMerge ->
# MaskSelectAtPixel -> MASK (Upsampling Error Map: a picture of Upsample's stack, beside the masks).
PIPELINE_NODES = [HeadPCA, Upsample, UpsamplingErrorMap, MultiKMeans, MaskMerge, MaskSelectAtPixel]


ALL_NODES = [RecordSelfAttention, *PIPELINE_NODES, *LABEL_MAP_NODES, *RECORDING_IO_NODES]


class HeadSegExtension(ComfyExtension):
    def __init__(self, node_list: list[type[io.ComfyNode]] | None = None):
        """``node_list``: the nodes to register, all of HeadSeg's by default (none for a second copy)."""
        self.node_list = list(ALL_NODES if node_list is None else node_list)

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(self.node_list)


def _prompt_server():
    """The running ComfyUI's PromptServer, or None.

    The server module is looked up, not imported: main.py has imported it before it loads custom
    nodes, and importing it elsewhere (tests, scripts) would only start half a server.
    """
    server_class = getattr(sys.modules.get("server"), "PromptServer", None)
    return getattr(server_class, "instance", None)


def register_prompt_migration() -> bool:
    """Hooks prompt_migration.on_prompt into the running ComfyUI server; False when none runs."""
    return prompt_migration.register(_prompt_server())


def register_output_links() -> bool:
    """Hooks output_links.on_prompt into the running ComfyUI server (after the migration, whose new nodes
    it then sees); False when none runs."""
    return prompt_migration.register(_prompt_server(), output_links.on_prompt)
