"""The pixel the picker names when the last run moved or mapped x / y onto the masks' grid, or x / y
come from a link (js/picker_pixels.js).
"""

from __future__ import annotations

import json

from headseg.tests.browser.helpers import (
    JS_CHECK_STATE,
    JS_HOLD_MESSAGES_AFTER_START,
    JS_LOADED_RECORDING_GRAPH,
    JS_QUEUE_AND_WAIT,
    JS_QUEUE_AND_WAIT_WITH_EARLY_MESSAGES,
    JS_TO_SUBGRAPH,
    JS_VIEW_NODE,
    JS_WIDGETS,
    add_picker,
    click_pixel,
    coded_picture,
    decode_position,
    frame_rect,
    picker_selector,
    rebuild_as_undo_does,
    save_random_recording,
    save_recording_and_picture,
    screenshot_rgb,
    selected_thumbs,
    settle,
    synthetic_run,
    view_picker,
    vue_nodes,
    wait_picture_ready,
)


def test_a_pixel_mapped_by_the_run_becomes_the_widgets_pixel(comfy_page, pictures):
    """Picked on a larger picture before the first run, (100, 60) lies outside the 64 x 40 masks; the
    run maps it to (50, 30). The widgets take that pixel, so the masks are not shown as stale (they
    were, for good: queueing again changed nothing). Widgets changed since the run are left alone."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    set_xy = "([id, x, y]) => { for (const w of app.graph.getNodeById(id).widgets) { if (w.name === 'x') w.value = x; if (w.name === 'y') w.value = y; } }"
    page.evaluate(set_xy, [node_id, 100, 60])
    synthetic_run(page, node_id, name, (64, 40), (50, 30), asked=(100, 60))
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (50, 30)
    assert not page.evaluate("(sel) => document.querySelector(sel + ' .headseg-strip').classList.contains('headseg-stale')", sel)
    assert page.eval_on_selector(sel + " .headseg-marker", "m => m.style.display") == "block"  # drawn (0 x 0 box + cross)
    assert "queue" not in page.text_content(sel + " .headseg-info")
    page.evaluate(set_xy, [node_id, 7, 8])  # the user picked again before this payload arrived
    synthetic_run(page, node_id, name, (64, 40), (50, 30), asked=(100, 60))
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (7, 8)
    assert page.evaluate("(sel) => document.querySelector(sel + ' .headseg-strip').classList.contains('headseg-stale')", sel)
    # x from a link: y alone is not mapped (a mapped y beside an unmapped x would name another pixel)
    page.evaluate(set_xy, [node_id, 100, 60])
    page.evaluate(
        """(id) => { const node = app.graph.getNodeById(id); const p = LiteGraph.createNode('PrimitiveInt');
                     p.pos = [40, 80]; app.graph.add(p); p.connect(0, node, node.inputs.findIndex(i => i.name === 'x')); }""",
        node_id,
    )
    synthetic_run(page, node_id, name, (64, 40), (50, 30), asked=(100, 60))
    assert page.evaluate(JS_WIDGETS, node_id)["y"] == 60
    assert comfy_page.pack_problems() == []


def test_a_pixel_past_the_grid_moved_by_the_run_becomes_the_widgets_pixel_and_stays_clickable(comfy_page, pictures):
    """x, y past the masks' right and bottom edge (the examples' 256, 256 on a smaller image) are moved by
    the run to the nearest pixel of the grid: the widgets take it, the cross marks it, the thumbnails are
    not stale and choose a mask, and a click on the picture picks another pixel."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    set_xy = "([id, x, y]) => { for (const w of app.graph.getNodeById(id).widgets) { if (w.name === 'x') w.value = x; if (w.name === 'y') w.value = y; } }"
    page.evaluate(set_xy, [node_id, W + 40, H + 40])
    synthetic_run(page, node_id, name, (W, H), (W - 1, H - 1), masks=3, asked=(W + 40, H + 40))
    settle(page)
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (W - 1, H - 1)
    assert not page.evaluate("(sel) => document.querySelector(sel + ' .headseg-strip').classList.contains('headseg-stale')", sel)
    assert page.eval_on_selector(sel + " .headseg-marker", "m => m.style.display") == "block"
    assert "queue" not in page.text_content(sel + " .headseg-info")
    thumbs = page.query_selector_all(sel + " .headseg-thumb")
    assert len(thumbs) == 3
    thumbs[2].click()
    settle(page, 250)
    assert page.evaluate(JS_WIDGETS, node_id)["index"] == 2
    click_pixel(page, node_id, (W, H), (10, 20))
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (10, 20)
    assert comfy_page.pack_problems() == []


def test_x_from_a_link_and_y_moved_onto_the_grid_is_not_stale(comfy_page, pictures):
    """x fed by a link, y typed past the bottom edge: the run moves y to the last row. The y widget keeps
    what it asked (one coordinate is not adopted beside a linked one), yet the picker shows the pixel
    the run used, its thumbnails are not stale, and a thumbnail click chooses a mask."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    page.evaluate(
        """([id, y]) => { const node = app.graph.getNodeById(id);
                          for (const w of node.widgets) if (w.name === 'y') w.value = y;
                          const p = LiteGraph.createNode('PrimitiveInt'); p.pos = [40, 80]; app.graph.add(p);
                          p.connect(0, node, node.inputs.findIndex(i => i.name === 'x')); }""",
        [node_id, H + 100],
    )
    synthetic_run(page, node_id, name, (W, H), (5, H - 1), masks=3, asked=(5, H + 100))
    settle(page)
    assert page.evaluate(JS_WIDGETS, node_id)["y"] == H + 100
    assert not page.evaluate("(sel) => document.querySelector(sel + ' .headseg-strip').classList.contains('headseg-stale')", sel)
    assert page.eval_on_selector(sel + " .headseg-marker", "m => m.style.display") == "block"
    info = page.text_content(sel + " .headseg-info")
    assert f"x 5, y {H - 1}" in info and "queue" not in info
    page.query_selector_all(sel + " .headseg-thumb")[1].click()
    settle(page, 250)
    assert page.evaluate(JS_WIDGETS, node_id)["index"] == 1
    assert comfy_page.pack_problems() == []


def test_picker_with_linked_pixel_and_index_past_the_end(comfy_page, pictures):
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    # index past the last mask: the server outputs the coarsest, and that thumbnail is outlined
    page.evaluate("(id) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'index'); w.value = 10; }", node_id)
    synthetic_run(page, node_id, name, (W, H), (0, 0), masks=3, index=10, stored=False)
    settle(page)
    assert selected_thumbs(page, sel) == ["2"]
    # a thumbnail of an old pixel does nothing: queue first
    page.evaluate("(id) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'x'); w.value = 5; }", node_id)
    settle(page)
    page.click(sel + " .headseg-thumb[data-index='0']", force=True)  # aria-disabled: a user can still click it
    settle(page)
    assert page.evaluate(JS_WIDGETS, node_id)["index"] == 10
    # x fed by a link: clicks leave it alone, and the cross marks the pixel the run used
    page.evaluate(
        """(id) => { const node = app.graph.getNodeById(id); const p = LiteGraph.createNode('PrimitiveInt');
                     p.pos = [40, 80]; app.graph.add(p); p.connect(0, node, node.inputs.findIndex(i => i.name === 'x')); }""",
        node_id,
    )
    synthetic_run(page, node_id, name, (W, H), (100, 0), masks=3, index=10, stored=False)
    settle(page)
    before = page.evaluate(JS_WIDGETS, node_id)
    rect = frame_rect(page, node_id)
    marker = page.eval_on_selector(sel + " .headseg-marker", "e => e.getBoundingClientRect().toJSON()")
    assert abs(marker["x"] - (rect["left"] + (100.5 / W) * rect["width"])) <= 2
    assert "queue" not in page.text_content(sel + " .headseg-info")
    page.mouse.click(rect["left"] + 0.2 * rect["width"], rect["top"] + 0.2 * rect["height"])
    settle(page)
    assert page.evaluate(JS_WIDGETS, node_id) == before
    assert "come from a link" in page.text_content(sel + " .headseg-info")
    assert comfy_page.pack_problems() == []


JS_SET_POINTS = "([id, text]) => { app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value = text; }"
JS_POINTS = "(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value"
JS_UNDO = "async () => { await app.extensionManager.workflow.activeWorkflow.changeTracker.undo(); }"


def test_undo_past_a_run_that_mapped_the_pixel_brings_back_the_pixel_asked(comfy_page, pictures):
    """A run mapped the picked (100, 60) and more_points' (100, 60) onto the 64 x 40 masks' grid and the
    widgets took (50, 30). Undo rebuilds the node and restores its last run from the outputs ComfyUI keeps:
    the state undone to (the pixels asked) stays, it is not mapped again (that made a new edit of each
    undo, so the edits before the first run could never be undone), and the next undo goes on back to
    the state before it."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    page.evaluate(JS_CHECK_STATE)  # the graph built above (x, y = 0, 0) is the starting state
    # newer frontends (1.58) fold an edit made within 50 ms of a noted step into that step (the change tracker's
    # squashState): the pixel set below would replace the starting state instead of being a step after it
    settle(page, 200)
    set_xy = "([id, x, y]) => { for (const w of app.graph.getNodeById(id).widgets) { if (w.name === 'x') w.value = x; if (w.name === 'y') w.value = y; } }"
    page.evaluate(set_xy, [node_id, 100, 60])
    page.evaluate(JS_SET_POINTS, [node_id, "100,60"])
    page.evaluate(JS_CHECK_STATE)
    # a run ends well after the last edit: newer frontends (1.58) fold a change made within 50 ms of a noted
    # step into that step (the change tracker's squashState)
    settle(page, 200)
    synthetic_run(page, node_id, name, (64, 40), (50, 30), asked=(100, 60), points=("100,60", [[50, 30, 1]]))
    page.evaluate(JS_CHECK_STATE)
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (50, 30)
    assert page.evaluate(JS_POINTS, node_id) == "50,30"
    page.evaluate(JS_UNDO)
    wait_picture_ready(page, node_id)  # the rebuilt node's picker shows the run's picture again
    settle(page, 1200)  # draws and the slow timer tick
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (100, 60)
    assert page.evaluate(JS_POINTS, node_id) == "100,60"
    # the picker names the pixel that run used for these widgets: the masks are not stale
    assert not page.evaluate("(sel) => document.querySelector(sel + ' .headseg-strip').classList.contains('headseg-stale')", sel)
    page.evaluate(JS_UNDO)
    settle(page, 600)
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (0, 0)
    assert page.evaluate(JS_POINTS, node_id) == ""
    assert comfy_page.pack_problems() == []


