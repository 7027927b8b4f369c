"""The picker's strip of mask thumbnails: hovering previews a mask, a click chooses it, what assistive
technology is told, the wheel over the strip, and a run that rebuilds the strip under the pointer.
"""

from __future__ import annotations

import shutil

from headseg.tests.browser.helpers import (
    JS_WIDGETS,
    add_picker,
    click_pixel,
    frame_rect,
    picker_selector,
    ready_picker,
    selected_thumbs,
    settle,
    synthetic_run,
)


def _hovering(page, sel):
    return page.evaluate("(sel) => document.querySelector(sel + ' .headseg-frame').classList.contains('headseg-hovering')", sel)


def hover_strip(page, sel):
    """Moves the pointer to the middle of the picker's thumbnail strip -> the strip's bounding box."""
    box = page.eval_on_selector(sel + " .headseg-strip", "e => e.getBoundingClientRect().toJSON()")
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    return box

def test_thumbnail_hover_previews_and_leaving_restores_and_click_picks_that_mask(comfy_page, pictures):
    """Hovering a thumbnail shows its mask on the picture, leaving brings the picture back, and a click
    chooses that mask (index) and outlines its thumbnail."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    synthetic_run(page, node_id, name, (W, H), (0, 0), masks=3, stored=False)  # widgets ask for (0, 0): fresh
    settle(page)
    thumbs = page.query_selector_all(sel + " .headseg-thumb")
    assert len(thumbs) == 3
    thumbs[1].hover()
    settle(page, 300)
    assert _hovering(page, sel)
    page.mouse.move(5, 5)  # leaves the thumbnail: the picture comes back
    settle(page, 300)
    assert not _hovering(page, sel)
    for target in (2, 1):
        thumbs[target].click()
        settle(page, 250)
        assert page.evaluate(JS_WIDGETS, node_id)["index"] == target
        assert selected_thumbs(page, sel) == [str(target)]
    assert comfy_page.pack_problems() == []


def test_thumbnails_tell_assistive_technology_which_mask_is_chosen_and_when_they_are_stale(comfy_page, pictures):
    """The chosen thumbnail is marked by its outline and a stale strip by its fading: both are also
    exposed (aria-pressed, aria-disabled), and each thumbnail is named by its mask's details."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    synthetic_run(page, node_id, name, (W, H), (0, 0), masks=3, stored=False)
    settle(page)
    aria = "(bs) => bs.map(b => [b.getAttribute('aria-label'), b.getAttribute('aria-pressed'), b.getAttribute('aria-disabled')])"
    got = page.eval_on_selector_all(sel + " .headseg-thumb", aria)
    assert got == [
        ["mask 0, 10 px, k=2, cluster 0", "true", "false"],
        ["mask 1, 20 px, k=2, cluster 1", "false", "false"],
        ["mask 2, 30 px, k=2, cluster 2", "false", "false"],
    ]
    page.query_selector_all(sel + " .headseg-thumb")[2].click()
    settle(page, 250)
    assert [g[1] for g in page.eval_on_selector_all(sel + " .headseg-thumb", aria)] == ["false", "false", "true"]
    click_pixel(page, node_id, (W, H), (30, 40))  # another pixel: the thumbnails are the old one's
    assert [g[2] for g in page.eval_on_selector_all(sel + " .headseg-thumb", aria)] == ["true"] * 3
    assert comfy_page.pack_problems() == []


