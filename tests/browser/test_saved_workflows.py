"""Workflows saved by older versions: older or damaged widget layouts load with clean numbers,
Upsample's former error_map output is rewired to an Upsampling Error Map node (also in subgraphs, and in a
prompt in API format opened in the web UI), and a Multi K-Means inside a group node keeps its device and a
fixed seed.
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest

from headseg.tests.browser.helpers import (
    JS_TO_SUBGRAPH,
    JS_WIDGETS,
    PICKER,
    WORKFLOWS_DIR,
    explore_as_saved_before_the_error_map_node,
    load_workflow,
    settle,
    vue_nodes,
    wait_picture_ready,
)


def old_layout_workflow(picture: str) -> dict:
    """A saved workflow with three picker nodes in older or damaged widget layouts."""

    def picker(node_id, pos, values, inputs):
        return {
            "id": node_id, "type": PICKER, "pos": pos, "size": [300, 420], "flags": {}, "order": node_id,
            "mode": 0, "inputs": inputs, "outputs": [{"name": "mask", "type": "MASK", "links": None}],
            "properties": {"Node name for S&R": PICKER}, "widgets_values": values,
        }  # fmt: skip

    return {
        "last_node_id": 5, "last_link_id": 1, "version": 0.4, "config": {}, "extra": {}, "groups": [],
        "nodes": [
            {"id": 1, "type": "LoadImage", "pos": [0, 0], "size": [300, 320], "flags": {}, "order": 0, "mode": 0,
             "inputs": [], "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]},
                                       {"name": "MASK", "type": "MASK", "links": None}],
             "properties": {}, "widgets_values": [picture, "image"]},
            # older layout: only x and y were widgets; inputs listed the old way
            picker(2, [350, 0], [40, 30], [{"name": "masks", "type": "HEADSEG_MASKS", "link": None},
                                           {"name": "image", "type": "IMAGE", "link": 1}]),
            # a layout that saved an extra value for the picker itself
            picker(3, [700, 0], [41, 31, 2, {"picker": {"x": 41}}], [{"name": "masks", "type": "HEADSEG_MASKS", "link": None}]),
            # damaged values: strings, null, NaN-producing text
            picker(4, [1050, 0], ["42", None, "abc"], [
                {"name": "masks", "type": "HEADSEG_MASKS", "link": None},
                {"name": "x", "type": "INT", "widget": {"name": "x"}, "link": None}]),
            # out of range and fractional
            picker(5, [1400, 0], [-7, 99999999999, 1.6], [{"name": "masks", "type": "HEADSEG_MASKS", "link": None}]),
        ],
        "links": [[1, 1, 0, 2, 1, "IMAGE"]],
    }  # fmt: skip


def test_old_widget_layout_loads(comfy_page, pictures, comfy_server):
    page = comfy_page.page
    spec = comfy_server.object_info()[PICKER]["input"]["required"]
    defaults = {k: spec[k][1]["default"] for k in ("x", "y", "index")}
    workflow = old_layout_workflow(pictures["landscape"][0])
    load_workflow(page, workflow, "old-layout")
    settle(page, 800)
    got = {i: page.evaluate(JS_WIDGETS, i) for i in (2, 3, 4, 5)}
    assert got[2] == {"x": 40, "y": 30, "index": defaults["index"]}
    assert got[3] == {"x": 41, "y": 31, "index": 2}
    assert got[4] == {"x": 42, "y": defaults["y"], "index": defaults["index"]}
    assert got[5] == {"x": spec["x"][1]["min"], "y": spec["y"][1]["max"], "index": 2}
    # every picker got its DOM, node 2 shows the picture of the Load Image it is linked to
    assert page.evaluate("() => document.querySelectorAll('.headseg-picker').length") == 4
    wait_picture_ready(page, 2)
    # and the prompt ComfyUI would queue carries clean integers
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    for i in ("2", "3", "4", "5"):
        for k in ("x", "y", "index"):
            v = prompt[i]["inputs"][k]
            assert isinstance(v, int) and v >= 0, (i, k, v)
        # more_points (0.5.0) takes the 4th value: node 3's saved picker value must not land in it
        assert prompt[i]["inputs"].get("more_points", "") == "", (i, prompt[i]["inputs"])
    assert comfy_page.pack_problems() == []
    assert not [p for p in comfy_page.problems() if re.search(r"\bNaN\b", p)]


# Every number widget of the HeadSeg nodes: [node type, widget name, value, whether it is -0].
JS_HEADSEG_NUMBERS = """() => app.graph.nodes.filter(n => n.type.startsWith('HeadSeg_')).flatMap(n => (n.widgets ?? [])
  .filter(w => typeof w.value === 'number').map(w => [n.type, w.name, w.value, Object.is(w.value, -0)]))"""


def test_a_number_saved_as_minus_zero_loads_as_zero_in_both_renderers(comfy_page):
    """A workflow file holding -0.0 (as Python's json writes a negative zero: JSON.parse keeps its sign) for Mask
    Merge's min_area and batch_index: ComfyUI's loading kept -0, which Nodes 2.0 shows as "-0". The HeadSeg number
    widgets load it as 0 in both renderers. (Passed from Python through page.evaluate, every float 0.0 of a workflow
    arrives as -0: Playwright's serialiser tests `value == float("-0")`, true for 0.0. The file's text is parsed in
    the page here, as ComfyUI parses a workflow file or template.)"""
    page = comfy_page.page
    wf = json.loads((WORKFLOWS_DIR / "headseg_zero_shot_photo.json").read_text())
    for node in wf["nodes"]:  # no Missing Models dialog
        node.get("properties", {}).pop("models", None)
    merge = next(n for n in wf["nodes"] if n["type"] == "HeadSeg_MaskMerge")
    merge["widgets_values"] = [0.9, "NEG_ZERO", "NEG_ZERO"]  # iou_threshold, min_area, batch_index
    text = json.dumps(wf).replace('"NEG_ZERO"', "-0.0")
    assert text.count("-0.0") == 2
    for vue in (False, True):
        with contextlib.ExitStack() as stack:
            if vue:
                stack.enter_context(vue_nodes(page))
                settle(page, 500)
            page.evaluate("async (text) => { await app.loadGraphData(JSON.parse(text), true, true, 'minus-zero'); }",
                          text)
            settle(page, 800)
            numbers = page.evaluate(JS_HEADSEG_NUMBERS)
            assert [r for r in numbers if r[3]] == [], (vue, numbers)
            assert ["HeadSeg_MaskMerge", "min_area", 0, False] in numbers
            if vue:
                # the widget's name: the input's aria-label (frontend 1.32.9) or its box's (1.58, which also
                # shows a float widget's value to its precision: "0.000")
                shown = page.evaluate(
                    "(id) => Object.fromEntries([...document.querySelectorAll(`[data-node-id='${id}'] input`)]"
                    ".map(i => [i.closest('[aria-label]')?.getAttribute('aria-label'), i.value]))", merge["id"])
                for name in ("min_area", "batch_index"):
                    value = shown.get(name)
                    assert value is not None and float(value) == 0 and not value.startswith("-"), shown
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert prompt[str(merge["id"])]["inputs"]["min_area"] == 0
    assert comfy_page.pack_problems() == []


def test_a_workflow_saved_with_upsamples_error_map_output_is_rewired(comfy_page):
    """Old workflows queue as before: the links of Upsample's former error_map output now come from
    an Upsampling Error Map node fed by the same Upsample, and Upsample keeps one output."""
    page = comfy_page.page
    load_workflow(page, explore_as_saved_before_the_error_map_node(), "old-error-map")
    settle(page, 800)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    maps = [i for i, n in prompt.items() if n["class_type"] == "HeadSeg_UpsamplingError"]
    assert len(maps) == 1
    assert prompt[maps[0]]["inputs"]["stack"] == ["10", 0]
    assert prompt["15"]["class_type"] == "PreviewImage" and prompt["15"]["inputs"]["images"] == [maps[0], 0]
    outputs = page.evaluate("() => app.graph.getNodeById(10).outputs.map(o => o.name)")
    assert outputs == ["stack"]
    assert comfy_page.pack_problems() == []


def test_an_old_error_map_output_inside_a_subgraph_is_rewired(comfy_page):
    """The explore example's Upsample and error-map preview in a subgraph, saved when Upsample had the
    error_map output: opening it rewires the subgraph as the root graph is rewired."""
    page = comfy_page.page
    wf = json.loads((WORKFLOWS_DIR / "headseg_explore.json").read_text())
    load_workflow(page, wf, "subgraph-old-error-map")
    settle(page, 500)
    saved = json.loads(page.evaluate("async (ids) => { await (" + JS_TO_SUBGRAPH + ")(ids);"
                                     " return JSON.stringify(app.graph.serialize()); }", [10, 15]))  # fmt: skip
    (definition,) = saved["definitions"]["subgraphs"]
    nodes = {n["id"]: n for n in definition["nodes"]}
    up, shown = nodes[10], nodes[15]
    link = next(l for l in definition["links"] if l["target_id"] == 15)  # Upsample stack -> error-map node
    link.update(origin_slot=1, type="IMAGE")  # as from Upsample's old second output
    up["outputs"][0]["links"].remove(link["id"])
    up["outputs"].append({"name": "error_map", "type": "IMAGE", "links": [link["id"]], "slot_index": 1})
    shown.update(type="PreviewImage", inputs=[{"name": "images", "type": "IMAGE", "link": link["id"]}], outputs=[],
                 properties={"Node name for S&R": "PreviewImage"}, widgets_values=[])  # fmt: skip
    load_workflow(page, saved, "subgraph-old-error-map")
    settle(page, 800)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    maps = [i for i, n in prompt.items() if n["class_type"] == "HeadSeg_UpsamplingError"]
    ups = [i for i, n in prompt.items() if n["class_type"] == "HeadSeg_Upsample"]
    previews = [i for i, n in prompt.items() if n["class_type"] == "PreviewImage" and i.endswith(":15")]
    assert len(maps) == 1 and len(ups) == 1 and len(previews) == 1, prompt
    assert prompt[maps[0]]["inputs"]["stack"] == [ups[0], 0]
    assert prompt[previews[0]]["inputs"]["images"] == [maps[0], 0]
    inner = page.evaluate("() => app.graph.subgraphs.values().next().value.nodes"
                          ".find(n => n.type === 'HeadSeg_Upsample').outputs.map(o => o.name)")  # fmt: skip
    assert inner == ["stack"]
    assert comfy_page.pack_problems() == []


def test_an_old_error_map_output_that_leaves_a_subgraph_is_rewired(comfy_page):
    """Inside a subgraph, the old error_map output fed the subgraph's output, read outside by a Preview
    Image: the new Upsampling Error Map node takes over that link too, so the outside keeps its input."""
    page = comfy_page.page
    wf = json.loads((WORKFLOWS_DIR / "headseg_explore.json").read_text())
    load_workflow(page, wf, "subgraph-old-error-map-out")
    settle(page, 500)
    saved = json.loads(page.evaluate(
        """async (ids) => { const shown = LiteGraph.createNode('PreviewImage'); shown.pos = [1400, 1400];
             app.graph.add(shown); app.graph.getNodeById(15).connect(0, shown, 0);
             await (""" + JS_TO_SUBGRAPH + """)(ids); return JSON.stringify(app.graph.serialize()); }""",
        [10, 15],
    ))  # fmt: skip
    (definition,) = saved["definitions"]["subgraphs"]
    nodes = {n["id"]: n for n in definition["nodes"]}
    up = nodes[10]
    out_link = next(l for l in definition["links"] if l["origin_id"] == 15 and l["target_id"] == -20)
    stack_link = next(l for l in definition["links"] if l["origin_id"] == 10 and l["target_id"] == 15)
    definition["links"].remove(stack_link)  # the error map becomes Upsample's old second output again
    up["outputs"][0]["links"].remove(stack_link["id"])
    out_link.update(origin_id=10, origin_slot=1)
    up["outputs"].append({"name": "error_map", "type": "IMAGE", "links": [out_link["id"]], "slot_index": 1})
    definition["nodes"].remove(nodes[15])
    load_workflow(page, saved, "subgraph-old-error-map-out")
    settle(page, 800)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    maps = [i for i, n in prompt.items() if n["class_type"] == "HeadSeg_UpsamplingError"]
    ups = [i for i, n in prompt.items() if n["class_type"] == "HeadSeg_Upsample"]
    assert len(maps) == 1 and len(ups) == 1, prompt
    assert prompt[maps[0]]["inputs"]["stack"] == [ups[0], 0]
    outside = [n for i, n in prompt.items() if n["class_type"] == "PreviewImage" and ":" not in i]
    assert [n["inputs"].get("images") for n in outside if n["inputs"].get("images", [""])[0] == maps[0]] == [
        [maps[0], 0]
    ], prompt
    assert comfy_page.pack_problems() == []


def test_a_save_label_maps_saved_before_its_masks_input_gets_the_socket(comfy_page):
    """A Save Label Maps node saved before 0.5.6 lists two inputs (clusters, image); loaded now it has
    the optional `masks` socket too, so the merged masks can be linked into it."""
    page = comfy_page.page
    workflow = {
        "last_node_id": 1, "last_link_id": 0, "version": 0.4, "config": {}, "extra": {}, "groups": [], "links": [],
        "nodes": [{
            "id": 1, "type": "HeadSeg_SaveLabelMaps", "pos": [0, 0], "size": [300, 100], "flags": {}, "order": 0,
            "mode": 0, "outputs": [], "properties": {"Node name for S&R": "HeadSeg_SaveLabelMaps"},
            "inputs": [{"name": "clusters", "type": "HEADSEG_CLUSTERS", "link": None},
                       {"name": "image", "type": "IMAGE", "link": None, "shape": 7}],
            "widgets_values": ["dataset/old"],
        }],
    }  # fmt: skip
    load_workflow(page, workflow, "old-save-label-maps")
    settle(page, 800)
    inputs = page.evaluate("() => app.graph.getNodeById(1).inputs.map(i => [i.name, i.type])")
    assert [name for name, _type in inputs if not name == "filename_prefix"] == ["clusters", "image", "masks"]
    assert ["masks", "HEADSEG_MASKS"] in inputs
    widgets = page.evaluate("() => app.graph.getNodeById(1).widgets.map(w => [w.name, w.value])")
    assert widgets == [["filename_prefix", "dataset/old"]]


# Group node widgets read by name -> value, and the prompt inputs of its inner Multi K-Means.
JS_GROUP_STATE = """(id) => { const n = app.graph.getNodeById(id);
  return Object.fromEntries(n.widgets.filter(w => w.serialize !== false).map(w => [w.name, w.value])); }"""


def _convert_to_group_node(page, ids, name):
    """Converts nodes ``ids`` into a (deprecated) group node called ``name``, as the command does (it asks
    for the name in a dialog) -> the group node's id. Skips the test on a frontend without group nodes
    (1.58 has no such command)."""
    command = "Comfy.GroupNode.ConvertSelectedNodesToGroupNode"
    if not page.evaluate("(id) => app.extensionManager.command.commands.some(c => c.id === id)", command):
        pytest.skip(f"this frontend has no group nodes (no {command} command)")
    page.evaluate("(ids) => { app.canvas.deselectAll(); for (const id of ids) app.canvas.select(app.graph.getNodeById(id));"
                  " window.__headsegGroup = app.extensionManager.command.execute("
                  "'Comfy.GroupNode.ConvertSelectedNodesToGroupNode'); }", ids)  # fmt: skip
    field = page.locator("[role=dialog] input[type=text], [role=dialog] input:not([type])").first
    field.wait_for(timeout=10_000)
    field.fill(name)
    field.press("Enter")
    page.evaluate("async () => { await window.__headsegGroup; }")
    settle(page, 500)
    return page.evaluate("(type) => app.graph.nodes.find(n => n.type === type).id", f"workflow>{name}")


def test_multi_kmeans_in_a_group_node_keeps_its_device_and_a_fixed_seed(comfy_page):
    """ComfyUI's group nodes give any inner input named seed a control_after_generate widget, which
    Multi K-Means' seed does not have: Convert to Group Node put Multi K-Means' device value into that
    control and left device empty (the prompt sent device: null), a workflow saved so kept it, and a
    group node placed anew re-drew the k-means seed at every queue (randomize)."""
    page = comfy_page.page
    wf = json.loads((WORKFLOWS_DIR / "headseg_explore.json").read_text())
    next(n for n in wf["nodes"] if n["id"] == 11)["widgets_values"][2] = "cpu"  # Multi K-Means: device cpu
    load_workflow(page, wf, "group-node")
    settle(page, 500)
    group = _convert_to_group_node(page, [11, 12], "hskmeans")
    state = page.evaluate(JS_GROUP_STATE, group)
    assert (state["seed"], state["control_after_generate"], state["device"]) == (0, "fixed", "cpu"), state
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert prompt[f"{group}:0"]["inputs"]["device"] == "cpu", prompt[f"{group}:0"]

    # the same workflow as saved before this fix: the device in the control's place, none in device's
    saved = json.loads(page.evaluate("() => JSON.stringify(app.graph.serialize())"))
    node = next(n for n in saved["nodes"] if n["id"] == group)
    at = list(state).index("control_after_generate")
    node["widgets_values"][at : at + 2] = ["cpu", None]
    load_workflow(page, saved, "group-node-saved")
    settle(page, 500)
    state = page.evaluate(JS_GROUP_STATE, group)
    assert (state["control_after_generate"], state["device"]) == ("fixed", "cpu"), state
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert prompt[f"{group}:0"]["inputs"]["device"] == "cpu", prompt[f"{group}:0"]

    # a group node of that type placed anew: the k-means seed stays fixed
    fresh = page.evaluate("() => { const n = LiteGraph.createNode('workflow>hskmeans'); n.pos = [0, 0];"
                          " app.graph.add(n); return n.id; }")  # fmt: skip
    state = page.evaluate(JS_GROUP_STATE, fresh)
    assert (state["control_after_generate"], state["device"]) == ("fixed", "auto"), state
    assert comfy_page.pack_problems() == []


def test_an_api_prompt_reading_upsamples_error_map_output_opened_in_the_web_ui_is_rewired(comfy_page):
    """A prompt in API format saved for 0.1.0 (a preview reading ["<upsample id>", 1]) opened in the web UI
    (an API workflow file dropped on it): ComfyUI's loadApiJson builds the graph from today's Upsample,
    which has one output, and left that preview unlinked (queued: "Required input is missing"). The
    preview now reads a new Upsampling Error Map node fed by the same Upsample, as the server rewires
    such a prompt when it is queued."""
    page = comfy_page.page
    wf = json.loads((WORKFLOWS_DIR / "headseg_explore.json").read_text())
    load_workflow(page, wf, "api-old-error-map")
    settle(page, 500)
    api = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert api["15"]["class_type"] == "HeadSeg_UpsamplingError" and api["15"]["inputs"]["stack"] == ["10", 0]
    api["15"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 1]}, "_meta": {"title": "error map"}}
    before, after = page.evaluate("async (api) => { const before = JSON.stringify(api);"
                                  " await app.loadApiJson(api, 'api-old-error-map'); return [before, JSON.stringify(api)]; }",
                                  api)  # fmt: skip
    assert after == before  # the caller's prompt is left as it was
    settle(page, 800)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    maps = [i for i, n in prompt.items() if n["class_type"] == "HeadSeg_UpsamplingError"]
    assert len(maps) == 1, prompt
    assert prompt[maps[0]]["inputs"]["stack"] == ["10", 0]
    assert prompt["15"]["class_type"] == "PreviewImage" and prompt["15"]["inputs"].get("images") == [maps[0], 0]
    assert comfy_page.pack_problems() == []