def test_a_pixel_picked_on_a_picture_wider_than_16384_px_passes_the_prompt_check(comfy_page, comfy_server):
    """Before the first run the picker shows the connected picture at its own size, and the node maps a pixel
    of it that lies outside the masks' grid. A click near the right edge of a 17 000 px wide scan gave x = 16 8xx,
    which ComfyUI refused when queued ('Value 16830 bigger than max of 16383: x'): the widgets' range was the
    masks' largest grid, not the pictures the node maps from. The prompt check now lets that pixel through."""
    name, W, H = "headseg_browser_wide_17000.png", 17000, 400
    coded_picture(W, H).save(comfy_server.input_dir / name)
    page = comfy_page.page
    node_id = add_picker(page, name)
    page.wait_for_function(
        "(sel) => { const i = document.querySelector(sel + ' img.headseg-base'); return i && i.naturalWidth > 0; }",
        arg=picker_selector(node_id),
        timeout=60_000,
    )
    settle(page, 500)
    rect = frame_rect(page, node_id)
    page.mouse.click(rect["left"] + 0.995 * rect["width"], rect["top"] + 0.5 * rect["height"])
    settle(page, 300)
    x = page.evaluate(JS_WIDGETS, node_id)["x"]
    assert x > 16383, x  # a pixel of the picture, past any masks' grid
    api = page.evaluate("async () => (await app.graphToPrompt()).output")
    assert api[str(node_id)]["inputs"]["x"] == x
    try:
        comfy_server.post_json("/prompt", {"prompt": api, "client_id": "headseg-wide-picture"})
    except RuntimeError as exc:  # 400 with the prompt check's node_errors (masks is not connected here)
        body = str(exc).split(": ", 1)[1]
    else:
        raise AssertionError("a picker without masks was queued")
    errors = [e for e in json.loads(body)["node_errors"][str(node_id)]["errors"] if e["extra_info"]["input_name"] == "x"]
    assert errors == [], errors
    assert comfy_page.pack_problems() == []


JS_KEPT_STATE = "() => structuredClone(app.extensionManager.workflow.activeWorkflow.changeTracker.activeState)"


JS_RELOAD = """async (workflow) => { for (const id of Object.keys(app.nodeOutputs ?? {})) delete app.nodeOutputs[id];
  await app.loadGraphData(workflow, true, true); }"""


def test_after_a_reload_the_cross_and_a_click_are_where_the_node_reads_the_pixel(comfy_page, comfy_server):
    """Load Recording's 64 x 48 masks, Load Image's 300 x 200 picture (stretched onto them). A click at 90 % of
    the picture before the first run is mapped by the run to the grid pixel (57, 43), which the widgets take.
    A page reload (the workflow loaded again, with no node outputs) showed the picture again at its own size:
    the cross was drawn at picture pixel (57, 43), 19 % / 22 % of it, and a click near the top left gave a
    picture pixel inside the grid, which the node reads as a pixel of the grid: elsewhere on the picture. The
    picker now keeps the last run's frame in the node's properties (saved with the workflow): the cross and
    a click are on the masks' grid, as the node reads them."""
    from headseg.nodes.core.pixels import picture_to_mask_pixel

    W, H, w, h = 64, 48, 300, 200
    recording, picture = save_recording_and_picture(comfy_server, "headseg_browser_frame", W, H, w, h)
    page = comfy_page.page
    node_id = page.evaluate(JS_LOADED_RECORDING_GRAPH, [recording, picture])
    sel = picker_selector(node_id)
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    rect = frame_rect(page, node_id)
    page.mouse.click(rect["left"] + 0.9 * rect["width"], rect["top"] + 0.9 * rect["height"])
    settle(page, 300)
    assert page.evaluate(JS_WIDGETS, node_id) | {"index": 0} == {"x": 270, "y": 180, "index": 0}  # the picture's
    events = page.evaluate(JS_QUEUE_AND_WAIT, 120_000)
    assert events["error"] is None, f"run failed: {json.dumps(events['error'])[:2000]}"
    wait_picture_ready(page, node_id)
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (57, 43) == picture_to_mask_pixel(270, 180, (h, w), (H, W))
    # the state ComfyUI keeps for a reload (and undo) has the frame and the pixel at once, without a later edit
    workflow = page.evaluate(JS_KEPT_STATE)
    (saved,) = [n for n in workflow["nodes"] if str(n["id"]) == str(node_id)]
    assert saved["properties"]["headseg_frame"] == {"grid": [W, H], "picture": [w, h]}
    assert saved["widgets_values"][:2] == [57, 43]

    page.evaluate(JS_RELOAD, workflow)
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    settle(page, 600)
    assert picture in page.eval_on_selector(sel + " img.headseg-base", "i => i.src")  # Load Image's: no run
    # the cross lies on the picture where the node reads the widgets' pixel
    rect = frame_rect(page, node_id)
    marker = page.eval_on_selector(sel + " .headseg-marker", "e => e.getBoundingClientRect().toJSON()")
    shot = screenshot_rgb(page)
    px, py = decode_position(shot.getpixel((round(marker["x"]), round(marker["y"]))), w, h)
    assert picture_to_mask_pixel(round(px), round(py), (h, w), (H, W)) == (57, 43), (px, py)
    assert "x 57, y 43" in page.text_content(sel + " .headseg-info")
    # a click near the top left: where a pixel of the picture would lie inside the grid
    cx, cy = rect["left"] + (9.5 / W) * rect["width"], rect["top"] + (8.5 / H) * rect["height"]
    px, py = decode_position(shot.getpixel((round(cx), round(cy))), w, h)
    page.mouse.click(cx, cy)
    settle(page, 300)
    events = page.evaluate(JS_QUEUE_AND_WAIT, 120_000)
    assert events["error"] is None, f"run failed: {json.dumps(events['error'])[:2000]}"
    assert str(node_id) in events["executed"]
    used = page.evaluate("(id) => app.nodeOutputs[String(id)].headseg_pixel", node_id)
    gx, gy = picture_to_mask_pixel(round(px), round(py), (h, w), (H, W))  # the grid pixel under the click
    assert abs(used[0] - gx) <= 1 and abs(used[1] - gy) <= 1, (used, (gx, gy))
    assert comfy_page.pack_problems() == []


