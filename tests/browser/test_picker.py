"""Mask Select At Pixel's picker: the picture it shows (from the run, or before one from the node
that feeds it, through Reroute nodes and a subgraph's input), clicks on it, its layout in the node,
the mouse wheel over it, and each pick as one undo step.
"""

from __future__ import annotations

import json
import uuid

import pytest

from headseg.tests.browser.helpers import (
    JS_CHECK_STATE,
    JS_KEEP_OUTPUT,
    JS_OPEN_SUBGRAPH_PICKER,
    JS_OWN_WIDGETS,
    JS_TO_SUBGRAPH,
    JS_WIDGETS,
    add_picker,
    click_pixel,
    coded_picture,
    decode_position,
    frame_rect,
    picker_payload,
    picker_selector,
    ready_picker,
    rebuild_as_undo_does,
    screenshot_rgb,
    settle,
    side_panel_inputs,
    synthetic_run,
    vue_nodes,
    wait_picture_ready,
)


def test_picker_without_image_says_so(comfy_page):
    page = comfy_page.page
    node_id = add_picker(page)
    settle(page)
    message = page.text_content(picker_selector(node_id) + " .headseg-message")
    assert "No image yet" in message
    assert page.is_visible(picker_selector(node_id) + " .headseg-message")
    before = page.evaluate(JS_WIDGETS, node_id)
    box = page.eval_on_selector(picker_selector(node_id) + " .headseg-stage", "e => e.getBoundingClientRect().toJSON()")
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    settle(page)
    assert page.evaluate(JS_WIDGETS, node_id) == before


@pytest.mark.parametrize(
    "picture, scale",
    [("landscape", 1.0), ("landscape", 1.75), ("portrait", 1.3)],
    ids=["landscape-zoom1", "landscape-zoom1.75", "portrait-zoom1.3"],
)
def test_click_sets_image_pixel(comfy_page, pictures, picture, scale, screenshots):
    name, W, H = pictures[picture]
    page = comfy_page.page
    node_id = add_picker(page, name, scale)
    wait_picture_ready(page, node_id)

    for fx, fy in [(0.1, 0.2), (0.63, 0.41), (0.97, 0.93)]:
        px, py = int(fx * W), int(fy * H)  # aim at the centre of this image pixel
        rect = frame_rect(page, node_id)
        # the displayed picture keeps the image's aspect ratio (within a screen pixel)
        assert abs(rect["width"] / rect["height"] - W / H) < 2.0 / min(rect["width"], rect["height"]) * (W / H) + 0.02
        assert rect["width"] / W > 1.1, "the test needs more than one screen pixel per image pixel"
        cx, cy = click_pixel(page, node_id, (W, H), (px, py))
        values = page.evaluate(JS_WIDGETS, node_id)
        assert (values["x"], values["y"]) == (px, py), (fx, fy, values)
        # What the user sees under the pointer is the pixel the widgets now name.
        page.mouse.move(5, 5)  # the pointer itself is not drawn, but keep hover effects away
        shot = screenshot_rgb(page)
        seen = decode_position(shot.getpixel((int(cx), int(cy))), W, H)
        assert abs(seen[0] - values["x"]) <= 2.5 and abs(seen[1] - values["y"]) <= 2.5, (seen, values)
        # and the marker is drawn on that pixel
        marker = page.eval_on_selector(
            picker_selector(node_id) + " .headseg-marker", "e => e.getBoundingClientRect().toJSON()"
        )
        assert abs(marker["x"] - cx) <= max(2.0, rect["width"] / W) and abs(marker["y"] - cy) <= max(2.0, rect["height"] / H)

    # A click outside the picture (on the letterbox around it, or past its edge) changes nothing.
    before = page.evaluate(JS_WIDGETS, node_id)
    stage = page.eval_on_selector(picker_selector(node_id) + " .headseg-stage", "e => e.getBoundingClientRect().toJSON()")
    rect = frame_rect(page, node_id)
    outside = []
    if rect["top"] - stage["y"] > 4:
        outside.append((rect["left"] + rect["width"] / 2, (stage["y"] + rect["top"]) / 2))
    if rect["left"] - stage["x"] > 4:
        outside.append(((stage["x"] + rect["left"]) / 2, rect["top"] + rect["height"] / 2))
    assert outside, "expected a letterbox around a non-square picture"
    for ox, oy in outside:
        page.mouse.click(ox, oy)
        settle(page, 200)
        assert page.evaluate(JS_WIDGETS, node_id) == before
    page.screenshot(path=str(screenshots / f"picker-{picture}-zoom{scale}.png"))
    assert comfy_page.pack_problems() == []


