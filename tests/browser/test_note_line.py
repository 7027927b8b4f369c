"""The note line under the other HeadSeg nodes: Multi K-Means names the k of the colour map shown, the
whole text shows on nodes with a picture preview, and the line comes back when undo rebuilds a node in the
Vue node renderer.
"""

from __future__ import annotations

import pytest

from headseg.tests.browser.helpers import (
    JS_OWN_WIDGETS,
    add_merge_with_note,
    rebuild_as_undo_does,
    settle,
    side_panel_inputs,
    vue_nodes,
)


def test_multi_kmeans_note_names_the_k_of_the_shown_colour_map(comfy_page, pictures):
    """The note line under Multi K-Means lists the k of its colour maps and names the one shown."""
    page = comfy_page.page
    ref = {"filename": pictures["landscape"][0], "subfolder": "", "type": "input"}
    node_id = page.evaluate(
        """(ref) => { app.graph.clear(); const m = LiteGraph.createNode('HeadSeg_MultiKMeans'); m.pos = [40, 80];
                   app.graph.add(m); app.canvas.ds.scale = 1; app.canvas.ds.offset = [100, 100];
                   const out = {images: [ref, ref, ref], text: ['3 colour maps'], headseg_labels: ['k=2', 'k=4', 'k=7']};
                   app.nodeOutputs[String(m.id)] = out; m.onExecuted(out);
                   app.canvas.setDirty(true, true); return m.id; }""", ref
    )
    page.wait_for_function("(id) => { const n = app.graph.getNodeById(id); return n.imgs?.length === 3 && n.imgs.every(i => i.complete && i.naturalWidth > 0); }", arg=node_id, timeout=15_000)
    note = "(id) => app.graph.getNodeById(id).headsegNote?.root.textContent ?? ''"
    page.wait_for_function(f"(id) => ({note})(id).includes('colour maps, left to right: k=2 · k=4 · k=7')", arg=node_id, timeout=10_000)
    for i, k in ((1, "k=4"), (2, "k=7"), (0, "k=2")):
        page.evaluate(f"(id) => {{ app.graph.getNodeById(id).imageIndex = {i}; app.canvas.setDirty(true, true); app.canvas.draw(true, true); }}", node_id)
        page.wait_for_function(f"(id) => ({note})(id).startsWith('showing {k}')", arg=node_id, timeout=10_000)
        assert "3 colour maps" in page.evaluate(note, node_id)
    assert comfy_page.pack_problems() == []


# A note's element -> {clientHeight, scrollHeight} once it is laid out with its text
JS_NOTE_BOX = """(id) => { const e = app.graph.getNodeById(id).headsegNote?.root;
  return e && e.clientHeight > 0 ? {client: e.clientHeight, scroll: e.scrollHeight, text: e.textContent} : null; }"""


@pytest.mark.parametrize(
    "node_type, text",
    [
        ("HeadSeg_HeadPCA", "195 heads recorded in 16 layers; 175 heads in 15 layers selected (down+up, levels all); 8 components each"),
        ("HeadSeg_SaveLabelMaps", "headseg/labels_00002_*: 5 label maps (k = 2, 5, 6, 10, 20) + the picture"),
    ],
)
def test_the_whole_note_shows_above_a_picture_preview(comfy_page, pictures, node_type, text):
    """On a node whose run shows a picture (Head PCA, Save Label Maps) the preview takes the node's free height,
    and the note got its minimum widget height, 34, of which the canvas draws the element 2 x 10 px shorter:
    14 px, less than one line, so the second line of these texts (from a real run of the explore example, at
    the example's node width) was hidden and the first one cut at its descenders."""
    page = comfy_page.page
    ref = {"filename": pictures["landscape"][0], "subfolder": "", "type": "input"}
    node_id = page.evaluate(
        """([type, ref, text]) => { app.graph.clear(); const m = LiteGraph.createNode(type); m.pos = [40, 80];
                   m.size = [330, 200]; app.graph.add(m); app.canvas.ds.scale = 1; app.canvas.ds.offset = [100, 100];
                   const out = {images: [ref], text: [text]};
                   app.nodeOutputs[String(m.id)] = out; m.onExecuted(out);
                   app.canvas.setDirty(true, true); return m.id; }""", [node_type, ref, text]
    )
    page.wait_for_function("(id) => { const n = app.graph.getNodeById(id); return n.imgs?.length === 1 && n.imgs[0].complete && n.imgs[0].naturalWidth > 0; }", arg=node_id, timeout=15_000)
    page.wait_for_function(f"(id) => ({JS_NOTE_BOX})(id)", arg=node_id, timeout=10_000)
    settle(page, 800)  # the canvas lays the widgets out again on its next frames
    page.evaluate("() => { app.canvas.setDirty(true, true); app.canvas.draw(true, true); }")
    settle(page, 400)
    box = page.evaluate(JS_NOTE_BOX, node_id)
    assert box["text"] == text
    assert box["scroll"] > 20, box  # the text wraps to two lines at this width
    assert box["scroll"] <= box["client"], f"the note shows {box['client']} px of its {box['scroll']} px of text"
    assert comfy_page.pack_problems() == []


