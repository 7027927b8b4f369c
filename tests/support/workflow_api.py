"""Convert a ComfyUI workflow from the UI (litegraph) format to the API format that /prompt takes.

ComfyUI has no server-side converter (the web frontend does it in the browser), so the tests
carry this one. It follows the frontend's rules, using the server's ``/object_info``:

* widget values: ``widgets_values`` holds one value per widget, in the node's input order
  (``input_order``: required, then optional). An INT or COMBO with ``control_after_generate``
  (e.g. KSampler's seed) is followed by one extra UI-only value ("fixed", "randomize", ...),
  which is skipped. Extra trailing values (e.g. LoadImage's "upload" button) are ignored.
  A dict ``widgets_values`` (some newer nodes) is read by name.
* links: ``[id, from_node, from_slot, to_node, to_slot, type]`` become ``[str(from_node), slot]``.
  A widget converted to a socket and linked takes the link instead of the widget value.
* muted nodes (mode 2) are left out; bypassed nodes (mode 4) are left out and each consumer is
  wired to the bypassed node's first input of the same type (as the frontend does); Reroute
  nodes are followed through; nodes that the server does not know (Note, MarkdownNote, groups)
  are UI-only and left out; a PrimitiveNode passes its value to the widgets it feeds.
"""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
MUTED, BYPASSED = 2, 4


def is_widget(spec) -> bool:
    """Whether an object_info input spec ``[type, options]`` is shown as a widget."""
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def widget_names(info: dict) -> list[tuple[str, dict]]:
    """(name, options) of the node's widgets, in the order the frontend creates them."""
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            if is_widget(spec):
                out.append((name, spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """UI-format workflow dict -> API-format prompt dict ``{node_id: {class_type, inputs}}``."""
    nodes = {int(n["id"]): n for n in workflow["nodes"]}
    links = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):  # newer serialisation
            keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
            link = [link[k] for k in keys]
        links[int(link[0])] = link

    def upstream(link_id):
        """(node_id, slot) feeding a link, through Reroutes and bypassed nodes; None if muted."""
        seen = set()
        while link_id is not None and link_id not in seen:
            seen.add(link_id)
            _, src, slot, _, _, ltype = links[int(link_id)]
            node = nodes[int(src)]
            mode = node.get("mode", 0)
            if node["type"] == "Reroute":
                link_id = (node.get("inputs") or [{}])[0].get("link")
                continue
            if mode == BYPASSED:
                out_type = node["outputs"][slot]["type"] if slot < len(node.get("outputs", [])) else ltype
                nxt = None
                for inp in node.get("inputs", []):
                    if inp.get("type") == out_type and inp.get("link") is not None:
                        nxt = inp["link"]
                        break
                link_id = nxt
                continue
            if mode == MUTED or node["type"] not in object_info:
                return None
            return [str(src), int(slot)]
        return None

    def primitive_value(link_id):
        """Value of a PrimitiveNode feeding a widget socket, else None."""
        _, src, _, _, _, _ = links[int(link_id)]
        node = nodes[int(src)]
        if node["type"] == "PrimitiveNode" and node.get("widgets_values"):
            return True, node["widgets_values"][0]
        return False, None

    prompt = {}
    for nid, node in sorted(nodes.items()):
        ctype = node["type"]
        if node.get("mode", 0) in (MUTED, BYPASSED) or ctype not in object_info:
            continue
        info = object_info[ctype]
        inputs = {}
        socket_links = {inp["name"]: inp.get("link") for inp in node.get("inputs", [])}

        values = node.get("widgets_values", [])
        if isinstance(values, dict):
            for name, _ in widget_names(info):
                if name in values:
                    inputs[name] = values[name]
        else:
            i = 0
            for name, opts in widget_names(info):
                if i < len(values):
                    inputs[name] = values[i]
                i += 1
                if opts.get("control_after_generate"):
                    i += 1  # the UI-only "control after generate" value

        for name, link_id in socket_links.items():
            if link_id is None:
                continue
            is_prim, value = primitive_value(link_id)
            if is_prim:
                inputs[name] = value
                continue
            src = upstream(link_id)
            if src is None:
                inputs.pop(name, None)
            else:
                inputs[name] = src
        prompt[str(nid)] = {"class_type": ctype, "inputs": inputs, "_meta": {"title": node.get("title", ctype)}}
    return prompt


def set_widget(api: dict, class_type: str, name: str, value) -> int:
    """Sets input ``name`` of every node of ``class_type`` in an API prompt; returns how many."""
    n = 0
    for node in api.values():
        if node["class_type"] == class_type:
            node["inputs"][name] = value
            n += 1
    return n


def nodes_of(api: dict, class_type: str) -> list[str]:
    return [nid for nid, node in api.items() if node["class_type"] == class_type]