def test_click_maps_through_scaled_preview(comfy_page, pictures):
    """The node may send a preview smaller than the masks: x/y follow headseg_size, not the preview."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    synthetic_run(page, node_id, name, (W * 4, H * 4), (0, 0), masks=0, stored=False)
    rect = frame_rect(page, node_id)
    cx, cy = rect["left"] + 0.7 * rect["width"], rect["top"] + 0.35 * rect["height"]
    page.mouse.click(cx, cy)
    settle(page, 250)
    values = page.evaluate(JS_WIDGETS, node_id)
    # 4 mask pixels per preview pixel, about 1.25 screen pixels per preview pixel: within 4 pixels
    assert abs(values["x"] - 0.7 * W * 4) <= 4 and abs(values["y"] - 0.35 * H * 4) <= 4, values
    page.mouse.move(5, 5)
    seen = decode_position(screenshot_rgb(page).getpixel((int(cx), int(cy))), W, H)
    assert abs(seen[0] * 4 - values["x"]) <= 10 and abs(seen[1] * 4 - values["y"]) <= 10


def test_picker_degrades_on_other_payloads(comfy_page, pictures):
    """A payload without the headseg_* keys, or a damaged one, never breaks the picker."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    # damaged: nothing usable -> still the "no image" message, widgets untouched
    before = page.evaluate(JS_WIDGETS, node_id)
    page.evaluate(
        """(id) => app.graph.getNodeById(id).onExecuted({headseg_image: 'nope', headseg_size: ['a', null],
             headseg_masks: [null, 3, {filename: 7}], headseg_pixel: 'x'})""",
        node_id,
    )
    settle(page)
    assert page.is_visible(sel + " .headseg-message")
    assert page.evaluate(JS_WIDGETS, node_id) == before
    # the standard "images" key: the first picture is clicked on, the others become thumbnails
    ref = {"filename": name, "subfolder": "", "type": "input"}
    page.evaluate("([id, ref]) => app.graph.getNodeById(id).onExecuted({images: [ref, ref, ref]})", [node_id, ref])
    wait_picture_ready(page, node_id)
    assert len(page.query_selector_all(sel + " .headseg-thumb")) == 2
    click_pixel(page, node_id, (W, H), (10, 20))
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (10, 20)
    assert comfy_page.pack_problems() == []


JS_NODE_SCREEN_RECT = """
(id) => {
  const node = app.graph.getNodeById(id);
  const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
  const x = (v) => (v + ds.offset[0]) * ds.scale + r.left, y = (v) => (v + ds.offset[1]) * ds.scale + r.top;
  return {left: x(node.pos[0]), top: y(node.pos[1]), right: x(node.pos[0] + node.size[0]),
          bottom: y(node.pos[1] + node.size[1]), size: [...node.size]};
}
"""


@pytest.mark.parametrize("scale", [1.0, 1.5])
@pytest.mark.parametrize("state", ["masks", "no image"])
def test_picker_stays_inside_its_node_at_the_smallest_size(comfy_page, pictures, scale, state):
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page, name if state == "masks" else "", scale)
    sel = picker_selector(node_id)
    if state == "masks":
        synthetic_run(page, node_id, name, (W, H), (10, 10), masks=3)
    settle(page)
    for size in ("default", "smallest"):
        if size == "smallest":  # as far as dragging the corner goes: ComfyUI stops at computeSize()
            page.evaluate(
                "(id) => { const n = app.graph.getNodeById(id); n.setSize(n.computeSize()); app.canvas.setDirty(true, true); }",
                node_id,
            )
            settle(page, 600)
        node = page.evaluate(JS_NODE_SCREEN_RECT, node_id)
        parts = ("", " .headseg-stage", " .headseg-info") + ((" .headseg-strip",) if state == "masks" else ())
        for part in parts:
            box = page.eval_on_selector(sel + part, "e => e.getBoundingClientRect().toJSON()")
            assert box["height"] > 0, (size, part)
            assert box["bottom"] <= node["bottom"] + 0.5 and box["right"] <= node["right"] + 0.5, (size, part, box, node)
            assert box["top"] >= node["top"] - 0.5 and box["left"] >= node["left"] - 0.5, (size, part, box, node)
    assert comfy_page.pack_problems() == []