def test_after_a_reload_a_picture_vae_encode_crops_is_shown_cropped_and_another_one_at_its_own_size(
    comfy_page, comfy_server, pictures
):
    """A 69 x 53 photo is VAE Encode's: its masks cover its centred 64 x 48 window (2 px in from the left and
    top). After a reload the picker shows that window on the last run's grid, so that the pixel under a click
    is the one the node reads; a picture of another size chosen in Load Image is shown at its own size, as
    before the first run, and the first one on the grid again."""
    W, H, w, h = 64, 48, 69, 53
    name = "headseg_browser_vae_window.png"
    coded_picture(w, h).save(comfy_server.input_dir / name)
    page = comfy_page.page
    node_id = add_picker(page, name)
    wait_picture_ready(page, node_id)
    synthetic_run(page, node_id, name, (W, H), (5, 6), picture_size=(w, h))
    workflow = page.evaluate("() => app.graph.serialize()")
    page.evaluate(JS_RELOAD, workflow)
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    settle(page, 600)
    cx, cy = click_pixel(page, node_id, (W, H), (50, 40))  # the centre of grid pixel (50, 40) on the frame
    values = page.evaluate(JS_WIDGETS, node_id)
    assert (values["x"], values["y"]) == (50, 40)
    px, py = decode_position(screenshot_rgb(page).getpixel((round(cx), round(cy))), w, h)
    assert abs(px - 52) <= 0.6 and abs(py - 42) <= 0.6, (px, py)  # VAE Encode's window: 2 px in
    assert page.evaluate("(id) => app.graph.getNodeById(id).headsegPicker.size", node_id) == [W, H]
    # another picture: its own size, as before the first run
    other, ow, oh = pictures["landscape"]
    choose = """(name) => { const w = app.graph.nodes.find(n => n.type === 'LoadImage').widgets.find(w => w.name === 'image');
                            w.value = name; w.callback?.(name); }"""
    grid_is = "([id, size]) => { const p = app.graph.getNodeById(id).headsegPicker; return !p.loading && `${p.size}` === size; }"
    page.evaluate(choose, other)
    page.wait_for_function(grid_is, arg=[node_id, f"{ow},{oh}"], timeout=15_000)
    page.evaluate(choose, name)  # the first picture again: on the grid
    page.wait_for_function(grid_is, arg=[node_id, f"{W},{H}"], timeout=15_000)
    assert comfy_page.pack_problems() == []