def test_wheel_over_the_thumbnail_strip_scrolls_it_and_does_not_zoom(comfy_page, pictures):
    """The wheel over the strip scrolls its thumbnails sideways (a mouse wheel turns vertically, which the
    browser does not turn into a sideways scroll: the thumbnails past the node's width were out of reach);
    it never zooms the canvas."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    synthetic_run(page, node_id, name, (W, H), (0, 0), masks=8, stored=False)
    settle(page)
    box = hover_strip(page, sel)
    before = page.evaluate("() => app.canvas.ds.scale")
    scroll = "(sel) => document.querySelector(sel + ' .headseg-strip').scrollLeft"
    assert page.evaluate(scroll, sel) == 0
    page.mouse.wheel(0, 120)
    settle(page)
    assert page.evaluate(scroll, sel) > 60
    page.mouse.wheel(0, -240)
    settle(page)
    assert page.evaluate(scroll, sel) == 0
    assert page.evaluate("() => app.canvas.ds.scale") == before
    # the last thumbnail comes into view
    page.mouse.wheel(0, 2000)
    settle(page)
    last = page.eval_on_selector(sel + " .headseg-thumb[data-index='7']", "e => e.getBoundingClientRect().toJSON()")
    assert last["right"] <= box["x"] + box["width"] + 1
    assert page.evaluate("() => app.canvas.ds.scale") == before
    assert comfy_page.pack_problems() == []


def test_a_run_that_replaces_the_hovered_thumbnail_leaves_no_mask_over_the_picture(comfy_page, pictures):
    """A run's result can arrive while the pointer rests on a thumbnail: the strip is rebuilt under it
    and the browser sends the removed thumbnail no pointerleave. The mask it previewed must not stay
    drawn over the picture (here the new run finds fewer masks: nothing lies under the pointer)."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    synthetic_run(page, node_id, name, (W, H), (0, 0), masks=3, stored=False)
    settle(page)
    page.query_selector_all(sel + " .headseg-thumb")[2].hover()
    settle(page, 300)
    assert _hovering(page, sel)
    synthetic_run(page, node_id, name, (W, H), (0, 0), masks=1, stored=False)
    settle(page)
    rect = frame_rect(page, node_id)
    page.mouse.move(rect["left"] + rect["width"] / 2, rect["top"] + rect["height"] / 2, steps=5)
    settle(page, 300)
    assert len(page.query_selector_all(sel + " .headseg-thumb")) == 1
    assert not _hovering(page, sel)
    assert comfy_page.pack_problems() == []


def test_with_index_fed_by_a_link_the_outline_marks_the_mask_the_run_output_and_clicks_leave_it(comfy_page, pictures):
    """index from a link: the run outputs the mask at the linked index, so that thumbnail is outlined (not
    the one of the widget's value from before the link), and a click on a thumbnail changes nothing."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    page.evaluate(
        """(id) => { const node = app.graph.getNodeById(id); const p = LiteGraph.createNode('PrimitiveInt');
                     p.pos = [40, 80]; app.graph.add(p); p.connect(0, node, node.inputs.findIndex(i => i.name === 'index')); }""",
        node_id,
    )
    synthetic_run(page, node_id, name, (W, H), (0, 0), masks=3, index=2, stored=False)  # the link gave 2
    settle(page)
    assert page.evaluate(JS_WIDGETS, node_id)["index"] == 0
    assert selected_thumbs(page, sel) == ["2"]
    page.click(sel + " .headseg-thumb[data-index='1']", force=True)  # aria-disabled: a user can still click it
    settle(page, 250)
    assert page.evaluate(JS_WIDGETS, node_id)["index"] == 0
    assert selected_thumbs(page, sel) == ["2"]
    assert "index comes from a link" in page.text_content(sel + " .headseg-info")
    aria = page.eval_on_selector_all(sel + " .headseg-thumb", "bs => bs.map(b => b.getAttribute('aria-disabled'))")
    assert aria == ["true"] * 3
    # the link removed: the widget's index is outlined again, and a click chooses a mask
    page.evaluate("(id) => { const node = app.graph.getNodeById(id); node.disconnectInput(node.inputs.findIndex(i => i.name === 'index')); }", node_id)
    settle(page, 800)
    assert selected_thumbs(page, sel) == ["0"]
    page.click(sel + " .headseg-thumb[data-index='1']")
    settle(page, 250)
    assert page.evaluate(JS_WIDGETS, node_id)["index"] == 1 and selected_thumbs(page, sel) == ["1"]
    assert comfy_page.pack_problems() == []


def test_after_a_run_the_chosen_thumbnail_is_in_view(comfy_page, comfy_server, pictures):
    """A run rebuilds the strip with new pictures: it showed the first thumbnails again, so a coarser mask
    chosen further along the strip (and queued) had its outlined thumbnail out of view."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    again = [f"headseg_browser_landscape_run{i}.png" for i in (1, 2)]  # each run writes new files
    for other in again:
        shutil.copy(comfy_server.input_dir / name, comfy_server.input_dir / other)
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    synthetic_run(page, node_id, name, (W, H), (0, 0), masks=8, stored=False)
    settle(page)
    box = hover_strip(page, sel)
    page.mouse.wheel(0, 2000)
    settle(page)
    page.click(sel + " .headseg-thumb[data-index='7']")
    settle(page, 250)
    assert page.evaluate(JS_WIDGETS, node_id)["index"] == 7
    page.mouse.move(5, 5)
    synthetic_run(page, node_id, again[0], (W, H), (0, 0), masks=8, index=7, stored=False)  # queued with index 7
    settle(page, 800)
    assert selected_thumbs(page, sel) == ["7"]
    strip = page.eval_on_selector(sel + " .headseg-strip", "e => e.getBoundingClientRect().toJSON()")
    chosen = page.eval_on_selector(sel + " .headseg-thumb[data-index='7']", "e => e.getBoundingClientRect().toJSON()")
    assert strip["left"] - 1 <= chosen["left"] and chosen["right"] <= strip["right"] + 1, (strip, chosen)
    # a run with another pixel whose masks are fewer: the coarsest one (outlined) is in view too
    synthetic_run(page, node_id, again[1], (W, H), (0, 0), masks=6, index=5, stored=False)
    settle(page, 800)
    assert selected_thumbs(page, sel) == ["5"]
    chosen = page.eval_on_selector(sel + " .headseg-thumb[data-index='5']", "e => e.getBoundingClientRect().toJSON()")
    assert strip["left"] - 1 <= chosen["left"] and chosen["right"] <= strip["right"] + 1, (strip, chosen)
    # and a thumbnail chosen by a click that is already in view does not move the strip
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -2000)
    settle(page)
    page.click(sel + " .headseg-thumb[data-index='1']")
    settle(page, 250)
    assert page.eval_on_selector(sel + " .headseg-strip", "e => e.scrollLeft") == 0
    assert comfy_page.pack_problems() == []