def test_an_info_line_too_long_for_the_node_has_the_whole_text_as_its_tooltip(comfy_page, pictures):
    """The line under the picture is one line, cut with an ellipsis: at the node's default width a pick after a
    run of 12 masks on a 1024 x 1024 grid ends in "queue to update the masks", past the node's edge. Its tooltip
    is the whole line (it had none: what to do next could not be read)."""
    name = pictures["landscape"][0]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    synthetic_run(page, node_id, name, (1024, 1024), (100, 200), masks=12)
    page.evaluate("(id) => { const n = app.graph.getNodeById(id); n.widgets.find(w => w.name === 'x').value = 500;"
                  " n.headsegPicker.sync(true); }", node_id)
    settle(page)
    info = page.eval_on_selector(sel + " .headseg-info", "e => ({text: e.textContent, title: e.title, cut: e.scrollWidth > e.clientWidth})")
    assert info["text"].endswith("12 masks here · queue to update the masks"), info
    assert info["cut"], info  # the case this test is about: the line is wider than the node
    assert info["title"] == info["text"]
    assert comfy_page.pack_problems() == []


def test_wheel_over_the_picker_zooms_the_canvas(comfy_page, pictures):
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    synthetic_run(page, node_id, name, (W, H), (0, 0), stored=False)
    rect = frame_rect(page, node_id)
    page.mouse.move(rect["left"] + rect["width"] / 2, rect["top"] + rect["height"] / 2)
    before = page.evaluate("() => app.canvas.ds.scale")
    page.mouse.wheel(0, -240)
    settle(page)
    assert page.evaluate("() => app.canvas.ds.scale") != before
    assert comfy_page.pack_problems() == []


def test_picker_forgets_the_picture_when_the_image_link_is_removed(comfy_page, pictures):
    """Before any run the picker shows the linked picture; unlinked, it says there is no image."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    # node ids are reused after graph.clear(): no run of an earlier test's node may stand in for this one's
    page.evaluate("() => { for (const id of Object.keys(app.nodeOutputs)) delete app.nodeOutputs[id]; }")
    node_id, sel = ready_picker(page, name)
    page.evaluate(
        "(id) => { const n = app.graph.getNodeById(id); n.disconnectInput(n.inputs.findIndex(i => i.name === 'image'));"
        " app.canvas.setDirty(true, true); }",
        node_id,
    )
    page.wait_for_function(
        "(sel) => { const m = document.querySelector(sel + ' .headseg-message');"
        " return m && getComputedStyle(m).display !== 'none' && m.textContent.includes('No image yet'); }",
        arg=sel,
        timeout=10_000,
    )
    assert not page.is_visible(sel + " .headseg-frame")
    assert comfy_page.pack_problems() == []


def test_picker_grows_with_its_node_in_the_vue_node_renderer(comfy_page, pictures):
    """With Nodes 2.0 (Vue nodes) the picture takes the node's free height and follows a resize by the
    corner, as on the canvas, instead of staying 200 px tall."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    with vue_nodes(page):
        node_id = add_picker(page, name)
        synthetic_run(page, node_id, name, (W, H), (3, 4))
        box = "(e) => e.getBoundingClientRect().toJSON()"
        node_sel = f"[data-node-id='{node_id}']:not(.headseg-picker)"
        node, picker = page.eval_on_selector(node_sel, box), page.eval_on_selector(picker_selector(node_id), box)
        assert picker["height"] > 0.4 * node["height"], (picker, node)  # the free height, not the 200 px minimum
        x, y = node["right"] - 3, node["bottom"] - 3
        page.mouse.move(x, y)
        page.mouse.down()
        page.mouse.move(x + 100, y + 120, steps=8)
        page.mouse.up()
        settle(page, 600)
        grown = page.eval_on_selector(picker_selector(node_id), box)
        assert grown["height"] >= picker["height"] + 100 and grown["width"] >= picker["width"] + 80, (picker, grown)
        rect = frame_rect(page, node_id)
        assert abs(rect["width"] / rect["height"] - W / H) < 0.05  # the picture keeps its aspect ratio
    assert comfy_page.pack_problems() == []


JS_TRACKER = """() => { const w = app.extensionManager.workflow.activeWorkflow;
  return {modified: !!w.isModified, undo: w.changeTracker.undoQueue.length}; }"""