def test_a_shared_workflows_frame_that_no_run_gives_is_not_used(comfy_page, pictures):
    """The frame kept in a node's properties comes back from any workflow file, a shared one too. The node
    reports masks of 1 to 16384 px per side: a frame of a larger grid (a crafted or damaged file) made the
    picker show the connected picture on it, a frame one pixel high where the grid was wide (nothing to click)
    or clicks naming pixels far past the masks (the node moved them to the grid's last pixel: the first pick
    was the corner; past 10⁹ the prompt check refused x). Such a frame is ignored: the picture is shown at
    its own size, as before the first run; a frame a run can give is still used."""
    name, w, h = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page, name)
    wait_picture_ready(page, node_id)
    workflow = page.evaluate("() => app.graph.serialize()")
    (saved,) = [n for n in workflow["nodes"] if str(n["id"]) == str(node_id)]
    size = "(id) => app.graph.getNodeById(id).headsegPicker.size"
    for grid, expected in (([1e12, 1], [w, h]), ([100000, 100000], [w, h]), ([16385, 64], [w, h]), ([64, 48], [64, 48])):
        saved["properties"]["headseg_frame"] = {"grid": grid, "picture": [w, h]}
        page.evaluate(JS_RELOAD, workflow)
        view_picker(page, node_id, 1.0)
        wait_picture_ready(page, node_id)
        settle(page, 300)
        assert page.evaluate(size, node_id) == expected, grid
        click_pixel(page, node_id, expected, (expected[0] // 2, expected[1] // 2))
        values = page.evaluate(JS_WIDGETS, node_id)
        assert (values["x"], values["y"]) == (expected[0] // 2, expected[1] // 2), grid
    assert comfy_page.pack_problems() == []


def test_runs_of_a_subgraph_two_subgraph_nodes_use_keep_no_frame(comfy_page, comfy_server):
    """Mask Select in a subgraph that two subgraph nodes use (the second made by cloning the first, as
    Alt+drag does), one fed a 300 x 200 picture and one a 200 x 300 one: each prompt runs the node once per
    subgraph node, and ComfyUI hands both payloads to the one node inside. The picker kept each run's frame,
    so the frame flipped twice a prompt: every queue, all nodes cached, added two undo steps that change
    nothing on screen (and cleared the redo history) and marked the workflow modified. Such a picker shows
    no upstream picture (it cannot tell whose), so it has no use for a frame: none is kept."""

    W, H = 64, 48
    recording, landscape, portrait = (
        "headseg_browser_two_users.safetensors", "headseg_browser_two_users_a.png", "headseg_browser_two_users_b.png",
    )  # fmt: skip
    save_random_recording(comfy_server, recording, W, H)
    coded_picture(300, 200).save(comfy_server.input_dir / landscape)
    coded_picture(200, 300).save(comfy_server.input_dir / portrait)
    page = comfy_page.page
    node_id = page.evaluate(JS_LOADED_RECORDING_GRAPH, [recording, landscape])
    first = page.evaluate(JS_TO_SUBGRAPH, [node_id])
    second = page.evaluate(
        """([id, picture]) => { const a = app.graph.getNodeById(id); const b = a.clone(); b.pos = [900, 600];
             app.graph.add(b);
             const masks = app.graph.links.get(a.inputs.find(i => i.name === 'masks').link);
             app.graph.getNodeById(masks.origin_id).connect(masks.origin_slot, b, b.inputs.findIndex(i => i.name === 'masks'));
             const load = LiteGraph.createNode('LoadImage'); load.pos = [600, 700]; app.graph.add(load);
             const w = load.widgets.find(w => w.name === 'image'); w.value = picture; w.callback?.(picture);
             load.connect(0, b, b.inputs.findIndex(i => i.name === 'image'));
             return a.subgraph === b.subgraph ? b.id : null; }""",
        [first, portrait],
    )
    assert second is not None  # two users of one subgraph
    state = """() => { const ct = app.extensionManager.workflow.activeWorkflow.changeTracker;
                       const inner = app.graph.subgraphs.values().next().value.nodes.find(n => n.type === 'HeadSeg_MaskSelectAtPixel');
                       return {undo: ct.undoQueue.length, frame: inner.properties.headseg_frame ?? null}; }"""
    page.evaluate(JS_CHECK_STATE)
    ran = []
    for _ in range(3):
        events = page.evaluate(JS_QUEUE_AND_WAIT, 120_000)
        assert events["error"] is None, f"run failed: {json.dumps(events['error'])[:2000]}"
        assert {f"{first}:{node_id}", f"{second}:{node_id}"} <= set(events["executed"])
        settle(page, 300)
        ran.append(page.evaluate(state))
    # the second and third queues run nothing anew: they change nothing in the workflow
    assert ran[2]["undo"] == ran[1]["undo"], ran
    assert [r["frame"] for r in ran] == [None] * 3
    assert comfy_page.pack_problems() == []


# the masks' grid and the picture of run_ended_in_another_tab: W, H, w, h
AWAY_SIZES = (64, 48, 300, 200)


def run_ended_in_another_tab(comfy_page, comfy_server, name):
    """Load Recording -> ... -> Mask Select in workflow tab A, its picker clicked at picture pixel (270, 180)
    before the first run, queued, and the run ended while a new blank tab B was open (A's picker not told of
    it) -> (the node id, A's path, B's path). B stays open."""
    W, H, w, h = AWAY_SIZES
    recording, picture = save_recording_and_picture(comfy_server, name, W, H, w, h)
    page = comfy_page.page
    node_id = page.evaluate(JS_LOADED_RECORDING_GRAPH, [recording, picture])
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    rect = frame_rect(page, node_id)
    page.mouse.click(rect["left"] + 0.9 * rect["width"], rect["top"] + 0.9 * rect["height"])  # picture pixel
    settle(page, 300)
    assert page.evaluate(JS_WIDGETS, node_id) | {"index": 0} == {"x": 270, "y": 180, "index": 0}
    first = page.evaluate("() => app.extensionManager.workflow.activeWorkflow.path")
    # queued, and another workflow opened once the prompt has started and ComfyUI has noted the workflow it
    # belongs to (when queuePrompt returns): the prompt ends there (its messages held back until then)
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.NewBlankWorkflow'); }")
    blank = page.evaluate("() => app.extensionManager.workflow.activeWorkflow.path")
    assert page.evaluate(JS_OPEN_TAB, first)
    ended_in = page.evaluate(JS_QUEUE_THEN_OPEN_TAB, blank)
    assert ended_in == blank, ended_in
    return node_id, first, ended_in


def test_a_run_that_ends_while_another_workflow_is_open_keeps_its_frame(comfy_page, comfy_server):
    """ComfyUI tells a run's nodes of its end only in the workflow open at the time: one queued and left for
    another workflow tab reaches the picker when its tab is opened again, restored from the outputs the tab
    keeps, as undo restores a run (the widgets left as they are). Its frame was not kept and the pixel it
    mapped not taken: a grid pixel clicked on its picture then (the masks' pixels) was read after a page
    reload on the connected picture at its own size, elsewhere on the picture than the node reads it. A run
    the node was never told of is now taken as it comes, when its tab is opened again."""
    from headseg.nodes.core.pixels import picture_to_mask_pixel

    W, H, w, h = AWAY_SIZES
    node_id, first, ended_in = run_ended_in_another_tab(comfy_page, comfy_server, "headseg_browser_away")
    page = comfy_page.page
    page.evaluate(
        """async (p) => { const store = app.extensionManager.workflow;
                          await app.extensionManager.command.execute('Workspace.PreviousOpenedWorkflow');
                          if (store.activeWorkflow.path !== p) await app.extensionManager.command.execute('Workspace.NextOpenedWorkflow'); }""",
        first,
    )
    page.wait_for_function("(p) => app.extensionManager.workflow.activeWorkflow.path === p", arg=first)
    page.evaluate(
        """async (p) => { const store = app.extensionManager.workflow;
                          await store.closeWorkflow(store.openWorkflows.find(w => w.path === p)); }""",
        ended_in,
    )  # the tabs as the other tests found them
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    page.wait_for_function("(id) => !!app.graph.getNodeById(id).headsegPicker.output", arg=node_id, timeout=15_000)
    settle(page, 600)
    # the run's pixel and frame, in the state ComfyUI keeps for a reload
    assert (page.evaluate(JS_WIDGETS, node_id)["x"], page.evaluate(JS_WIDGETS, node_id)["y"]) == (57, 43)
    workflow = page.evaluate(JS_KEPT_STATE)
    (saved,) = [n for n in workflow["nodes"] if str(n["id"]) == str(node_id)]
    assert saved["properties"].get("headseg_frame") == {"grid": [W, H], "picture": [w, h]}
    # a grid pixel clicked on the run's picture, then a reload: the cross stays on that pixel of the picture
    click_pixel(page, node_id, (W, H), (10, 8))
    assert page.evaluate(JS_WIDGETS, node_id) | {"index": 0} == {"x": 10, "y": 8, "index": 0}
    page.evaluate(JS_RELOAD, page.evaluate(JS_KEPT_STATE))
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    settle(page, 600)
    assert page.evaluate("(id) => app.graph.getNodeById(id).headsegPicker.size", node_id) == [W, H]
    sel = picker_selector(node_id)
    marker = page.eval_on_selector(sel + " .headseg-marker", "e => e.getBoundingClientRect().toJSON()")
    px, py = decode_position(screenshot_rgb(page).getpixel((round(marker["x"]), round(marker["y"]))), w, h)
    assert picture_to_mask_pixel(round(px), round(py), (h, w), (H, W)) == (10, 8), (px, py)
    assert comfy_page.pack_problems() == []


# Opens the open workflow tab whose path is ``p`` (the tabs' order is kept: the next one until it is reached).
JS_OPEN_TAB = """async (p) => { const store = app.extensionManager.workflow;
  for (let i = 0; i < store.openWorkflows.length && store.activeWorkflow.path !== p; i++)
    await app.extensionManager.command.execute('Workspace.NextOpenedWorkflow');
  return store.activeWorkflow.path === p; }"""

# Queues the open workflow, and opens the tab whose path is ``p`` once the prompt has started and ComfyUI has
# noted the workflow it belongs to: the prompt's later messages are held back until that tab is open
# (JS_HOLD_MESSAGES_AFTER_START), whatever the time the server takes. -> the path of the tab open when the
# prompt ended.
JS_QUEUE_THEN_OPEN_TAB = (
    """async (p) => { const api = app.api; let done, started; const ended = new Promise(r => done = r);
  const start = new Promise(r => started = r);
  const end = () => done(app.extensionManager.workflow.activeWorkflow.path);
  api.addEventListener('execution_start', () => started(), {once: true});
  for (const type of ['execution_success', 'execution_error']) api.addEventListener(type, end, {once: true});
  ("""
    + JS_HOLD_MESSAGES_AFTER_START
    + """)();
  await app.queuePrompt(0, 1);
  const late = new Promise(r => setTimeout(() => r(false), 60000));
  if (!(await Promise.race([start.then(() => true), late]))) { await window.headsegRelease(); return 'no prompt started'; }
  const opened = await ("""
    + JS_OPEN_TAB
    + """)(p);
  await window.headsegRelease();
  return opened ? await ended : 'tab not opened: ' + p; }"""
)

# Registers (once per page) an extension whose afterLoadGraph waits, after a load of the workflow whose path
# window.headsegLoadHold names, for its promise, as one that fetches something after each load: ComfyUI's graph
# load is under way until it is done.
JS_SLOW_AFTER_LOAD_GRAPH = """() => { if (window.headsegSlowLoadRegistered) return;
  window.headsegSlowLoadRegistered = true;
  app.registerExtension({name: 'HeadSeg.test.slowAfterLoadGraph', async afterLoadGraph() {
    const hold = window.headsegLoadHold;
    if (hold && app.extensionManager.workflow.activeWorkflow?.path === hold.path) await hold.promise; }}); }"""

# Opens workflow tab ``p`` with its load held in afterLoadGraph (JS_SLOW_AFTER_LOAD_GRAPH) until
# window.headsegReleaseLoad() is called; window.headsegOpening ends when the tab is open.
JS_OPEN_TAB_HELD = (
    """(p) => { let release; window.headsegLoadHold = {path: p, promise: new Promise(r => release = r)};
  window.headsegReleaseLoad = async () => { window.headsegLoadHold = null; release(); await window.headsegOpening; };
  window.headsegOpening = ("""
    + JS_OPEN_TAB
    + """)(p); }"""
)

JS_LOADING_GRAPH = "() => window.comfyAPI?.changeTracker?.ChangeTracker?.isLoadingGraph ?? null"


def test_a_run_taken_while_its_tab_still_loads_is_noted_as_a_step_of_its_own(comfy_page, comfy_server):
    """A run that ended while another workflow tab was open is taken when its tab is opened again: the pixel it
    mapped and its frame, noted in the undo history as one step. ComfyUI 1.58 notes no change while a graph
    loads (its change tracker's isLoadingGraph), and the load lasts until every extension's afterLoadGraph is
    done (here one that takes its time): a run taken then was not noted, and the workflow kept for a reload
    lacked its frame and pixel (until the next change ComfyUI noted, whose undo step they would join). The
    noting now waits for the load to end: the run is a step of its own (Ctrl+Z after a pick takes back the pick
    alone)."""
    from headseg.nodes.core.pixels import picture_to_mask_pixel

    W, H, w, h = AWAY_SIZES
    node_id, first, blank = run_ended_in_another_tab(comfy_page, comfy_server, "headseg_browser_away_loading")
    page = comfy_page.page
    page.evaluate(JS_SLOW_AFTER_LOAD_GRAPH)
    page.evaluate(JS_OPEN_TAB_HELD, first)
    try:
        page.wait_for_function(
            "(id) => !!app.graph.getNodeById(id)?.headsegPicker?.output", arg=node_id, timeout=15_000
        )  # the picker took the run: its frame and pixel are in the graph
        loading = page.evaluate(JS_LOADING_GRAPH)
    finally:
        page.evaluate("async () => { await window.headsegReleaseLoad(); }")
    assert loading is not False, "the run was taken after the load"  # null: a frontend without the flag (1.32)
    assert page.evaluate("() => app.extensionManager.workflow.activeWorkflow.path") == first
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    settle(page, 800)
    mapped = list(picture_to_mask_pixel(270, 180, (h, w), (H, W)))
    state = page.evaluate(JS_TAB_STATE, node_id)
    assert state["pixel"] == mapped and state["frame"] == {"grid": [W, H], "picture": [w, h]}, state
    # noted: in the state ComfyUI keeps for a reload, the workflow marked modified
    (kept,) = [n for n in page.evaluate(JS_KEPT_STATE)["nodes"] if str(n["id"]) == str(node_id)]
    assert kept["properties"].get("headseg_frame") == state["frame"] and kept["widgets_values"][:2] == mapped, kept
    assert state["modified"]
    # a pick, then Ctrl+Z: back to the run's pixel, its frame kept
    click_pixel(page, node_id, (W, H), (10, 8))
    page.evaluate("async () => { await app.extensionManager.workflow.activeWorkflow.changeTracker.undo(); }")
    page.wait_for_function("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'x').value !== 10", arg=node_id)
    undone = page.evaluate(JS_TAB_STATE, node_id)
    assert undone["pixel"] == mapped and undone["frame"] == state["frame"], undone
    page.evaluate(
        """async (p) => { const store = app.extensionManager.workflow;
                          await store.closeWorkflow(store.openWorkflows.find(w => w.path === p), {warnIfUnsaved: false}); }""",
        blank,
    )  # the tabs as the other tests found them
    assert comfy_page.pack_problems() == []


JS_SLOW_KMEANS = """() => { app.graph.nodes.find(n => n.type === 'HeadSeg_MultiKMeans').widgets
  .find(w => w.name === 'cluster_counts').value = '2,5,10,20,30'; }"""

JS_TAB_STATE = """(id) => { const wf = app.extensionManager.workflow.activeWorkflow; const node = app.graph.getNodeById(id);
  return {path: wf.path, undo: wf.changeTracker.undoQueue.length, modified: !!wf.isModified,
          frame: node.properties.headseg_frame ?? null,
          pixel: ['x', 'y'].map(name => node.widgets.find(w => w.name === name).value)}; }"""


JS_PICKER_NODE_STATE = """(id) => { const wf = app.extensionManager.workflow.activeWorkflow;
  const node = wf.changeTracker.activeState?.nodes?.find(n => String(n.id) === String(id));
  return JSON.stringify({properties: node?.properties, widgets_values: node?.widgets_values}); }"""


def assert_picker_unchanged(page, node_id, before):
    """The open workflow's Mask Select node as ``before`` (JS_TAB_STATE) found it: the same tab, no frame or
    pixel of another tab's run, and nothing of it changed in the state its change tracker notes (an undo step
    of the picker's). The tab's undo queue and modified mark are not compared: ComfyUI shows another tab's
    run in the open tab's other nodes of the same ids (text outputs), which can resize them, an undo step of
    its own."""
    after = page.evaluate(JS_TAB_STATE, node_id)
    keys = ("path", "frame", "pixel")
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys}, (after, before)
    assert page.evaluate(JS_PICKER_NODE_STATE, node_id) == before["node"], "the picker node changed in the tracker"


def test_undo_after_a_real_run_brings_that_run_back_in_its_own_workflow(comfy_page, comfy_server):
    """A run of the open workflow, then undo (its nodes rebuilt in the same workflow, the outputs its change
    tracker keeps given back): the picker shows that run again (its thumbnails and frame), with no undo step
    of its own: the run is the open workflow's, not another tab's."""
    W, H, w, h = 64, 48, 300, 200
    recording, picture = save_recording_and_picture(comfy_server, "headseg_browser_undo_real", W, H, w, h)
    page = comfy_page.page
    node_id = page.evaluate(JS_LOADED_RECORDING_GRAPH, [recording, picture])
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    events = page.evaluate(JS_QUEUE_AND_WAIT, 120_000)
    assert events["error"] is None, f"run failed: {json.dumps(events['error'])[:2000]}"
    sel = picker_selector(node_id)
    page.wait_for_function("(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length > 0", arg=sel, timeout=15_000)
    settle(page, 600)
    page.evaluate(JS_CHECK_STATE)
    thumbs = len(page.query_selector_all(sel + " .headseg-thumb"))
    before = page.evaluate(JS_TAB_STATE, node_id)
    rebuild_as_undo_does(page, node_id)
    view_picker(page, node_id, 1.0)
    page.wait_for_function("(id) => !!app.graph.getNodeById(id).headsegPicker.output", arg=node_id, timeout=15_000)
    wait_picture_ready(page, node_id)
    settle(page, 1500)  # the slow timer ticks the picker
    assert len(page.query_selector_all(sel + " .headseg-thumb")) == thumbs
    assert page.evaluate(JS_TAB_STATE, node_id) == before
    assert comfy_page.pack_problems() == []


# masks with many pixels and k (a prompt of some length, as in use), and a picture of another size
DUPLICATE_SIZES = (256, 192, 300, 200)  # W, H, w, h


def workflow_and_its_duplicate(comfy_page, comfy_server, name):
    """A Load Recording -> Mask Select workflow A whose picker was clicked at pixel (270, 180) of a 300 x 200
    picture on 256 x 192 masks, duplicated as B (open) -> (node id, A's path, B's path, the grid pixel A's
    run maps the click to)."""
    from headseg.nodes.core.pixels import picture_to_mask_pixel

    W, H, w, h = DUPLICATE_SIZES
    recording, picture = save_recording_and_picture(comfy_server, name, W, H, w, h)
    page = comfy_page.page
    node_id = page.evaluate(JS_LOADED_RECORDING_GRAPH, [recording, picture])
    page.evaluate(JS_SLOW_KMEANS)
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    rect = frame_rect(page, node_id)
    page.mouse.click(rect["left"] + 0.9 * rect["width"], rect["top"] + 0.9 * rect["height"])  # picture pixel
    mapped = picture_to_mask_pixel(270, 180, (h, w), (H, W))
    settle(page, 300)
    page.evaluate(JS_CHECK_STATE)
    first = page.evaluate("() => app.extensionManager.workflow.activeWorkflow.path")
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.DuplicateWorkflow'); }")
    page.wait_for_function("(p) => app.extensionManager.workflow.activeWorkflow.path !== p", arg=first)
    copy = page.evaluate("() => app.extensionManager.workflow.activeWorkflow.path")
    return node_id, first, copy, mapped


def queue_in_a_then_check_only_a_takes_the_run(page, node_id, first, copy, before, mapped):
    """Queues workflow A (open: ``first``) and opens its duplicate B (``copy``) once the prompt has started
    and ComfyUI has noted the workflow it belongs to (its messages held back until then): B's picker stays
    as ``before`` found it (assert_picker_unchanged), and A, opened again, takes its run: the frame and the
    pixel it mapped. B's tab is closed after, the tabs as the other tests found them."""
    W, H, w, h = DUPLICATE_SIZES
    ended_in = page.evaluate(JS_QUEUE_THEN_OPEN_TAB, copy)
    assert ended_in == copy, ended_in
    settle(page, 1500)  # the slow timer ticks the picker
    assert_picker_unchanged(page, node_id, before)
    assert page.evaluate(JS_OPEN_TAB, first)
    view_picker(page, node_id, 1.0)
    page.wait_for_function("(id) => !!app.graph.getNodeById(id).headsegPicker.output", arg=node_id, timeout=15_000)
    settle(page, 600)
    state = page.evaluate(JS_TAB_STATE, node_id)
    assert state["frame"] == {"grid": [W, H], "picture": [w, h]} and state["pixel"] == list(mapped), state
    page.evaluate(
        """async (p) => { const store = app.extensionManager.workflow;
                          await store.closeWorkflow(store.openWorkflows.find(w => w.path === p), {warnIfUnsaved: false}); }""",
        copy,
    )


def test_a_run_queued_from_a_workflow_changes_nothing_in_its_duplicate_open_when_it_ends(comfy_page, comfy_server):
    """ComfyUI hands a run's 'executed' message to the node of the same id in the workflow open when the run
    ends: a run queued from workflow A and ended while its duplicate B was open (the same nodes and ids) wrote
    A's frame into B's Mask Select node and the pixel it mapped into B's widgets, with an undo step, marking B
    modified; and A, opened again, took neither (its node counted the run as one it had been told of). A run
    queued from another workflow tab now changes nothing in the open one, and reaches its own when its tab
    is opened again."""
    page = comfy_page.page
    node_id, first, copy, mapped = workflow_and_its_duplicate(comfy_page, comfy_server, "headseg_browser_duplicate")
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    settle(page, 600)
    before = page.evaluate(JS_TAB_STATE, node_id)
    before["node"] = page.evaluate(JS_PICKER_NODE_STATE, node_id)
    assert before["frame"] is None and before["pixel"] == [270, 180], before
    assert page.evaluate(JS_OPEN_TAB, first)
    queue_in_a_then_check_only_a_takes_the_run(page, node_id, first, copy, before, mapped)
    assert comfy_page.pack_problems() == []


def test_a_run_queued_from_a_workflow_changes_nothing_in_its_duplicate_that_ran_before(comfy_page, comfy_server, pictures):
    """As above, with the duplicate B run once (on the portrait) before A is queued: its tab, opened again,
    gets its outputs back from its change tracker, and ComfyUI then writes every payload the open graph is
    handed into that tracker, A's run too. B took A's run all the same (its frame written over B's, an undo
    step, B modified); A, opened again, takes it."""
    W, H = DUPLICATE_SIZES[:2]
    other, ow, oh = pictures["portrait"]
    page = comfy_page.page
    node_id, first, copy, mapped = workflow_and_its_duplicate(comfy_page, comfy_server, "headseg_browser_duplicate_ran")
    page.evaluate(
        """(name) => { const load = app.graph.nodes.find(n => n.type === 'LoadImage');
             const w = load.widgets.find(w => w.name === 'image'); w.value = name; w.callback?.(name); }""",
        other,
    )
    events = page.evaluate(JS_QUEUE_AND_WAIT, 120_000)  # B's own run, on the portrait
    assert events["error"] is None, f"run failed: {json.dumps(events['error'])[:2000]}"
    settle(page, 600)
    page.evaluate(JS_CHECK_STATE)
    before = page.evaluate(JS_TAB_STATE, node_id)
    before["node"] = page.evaluate(JS_PICKER_NODE_STATE, node_id)
    assert before["frame"] == {"grid": [W, H], "picture": [ow, oh]}, before
    assert page.evaluate(JS_OPEN_TAB, first)
    page.evaluate(  # another k-means seed in A: its prompt runs for a while, not from the cache
        "() => { app.graph.nodes.find(n => n.type === 'HeadSeg_MultiKMeans').widgets.find(w => w.name === 'seed').value = 7; }"
    )
    queue_in_a_then_check_only_a_takes_the_run(page, node_id, first, copy, before, mapped)
    assert comfy_page.pack_problems() == []


def test_a_run_served_from_the_cache_to_a_duplicate_stays_its_first_workflows_run(comfy_page, comfy_server):
    """Workflow A run, then its duplicate B queued with nothing changed: ComfyUI serves B's prompt from its cache
    and hands B's Mask Select A's payload again (the same content and headseg_run). The run is both tabs':
    A, opened again, shows it. The picker noted one workflow per run and the last one won, so A's picker,
    rebuilt as its tab opened, took its own run for B's and showed none."""
    page = comfy_page.page
    node_id, first, copy, _ = workflow_and_its_duplicate(comfy_page, comfy_server, "headseg_browser_duplicate_cached")
    sel = picker_selector(node_id)
    thumbs = "(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length"
    assert page.evaluate(JS_OPEN_TAB, first)
    view_picker(page, node_id, 1.0)
    events = page.evaluate(JS_QUEUE_AND_WAIT, 120_000)  # A's run
    assert events["error"] is None, f"run failed: {json.dumps(events['error'])[:2000]}"
    page.wait_for_function(f"(sel) => ({thumbs})(sel) > 0", arg=sel, timeout=15_000)
    shown = page.evaluate(thumbs, sel)
    run_id = "(id) => app.graph.getNodeById(id).headsegPicker.output?.headseg_run?.[0] ?? null"
    first_run = page.evaluate(run_id, node_id)
    assert first_run
    assert page.evaluate(JS_OPEN_TAB, copy)
    view_picker(page, node_id, 1.0)
    # B queued, nothing changed: every node served from the cache, A's payload handed over again. The messages
    # are held until the page has the prompt's id (a prompt run from the cache can end before that answer)
    ended = page.evaluate(
        """async () => { ("""
        + JS_HOLD_MESSAGES_AFTER_START
        + """)(); let end; const ended = new Promise(r => end = r);
             for (const t of ['execution_success', 'execution_error']) app.api.addEventListener(t, () => end(t), {once: true});
             await app.queuePrompt(0, 1); await window.headsegRelease?.(); return await ended; }"""
    )
    assert ended == "execution_success", ended
    page.wait_for_function(f"(sel) => ({thumbs})(sel) === {shown}", arg=sel, timeout=15_000)  # B shows it as its run
    assert page.evaluate(run_id, node_id) == first_run  # A's run again, from the cache
    assert page.evaluate(JS_OPEN_TAB, first)
    view_picker(page, node_id, 1.0)
    settle(page, 1500)  # the slow timer ticks the rebuilt picker
    assert page.evaluate(thumbs, sel) == shown
    page.evaluate(
        """async (p) => { const store = app.extensionManager.workflow;
                          await store.closeWorkflow(store.openWorkflows.find(w => w.path === p), {warnIfUnsaved: false}); }""",
        copy,
    )
    assert comfy_page.pack_problems() == []


# [id, other, batches]: queues one click of each batch count in ``batches`` (app.queuePrompt(0, n)), the page's
# messages held from the first prompt's start on; then chooses picture ``other`` in Load Image and, once it shows
# it, lets the messages through and waits for every prompt to end -> {waiting: whether a prompt had not started
# yet when the picture was chosen, kept: for each run of Mask Select node ``id``, whether its picker took no run
# for the picture it shows (it gave way to the new one), ended: each prompt's id as it ended, 'error' for a failed one}.
JS_QUEUE_THEN_CHOOSE_PICTURE = (
    """async ([id, other, batches]) => { const api = app.api; const started = [], kept = [], ended = [];
         const picker = app.graph.getNodeById(id).headsegPicker;
         const onStart = (e) => started.push(e.detail.prompt_id);
         const onRun = (e) => { if (String(e.detail?.node) === String(id))
           kept.push(!picker.output || picker.upstreamChangedSince(picker.output)); };
         const onEnd = (e) => ended.push(e.detail?.prompt_id ?? 'error');
         api.addEventListener('execution_start', onStart);
         api.addEventListener('executed', onRun);
         for (const type of ['execution_success', 'execution_error']) api.addEventListener(type, onEnd);
         ("""
    + JS_HOLD_MESSAGES_AFTER_START
    + """)();
         for (const n of batches) await app.queuePrompt(0, n);
         const total = batches.reduce((a, n) => a + n, 0);
         const waiting = started.length < total;
         const load = app.graph.nodes.find(n => n.type === 'LoadImage');
         const w = load.widgets.find(w => w.name === 'image'); w.value = other; w.callback?.(other);
         app.canvas.setDirty(true, true);
         const t0 = performance.now();
         const loaded = () => load.imgs?.[0]?.complete && load.imgs[0].src.includes(other);
         while (!loaded() && performance.now() - t0 < 20000) { app.canvas.draw(true, true); await new Promise(r => setTimeout(r, 100)); }
         await window.headsegRelease();
         while (ended.length < total && performance.now() - t0 < 120000) await new Promise(r => setTimeout(r, 100));
         api.removeEventListener('execution_start', onStart);
         api.removeEventListener('executed', onRun);
         for (const type of ['execution_success', 'execution_error']) api.removeEventListener(type, onEnd);
         return {waiting, kept, ended}; }"""
)


def second_prompt_gives_way(page, comfy_server, pictures, name):
    """Two prompts queued on a 512 x 384 picture; the portrait chosen in Load Image while the second waits in
    the queue: the picker ends on the portrait, with no thumbnails (test below)."""
    W, H = 512, 384
    recording, picture = save_recording_and_picture(comfy_server, name, W, H, W, H)
    other, OW, OH = pictures["portrait"]
    node_id = page.evaluate(JS_LOADED_RECORDING_GRAPH, [recording, picture])
    page.evaluate(JS_SLOW_KMEANS)  # a first prompt that takes a while: more clusters on more pixels
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    # the messages held back from the first prompt's start until the other picture is chosen: the second
    # prompt waits in the queue then, as the page sees it, whatever the time the server takes
    result = page.evaluate(JS_QUEUE_THEN_CHOOSE_PICTURE, [node_id, other, [1, 1]])
    assert result["waiting"], "the second prompt started before another picture was chosen"
    assert len(result["ended"]) == 2 and "error" not in result["ended"], result
    sel = picker_selector(node_id)
    page.wait_for_function(
        f"() => app.graph.nodes.find(n => n.type === 'LoadImage').imgs?.[0]?.src.includes('{other}')", timeout=10_000
    )
    settle(page, 1500)  # the slow timer ticks the picker
    wait_picture_ready(page, node_id)
    shown = "(sel) => { const i = document.querySelector(sel + ' img.headseg-base'); return [i.naturalWidth, i.naturalHeight]; }"
    assert page.query_selector_all(sel + " .headseg-thumb") == []
    assert page.evaluate(shown, sel) == [OW, OH]


def test_a_prompt_waiting_in_the_queue_when_another_picture_is_chosen_gives_way_to_it(comfy_page, comfy_server, pictures):
    """Two prompts queued on a 512 x 384 picture; the portrait chosen in Load Image while the second waits
    in the queue behind the first. The second segments the first picture, but the picker took the picture
    Load Image showed when that prompt started as the run's: its thumbnails and picture were shown as the
    portrait's, and a pixel picked on them was used on the portrait by the next run. A run gives way to a
    picture chosen after its prompt was queued, as to one chosen while it runs."""
    second_prompt_gives_way(comfy_page.page, comfy_server, pictures, "headseg_browser_waiting")
    assert comfy_page.pack_problems() == []


def test_after_refresh_node_definitions_a_prompt_queued_before_another_picture_still_gives_way_to_it(
    open_page, comfy_server, pictures
):
    """Refresh Node Definitions (the R key) registers every node type again, and with it ran the picker's
    set-up again: a second set of ComfyUI api listeners, whose 'execution_start' dropped what the first had
    just taken as the prompt under way, the picture shown when it was queued and the workflow it came from.
    The prompt waiting in the queue when the portrait was chosen then segmented the landscape but was shown
    as the portrait's (its thumbnails and picture). The set-up hooks ComfyUI's api once."""
    tab = open_page()  # a tab of its own: the refreshed node types stay in it
    page = tab.page
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.RefreshNodeDefinitions'); }")
    page.wait_for_function("() => LiteGraph.registered_node_types['HeadSeg_MaskSelectAtPixel']")
    second_prompt_gives_way(page, comfy_server, pictures, "headseg_browser_waiting_refreshed")
    assert tab.pack_problems() == []


def test_each_prompt_of_a_large_batch_waiting_when_another_picture_is_chosen_gives_way_to_it(
    comfy_page, comfy_server, pictures
):
    """A batch count of 70 (ComfyUI's limit is 100) queues 70 prompts at one click; the portrait chosen in Load
    Image while they wait. The picker kept what it had noted at queue time for the last 64 prompts queued only:
    the first ones to run after the change had lost it, and were taken as runs on the portrait (their
    thumbnails shown over it until the next run). Each run now gives way to the portrait."""
    W, H = 64, 48
    recording, picture = save_recording_and_picture(comfy_server, "headseg_browser_batch", W, H, W, H)
    other = pictures["portrait"][0]
    page = comfy_page.page
    node_id = page.evaluate(JS_LOADED_RECORDING_GRAPH, [recording, picture])
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    result = page.evaluate(JS_QUEUE_THEN_CHOOSE_PICTURE, [node_id, other, [70]])
    assert len(result["ended"]) == 70 and "error" not in result["ended"], result
    gave_way = result["kept"][1:]  # the first prompt started before the portrait was chosen
    assert len(gave_way) == 69 and all(gave_way), [i + 2 for i, ok in enumerate(gave_way) if not ok]
    assert comfy_page.pack_problems() == []


def test_after_a_real_page_reload_in_nodes_2_0_a_click_on_the_cropped_photo_is_the_pixel_queued(open_page, comfy_server):
    """The page reloaded for real (the workflow ComfyUI kept for it, no node outputs) in the Vue node renderer
    (Nodes 2.0): a 69 x 53 photo, whose 64 x 48 masks cover VAE Encode's centred window, is shown as that
    window, on the last run's grid; a click is the grid pixel under it, and the next run uses that pixel."""

    W, H, w, h = 64, 48, 69, 53
    recording, picture = save_recording_and_picture(comfy_server, "headseg_browser_reload", W, H, w, h)
    tab = open_page()
    page = tab.page
    with vue_nodes(page):
        node_id = page.evaluate(JS_LOADED_RECORDING_GRAPH, [recording, picture])
        events = page.evaluate(JS_QUEUE_AND_WAIT, 120_000)
        assert events["error"] is None, f"run failed: {json.dumps(events['error'])[:2000]}"
        page.reload(wait_until="domcontentloaded")
        page.wait_for_function(
            "(id) => window.app && app.graph && app.graph.getNodeById(id)?.headsegPicker && LiteGraph.vueNodesMode",
            arg=node_id, timeout=90_000,
        )
        view_picker(page, node_id, 1.0)
        wait_picture_ready(page, node_id)
        settle(page, 600)
        sel = picker_selector(node_id)
        assert picture in page.eval_on_selector(sel + " img.headseg-base", "i => i.src")  # Load Image's: no run
        assert page.evaluate("(id) => app.graph.getNodeById(id).headsegPicker.size", node_id) == [W, H]
        cx, cy = click_pixel(page, node_id, (W, H), (50, 40))
        assert page.evaluate(JS_WIDGETS, node_id) | {"index": 0} == {"x": 50, "y": 40, "index": 0}
        px, py = decode_position(screenshot_rgb(page).getpixel((round(cx), round(cy))), w, h)
        assert abs(px - 52) <= 0.6 and abs(py - 42) <= 0.6, (px, py)  # VAE Encode's window: 2 px in
        events = page.evaluate(JS_QUEUE_AND_WAIT, 120_000)
        assert events["error"] is None, f"run failed: {json.dumps(events['error'])[:2000]}"
        assert page.evaluate("(id) => app.nodeOutputs[String(id)].headseg_pixel", node_id) == [50, 40]
    assert tab.pack_problems() == []


JS_HISTORY = """(id) => { const wf = app.extensionManager.workflow.activeWorkflow; const ct = wf.changeTracker;
  const node = ct.activeState.nodes.find(n => String(n.id) === String(id));
  const pixel = ['x', 'y'].map(name => app.graph.getNodeById(id).widgets.find(w => w.name === name).value);
  return {undo: ct.undoQueue.length, redo: ct.redoQueue.length, modified: !!wf.isModified, pixel,
          frame: node.properties.headseg_frame ?? null,
          heights: Object.fromEntries(app.graph.nodes.map(n => [n.id, n.size[1]])),
          notes: Object.fromEntries(app.graph.nodes.map(n => [n.id, n.headsegNote?.shown ?? null]))}; }"""

# [id, ran]: whether every node shows the note line and has the height that ``ran`` (JS_HISTORY) found.
JS_NOTES_AS = (
    """([id, ran]) => { const now = ("""
    + JS_HISTORY
    + """)(id); return Object.keys(ran.heights).every(k => now.heights[k] === ran.heights[k] && now.notes[k] === ran.notes[k]); }"""
)

# The graph loaded again into the open workflow tab as ComfyUI loads a workflow file (its execution order and
# the renderer it was made in noted), that state the first of its undo history. Load Recording, Head PCA and
# Multi K-Means are given the heights a run grows them to (as the examples have them): ComfyUI grows a node
# whose previews, or whose note line once its text has wrapped, need more room as it draws it.
JS_LOAD_AS_A_WORKFLOW = """async () => { const workflow = app.extensionManager.workflow.activeWorkflow;
  const heights = {HeadSeg_LoadRecording: 160, HeadSeg_HeadPCA: 500, HeadSeg_MultiKMeans: 450};
  for (const node of app.graph.nodes) if (heights[node.type]) node.setSize([node.size[0], heights[node.type]]);
  await app.loadGraphData(app.graph.serialize(), true, true, workflow);
  workflow.changeTracker.checkState(); }"""


def view_each_node(page, node_id):
    """Brings every node of the graph into view in turn (the canvas draws it), then node ``node_id``."""
    for other in page.evaluate("() => app.graph.nodes.map(n => n.id)"):
        page.evaluate(JS_VIEW_NODE, [other, 1.0])
        settle(page, 300)
    view_picker(page, node_id, 1.0)


def test_the_first_run_adds_no_undo_step_that_changes_nothing_on_screen(comfy_page, comfy_server):
    """Load Recording -> ... -> Mask Select, clicked at (10, 20) of a picture of the masks' size, then queued.
    The first run grows Upsample and Mask Merge for their note lines and keeps its frame in Mask Select's
    properties. These made an undo step of their own, so Ctrl+Z after the run changed nothing on screen (the
    frame is not shown, and the nodes rebuilt by the undo grew again), and that growth was a new step at the
    next click on the canvas, which cleared the redo history: the pick before the run could never be undone.
    The run's changes now join the current step (the workflow is still marked modified, and the state kept
    for a reload has the frame): Ctrl+Z takes the pick back, and redo brings it again.
    The run's messages up to Upsample's come before the page has the prompt's id (as when the first nodes are
    quick, or served from the cache), the later ones after: ComfyUI kept only the later nodes' outputs for
    undo, and Upsample, rebuilt by Ctrl+Z, came back without its note line, at its height before the run."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    W, H = 64, 48
    recording, picture = save_recording_and_picture(comfy_server, "headseg_browser_first_run_undo", W, H, W, H)
    page = comfy_page.page
    node_id = page.evaluate(JS_LOADED_RECORDING_GRAPH, [recording, picture])
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    view_each_node(page, node_id)  # Load Image grown to show its picture, as in a workflow saved with it
    page.evaluate(JS_LOAD_AS_A_WORKFLOW)
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    empty_canvas = (1000, 800)
    click_pixel(page, node_id, (W, H), (10, 20))
    picked = page.evaluate(JS_HISTORY, node_id)
    assert picked["pixel"] == [10, 20] and picked["frame"] is None and picked["undo"] >= 1, picked
    events = page.evaluate(JS_QUEUE_AND_WAIT_WITH_EARLY_MESSAGES, [120_000, "HeadSeg_Upsample"])
    assert events["error"] is None, f"run failed: {json.dumps(events['error'])[:2000]}"
    wait_picture_ready(page, node_id)
    view_each_node(page, node_id)
    page.mouse.click(*empty_canvas)  # ComfyUI notes any change not noted yet when a click ends
    settle(page, 300)
    ran = page.evaluate(JS_HISTORY, node_id)
    assert ran["frame"] == {"grid": [W, H], "picture": [W, H]} and ran["modified"], ran
    assert any(ran["heights"][k] > picked["heights"][k] for k in picked["heights"]), ran  # note lines shown
    assert ran["undo"] == picked["undo"], (picked, ran)
    page.keyboard.press("Control+z")
    page.wait_for_function("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'x').value === 0", arg=node_id)
    view_each_node(page, node_id)  # the rebuilt nodes grow again for their note lines as they are drawn
    page.mouse.click(*empty_canvas)
    try:
        page.wait_for_function(JS_NOTES_AS, arg=[node_id, ran], timeout=10_000)
    except PlaywrightTimeoutError:
        pass  # told below
    undone = page.evaluate(JS_HISTORY, node_id)
    assert (undone["notes"], undone["heights"]) == (ran["notes"], ran["heights"]), (
        f"10 s after Ctrl+Z the rebuilt nodes' note lines and heights are not those after the run: {undone}, {ran}"
    )
    assert undone["pixel"] == [0, 0], undone
    assert (undone["undo"], undone["redo"]) == (picked["undo"] - 1, 1), (picked, undone)
    page.keyboard.press("Control+Shift+z")
    page.wait_for_function("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'x').value === 10", arg=node_id)
    settle(page, 500)
    assert page.evaluate(JS_HISTORY, node_id)["pixel"] == [10, 20]
    assert comfy_page.pack_problems() == []