def test_a_list_of_latents_shows_the_first_items_masks_and_leaves_more_points_alone(comfy_page, pictures):
    """A list input (latents from Rebatch Latents) runs Mask Select once per item, and ComfyUI joins the
    items' UI payloads key by key (execution.get_output_from_returns: {key: item 0's + item 1's + ...}). The
    picker shows the first item: its picture and only its thumbnails (here 2; item 1, a smaller picture, has
    3), and the widgets keep the text the run was asked (the joined points, the same pixels once per item,
    were written back into more_points, tripling it at every queue of a list of three)."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    asked = "30,40; -50,60"
    page.evaluate("([id, t]) => { app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value = t; }",
                  [node_id, asked])
    page.evaluate("(id) => { const n = app.graph.getNodeById(id); for (const [a, v] of [['x', 10], ['y', 20]]) n.widgets.find(w => w.name === a).value = v; }", node_id)
    ref = {"filename": name, "subfolder": "", "type": "input"}

    def item(size, masks):  # one run's payload, as MaskSelectAtPixel.execute returns it
        return {
            "headseg_image": [ref], "headseg_size": list(size), "headseg_pixel": [10, 20],
            "headseg_pixel_asked": [10, 20], "headseg_index": [0], "headseg_masks": [ref] * masks,
            "headseg_mask_info": [{"area": 10 * (i + 1), "k": 2, "cluster": i} for i in range(masks)],
            "headseg_points": [[30, 40, 1], [50, 60, 0]], "headseg_points_asked": [asked],
            "headseg_item": [{"masks": masks, "points": 2}],
        }  # fmt: skip

    runs = [item((W, H), 2), item((W // 2, H // 2), 3), item((W, H), 3)]
    joined = {key: [v for run in runs for v in run[key]] for key in runs[0]}  # as ComfyUI joins them
    page.evaluate("([id, p]) => { app.nodeOutputs[String(id)] = p; app.graph.getNodeById(id).onExecuted(p); }",
                  [node_id, joined])
    settle(page, 300)
    assert len(page.query_selector_all(sel + " .headseg-thumb")) == 2
    more = page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value", node_id)
    assert more == asked
    assert page.evaluate(JS_WIDGETS, node_id) == {"x": 10, "y": 20, "index": 0}
    assert len(page.query_selector_all(sel + " .headseg-ring")) == 2
    assert not page.eval_on_selector(sel + " .headseg-strip", "s => s.classList.contains('headseg-stale')")
    assert comfy_page.pack_problems() == []
