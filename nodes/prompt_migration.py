"""API-format prompts saved for older HeadSeg versions -> today's nodes, before ComfyUI validates them.

Up to version 0.1.0 *Upsample* had a second output, ``error_map``; it is now the node
``HeadSeg_UpsamplingError``. The web UI rewires saved workflows when it opens them
(js/error_map_migration.js); prompts posted in API format never pass through the web UI, so ComfyUI
hands them to ``on_prompt`` first: every input that reads ``["<upsample id>", 1]`` is pointed at a new
*Upsampling Error Map* node fed by that Upsample. Nothing here imports ComfyUI.
"""

from __future__ import annotations

import logging

UPSAMPLE = "HeadSeg_Upsample"
ERROR_MAP = "HeadSeg_UpsamplingError"
_OLD_ERROR_MAP_SLOT = 1
log = logging.getLogger("HeadSeg")


def _reads_slot(value, node_ids: set[str], slot: int) -> bool:
    """True when an input value is a link ``[node id, slot]`` to one of ``node_ids`` at ``slot``."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], (str, int))
        and str(value[0]) in node_ids
        and type(value[1]) is int
        and value[1] == slot
    )


def _free_id(prompt: dict, wanted: str) -> str:
    """``wanted``, or ``wanted-2``, ``wanted-3``, ... : the first that no node of ``prompt`` has."""
    candidate, n = wanted, 1
    while candidate in prompt:
        n += 1
        candidate = f"{wanted}-{n}"
    return candidate


def migrate_upsample_error_map(prompt: dict) -> dict[str, list[str]]:
    """Rewires reads of Upsample's former output 1 to new Upsampling Error Map nodes, in place.

    Returns {new node id: [ids of the nodes now reading it]}; empty when nothing read that output.
    """
    if not isinstance(prompt, dict):
        return {}
    nodes = {str(nid): node for nid, node in prompt.items() if isinstance(node, dict)}
    upsamples = {nid for nid, node in nodes.items() if node.get("class_type") == UPSAMPLE}
    if not upsamples:
        return {}
    added: dict[str, str] = {}  # upsample id -> its new error-map node id
    readers: dict[str, list[str]] = {}
    for nid, node in nodes.items():
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            continue
        for name, value in inputs.items():
            if not _reads_slot(value, upsamples, _OLD_ERROR_MAP_SLOT):
                continue
            source = str(value[0])
            if source not in added:
                new_id = _free_id(prompt, f"{source}-error-map")
                prompt[new_id] = {
                    "class_type": ERROR_MAP,
                    "inputs": {"stack": [value[0], 0]},
                    "_meta": {"title": "HeadSeg Upsampling Error Map"},
                }
                added[source], readers[new_id] = new_id, []
            inputs[name] = [added[source], 0]
            if nid not in readers[added[source]]:
                readers[added[source]].append(nid)
    return readers


def on_prompt(json_data):
    """ComfyUI's on-prompt hook: migrates ``json_data["prompt"]`` in place and returns ``json_data``."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    added = migrate_upsample_error_map(prompt)
    for new_id, readers in added.items():
        log.warning(
            "[HeadSeg] node(s) %s read output 1 (error_map) of Upsample node %s, an output that HeadSeg 0.2.0 "
            "moved to its own node: added Upsampling Error Map node %r to give it. Save the workflow again "
            "(or read this node's output in API prompts) to stop this message.",
            ", ".join(readers),
            prompt[new_id]["inputs"]["stack"][0],
            new_id,
        )
    return json_data


def register(server, handler=None) -> bool:
    """Adds ``handler`` (this module's ``on_prompt`` by default) to a ComfyUI PromptServer once; False when
    there is no server to add it to."""
    handler = on_prompt if handler is None else handler
    handlers = getattr(server, "on_prompt_handlers", None)
    if server is None or handlers is None:
        return False
    if handler not in handlers:
        server.add_on_prompt_handler(handler)
    return True
