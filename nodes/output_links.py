"""Which outputs of a HeadSeg node a prompt links to another node, written into the prompt before ComfyUI
caches by it, so that an output nobody reads need not be kept in ComfyUI's cache.

ComfyUI keys a node's cached outputs on its class, its inputs and its ancestors, never on which of its
outputs are linked: an output left out because nothing read it would be handed, from the cache, to a node
linked to it later. So ComfyUI's on-prompt hook (``on_prompt``, run on every prompt posted to the server,
from the web UI or in API format, before validation and caching) writes into every HeadSeg node that has
outputs worth leaving out one more input, ``LINKED_OUTPUTS_KEY``: the names of its outputs that the prompt
links. ComfyUI hashes every input of a node's prompt entry into its cache key (comfy_execution/caching.py,
get_immediate_node_signature), so linking an output changes the key and the node runs again. ComfyUI
validates and passes to ``execute`` only the inputs a node declares, so the key reaches only the cache key.

A node leaves out an output only when ``outputs_to_keep`` says so: the key is there AND names exactly the
outputs that the prompt it runs in (ComfyUI's hidden PROMPT) links. A prompt without the key (one queued
without the server's hook) or with one that the links contradict makes every output. Nothing here imports
ComfyUI.
"""

from __future__ import annotations

import math

LINKED_OUTPUTS_KEY = "headseg_linked_outputs"

# class_type -> its output names in output order (only nodes that may leave out some of them)
OUTPUT_NAMES: dict[str, tuple[str, ...]] = {
    "HeadSeg_HeadPCA": ("features", "pca_rgb"),
    "HeadSeg_MultiKMeans": ("clusters", "colour_maps"),
    "HeadSeg_MaskMerge": ("masks", "all_masks"),
    "HeadSeg_MaskSelectAtPixel": ("mask", "masks_at_pixel", "overlay", "count"),
}


def _link_source(value) -> tuple[str, int] | None:
    """(node id, output index) of an input value that is a link ``[node id, index]``; None otherwise. Wider than
    ComfyUI's is_link (an int node id, a float index): reading too much as a link only keeps an output."""
    if not (isinstance(value, list) and len(value) == 2):
        return None
    node, index = value
    if isinstance(node, bool) or not isinstance(node, (str, int)):
        return None
    if isinstance(index, bool) or not isinstance(index, (int, float)) or not math.isfinite(index):
        return None
    return str(node), int(index)


def linked_output_indices(prompt: dict) -> dict[str, set[int]]:
    """API prompt {node id: {"inputs": {...}}} -> {node id: indices of its outputs that some node's input links}."""
    linked: dict[str, set[int]] = {}
    for node in prompt.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if not isinstance(inputs, dict):
            continue
        for value in inputs.values():
            source = _link_source(value)
            if source is not None:
                linked.setdefault(source[0], set()).add(source[1])
    return linked


def _linked_names(names: tuple[str, ...], indices: set[int]) -> str:
    """The key's value: the linked outputs' names in output order, comma-separated ('' when none)."""
    return ",".join(name for i, name in enumerate(names) if i in indices)


def annotate(prompt) -> int:
    """Writes LINKED_OUTPUTS_KEY into the inputs of every node of ``prompt`` listed in OUTPUT_NAMES (replacing
    any value there), in place -> the number of nodes annotated. Anything that is not an API prompt is left
    as it is (ComfyUI's validation then answers it)."""
    if not isinstance(prompt, dict):
        return 0
    linked = linked_output_indices(prompt)
    count = 0
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            continue
        class_type = node.get("class_type")
        names = OUTPUT_NAMES.get(class_type) if isinstance(class_type, str) else None  # a list: unhashable
        if names is None:
            continue
        node["inputs"][LINKED_OUTPUTS_KEY] = _linked_names(names, linked.get(str(node_id), set()))
        count += 1
    return count


def outputs_to_keep(prompt, node_id, class_type: str) -> set[str] | None:
    """The names of the outputs node ``node_id`` of ``prompt`` (ComfyUI's hidden PROMPT) must make, or None for
    all of them: None unless the node's LINKED_OUTPUTS_KEY is there and names exactly the outputs the prompt
    links (a prompt changed after it was annotated, a node id that is not in the prompt: all are made)."""
    names = OUTPUT_NAMES[class_type]
    if not isinstance(prompt, dict) or node_id is None:
        return None
    node = prompt.get(str(node_id))
    inputs = node.get("inputs") if isinstance(node, dict) else None
    if not isinstance(inputs, dict) or node.get("class_type") != class_type:
        return None
    written = inputs.get(LINKED_OUTPUTS_KEY)
    linked = linked_output_indices(prompt).get(str(node_id), set())
    if not isinstance(written, str) or written != _linked_names(names, linked):
        return None
    return {name for i, name in enumerate(names) if i in linked}


def on_prompt(json_data):
    """ComfyUI's on-prompt hook: annotates ``json_data["prompt"]`` in place and returns ``json_data``."""
    annotate(json_data.get("prompt") if isinstance(json_data, dict) else None)
    return json_data