def test_many_landscape_thumbnails_keep_the_picker_inside_its_node_in_the_vue_node_renderer(comfy_page, pictures):
    """With Nodes 2.0 (Vue nodes) the widget sits in a flex item no narrower than its content: six thumbnails of a
    2:1 picture (about 650 px side by side) made the picker that wide, past the node's right edge, with the
    picture centred in it (half off the node). The strip scrolls inside the node instead."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    with vue_nodes(page):
        node_id = add_picker(page, name)
        synthetic_run(page, node_id, name, (W, H), (3, 4), masks=6)
        settle(page)
        box = "(e) => e.getBoundingClientRect().toJSON()"
        node = page.eval_on_selector(f"[data-node-id='{node_id}']:not(.headseg-picker)", box)
        sel = picker_selector(node_id)
        for part in ("", " .headseg-stage", " .headseg-frame", " .headseg-info", " .headseg-strip"):
            el = page.eval_on_selector(sel + part, box)
            assert el["left"] >= node["left"] - 0.5 and el["right"] <= node["right"] + 0.5, (part, el, node)
        strip = page.eval_on_selector(sel + " .headseg-strip", "e => ({sw: e.scrollWidth, cw: e.clientWidth})")
        assert strip["sw"] > strip["cw"]  # the thumbnails are wider than the node: the strip scrolls
    assert comfy_page.pack_problems() == []


def test_each_pick_is_an_undo_step_and_marks_the_workflow_modified(comfy_page, pictures):
    """A click on the picture sets x / y the way an edit of those widgets does: undo (Ctrl+Z) takes the
    picks back one at a time, and the workflow shows unsaved changes."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page, name)
    wait_picture_ready(page, node_id)
    page.evaluate(JS_CHECK_STATE)  # the graph built above is the starting state
    before = page.evaluate(JS_TRACKER)
    start = page.evaluate(JS_WIDGETS, node_id)
    picks = []
    for fx, fy in [(0.25, 0.5), (0.75, 0.25)]:
        rect = frame_rect(page, node_id)
        page.mouse.click(rect["left"] + fx * rect["width"], rect["top"] + fy * rect["height"])
        settle(page, 250)
        picks.append(page.evaluate(JS_WIDGETS, node_id))
    assert picks[0] != start and picks[1] != picks[0]
    after = page.evaluate(JS_TRACKER)
    assert after["undo"] == before["undo"] + 2 and after["modified"], (before, after)
    for expected in (picks[0], start):
        # what Ctrl+Z runs (the key itself is ComfyUI's: pressed in quick succession in a test, a second
        # press is sometimes dropped by the page)
        got = page.evaluate(
            """async (id) => { await app.extensionManager.workflow.activeWorkflow.changeTracker.undo();
                               const n = app.graph.getNodeById(id);
                               return Object.fromEntries(n.widgets.map(w => [w.name, w.value])); }""",
            node_id,
        )
        assert (got["x"], got["y"]) == (expected["x"], expected["y"]), (got, expected)
    assert comfy_page.pack_problems() == []


def test_picker_shows_a_picture_that_comes_through_reroute_nodes_before_a_run(comfy_page, pictures):
    """Load Image -> Reroute -> Reroute -> the picker's image: the picture is found through the front end's
    Reroute nodes, so a pixel can be picked before the first run, as with a direct link."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page, name)
    wait_picture_ready(page, node_id)
    direct = page.eval_on_selector(picker_selector(node_id) + " img.headseg-base", "i => i.src")
    page.evaluate(
        """(id) => { const node = app.graph.getNodeById(id);
                     const load = app.graph.nodes.find(n => n.type === 'LoadImage');
                     const a = LiteGraph.createNode('Reroute'), b = LiteGraph.createNode('Reroute');
                     a.pos = [300, 300]; b.pos = [360, 300]; app.graph.add(a); app.graph.add(b);
                     load.connect(0, a, 0); a.connect(0, b, 0); b.connect(0, node, node.inputs.findIndex(i => i.name === 'image'));
                     app.canvas.setDirty(true, true); }""",
        node_id,
    )
    settle(page, 800)
    wait_picture_ready(page, node_id)
    assert page.eval_on_selector(picker_selector(node_id) + " img.headseg-base", "i => i.src") == direct
    rect = frame_rect(page, node_id)
    page.mouse.click(rect["left"] + 0.25 * rect["width"], rect["top"] + 0.75 * rect["height"])
    settle(page, 250)
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (int(0.25 * W), int(0.75 * H))
    assert comfy_page.pack_problems() == []


def test_picker_inside_a_subgraph_shows_the_picture_from_outside_before_a_run(comfy_page, pictures):
    """Load Image outside, the picker inside a subgraph: the picture is found through the subgraph's
    input, so a pixel can be picked before the first run, as in the root graph."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page, name)
    wait_picture_ready(page, node_id)
    outside = page.eval_on_selector(picker_selector(node_id) + " img.headseg-base", "i => i.src")
    sg = page.evaluate(JS_TO_SUBGRAPH, [node_id])
    inner = page.evaluate(JS_OPEN_SUBGRAPH_PICKER, sg)
    wait_picture_ready(page, inner)
    assert page.eval_on_selector(picker_selector(inner) + " img.headseg-base", "i => i.src") == outside
    rect = frame_rect(page, inner)
    page.mouse.click(rect["left"] + 0.75 * rect["width"], rect["top"] + 0.25 * rect["height"])
    settle(page, 250)
    values = page.evaluate("(sg) => Object.fromEntries(app.graph.getNodeById(sg).subgraph.nodes.find(n => "
                           "n.type === 'HeadSeg_MaskSelectAtPixel').widgets.map(w => [w.name, w.value]))", sg)  # fmt: skip
    assert (values["x"], values["y"]) == (int(0.75 * W), int(0.25 * H))
    page.evaluate("() => app.canvas.setGraph(app.graph)")
    assert comfy_page.pack_problems() == []


