"""Mask Select At Pixel's picker and more_points: shift-click adds a pixel the masks must contain, alt-click
one they must not, a click on a ring removes it, a plain click starts over; rings on those pixels, the
info line, stale thumbnails until a run with those points, each change one undo step, and the pixels a
run mapped onto the masks' grid taken over by the widget.
"""

from __future__ import annotations

from headseg.tests.browser.helpers import (
    JS_CHECK_STATE,
    click_pixel,
    frame_rect,
    ready_picker,
    settle,
    synthetic_run,
    vue_nodes,
)

JS_MORE = "(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value"
JS_RINGS = """(sel) => [...document.querySelectorAll(sel + ' .headseg-ring')].map(r => ({
  out: r.classList.contains('headseg-ring-out'), left: r.style.left, top: r.style.top }))"""
JS_XY = "(id) => ['x', 'y'].map(a => app.graph.getNodeById(id).widgets.find(w => w.name === a).value)"
JS_UNDO = "() => app.extensionManager.workflow.activeWorkflow.changeTracker.undoQueue.length"


def click_with(page, node_id, size, pixel, key):
    page.keyboard.down(key)
    try:
        click_pixel(page, node_id, size, pixel)
    finally:
        page.keyboard.up(key)


def run_payload(page, node_id, name, size, pixel, asked_points: str, used_points: list, masks: int = 2):
    """synthetic_run for ``pixel`` (None: the widgets' x, y) with these more_points."""
    synthetic_run(page, node_id, name, size, pixel or page.evaluate(JS_XY, node_id), masks=masks,
                  points=(asked_points, used_points))


def stale(page, sel) -> bool:
    return page.eval_on_selector(sel + " .headseg-strip", "s => s.classList.contains('headseg-stale')")


