"""The picker when its node is rebuilt (undo, in the root graph, in a subgraph and in the Vue node
renderer), when its node leaves the workflow, and for the throwaway copy of a copied node.
"""

from __future__ import annotations

import pytest

from headseg.tests.browser.helpers import (
    JS_CHECK_STATE,
    JS_KEEP_OUTPUT,
    JS_OPEN_SUBGRAPH_PICKER,
    JS_TO_SUBGRAPH,
    JS_WIDGETS,
    add_merge_with_note,
    add_picker,
    click_pixel,
    frame_rect,
    picker_payload,
    picker_selector,
    ready_picker,
    rebuild_as_undo_does,
    settle,
    synthetic_run,
    view_picker,
    vue_nodes,
    wait_picture_ready,
)


@pytest.mark.parametrize("earlier_run", [False, True], ids=["first-run", "after-a-run-of-another-node"])
def test_picker_comes_back_when_the_node_is_rebuilt(comfy_page, pictures, earlier_run):
    """Undo rebuilds the nodes from the saved graph (loadGraphData without clearing outputs): the
    picker restores its last run from the outputs ComfyUI keeps, as ComfyUI's own previews do,
    instead of going blank. Also once the workflow queued a run before (``earlier_run``): its change tracker
    then keeps the outputs of its runs, and undo hands those back as app.nodeOutputs."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    if earlier_run:
        page.evaluate("() => { app.extensionManager.workflow.activeWorkflow.changeTracker.nodeOutputs = "
                      "{'99': {text: ['an earlier run of a node since deleted']}}; }")
    node_id = add_picker(page)
    synthetic_run(page, node_id, name, (W, H), (0, 0))
    sel = picker_selector(node_id)
    assert len(page.query_selector_all(sel + " .headseg-thumb")) == 2
    merge_id = add_merge_with_note(page, "merged masks per image: 7", (40, 600))
    rebuild_as_undo_does(page, node_id)
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    page.wait_for_function(
        "(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length === 2", arg=sel, timeout=15_000
    )
    assert "2 masks here" in page.text_content(sel + " .headseg-info")
    page.evaluate("(id) => { const n = app.graph.getNodeById(id); app.canvas.ds.offset = [40 - n.pos[0], 80 - n.pos[1]]; "
                  "app.canvas.setDirty(true, true); }", merge_id)
    page.wait_for_function("() => [...document.querySelectorAll('.headseg-note')].some(e => "
                           "e.textContent.includes('merged masks per image: 7'))", timeout=15_000)
    assert comfy_page.pack_problems() == []


JS_SHOWN_PICKERS = """(id) => { const n = app.graph.getNodeById(id);
  const shown = [...document.querySelectorAll('.headseg-picker')].filter(e => e.isConnected && e.getBoundingClientRect().width > 0);
  return {count: shown.length, live: shown.length === 1 && shown[0] === n.headsegPicker.root,
          thumbs: shown.map(e => e.querySelectorAll('.headseg-thumb').length)}; }"""


def test_after_undo_the_vue_renderer_shows_the_rebuilt_nodes_picker(comfy_page, pictures):
    """Nodes 2.0 keeps showing the element of the picker an undo replaced: the rebuilt node's picker
    takes its place, so clicks set the live node's x / y and runs show their thumbnails."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    with vue_nodes(page):
        node_id = add_picker(page, name)
        synthetic_run(page, node_id, name, (W, H), (3, 4))
        page.evaluate(JS_CHECK_STATE)
        for fx in (0.25, 0.75):
            rect = frame_rect(page, node_id)
            page.mouse.click(rect["left"] + fx * rect["width"], rect["top"] + 0.5 * rect["height"])
            settle(page, 250)
        page.evaluate("async () => { await app.extensionManager.workflow.activeWorkflow.changeTracker.undo(); }")
        page.wait_for_function(f"(id) => ({JS_SHOWN_PICKERS})(id).live", arg=node_id, timeout=15_000)
        rect = frame_rect(page, node_id)
        page.mouse.click(rect["left"] + 0.5 * rect["width"], rect["top"] + 0.25 * rect["height"])
        settle(page, 250)
        values = page.evaluate(JS_WIDGETS, node_id)
        assert (values["x"], values["y"]) == (W // 2, H // 4)
        synthetic_run(page, node_id, name, (W, H), (W // 2, H // 4), masks=3)
        assert page.evaluate(JS_SHOWN_PICKERS, node_id)["thumbs"] == [3]
    assert comfy_page.pack_problems() == []


def picker_in_a_subgraph(page, pictures):
    """A picker on the landscape picture, made into a subgraph -> (its node id, the subgraph node's id, the
    payload of a run of it at pixel (3, 4))."""
    name, W, H = pictures["landscape"]
    node_id = add_picker(page, name)
    wait_picture_ready(page, node_id)
    sg = page.evaluate(JS_TO_SUBGRAPH, [node_id])
    return node_id, sg, picker_payload(name, (W, H), (3, 4))


def test_picker_inside_a_subgraph_comes_back_when_the_node_is_rebuilt(comfy_page, pictures):
    """Inside a subgraph ComfyUI keeps a node's outputs under '<subgraph id>:<node id>': the picker
    finds its last run there after undo rebuilds the graph, as it does in the root graph."""
    page = comfy_page.page
    node_id, sg, payload = picker_in_a_subgraph(page, pictures)
    page.evaluate(
        """([sg, id, payload]) => {
             const outer = app.graph.getNodeById(sg);
             const inner = outer.subgraph.nodes.find(n => n.type === 'HeadSeg_MaskSelectAtPixel');
             for (const w of inner.widgets) { if (w.name === 'x') w.value = 3; if (w.name === 'y') w.value = 4; }
             app.api.dispatchCustomEvent('executed', {node: `${sg}:${inner.id}`, display_node: `${sg}:${inner.id}`,
                                                      output: payload, prompt_id: 'p'}); }""",
        [sg, node_id, payload],
    )
    inner = page.evaluate(JS_OPEN_SUBGRAPH_PICKER, sg)
    sel = picker_selector(inner)
    thumbs = "(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length === 2"
    page.wait_for_function(thumbs, arg=sel, timeout=15_000)
    page.evaluate("() => app.canvas.setGraph(app.graph)")  # back to the root graph
    page.evaluate("async () => { await app.loadGraphData(app.graph.serialize(), false, false); }")  # as undo does
    settle(page, 500)
    inner = page.evaluate(JS_OPEN_SUBGRAPH_PICKER, sg)
    page.wait_for_function(thumbs, arg=picker_selector(inner), timeout=15_000)
    assert "2 masks here" in page.text_content(picker_selector(inner) + " .headseg-info")
    assert comfy_page.pack_problems() == []


def test_a_picker_converted_into_a_subgraph_after_a_run_keeps_the_runs_frame(comfy_page, pictures):
    """Converted into a subgraph after a run, the node has no outputs (they were kept under its old id), so
    the picker shows the landscape picture again: on the 96 x 64 masks' grid of that run (kept in the node's
    properties), not at the picture's own 240 x 120, so that a click gives the grid pixel the node reads."""
    name, w, h = pictures["landscape"]
    W, H = 96, 64
    page = comfy_page.page
    node_id = add_picker(page, name)
    wait_picture_ready(page, node_id)
    page.evaluate(
        "(id) => { for (const w of app.graph.getNodeById(id).widgets) { if (w.name === 'x') w.value = 50;"
        " if (w.name === 'y') w.value = 30; } }",
        node_id,
    )
    synthetic_run(page, node_id, name, (W, H), (50, 30), picture_size=(w, h))
    sg = page.evaluate(JS_TO_SUBGRAPH, [node_id])
    inner = page.evaluate(JS_OPEN_SUBGRAPH_PICKER, sg)
    wait_picture_ready(page, inner)
    sel = picker_selector(inner)
    assert name in page.eval_on_selector(sel + " img.headseg-base", "i => i.src")  # Load Image's: no run
    assert f"x 50, y 30 · {W}×{H}" in page.text_content(sel + " .headseg-info")
    click_pixel(page, inner, (W, H), (20, 10))
    values = page.evaluate(
        """(id) => Object.fromEntries(app.canvas.graph.getNodeById(id).widgets
                     .filter(w => ['x', 'y'].includes(w.name)).map(w => [w.name, w.value]))""",
        inner,
    )
    assert values == {"x": 20, "y": 10}
    assert comfy_page.pack_problems() == []


def test_a_picker_inside_a_subgraph_goes_when_the_workflow_is_cleared(comfy_page, pictures):
    """Clearing the graph (or opening another workflow) drops subgraph definitions without removing
    their nodes one by one, and deleting a subgraph node keeps its definition: the picker of a node
    in one must not stay behind in the page."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page, name)
    page.evaluate(JS_TO_SUBGRAPH, [node_id])
    count = "(n) => document.querySelectorAll('.headseg-picker').length === n"
    page.wait_for_function(count, arg=1, timeout=10_000)  # the one inside the subgraph
    page.evaluate("() => { app.graph.clear(); app.canvas.setDirty(true, true); }")
    page.wait_for_function(count, arg=0, timeout=10_000)
    node_id = add_picker(page, name)  # a new picker gets the same node id: no stale element to confuse
    wait_picture_ready(page, node_id)
    assert page.evaluate(count, 1)
    # deleting the subgraph node leaves its definition behind in the workflow: its picker goes too
    sg = page.evaluate(JS_TO_SUBGRAPH, [node_id])
    page.wait_for_function(count, arg=1, timeout=10_000)
    page.evaluate("(sg) => { app.graph.remove(app.graph.getNodeById(sg)); app.canvas.setDirty(true, true); }", sg)
    page.wait_for_function(count, arg=0, timeout=10_000)
    assert comfy_page.pack_problems() == []


def test_a_copied_picker_keeps_nothing_running_once_its_node_is_deleted(open_page):
    """Copying a node (Ctrl+C), cloning it or alt-dragging it builds a throwaway copy of it
    (node.clone()) that is never added to a graph: its picker must not stay live. Once the only
    Mask Select node is deleted, the pickers' timer stops. (A fresh tab: the timer is watched from
    the moment it starts.)"""
    tab = open_page()
    page = tab.page
    page.evaluate(
        """() => { app.graph.clear();
             const timers = window.__headsegTimers = {started: [], stopped: []};
             const set = window.setInterval, clear = window.clearInterval;
             window.setInterval = function (fn, ...rest) {
               const id = set.call(window, fn, ...rest);
               if (typeof fn === 'function' && String(fn).includes('dropIfGone')) timers.started.push(id);
               return id; };
             window.clearInterval = function (id) { timers.stopped.push(id); return clear.call(window, id); }; }"""
    )
    node_id = page.evaluate(
        """() => { const node = LiteGraph.createNode('HeadSeg_MaskSelectAtPixel'); node.pos = [100, 100];
                   app.graph.add(node); app.canvas.setDirty(true, true); return node.id; }"""
    )
    settle(page, 600)
    page.evaluate(
        """(id) => { const node = app.graph.getNodeById(id);
                     app.canvas.copyToClipboard([node]); app.canvas.copyToClipboard([node]);
                     app.graph.remove(node); app.canvas.setDirty(true, true); }""",
        node_id,
    )
    settle(page, 2500)  # past the grace a picker out of the workflow gets, and a tick of the timer
    timers = page.evaluate("() => window.__headsegTimers")
    assert len(timers["started"]) == 1, timers
    assert timers["started"][0] in timers["stopped"], timers
    assert tab.pack_problems() == []


def test_picker_inside_a_subgraph_gets_its_last_run_back_after_switching_workflow_tabs(comfy_page, pictures):
    """Switching to another workflow tab and back rebuilds the nodes, and ComfyUI puts back the outputs the
    workflow's runs gave, keyed by execution id ('<subgraph node id>:<node id>' inside a subgraph, where
    a run's outputs are otherwise kept under '<subgraph id>:<node id>'): the picker inside a subgraph
    finds its last run there too, as one in the root graph does."""
    page = comfy_page.page
    node_id, sg, payload = picker_in_a_subgraph(page, pictures)
    # a run's 'executed' message: ComfyUI keeps the output under the node's locator id, tells the node, and
    # the workflow's change tracker keeps it under the execution id for the next time the tab is opened
    root_id = page.evaluate(
        """([sg, payload]) => {
             const outer = app.graph.getNodeById(sg);
             const inner = outer.subgraph.nodes.find(n => n.type === 'HeadSeg_MaskSelectAtPixel');
             const root = LiteGraph.createNode('HeadSeg_MaskSelectAtPixel');  // and one in the root graph
             root.pos = [900, 80];
             app.graph.add(root);
             const tracker = app.extensionManager.workflow.activeWorkflow.changeTracker;
             tracker.nodeOutputs = {};
             for (const [node, id] of [[inner, `${sg}:${inner.id}`], [root, String(root.id)]]) {
               for (const w of node.widgets) { if (w.name === 'x') w.value = 3; if (w.name === 'y') w.value = 4; }
               app.api.dispatchCustomEvent('executed', {node: id, display_node: id, output: payload, prompt_id: 'p'});
               tracker.nodeOutputs[id] = payload;
             }
             tracker.checkState();
             return root.id; }""",
        [sg, payload],
    )
    js_thumbs = """(sg) => { const outer = app.graph.getNodeById(sg);
                    const inner = outer?.subgraph.nodes.find(n => n.type === 'HeadSeg_MaskSelectAtPixel');
                    return inner?.headsegPicker?.strip.querySelectorAll('.headseg-thumb').length ?? -1; }"""
    page.wait_for_function(f"(sg) => ({js_thumbs})(sg) === 2", arg=sg, timeout=15_000)
    first = page.evaluate("() => app.extensionManager.workflow.activeWorkflow.path")
    page.evaluate("async () => { await app.extensionManager.command.execute('Comfy.NewBlankWorkflow'); }")
    page.wait_for_function("(p) => app.extensionManager.workflow.activeWorkflow.path !== p", arg=first)
    blank = page.evaluate("() => app.extensionManager.workflow.activeWorkflow.path")
    settle(page, 500)
    page.evaluate(
        """async (p) => { const store = app.extensionManager.workflow;
                          await app.extensionManager.command.execute('Workspace.PreviousOpenedWorkflow');
                          if (store.activeWorkflow.path !== p) await app.extensionManager.command.execute('Workspace.NextOpenedWorkflow'); }""",
        first,
    )
    page.wait_for_function("(p) => app.extensionManager.workflow.activeWorkflow.path === p", arg=first)
    settle(page, 1500)  # the slow timer ticks the picker that no canvas draws
    assert page.evaluate(js_thumbs, sg) == 2
    assert page.evaluate("(id) => app.graph.getNodeById(id).headsegPicker.strip.querySelectorAll('.headseg-thumb').length", root_id) == 2
    page.evaluate(
        """async (p) => { const store = app.extensionManager.workflow;
                          await store.closeWorkflow(store.openWorkflows.find(w => w.path === p)); }""",
        blank,
    )  # the tabs as the other tests found them
    assert comfy_page.pack_problems() == []


JS_LOST_RUN = """([id, size]) => { const ref = {filename: 'headseg_gone_00001_.png', subfolder: '', type: 'temp'};
  const payload = {headseg_image: [ref], headseg_size: size, headseg_pixel: [1, 1], headseg_pixel_asked: [1, 1],
                   headseg_index: [0], headseg_masks: [ref, ref],
                   headseg_mask_info: [{area: 10, k: 2, cluster: 0}, {area: 20, k: 2, cluster: 1}]};
  (KEEP)(id, payload); app.graph.getNodeById(id).onExecuted(payload); }""".replace("KEEP", JS_KEEP_OUTPUT)

JS_PICKER_STATE = """(sel) => { const root = document.querySelector(sel);
  const img = root.querySelector('img.headseg-base'); const msg = root.querySelector('.headseg-message');
  return {thumbs: root.querySelectorAll('.headseg-thumb').length, natural: [img.naturalWidth, img.naturalHeight],
          framed: getComputedStyle(root.querySelector('.headseg-frame')).display !== 'none',
          message: getComputedStyle(msg).display === 'none' ? '' : msg.textContent}; }"""


def test_a_run_whose_pictures_the_server_lost_gives_way_to_the_upstream_picture(comfy_page, pictures):
    """ComfyUI empties its temp folder when it starts: a node rebuilt later (undo, a workflow tab opened again)
    got back a run whose picture and thumbnails answer 404, and the picker said only 'Could not load the
    picture.', with nothing to click on until the next run. It now shows the upstream picture to pick on, as
    before the first run, and does not bring that run back when the node is rebuilt again."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id, sel = ready_picker(page, name)
    page.evaluate(JS_LOST_RUN, [node_id, [W // 2, H // 2]])
    page.wait_for_function(
        """([sel, w, h]) => { const img = document.querySelector(sel + ' img.headseg-base');
             return img.complete && img.naturalWidth === w && img.naturalHeight === h
                    && !document.querySelector(sel + ' .headseg-thumb'); }""",
        arg=[sel, W, H],
        timeout=15_000,
    )
    wait_picture_ready(page, node_id)
    state = page.evaluate(JS_PICKER_STATE, sel)
    assert state == {"thumbs": 0, "natural": [W, H], "framed": True, "message": ""}
    rebuild_as_undo_does(page, node_id)
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    settle(page, 600)
    assert page.evaluate(JS_PICKER_STATE, sel) == state

    # no picture upstream: the picker says what happened and what to do
    bare = add_picker(page)
    page.evaluate(JS_LOST_RUN, [bare, [W, H]])
    page.wait_for_function(
        "(sel) => document.querySelector(sel + ' .headseg-message').textContent.includes('queue the workflow again')",
        arg=picker_selector(bare),
        timeout=15_000,
    )
    settle(page, 600)  # the slow timer leaves the message
    assert "temp folder" in page.evaluate(JS_PICKER_STATE, picker_selector(bare))["message"]
