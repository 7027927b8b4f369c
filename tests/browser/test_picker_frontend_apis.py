"""The pack on newer web frontends: the picker reads links and notes its edits in the undo history, and the
error_map migration reads the links of an old workflow's Upsample, through the APIs the frontend offers, not
through ones it marks deprecated (1.58 warns in the console at each use), and falls back to the old ones on a
frontend without them (1.32, which ComfyUI 0.3.75 pins).
"""

from __future__ import annotations

import json

from headseg.tests.browser.helpers import (
    JS_LOADED_RECORDING_GRAPH,
    JS_QUEUE_AND_WAIT,
    click_pixel,
    explore_as_saved_before_the_error_map_node,
    load_workflow,
    picker_selector,
    save_recording_and_picture,
    settle,
    view_picker,
    wait_picture_ready,
)

# Notes every deprecation warning from now on, with the stack it was raised from: LiteGraph's (input.link, ...),
# each raised again at every use, not once per page, and the change tracker's checkState(), whose once-only
# note is reset. window.headsegDeprecations() -> [{text, pack}] (pack: raised from the pack's scripts);
# window.headsegStopWatching() puts things back.
JS_WATCH_DEPRECATIONS = """() => {
  const seen = [];
  const note = (args) => {
    const text = args.filter((a) => a !== undefined).map(String).join(' ');
    if (/deprecated/i.test(text)) seen.push({text, pack: (new Error().stack ?? '').includes('/extensions/HeadSeg/')});
  };
  const fromLiteGraph = (...args) => note(args);
  const handlers = LiteGraph.onDeprecationWarning;
  const repeat = LiteGraph.alwaysRepeatWarnings;
  if (Array.isArray(handlers)) handlers.push(fromLiteGraph);
  LiteGraph.alwaysRepeatWarnings = true;
  window.comfyAPI?.changeTracker?.ChangeTracker?.resetCheckStateWarningForTest?.();
  const warn = console.warn;
  console.warn = function (...args) { note(args); return warn.apply(this, args); };
  window.headsegDeprecations = () => seen;
  window.headsegStopWatching = () => {
    console.warn = warn;
    LiteGraph.alwaysRepeatWarnings = repeat;
    if (Array.isArray(handlers)) handlers.splice(handlers.indexOf(fromLiteGraph), 1);
  };
}"""


def test_a_pick_and_a_run_raise_no_deprecation_warning_of_the_packs(comfy_page, comfy_server):
    """Load Recording -> ... -> Mask Select with a picture connected: a click on the picture (the pixel noted in
    the undo history), a thumbnail clicked, and a run (its frame noted in the workflow). On 1.58 the picker read
    its links through input.link and noted its edits through the change tracker's checkState(), and each raised
    a deprecation warning in the console ("input.link is deprecated...", "checkState() is deprecated..."). On a
    frontend that marks input.link deprecated, reading it here must raise one (else the watch sees nothing)."""
    W, H = 64, 48
    recording, picture = save_recording_and_picture(comfy_server, "headseg_browser_deprecations", W, H, W, H)
    page = comfy_page.page
    node_id = page.evaluate(JS_LOADED_RECORDING_GRAPH, [recording, picture])
    view_picker(page, node_id, 1.0)
    wait_picture_ready(page, node_id)
    page.evaluate(JS_WATCH_DEPRECATIONS)
    try:
        click_pixel(page, node_id, (W, H), (10, 20))
        events = page.evaluate(JS_QUEUE_AND_WAIT, 120_000)
        assert events["error"] is None, f"run failed: {json.dumps(events['error'])[:2000]}"
        sel = picker_selector(node_id)
        page.wait_for_function("(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length > 1", arg=sel)
        page.click(sel + " .headseg-thumb[data-index='1']")
        settle(page, 1200)  # the slow timer ticks the picker
        assert page.evaluate(f"() => app.graph.getNodeById({node_id}).widgets.find(w => w.name === 'index').value") == 1
        pack = sorted({d["text"] for d in page.evaluate("() => window.headsegDeprecations()") if d["pack"]})
        # the watch itself: a read of input.link outside the pack, noted where the frontend marks it deprecated
        probe = page.evaluate(
            """(id) => { const before = window.headsegDeprecations().length;
                         void app.graph.getNodeById(id).inputs[0].link;
                         return window.headsegDeprecations().slice(before).map(d => d.text); }""",
            node_id,
        )
    finally:
        page.evaluate("() => window.headsegStopWatching?.()")
    assert pack == [], pack
    marks_deprecated = page.evaluate(
        "() => /deprecated/.test(String(Object.getOwnPropertyDescriptor("
        "Object.getPrototypeOf(app.graph.nodes[0].inputs[0]), 'link')?.get ?? ''))"
    )
    assert bool(probe) == marks_deprecated, (probe, marks_deprecated)
    assert comfy_page.pack_problems() == []


def test_loading_a_workflow_saved_with_upsamples_error_map_output_raises_no_deprecation_warning_of_the_packs(
    comfy_page,
):
    """An old workflow whose Upsample has the error_map output, opened: the migration (error_map_migration.js)
    read the links of that output through output.links, which 1.58 marks deprecated ("output.links is
    deprecated..." in the console, raised from the pack's code). The workflow is still rewired: the preview
    reads a new Upsampling Error Map node. On a frontend that marks output.links deprecated, reading it here
    must raise one (else the watch sees nothing)."""
    page = comfy_page.page
    page.evaluate(JS_WATCH_DEPRECATIONS)
    try:
        load_workflow(page, explore_as_saved_before_the_error_map_node(), "old-error-map-deprecations")
        settle(page, 800)
        pack = sorted({d["text"] for d in page.evaluate("() => window.headsegDeprecations()") if d["pack"]})
        # the watch itself: a read of output.links outside the pack, noted where the frontend marks it deprecated
        probe = page.evaluate(
            """() => { const before = window.headsegDeprecations().length;
                       void app.graph.getNodeById(10).outputs[0].links;
                       return window.headsegDeprecations().slice(before).map(d => d.text); }"""
        )
    finally:
        page.evaluate("() => window.headsegStopWatching?.()")
    assert pack == [], pack
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    maps = [i for i, n in prompt.items() if n["class_type"] == "HeadSeg_UpsamplingError"]
    assert len(maps) == 1 and prompt[maps[0]]["inputs"]["stack"] == ["10", 0], prompt
    assert prompt["15"]["class_type"] == "PreviewImage" and prompt["15"]["inputs"]["images"] == [maps[0], 0]
    assert page.evaluate("() => app.graph.getNodeById(10).outputs.map(o => o.name)") == ["stack"]
    marks_deprecated = page.evaluate(
        "() => /deprecated/.test(String(Object.getOwnPropertyDescriptor("
        "Object.getPrototypeOf(app.graph.getNodeById(10).outputs[0]), 'links')?.get ?? ''))"
    )
    assert bool(probe) == marks_deprecated, (probe, marks_deprecated)
    assert comfy_page.pack_problems() == []