def test_shift_and_alt_clicks_add_pixels_in_and_out_and_a_plain_click_starts_over(comfy_page, pictures, screenshots):
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    run_payload(page, node_id, name, (W, H), None, "", [])
    xy = page.evaluate(JS_XY, node_id)
    assert not stale(page, sel) and page.evaluate(JS_RINGS, sel) == []
    page.evaluate(JS_CHECK_STATE)
    undo = page.evaluate(JS_UNDO)

    a, b = (W // 4, H // 2), (3 * W // 4, H // 4)
    click_with(page, node_id, (W, H), a, "Shift")
    assert page.evaluate(JS_MORE, node_id) == f"{a[0]},{a[1]}"
    rings = page.evaluate(JS_RINGS, sel)
    assert len(rings) == 1 and not rings[0]["out"]
    assert abs(float(rings[0]["left"].rstrip("%")) - (a[0] + 0.5) / W * 100) < 1e-3
    assert stale(page, sel)  # the thumbnails are for the run without that pixel
    assert "+1 in" in page.inner_text(sel + " .headseg-info")
    click_with(page, node_id, (W, H), b, "Alt")
    assert page.evaluate(JS_MORE, node_id) == f"{a[0]},{a[1]}; -{b[0]},{b[1]}"
    assert [r["out"] for r in page.evaluate(JS_RINGS, sel)] == [False, True]
    assert "1 out" in page.inner_text(sel + " .headseg-info")
    page.screenshot(path=str(screenshots / "picker-more-points.png"))
    assert page.evaluate(JS_XY, node_id) == xy  # shift / alt-clicks leave x and y alone

    # a shift-click on a green ring (a pixel or two off) turns it red, where alt-clicks are taken by the
    # system; any other click on a ring removes it
    click_with(page, node_id, (W, H), (a[0] + 1, a[1] - 1), "Shift")
    assert page.evaluate(JS_MORE, node_id) == f"-{a[0]},{a[1]}; -{b[0]},{b[1]}"
    assert [r["out"] for r in page.evaluate(JS_RINGS, sel)] == [True, True]
    click_with(page, node_id, (W, H), (a[0] - 1, a[1] + 1), "Shift")
    assert page.evaluate(JS_MORE, node_id) == f"-{b[0]},{b[1]}"
    assert page.evaluate(JS_UNDO) == undo + 4  # one undo step per change
    # a run with those points: the thumbnails are fresh
    run_payload(page, node_id, name, (W, H), None, f"-{b[0]},{b[1]}", [[b[0], b[1], 0]])
    assert not stale(page, sel)
    run_payload(page, node_id, name, (W, H), None, f"-{b[0]},{b[1]}", [[b[0], b[1], 0]], masks=0)
    assert "no mask fits these pixels" in page.inner_text(sel + " .headseg-info")
    # a plain click: the new pixel alone
    click_pixel(page, node_id, (W, H), (5, 6))
    assert page.evaluate(JS_MORE, node_id) == "" and page.evaluate(JS_RINGS, sel) == []
    assert comfy_page.pack_problems() == []


def test_points_a_run_mapped_onto_the_grid_are_taken_over_by_the_widget(comfy_page, pictures):
    """Shift-clicks on the picture before the first run give its pixels; the run maps them onto the masks'
    grid (here half the size) and the widget then holds the mapped pixels, as x and y do."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    click_with(page, node_id, (W, H), (W - 3, H - 5), "Shift")
    asked = page.evaluate(JS_MORE, node_id)
    assert asked == f"{W - 3},{H - 5}"
    run_payload(page, node_id, name, (W // 2, H // 2), None, asked, [[(W - 3) // 2, (H - 5) // 2, 1]])
    settle(page, 250)
    assert page.evaluate(JS_MORE, node_id) == f"{(W - 3) // 2},{(H - 5) // 2}"
    assert not stale(page, sel)
    (ring,) = page.evaluate(JS_RINGS, sel)
    assert abs(float(ring["left"].rstrip("%")) - ((W - 3) // 2 + 0.5) / (W // 2) * 100) < 1e-3
    assert frame_rect(page, node_id)["width"] > 20



def test_a_shift_click_edits_the_mapped_pixels_the_rings_show_while_the_widget_holds_the_runs_text(comfy_page, pictures):
    """While the widget still holds the more_points text the last run was given (a node that undo rebuilt
    gets its run back with its widgets as they were), the rings show the pixels that run mapped it to:
    a shift-click on a ring turns that pixel red, and one elsewhere adds a pixel beside it, both on the
    masks' grid. The click was applied to the text of picture pixels instead: the ring clicked stayed
    and a new one came, and the next run mapped the old pixel again beside the new grid pixel."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    grid = (W // 2, H // 2)
    set_more = "([id, text]) => { app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value = text; }"
    for clicked, expected in (((50, 30), "-50,30"), ((10, 40), "50,30; 10,40")):
        page.evaluate(set_more, [node_id, "100,60"])
        run_payload(page, node_id, name, grid, None, "100,60", [[50, 30, 1]])
        page.evaluate(set_more, [node_id, "100,60"])  # the run's text, as undo to before it brings back
        page.evaluate("() => app.canvas.setDirty(true, true)")
        settle(page, 300)
        (ring,) = page.evaluate(JS_RINGS, sel)
        assert abs(float(ring["left"].rstrip("%")) - 50.5 / grid[0] * 100) < 1e-3
        click_with(page, node_id, grid, clicked, "Shift")
        assert page.evaluate(JS_MORE, node_id) == expected
    assert comfy_page.pack_problems() == []

# one entry each: the node's parse_points and the picker's parsePoints must read it alike
POINT_TEXTS = [
    "12,40", " 012 , 040 ", "- 5,3", "-5,3\r", "\t7 ,\u00a08", "\ufeff5,3", "5,3\u2028", "1" + "0" * 21 + ",5",
    "-" + "9" * 400 + ",5", "+5,3", "5,-3", "5 3", "1.5,2", "\uff11\uff12,3", "\u00b2,3", "\x1c5,3", "5,3\x85", "--1,2",
]


def test_the_picker_reads_more_points_as_the_node_does(comfy_page):
    """Each text: the pixels parse_points reads are those parsePoints reads (or none, where the node refuses
    it), and a shift-click on a text the node reads leaves a text it still reads, with the same pixels."""
    from headseg.nodes.core.masks import parse_points

    got = comfy_page.page.evaluate(
        """async (texts) => { const m = await import('/extensions/HeadSeg/picker_pixels.js');
             return texts.map(t => [m.parsePoints(t), m.togglePoint(t, {x: 1, y: 1}, true, [100, 100])]); }""",
        POINT_TEXTS,
    )
    for text, (points, toggled) in zip(POINT_TEXTS, got):
        try:
            include, exclude = parse_points(text)
        except ValueError:
            assert points == [], ascii(text)
            continue
        read = [(p["x"], p["y"]) for p in points if p["keep"]], [(p["x"], p["y"]) for p in points if not p["keep"]]
        assert read == (include, exclude), ascii(text)
        assert parse_points(toggled) == (include + [(1, 1)], exclude), (ascii(text), toggled)


def test_the_picker_reads_long_runs_of_blanks_in_time_in_proportion_to_the_text(comfy_page):
    """Blanks on both sides of the optional '-' in one expression took time in the square of a run of blanks
    before a typo (64 000 blanks: 12 s, the tab frozen); now milliseconds, read as parse_points reads them."""
    from headseg.nodes.core.masks import parse_points

    blanks = " \u3000\t" * 40000  # before the trim: 2 s for 45 000 blanks, 21 s for these 120 000
    texts = [blanks + "x", "1" + blanks + "x", "-" + blanks + "1" + blanks + ",x", "1,1" + blanks + "x",
             blanks + "-" + blanks + "3" + blanks + "," + blanks + "4" + blanks]
    points, ms = comfy_page.page.evaluate(
        """async (texts) => { const m = await import('/extensions/HeadSeg/picker_pixels.js');
             const start = performance.now(); const points = texts.map(t => m.parsePoints(t));
             return [points, performance.now() - start]; }""",
        texts,
    )
    assert ms < 1000, ms  # about 3 ms
    assert points[:4] == [[], [], [], []] and points[4] == [{"x": 3, "y": 4, "keep": False}]
    assert parse_points(texts[4]) == ([], [(3, 4)])


def test_a_shift_click_keeps_an_entry_that_is_no_pixel_for_the_node_to_name(comfy_page):
    """A typo in more_points ('300 200') stays as written through shift / alt-clicks: the node then names
    it when queued, instead of running without that pixel."""
    from headseg.nodes.core.masks import parse_points

    added, removed = comfy_page.page.evaluate(
        """async () => { const m = await import('/extensions/HeadSeg/picker_pixels.js');
             return [m.togglePoint('120,80; 300 200\\n', {x: 5, y: 6}, false, [400, 300]),
                     m.togglePoint('120,80; 300 200', {x: 121, y: 79}, true, [400, 300])]; }"""
    )
    assert added == "120,80; 300 200; -5,6" and removed == "-120,80; 300 200"  # shift on a kept pixel: left out
    try:
        parse_points(added)
    except ValueError as exc:
        assert "entry 2 is '300 200'" in str(exc)
    else:
        raise AssertionError("the typo was dropped")


def test_a_shift_click_with_a_jitter_in_the_vue_renderer_neither_drags_nor_selects_the_node(comfy_page, pictures):
    """Nodes 2.0 drags a node on a move with shift held and toggles its selection on a shift-release: a
    shift-click on the picture whose pointer moves a few pixels must only add the pixel."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    with vue_nodes(page):
        settle(page, 800)
        node_id, sel = ready_picker(page, name)
        run_payload(page, node_id, name, (W, H), (5, 5), "", [])
        load_id = page.evaluate("(id) => app.graph.nodes.find(n => n.id !== id).id", node_id)
        page.evaluate("(id) => { app.canvas.deselectAll(); app.canvas.select(app.graph.getNodeById(id)); }", load_id)
        pos = page.evaluate("(id) => [...app.graph.getNodeById(id).pos]", node_id)
        rect = frame_rect(page, node_id)
        cx, cy = rect["left"] + rect["width"] / 3, rect["top"] + rect["height"] / 3
        page.keyboard.down("Shift")
        try:
            page.mouse.move(cx, cy)
            page.mouse.down()
            page.mouse.move(cx + 4, cy + 3, steps=3)
            page.mouse.move(cx + 25, cy + 15, steps=3)  # off the pixel, still a click on the picture
            page.mouse.up()
        finally:
            page.keyboard.up("Shift")
        settle(page, 400)
        assert page.evaluate("(id) => [...app.graph.getNodeById(id).pos]", node_id) == pos
        assert page.evaluate("() => [...app.canvas.selectedItems].map(n => n.id)") == [load_id]
        assert len(page.evaluate(JS_RINGS, sel)) == 1 and page.evaluate(JS_MORE, node_id)
        # a plain click still selects the node, as in the classic canvas
        click_pixel(page, node_id, (W, H), (W // 2, H // 2))
        assert page.evaluate("() => [...app.canvas.selectedItems].map(n => n.id)") == [node_id]
    assert comfy_page.pack_problems() == []


def test_a_linked_more_points_shows_no_rings_of_the_widgets_old_text_before_a_run(comfy_page, pictures):
    """With more_points fed by a link, the rings and the info line show the pixels of the last run; before
    one, none (not the widget's text from before it was linked, which the run does not use), from the
    moment the link is made."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    click_with(page, node_id, (W, H), (W // 4, H // 2), "Shift")
    assert len(page.evaluate(JS_RINGS, sel)) == 1
    page.evaluate(
        """(id) => { const node = app.graph.getNodeById(id); const p = LiteGraph.createNode('PrimitiveStringMultiline');
                     p.pos = [40, 500]; app.graph.add(p);
                     p.connect(0, node, node.inputs.findIndex(i => i.name === 'more_points'));
                     app.canvas.setDirty(true, true); }""",
        node_id,
    )
    settle(page, 800)  # the picker follows the link on the next draw or tick, as it does a link to x, y or index
    assert page.evaluate(JS_RINGS, sel) == [] and " in" not in page.inner_text(sel + " .headseg-info")
    run_payload(page, node_id, name, (W, H), None, "7,8", [[7, 8, 1]])
    assert len(page.evaluate(JS_RINGS, sel)) == 1 and "+1 in" in page.inner_text(sel + " .headseg-info")


def test_a_run_leaves_the_order_of_more_points_alone(comfy_page, pictures):
    """The node lists the pixels kept in before those left out: an alt-click before a shift-click, queued,
    keeps its text (it was rewritten in the node's order, marking the workflow modified and changing the
    node's input for the next queue), and a pixel the run mapped onto the grid is written in its place."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    run_payload(page, node_id, name, (W, H), None, "", [])
    click_with(page, node_id, (W, H), (10, 20), "Alt")
    click_with(page, node_id, (W, H), (100, 60), "Shift")
    asked = page.evaluate(JS_MORE, node_id)
    assert asked == "-10,20; 100,60"
    run_payload(page, node_id, name, (W, H), None, asked, [[100, 60, 1], [10, 20, 0]])
    settle(page, 250)
    assert page.evaluate(JS_MORE, node_id) == asked and not stale(page, sel)
    # the same pixels typed in another order than the run's are not stale either
    page.evaluate("(id) => { app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value = '-10,20;100,60'; }", node_id)
    settle(page, 800)
    assert not stale(page, sel)
    # nor in the node's order, or repeated: the masks listed depend only on which pixels are in and out
    for same in ("100,60; -10,20", "100,60; -10,20; 100,60"):
        page.evaluate("([id, t]) => { app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value = t; }", [node_id, same])
        settle(page, 800)
        assert not stale(page, sel), same
    page.evaluate("(id) => { app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value = '100,60; 10,20'; }", node_id)
    settle(page, 800)
    assert stale(page, sel)  # 10,20 now in the masks: other masks
    # a run that maps a pixel of a larger picture onto the grid: the mapped pixel takes that entry's place
    text = f"-{W + 30},{H + 10}; 7,8; -3,4"
    page.evaluate("([id, t]) => { app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value = t; }", [node_id, text])
    run_payload(page, node_id, name, (W, H), None, text, [[7, 8, 1], [W - 1, H - 1, 0], [3, 4, 0]])
    settle(page, 250)
    assert page.evaluate(JS_MORE, node_id) == f"-{W - 1},{H - 1}; 7,8; -3,4"
    assert not stale(page, sel)
    assert comfy_page.pack_problems() == []


def test_a_ring_is_drawn_centred_on_its_pixel(comfy_page, pictures):
    """A ring is a 10 px circle with a 2 px border, placed by a -7 px margin so that its centre is the pixel's
    centre. ComfyUI's page sizes every element border-box (Tailwind's base styles), so the ring was 10 px
    across in all and its centre lay 2 px left of and above the pixel, at every zoom: on a small picture the
    ring sat between the pixel picked and its neighbour. The cross (a 0 x 0 point) was always right."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    for pixel, key in (((W // 4, H // 2), "Shift"), ((3 * W // 4, H // 4), "Alt")):
        click_with(page, node_id, (W, H), pixel, key)
    rect = frame_rect(page, node_id)
    rings = page.eval_on_selector_all(
        sel + " .headseg-ring", "rs => rs.map(r => { const b = r.getBoundingClientRect(); return [b.x + b.width / 2, b.y + b.height / 2, b.width]; })"
    )
    assert len(rings) == 2
    for (x, y), (cx, cy, width) in zip(((W // 4, H // 2), (3 * W // 4, H // 4)), rings):
        want = rect["left"] + (x + 0.5) / W * rect["width"], rect["top"] + (y + 0.5) / H * rect["height"]
        assert abs(cx - want[0]) <= 0.5 and abs(cy - want[1]) <= 0.5, ((cx, cy), want)
        assert width == 14  # the 10 px circle and its 2 px border
    marker = page.eval_on_selector(sel + " .headseg-marker", "e => e.getBoundingClientRect().toJSON()")
    assert marker["width"] == 0  # the cross is drawn around a point: no box to size
    assert comfy_page.pack_problems() == []


def test_a_text_of_more_pixels_than_the_node_takes_draws_at_most_that_many_rings(comfy_page, pictures):
    """A shared workflow whose more_points lists 200 000 pixels (damaged or crafted) built one ring element each
    and froze the tab. The picker draws rings on the first MAX_POINTS (the node's limit, which refuses more when
    queued) and its info line says so; the picture stays clickable."""
    from headseg.nodes.core.masks import MAX_POINTS

    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    assert page.evaluate("async () => (await import('/extensions/HeadSeg/picker_pixels.js')).MAX_POINTS") == MAX_POINTS
    text = "; ".join(f"{'-' if i % 3 == 0 else ''}{i % W},{(i // W) % H}" for i in range(200_000))
    ms = page.evaluate(
        """([id, t]) => { const start = performance.now();
             app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value = t;
             app.graph.getNodeById(id).headsegPicker.sync(true); return performance.now() - start; }""",
        [node_id, text],
    )
    settle(page, 800)
    assert page.eval_on_selector_all(sel + " .headseg-ring", "rs => rs.length") == MAX_POINTS
    info = page.inner_text(sel + " .headseg-info")
    assert f"more_points: 200000 pixels, the node takes at most {MAX_POINTS}" in info, info
    assert ms < 5000, ms
    # at the limit: every ring, no such note
    text = "; ".join(f"{i % W},{(i // W) % H}" for i in range(MAX_POINTS))
    page.evaluate("([id, t]) => { app.graph.getNodeById(id).widgets.find(w => w.name === 'more_points').value = t; }", [node_id, text])
    settle(page, 800)
    assert page.eval_on_selector_all(sel + " .headseg-ring", "rs => rs.length") == MAX_POINTS
    assert "takes at most" not in page.inner_text(sel + " .headseg-info")
    assert comfy_page.pack_problems() == []
