"""HeadSeg's ComfyUI extension: the list of nodes ComfyUI registers (V3 entry point)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .pipeline_nodes import NODES as PIPELINE_NODES
from .record_node import RecordSelfAttention
from .recording_io_nodes import NODES as RECORDING_IO_NODES


class HeadSegExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [RecordSelfAttention, *PIPELINE_NODES, *RECORDING_IO_NODES]