def test_a_linked_picture_without_a_preview_asks_for_a_run(comfy_page):
    """An image input fed by a node that shows no preview (a VAE Decode before any run, or a picture
    from outside a subgraph) cannot be shown before the first run: the picker says to queue once
    rather than to connect an image."""
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    assert "connect an image" in page.text_content(sel + " .headseg-message")
    page.evaluate(
        """(id) => { const node = app.graph.getNodeById(id); const d = LiteGraph.createNode('VAEDecode');
                     d.pos = [40, 80]; app.graph.add(d); d.connect(0, node, node.inputs.findIndex(i => i.name === 'image'));
                     app.canvas.setDirty(true, true); }""",
        node_id,
    )
    page.wait_for_function(
        "(sel) => document.querySelector(sel + ' .headseg-message').textContent.includes('queue the workflow once')",
        arg=sel,
        timeout=15_000,
    )
    assert comfy_page.pack_problems() == []


JS_LOAD_PICTURE = """(name) => { const load = app.graph.nodes.find(n => n.type === 'LoadImage');
  const w = load.widgets.find(w => w.name === 'image'); w.value = name; w.callback?.(name); app.canvas.setDirty(true, true); }"""


def test_another_picture_in_load_image_after_a_run_is_shown_to_pick_on(comfy_page, pictures):
    """After a run the picker shows the run's picture. Another picture chosen in the Load Image that feeds
    it (here of another size) is shown instead, as before the first run, so the pixel is picked on the
    picture the next run segments, not on the last one (which showed no sign of the change); the last
    run's thumbnails go with it, also when undo rebuilds the node. The first picture chosen again brings
    that run back."""
    name, W, H = pictures["landscape"]
    other, OW, OH = pictures["portrait"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    synthetic_run(page, node_id, name, (W, H), (10, 20))
    assert len(page.query_selector_all(sel + " .headseg-thumb")) == 2
    shown = "(sel) => { const i = document.querySelector(sel + ' img.headseg-base'); return [i.naturalWidth, i.naturalHeight]; }"
    page.evaluate(JS_LOAD_PICTURE, other)
    page.wait_for_function(f"(sel) => ({shown})(sel)[0] === {OW}", arg=sel, timeout=10_000)
    wait_picture_ready(page, node_id)
    assert page.evaluate(shown, sel) == [OW, OH]
    assert page.query_selector_all(sel + " .headseg-thumb") == []
    assert f"{OW}×{OH}" in page.text_content(sel + " .headseg-info")
    click_pixel(page, node_id, (OW, OH), (30, 140))  # a pixel of the new picture, as before the first run
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (30, 140)
    rebuild_as_undo_does(page, node_id)  # the last run, still among ComfyUI's outputs, stays away
    settle(page, 1500)
    wait_picture_ready(page, node_id)
    assert page.evaluate(shown, sel) == [OW, OH]
    assert page.query_selector_all(sel + " .headseg-thumb") == []
    page.evaluate(JS_LOAD_PICTURE, name)
    page.wait_for_function("(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length === 2", arg=sel, timeout=10_000)
    wait_picture_ready(page, node_id)
    assert page.evaluate(shown, sel) == [W, H]
    assert comfy_page.pack_problems() == []


JS_KEEP_A_COPY_OF_THE_RUN = """(id) => { const key = String(id);
  app.nodeOutputs[key] = JSON.parse(JSON.stringify(app.nodeOutputs[key])); app.canvas.setDirty(true, true); }"""


def test_a_run_whose_outputs_comfyui_keeps_as_a_copy_gives_way_to_another_picture_upstream(comfy_page, pictures):
    """Newer frontends (1.58) keep a copy of each run's outputs, not the payload handed to the node. The
    picker told runs apart by the payload object: after another picture was chosen in Load Image it took
    the kept copy, on its next redraw, for a run it had never seen, tied the new picture to it and showed
    the last run's picture and thumbnails again for good. The copy is known as the same run, here with the
    pinned frontend made to keep a copy as the newer ones do: the run gives way to the new picture, stays
    away when undo rebuilds the node, and comes back with the first picture."""
    name, W, H = pictures["landscape"]
    other, OW, OH = pictures["portrait"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    synthetic_run(page, node_id, name, (W, H), (10, 20))
    page.evaluate(JS_KEEP_A_COPY_OF_THE_RUN, node_id)
    assert page.evaluate("(id) => app.nodeOutputs[String(id)] !== app.graph.getNodeById(id).headsegPicker.output", node_id)
    shown = "(sel) => { const i = document.querySelector(sel + ' img.headseg-base'); return [i.naturalWidth, i.naturalHeight]; }"
    page.evaluate(JS_LOAD_PICTURE, other)
    page.wait_for_function(f"() => app.graph.nodes.find(n => n.type === 'LoadImage').imgs?.[0]?.src.includes('{other}')", timeout=10_000)
    settle(page, 1000)  # redraws: the kept copy is not taken for a new run
    wait_picture_ready(page, node_id)
    assert page.query_selector_all(sel + " .headseg-thumb") == []
    assert page.evaluate(shown, sel) == [OW, OH]
    rebuild_as_undo_does(page, node_id)
    page.evaluate(JS_KEEP_A_COPY_OF_THE_RUN, node_id)  # the one undo gives back is another copy
    settle(page, 1000)
    wait_picture_ready(page, node_id)
    assert page.query_selector_all(sel + " .headseg-thumb") == []
    assert page.evaluate(shown, sel) == [OW, OH]
    page.evaluate(JS_LOAD_PICTURE, name)
    page.wait_for_function("(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length === 2", arg=sel, timeout=10_000)
    wait_picture_ready(page, node_id)
    assert page.evaluate(shown, sel) == [W, H]
    assert comfy_page.pack_problems() == []


# -> [[the key runKey gives each payload, the key of a copy of it (as newer frontends keep)], ...]
JS_RUN_KEYS = """async (payloads) => { const {runKey} = await import('/extensions/HeadSeg/graph_helpers.js');
  return payloads.map((payload) => [runKey(payload), runKey(JSON.parse(JSON.stringify(payload)))]); }"""


def test_a_run_is_known_by_its_run_id_not_by_its_whole_payload(comfy_page, pictures):
    """The picker keeps a key per run (up to 1000 runs, in three maps): the payload's whole JSON text, about
    16 KB for a run with 150 masks, tens of MB in a long session. Mask Select sends a new id at each run
    (headseg_run): the key is now made of that id, a few dozen characters, the same for a copy of the payload
    (as newer frontends keep it), another for the same content from another run. A payload without it
    (another node's 'images', or a Mask Select from before headseg_run) is still known by its content."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    run_id, other_id = uuid.uuid4().hex, uuid.uuid4().hex
    masks = 150
    payload = picker_payload(name, (W, H), (10, 20), masks=masks) | {"headseg_run": [run_id]}
    payloads = [
        payload,
        payload | {"headseg_run": [other_id]},  # the same content, another run
        payload | {"headseg_run": [run_id, other_id]},  # a list of latents: one run per item, their ids joined
        picker_payload(name, (W, H), (10, 20), masks=2),  # no run id
        picker_payload(name, (W, H), (11, 20), masks=2),
    ]
    keys = page.evaluate(JS_RUN_KEYS, payloads)
    assert all(key == copy for key, copy in keys), keys
    firsts = [key for key, _ in keys]
    assert len(set(firsts)) == len(payloads), firsts
    assert len(json.dumps(payload)) > 50 * masks  # a payload of this size ...
    assert max(len(key) for key in firsts[:3]) < 3 * len(run_id) + 8, firsts[:3]  # ... kept as its run id
    # and the picker takes such a run, and a copy of it as the same run (it keeps its thumbnails on redraws)
    page.evaluate(
        f"""([id, payload]) => {{ ({JS_KEEP_OUTPUT})(id, payload); app.graph.getNodeById(id).onExecuted(payload); }}""",
        [node_id, payload],
    )
    page.evaluate(JS_KEEP_A_COPY_OF_THE_RUN, node_id)
    rebuild_as_undo_does(page, node_id)
    page.evaluate(JS_KEEP_A_COPY_OF_THE_RUN, node_id)
    page.wait_for_function(f"(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length === {masks}", arg=sel)
    settle(page, 1000)
    assert len(page.query_selector_all(sel + " .headseg-thumb")) == masks
    assert comfy_page.pack_problems() == []


JS_RUN_WITH_UPSTREAM_PREVIEW = """([id, upstream, payload]) => {
  const load = app.graph.nodes.find(n => n.type === 'LoadImage');
  const send = (node, output) => app.api.dispatchCustomEvent('executed',
    {node: String(node), display_node: String(node), output, prompt_id: 'p'});
  // a prompt in which the node that feeds 'image' runs first and shows a new preview; this node's own run
  // follows before that preview's picture has loaded (ComfyUI sets node.imgs only then)
  app.api.dispatchCustomEvent('execution_start', {prompt_id: 'p'});
  send(load.id, {images: [{filename: upstream, subfolder: '', type: 'input'}]});
  send(id, payload);
  app.canvas.setDirty(true, true); }"""


def test_a_run_is_kept_when_the_upstream_preview_of_that_run_loads_after_it(comfy_page, pictures):
    """A node that feeds 'image' and shows a preview of each run (a pass-through preview node) sends its
    new preview before this node's run, but ComfyUI shows it (node.imgs) only once its picture has loaded,
    often after the picker got its run. The run was tied to the preview shown before, and dropped as
    'another picture upstream' as soon as its own preview appeared: the fresh run's thumbnails went and the
    picker showed the bare picture. The run stays; a picture chosen upstream after it still drops it."""
    name, W, H = pictures["landscape"]
    other, OW, OH = pictures["portrait"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    synthetic_run(page, node_id, name, (W, H), (10, 20))
    payload = picker_payload(other, (OW, OH), (30, 40), masks=3, info=False)
    page.evaluate(JS_RUN_WITH_UPSTREAM_PREVIEW, [node_id, other, payload])
    page.wait_for_function(
        f"() => app.graph.nodes.find(n => n.type === 'LoadImage').imgs?.[0]?.src.includes('{other}')", timeout=10_000
    )
    settle(page, 1500)  # the picker's ticks see the new upstream preview
    wait_picture_ready(page, node_id)
    assert len(page.query_selector_all(sel + " .headseg-thumb")) == 3
    assert "3 masks here" in page.text_content(sel + " .headseg-info")
    page.evaluate(JS_LOAD_PICTURE, name)  # another picture chosen upstream after the run
    page.wait_for_function("(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length === 0", arg=sel, timeout=10_000)
    assert comfy_page.pack_problems() == []


def test_a_click_while_the_next_runs_picture_loads_is_not_mapped_onto_the_picture_shown(comfy_page, comfy_server, pictures):
    """A run whose picture has another size than the last one's: until that picture has loaded the picker
    still shows the last one. The new run's grid was taken at once, so a click then was mapped with the new
    grid onto the old picture (and the cross drawn there): x / y named another pixel than the one under the
    pointer. Until the picture has loaded, clicks are left alone; then they give the new picture's pixel."""
    name, W, H = pictures["landscape"]
    _, OW, OH = pictures["portrait"]
    other = f"headseg_browser_loading_{uuid.uuid4().hex}.png"  # a picture the browser has not cached
    coded_picture(OW, OH).save(comfy_server.input_dir / other)
    page = comfy_page.page
    node_id = add_picker(page)
    synthetic_run(page, node_id, name, (W, H), (10, 20))
    held = []
    page.route(f"**/view?filename={other}*", lambda route: held.append(route))
    try:
        payload = picker_payload(other, (OW, OH), (10, 20), masks=1, info=False)
        page.evaluate("([id, p]) => app.graph.getNodeById(id).onExecuted(p)", [node_id, payload])
        for _ in range(50):  # the picture's request goes out and is held
            if held:
                break
            settle(page, 100)
        assert held, "the new picture was not requested"
        before = page.evaluate(JS_WIDGETS, node_id)
        click_pixel(page, node_id, (W, H), (200, 30))  # on the last run's picture, still shown
        assert page.evaluate(JS_WIDGETS, node_id) == before, "a click on the old picture was mapped with the new grid"
    finally:
        for route in held:
            route.continue_()
        page.unroute(f"**/view?filename={other}*")
    page.wait_for_function(
        f"(sel) => document.querySelector(sel + ' img.headseg-base').naturalWidth === {OW}", arg=picker_selector(node_id)
    )
    wait_picture_ready(page, node_id)
    cx, cy = click_pixel(page, node_id, (OW, OH), (60, 100))
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (60, 100)
    col, row = decode_position(screenshot_rgb(page).getpixel((int(cx), int(cy))), OW, OH)
    assert abs(col - 60) <= 1.5 and abs(row - 100) <= 1.5
    assert comfy_page.pack_problems() == []


def test_a_run_under_way_when_another_picture_is_chosen_upstream_gives_way_to_it(comfy_page, pictures):
    """A run segments the picture Load Image had when it started. Another picture chosen there while it
    runs (the next one made ready during a long sampling) was taken as the run's: its masks and its
    picture (the first one) were shown for good, and a pixel picked on it was used on the new picture by
    the next run. The picker shows the new picture to pick on, without the run's thumbnails, as for a
    picture chosen after the run; choosing the first picture again brings that run back."""
    name, W, H = pictures["landscape"]
    other, OW, OH = pictures["portrait"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    page.evaluate("() => app.api.dispatchCustomEvent('execution_start', {prompt_id: 'p'})")
    page.evaluate(JS_LOAD_PICTURE, other)  # while the run is under way
    page.wait_for_function(
        f"() => app.graph.nodes.find(n => n.type === 'LoadImage').imgs?.[0]?.src.includes('{other}')", timeout=10_000
    )
    settle(page, 600)
    payload = picker_payload(name, (W, H), (10, 20), info=False)
    page.evaluate(
        """([id, payload]) => { app.api.dispatchCustomEvent('executed', {node: String(id), display_node: String(id), output: payload, prompt_id: 'p'});
                                app.api.dispatchCustomEvent('execution_success', {prompt_id: 'p'}); }""",
        [node_id, payload],
    )
    settle(page, 1500)
    wait_picture_ready(page, node_id)
    shown = "(sel) => { const i = document.querySelector(sel + ' img.headseg-base'); return [i.naturalWidth, i.naturalHeight]; }"
    assert page.query_selector_all(sel + " .headseg-thumb") == []
    assert page.evaluate(shown, sel) == [OW, OH]
    page.evaluate(JS_LOAD_PICTURE, name)
    page.wait_for_function("(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length === 2", arg=sel, timeout=10_000)
    assert comfy_page.pack_problems() == []


def test_the_picker_follows_another_picture_in_load_image_in_the_vue_node_renderer(comfy_page, pictures):
    """With Nodes 2.0 (Vue nodes) the canvas never draws the nodes, so Load Image's node.imgs keeps the
    first picture: the picker went on showing it after another one was chosen there, a pixel picked before
    the first run was the old picture's, and a run was never dropped for another picture chosen upstream.
    The picker shows the picture of Load Image's outputs (as the Vue node does), before a run and after one."""
    name, W, H = pictures["landscape"]
    other, OW, OH = pictures["portrait"]
    page = comfy_page.page
    shown = "(sel) => { const i = document.querySelector(sel + ' img.headseg-base'); return [i.naturalWidth, i.naturalHeight]; }"
    with vue_nodes(page):
        node_id, sel = ready_picker(page, name)
        assert page.evaluate(shown, sel) == [W, H]
        page.evaluate(JS_LOAD_PICTURE, other)
        page.wait_for_function(f"(sel) => ({shown})(sel)[0] === {OW}", arg=sel, timeout=10_000)
        wait_picture_ready(page, node_id)
        assert page.evaluate(shown, sel) == [OW, OH]
        assert f"{OW}×{OH}" in page.text_content(sel + " .headseg-info")
        cx, cy = click_pixel(page, node_id, (OW, OH), (30, 140))  # before the first run: the new picture's pixel
        values = page.evaluate(JS_WIDGETS, node_id)
        assert (values["x"], values["y"]) == (30, 140)
        col, row = decode_position(screenshot_rgb(page).getpixel((int(cx), int(cy))), OW, OH)
        assert abs(col - 30) <= 1.5 and abs(row - 140) <= 1.5
        synthetic_run(page, node_id, other, (OW, OH), (30, 140))
        assert len(page.query_selector_all(sel + " .headseg-thumb")) == 2
        page.evaluate(JS_LOAD_PICTURE, name)  # another picture after the run: the run gives way to it
        page.wait_for_function("(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length === 0", arg=sel, timeout=10_000)
        page.wait_for_function(f"(sel) => ({shown})(sel)[0] === {W}", arg=sel, timeout=10_000)
        page.evaluate(JS_LOAD_PICTURE, other)  # the run's picture again brings the run back
        page.wait_for_function("(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length === 2", arg=sel, timeout=10_000)
    assert comfy_page.pack_problems() == []


def test_the_picker_is_not_listed_in_the_side_panel(comfy_page, pictures):
    """The side panel (1.58's right side panel, Parameters tab) lists the node's inputs to edit there: the
    picker's DOM widget has nothing to edit, and was listed under its name, as an empty entry."""
    page = comfy_page.page
    node_id = add_picker(page, pictures["landscape"][0])
    listed = side_panel_inputs(page, node_id)
    if listed is None:
        pytest.skip("this frontend has no right side panel")
    assert listed == page.evaluate(JS_OWN_WIDGETS, node_id)
    assert comfy_page.pack_problems() == []