LONG_PATH = "headseg/2026-11-27/a_bunch_of_colourful_flowers_seed_156680208700286/recording_00001_.safetensors"


@pytest.mark.parametrize("renderer", ["canvas", "vue"])
def test_a_long_saved_path_wraps_inside_the_node(comfy_page, renderer):
    """Save Recording's note is the saved file's path, one long word when filename_prefix fills in %date:...% and
    %Node.widget% patterns: on the canvas its end (the file name) was cut at the node's edge, and in the Vue node
    renderer the note was as wide as the path, past the node's right edge."""
    page = comfy_page.page

    def check():
        node_id = page.evaluate(
            """(text) => { app.graph.clear(); const m = LiteGraph.createNode('HeadSeg_SaveRecording'); m.pos = [40, 80];
                       app.graph.add(m); app.canvas.ds.scale = 1; app.canvas.ds.offset = [100, 100];
                       const out = {text: [text]}; app.nodeOutputs[String(m.id)] = out; m.onExecuted(out);
                       app.canvas.setDirty(true, true); return m.id; }""", LONG_PATH
        )
        page.wait_for_function(f"(id) => ({JS_NOTE_BOX})(id)", arg=node_id, timeout=10_000)
        settle(page, 800)
        page.evaluate("() => { app.canvas.setDirty(true, true); app.canvas.draw(true, true); }")
        settle(page, 400)
        note = page.evaluate(
            """(id) => { const e = app.graph.getNodeById(id).headsegNote.root; const r = e.getBoundingClientRect();
                         return {sw: e.scrollWidth, cw: e.clientWidth, sh: e.scrollHeight, ch: e.clientHeight, right: r.right}; }""",
            node_id,
        )
        assert note["sw"] <= note["cw"], f"the path is {note['sw']} px wide in a note {note['cw']} px wide"
        assert note["sh"] <= note["ch"], note
        if renderer == "vue":
            node = page.eval_on_selector(f"[data-node-id='{node_id}']", "e => e.getBoundingClientRect().toJSON()")
            assert note["right"] <= node["right"] + 0.5, (note, node)

    if renderer == "vue":
        with vue_nodes(page):
            check()
    else:
        check()
    assert comfy_page.pack_problems() == []


def test_after_undo_the_vue_renderer_shows_the_note_line_again(comfy_page):
    """Nodes 2.0 draws no canvas foreground, where the note line of a rebuilt node used to come back: a
    node that undo rebuilds shows its last run's note line again without a new run."""
    page = comfy_page.page
    with vue_nodes(page):
        merge_id = add_merge_with_note(page, "merged masks per image: 5", (40, 80))
        rebuild_as_undo_does(page, merge_id)
        page.wait_for_function(
            "(id) => (app.graph.getNodeById(id).headsegNote?.root.textContent ?? '').includes('merged masks per image: 5')",
            arg=merge_id, timeout=5_000,
        )
    assert comfy_page.pack_problems() == []


@pytest.mark.parametrize("renderer", ["canvas", "vue"])
def test_a_long_note_is_cut_at_six_lines(comfy_page, renderer):
    """A note of 20 lines shows its first 6 (its whole text is the tooltip), as the canvas shows it: in the Vue
    node renderer (Nodes 2.0) the node took all 20 lines' height."""
    page = comfy_page.page
    text = "\n".join(f"line {i}" for i in range(20))

    def check():
        merge_id = add_merge_with_note(page, text, (40, 80))
        page.wait_for_function(f"(id) => ({JS_NOTE_BOX})(id)", arg=merge_id, timeout=10_000)
        settle(page, 800)
        page.evaluate("() => { app.canvas.setDirty(true, true); app.canvas.draw(true, true); }")
        settle(page, 400)
        note = page.evaluate(
            """(id) => { const e = app.graph.getNodeById(id).headsegNote.root; const t = e.firstElementChild;
                         const line = parseFloat(getComputedStyle(e).lineHeight);
                         return {height: e.getBoundingClientRect().height, line, title: e.title, text: t.textContent}; }""",
            merge_id,
        )
        assert note["text"] == text and note["title"] == text
        # 6 lines between 2 px of padding above and below
        assert 5.5 * note["line"] + 4 <= note["height"] <= 6 * note["line"] + 4 + 0.5, note

    if renderer == "vue":
        with vue_nodes(page):
            check()
    else:
        check()
    assert comfy_page.pack_problems() == []


def test_the_note_line_is_not_listed_in_the_side_panel(comfy_page):
    """The side panel (1.58's right side panel, Parameters tab) lists the node's inputs to edit there: the
    note line's DOM widget has nothing to edit, and was listed under its name, as an empty entry."""
    page = comfy_page.page
    node_id = add_merge_with_note(page, "3 masks merged", (100, 100))
    page.wait_for_function("(id) => !!app.graph.getNodeById(id).headsegNote?.widget", arg=node_id, timeout=10_000)
    listed = side_panel_inputs(page, node_id)
    if listed is None:
        pytest.skip("this frontend has no right side panel")
    assert listed == page.evaluate(JS_OWN_WIDGETS, node_id)
    assert comfy_page.pack_problems() == []
