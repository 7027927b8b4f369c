"""The pixel the picker names when the last run moved or mapped x / y onto the masks' grid, or x / y
come from a link (js/picker_pixels.js).
"""

from __future__ import annotations

import json

from headseg.tests.browser.helpers import (
    JS_CHECK_STATE,
    JS_WIDGETS,
    add_picker,
    click_pixel,
    coded_picture,
    frame_rect,
    picker_selector,
    selected_thumbs,
    settle,
    synthetic_run,
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
    set_xy = "([id, x, y]) => { for (const w of app.graph.getNodeById(id).widgets) { if (w.name === 'x') w.value = x; if (w.name === 'y') w.value = y; } }"
    page.evaluate(set_xy, [node_id, 100, 60])
    page.evaluate(JS_SET_POINTS, [node_id, "100,60"])
    page.evaluate(JS_CHECK_STATE)
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
