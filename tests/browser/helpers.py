"""Helpers shared by the browser tests (tests/browser/test_*.py): test pictures, page helpers, JS snippets.

What a user sees is checked, not what the code believes: a click on the picker is judged by the
colour under the mouse pointer in a screenshot (the test pictures encode each pixel's column and
row in their red and green channels), and the console is compared with the same page whose pack
scripts are replaced by empty modules, so ComfyUI's own start-up messages do not count against us.
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / "example_workflows"
NODE_IDS = [
    "HeadSeg_RecordSelfAttention",
    "HeadSeg_HeadPCA",
    "HeadSeg_Upsample",
    "HeadSeg_UpsamplingError",
    "HeadSeg_MultiKMeans",
    "HeadSeg_MaskMerge",
    "HeadSeg_MaskSelectAtPixel",
    "HeadSeg_SaveLabelMaps",
    "HeadSeg_SaveRecording",
    "HeadSeg_LoadRecording",
]
PICKER = "HeadSeg_MaskSelectAtPixel"
LANDSCAPE = ("headseg_browser_landscape.png", 240, 120)
PORTRAIT = ("headseg_browser_portrait.png", 90, 160)


# -- test pictures and workflows --------------------------------------------------------------
def coded_picture(width: int, height: int):
    """RGB picture whose red channel encodes the column and green the row (0..255 over the side)."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:height, 0:width]
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = np.round(xx * 255.0 / (width - 1))
    rgb[..., 1] = np.round(yy * 255.0 / (height - 1))
    rgb[..., 2] = np.where(((xx // 10) + (yy // 10)) % 2 == 0, 40, 140)
    return Image.fromarray(rgb, "RGB")


def decode_position(rgb, width: int, height: int) -> tuple[float, float]:
    """Inverse of coded_picture: (column, row) that a colour stands for."""
    return rgb[0] * (width - 1) / 255.0, rgb[1] * (height - 1) / 255.0


def example_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))


def save_random_recording(comfy_server, name: str, W: int, H: int) -> None:
    """Saves a recording of random heads whose masks are W x H pixels in the server's input folder as ``name``."""
    import torch

    from headseg.nodes.core.recording import LayerKey, Recording
    from headseg.nodes.core.recording_file import save_recording

    heads = torch.randn(1, 2, H // 8, W // 8, 8, generator=torch.Generator().manual_seed(0))  # [B, heads, h, w, d]
    save_recording(Recording({LayerKey("input", 1, 0): heads}, (H, W)), comfy_server.input_dir / name)


def save_recording_and_picture(comfy_server, name: str, W: int, H: int, w: int, h: int) -> tuple[str, str]:
    """A recording whose masks are W x H pixels (save_random_recording) and a w x h coded picture, saved in the
    server's input folder as ``name``.safetensors and ``name``.png -> their file names."""
    recording, picture = f"{name}.safetensors", f"{name}.png"
    save_random_recording(comfy_server, recording, W, H)
    coded_picture(w, h).save(comfy_server.input_dir / picture)
    return recording, picture


def explore_as_saved_before_the_error_map_node() -> dict:
    """The explore example as it was saved when Upsample had a second output, error_map, linked to a
    Preview Image (node 15)."""
    wf = json.loads((WORKFLOWS_DIR / "headseg_explore.json").read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    up, shown = nodes[10], nodes[15]
    assert up["type"] == "HeadSeg_Upsample" and shown["type"] == "HeadSeg_UpsamplingError"
    link = next(l for l in wf["links"] if l[3] == 15)  # Upsample stack -> the error-map node
    link[2], link[5] = 1, "IMAGE"  # from Upsample's old second output
    up["outputs"][0]["links"].remove(link[0])
    up["outputs"].append({"name": "error_map", "type": "IMAGE", "links": [link[0]], "slot_index": 1})
    shown.update(type="PreviewImage", inputs=[{"name": "images", "type": "IMAGE", "link": link[0]}], outputs=[],
                 properties={"Node name for S&R": "PreviewImage"})  # fmt: skip
    return wf


# -- JS run in the page -----------------------------------------------------------------------
JS_PICKER_GRAPH = """
async ([picture, withImage]) => {
  app.graph.clear();
  let load = null;
  if (withImage) {
    load = LiteGraph.createNode('LoadImage');
    load.pos = [40, 80];
    app.graph.add(load);
    const w = load.widgets.find(w => w.name === 'image');
    w.value = picture;
    w.callback?.(picture);
  }
  const node = LiteGraph.createNode('HeadSeg_MaskSelectAtPixel');
  node.pos = [420, 80];
  app.graph.add(node);
  if (load) load.connect(0, node, node.inputs.findIndex(i => i.name === 'image'));
  app.canvas.setDirty(true, true);
  return node.id;
}
"""


JS_VIEW_NODE = """
([id, scale]) => {
  const node = app.graph.getNodeById(id);
  const ds = app.canvas.ds;
  ds.scale = scale;
  ds.offset = [180 / scale - node.pos[0], 190 / scale - node.pos[1]];
  app.canvas.setDirty(true, true);
}
"""


JS_WIDGETS = """
(id) => Object.fromEntries(app.graph.getNodeById(id).widgets
  .filter(w => ['x', 'y', 'index'].includes(w.name)).map(w => [w.name, w.value]))
"""


# Queues the graph (app.queuePrompt) and waits for the prompt to end -> {cached, executed: node ids, error: null
# or what ended it, started, finished}.
JS_QUEUE_AND_WAIT = """
async (timeoutMs) => {
  const api = app.api;
  const events = {cached: [], executed: [], error: null, started: false};
  let finish;
  const done = new Promise((resolve) => {
    const handlers = {
      execution_start: () => { events.started = true; },
      execution_cached: (e) => events.cached.push(...(e.detail?.nodes ?? []).map(String)),
      executed: (e) => events.executed.push(String(e.detail?.node)),
      execution_success: () => finish(null),
      execution_error: (e) => finish(e.detail ?? 'execution_error'),
      execution_interrupted: (e) => finish(e.detail ?? 'execution_interrupted'),
    };
    finish = (error) => {
      if (events.finished) return;
      events.finished = true;
      events.error = error;
      for (const [name, fn] of Object.entries(handlers)) api.removeEventListener(name, fn);
      resolve();
    };
    for (const [name, fn] of Object.entries(handlers)) api.addEventListener(name, fn);
  });
  const queued = await app.queuePrompt(0, 1);
  const refused = () => 'prompt refused: ' + (queued ? '' : 'node errors; ') +
    ([...document.querySelectorAll('.p-dialog')].map(d => d.textContent).join(' | ') || 'no execution started');
  setTimeout(() => { if (!events.started) finish(refused()); }, 30000);
  setTimeout(() => finish('timed out'), timeoutMs);
  await done;
  return events;
}
"""


JS_CHECK_STATE = "() => app.extensionManager.workflow.activeWorkflow.changeTracker.checkState()"

# Holds back the server's messages from the first 'execution_start' on: each is handed to ComfyUI's listeners
# (app.api.dispatchCustomEvent) only once window.headsegRelease() is awaited, in the order they came. The
# page then sees the prompt under way, however fast the server ran it, until the test has done what must
# happen while it runs (e.g. open another workflow tab).
JS_HOLD_MESSAGES_AFTER_START = """() => { const api = app.api; const dispatch = api.dispatchCustomEvent;
  const held = []; let holding = false;
  api.dispatchCustomEvent = function (type) {
    if (holding) { held.push([...arguments]); return true; }
    const result = dispatch.apply(this, arguments);
    if (type === 'execution_start') holding = true;
    return result; };
  window.headsegRelease = async () => {
    while (held.length) { await new Promise(r => setTimeout(r, 10)); dispatch.apply(api, held.shift()); }
    delete api.dispatchCustomEvent; delete window.headsegRelease; }; }"""


# [timeoutMs, type]: as JS_QUEUE_AND_WAIT, with the page told of the prompt's id (the answer to its /prompt request,
# api.queuePrompt) only once the 'executed' message of the node of type ``type`` has come, and the server's later
# messages held from then until the page has the id: the messages up to that node come before ComfyUI's front end
# knows whose prompt they are, as when the first nodes are quick or served from the cache, the rest after.
JS_QUEUE_AND_WAIT_WITH_EARLY_MESSAGES = (
    """async ([timeoutMs, type]) => { const api = app.api; const dispatch = api.dispatchCustomEvent;
  const queuePrompt = api.queuePrompt; const early = String(app.graph.nodes.find(n => n.type === type).id);
  const held = []; let holding = false, seen;
  const came = new Promise(r => { seen = r; setTimeout(() => r(false), timeoutMs); });
  api.dispatchCustomEvent = function (kind, detail) {
    if (holding) { held.push([...arguments]); return true; }
    const result = dispatch.apply(this, arguments);
    if (kind === 'executed' && String(detail?.node) === early) { holding = true; seen(true); }
    return result; };
  api.queuePrompt = async function () {
    const answer = await queuePrompt.apply(this, arguments);
    await came;
    setTimeout(() => { delete api.dispatchCustomEvent; for (const args of held.splice(0)) dispatch.apply(api, args); }, 0);
    return answer; };
  try { return await ("""
    + JS_QUEUE_AND_WAIT
    + """)(timeoutMs); } finally { api.queuePrompt = queuePrompt; } }"""
)

JS_TO_SUBGRAPH = """async (ids) => { app.canvas.deselectAll();
  for (const id of ids) app.canvas.select(app.graph.getNodeById(id));
  await app.extensionManager.command.execute('Comfy.Graph.ConvertToSubgraph');
  return app.graph.nodes.find(n => n.isSubgraphNode?.()).id; }"""

# Opens subgraph node ``sg`` and brings the Mask Select node inside into view at scale 1 -> its id.
JS_OPEN_SUBGRAPH_PICKER = """(sg) => { const outer = app.graph.getNodeById(sg); app.canvas.openSubgraph(outer.subgraph, outer);
  const inner = outer.subgraph.nodes.find(n => n.type === 'HeadSeg_MaskSelectAtPixel');
  app.canvas.ds.scale = 1; app.canvas.ds.offset = [180 - inner.pos[0], 190 - inner.pos[1]];
  app.canvas.setDirty(true, true); return inner.id; }"""


# Builds Load Recording of ``recording`` -> Head PCA -> Upsample -> Multi K-Means (k 2, 3) -> Mask Merge -> Mask Select,
# on the CPU, with Load Image of ``picture`` feeding its image -> the Mask Select node's id.
JS_LOADED_RECORDING_GRAPH = """
async ([recording, picture]) => {
  app.graph.clear();
  const add = (type, pos, values = {}) => {
    const node = LiteGraph.createNode(type);
    node.pos = pos;
    app.graph.add(node);
    for (const [name, value] of Object.entries(values)) node.widgets.find(w => w.name === name).value = value;
    return node;
  };
  const link = (from, to, name) => from.connect(0, to, to.inputs.findIndex(i => i.name === name));
  const load = add('HeadSeg_LoadRecording', [-900, 80], {file: recording, path: recording});
  const pca = add('HeadSeg_HeadPCA', [-900, 300], {device: 'cpu'});
  const up = add('HeadSeg_Upsample', [-900, 600]);
  const km = add('HeadSeg_MultiKMeans', [-600, 80], {cluster_counts: '2,3', device: 'cpu'});
  const merge = add('HeadSeg_MaskMerge', [-600, 500]);
  const image = add('LoadImage', [40, 80]);
  const w = image.widgets.find(w => w.name === 'image');
  w.value = picture;
  w.callback?.(picture);
  const node = add('HeadSeg_MaskSelectAtPixel', [420, 80]);
  link(load, pca, 'recording'); link(pca, up, 'features'); link(up, km, 'stack'); link(km, merge, 'clusters');
  link(merge, node, 'masks'); link(image, node, 'image');
  app.canvas.setDirty(true, true);
  return node.id;
}
"""


# -- page helpers -----------------------------------------------------------------------------
def picker_selector(node_id) -> str:
    """CSS selector of a picker node's DOM (the picker element carries its node id)."""
    return f".headseg-picker[data-node-id='{node_id}']"


def frame_rect(page, node_id) -> dict:
    return page.eval_on_selector(
        picker_selector(node_id) + " .headseg-frame",
        "e => { const r = e.getBoundingClientRect(); return {left: r.left, top: r.top, width: r.width, height: r.height}; }",
    )


def click_pixel(page, node_id, size, pixel) -> tuple[float, float]:
    """Clicks the centre of image pixel (x, y) of a W x H picture in the picker, waits for the widgets
    -> the screen point clicked."""
    (W, H), (x, y) = size, pixel
    rect = frame_rect(page, node_id)
    cx, cy = rect["left"] + (x + 0.5) / W * rect["width"], rect["top"] + (y + 0.5) / H * rect["height"]
    page.mouse.click(cx, cy)
    settle(page, 250)
    return cx, cy


def screenshot_rgb(page, hide_marker: bool = True):
    """Screenshot as a PIL image; the pick marker (drawn on the picked pixel) is hidden for it."""
    from PIL import Image

    hide = "document.querySelectorAll('.headseg-marker').forEach(m => m.style.visibility = '%s')"
    if hide_marker:
        page.evaluate("() => " + hide % "hidden")
    try:
        png = page.screenshot()
    finally:
        if hide_marker:
            page.evaluate("() => " + hide % "")
    return Image.open(io.BytesIO(png)).convert("RGB")


def selected_thumbs(page, sel) -> list[str]:
    """Indices of the outlined thumbnails of picker ``sel`` (the mask the MASK output carries)."""
    return page.eval_on_selector_all(sel + " .headseg-thumb.headseg-selected", "bs => bs.map(b => b.dataset.index)")


# Node ``id`` -> what each picker element carrying its id shows, and what its node's picker holds: the
# message of a wait_picture_ready that timed out.
JS_PICKER_DIAGNOSIS = """(id) => {
  const node = app.graph.getNodeById(id), picker = node?.headsegPicker;
  const elements = [...document.querySelectorAll(`.headseg-picker[data-node-id='${id}']`)].map((e) => {
    const f = e.querySelector('.headseg-frame'), i = e.querySelector('img.headseg-base'), m = e.querySelector('.headseg-message');
    return {live: e === picker?.root, dead: e.dataset.dead ?? null, connected: e.isConnected,
            frame: f ? [getComputedStyle(f).display, Math.round(f.getBoundingClientRect().width)] : null,
            img: i ? [i.getAttribute('src'), i.complete, i.naturalWidth] : null,
            message: m && getComputedStyle(m).display !== 'none' ? m.textContent : null};
  });
  return {node: !!node, picker: !!picker, rootConnected: picker?.root.isConnected ?? null,
          hasOutput: !!picker?.output, lostRun: picker?.lostRun ?? null, src: picker?.src ?? null,
          stored: Object.keys(app.nodeOutputs ?? {}).includes(String(id)), elements};
}"""


def wait_picture_ready(page, node_id, timeout=30_000):
    """Waits until node ``node_id``'s picker shows a loaded picture; on a timeout, the error says what each
    of its picker elements showed."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    try:
        page.wait_for_function(
            """(sel) => { const f = document.querySelector(sel + ' .headseg-frame');
                          const i = document.querySelector(sel + ' img.headseg-base');
                          return f && i && i.complete && i.naturalWidth > 0 && getComputedStyle(f).display !== 'none'
                                 && f.getBoundingClientRect().width > 20; }""",
            arg=picker_selector(node_id),
            timeout=timeout,
        )
    except PlaywrightTimeoutError as error:
        raise AssertionError(f"no picture shown by node {node_id}'s picker: {page.evaluate(JS_PICKER_DIAGNOSIS, node_id)}") from error
    page.wait_for_timeout(300)  # DOM widget positions follow the canvas on the next frames


# (id, output): keeps UI payload ``output`` of node ``id`` as ComfyUI keeps that of a run queued from the open
# workflow: in app.nodeOutputs, and in the outputs the workflow's change tracker keeps once it has any (undo hands
# those back as app.nodeOutputs).
JS_KEEP_OUTPUT = """(id, output) => { app.nodeOutputs[String(id)] = output;
  const kept = app.extensionManager.workflow.activeWorkflow?.changeTracker?.nodeOutputs;
  if (kept) kept[String(id)] = output; }"""


def add_merge_with_note(page, text: str, pos) -> int:
    """Adds a Mask Merge node as if it had run: ComfyUI keeps its output {text: [text]} (JS_KEEP_OUTPUT) and the
    node has been told of it (its note line shows text) -> its id."""
    return page.evaluate(
        f"""([text, pos]) => {{ const m = LiteGraph.createNode('HeadSeg_MaskMerge'); m.pos = pos; app.graph.add(m);
                              const out = {{text: [text]}};
                              ({JS_KEEP_OUTPUT})(m.id, out); m.onExecuted(out); return m.id; }}""",
        [text, list(pos)],
    )


def rebuild_as_undo_does(page, node_id) -> None:
    """Rebuilds every node as undo does, and waits until node ``node_id`` is a new object: the graph as it
    is now noted in the open workflow's undo history, a mark set in the graph's extra and noted, then that
    undone (ComfyUI's undo: loadGraphData without clearing outputs, into the same workflow, whose change
    tracker gives back the outputs it keeps). The workflow stays the open one (a load without it opened a
    new tab at each rebuild), its undo history and modified mark as they were but for any change not noted
    yet, noted as a step of its own."""
    path = "() => app.extensionManager.workflow.activeWorkflow.path"
    before = page.evaluate(path)
    page.evaluate(
        """async (id) => { const tracker = app.extensionManager.workflow.activeWorkflow.changeTracker;
                           app.graph.getNodeById(id).headsegOld = true;
                           tracker.checkState();
                           app.graph.extra.headsegRebuild = true;
                           tracker.checkState();
                           await tracker.undo(); }""",
        node_id,
    )
    page.wait_for_function("(id) => app.graph.getNodeById(id) && !app.graph.getNodeById(id).headsegOld", arg=node_id)
    assert page.evaluate(path) == before and not page.evaluate("() => app.graph.extra.headsegRebuild")


def load_workflow(page, workflow: dict, name: str) -> None:
    """Opens ``workflow`` in a tab ``name`` as ComfyUI opens a workflow file: its JSON text parsed in the page.
    Handed over as an object, every float 0.0 in it would arrive as -0 (Playwright's serialiser tests
    ``value == float("-0")``, true for 0.0), which no file holds (the examples' Mask Merge min_area is 0.0)."""
    page.evaluate(
        "async ([text, name]) => { await app.loadGraphData(JSON.parse(text), true, true, name); }",
        [json.dumps(workflow), name],
    )


# Selects node ``id`` and opens the right side panel's Parameters tab -> false where this frontend has no
# right side panel (the one ComfyUI 0.3.75 pins, 1.32.9; 1.58.1 has one).
JS_OPEN_PARAMETERS = """async (id) => {
  const host = [...document.querySelectorAll('body *')].find(e => e.__vue_app__);
  const stores = host.__vue_app__.config.globalProperties.$pinia._s;
  if (!stores.has('rightSidePanel')) return false;
  app.canvas.deselectAll?.();
  app.canvas.selectNode(app.graph.getNodeById(id));
  await new Promise(r => setTimeout(r, 300));
  stores.get('rightSidePanel').openPanel('parameters');
  return true;
}"""
JS_CLOSE_PANEL = """() => {
  const host = [...document.querySelectorAll('body *')].find(e => e.__vue_app__);
  host.__vue_app__.config.globalProperties.$pinia._s.get('rightSidePanel').closePanel();
}"""
# The labels of the widgets the open side panel lists (its widget items), in their order.
JS_PANEL_WIDGETS = """() => [...document.querySelectorAll('.widget-item')]
  .map(e => e.querySelector('.editable-text')?.textContent.trim())"""
# Node ``id``'s widgets other than DOM widgets (the picker, a note line): their labels, in their order.
JS_OWN_WIDGETS = "(id) => app.graph.getNodeById(id).widgets.filter(w => !w.element).map(w => w.label || w.name)"


def side_panel_inputs(page, node_id):
    """The labels the right side panel's Parameters tab lists for node ``node_id`` selected, once it lists
    every widget of the node's own (JS_OWN_WIDGETS); the panel is closed again. None where this frontend has
    no right side panel (1.32.9)."""
    if not page.evaluate(JS_OPEN_PARAMETERS, node_id):
        return None
    try:
        own = page.evaluate(JS_OWN_WIDGETS, node_id)
        assert own, "the node has no widgets of its own to list"
        page.wait_for_function(f"(want) => want.every(n => ({JS_PANEL_WIDGETS})().includes(n))", arg=own, timeout=15_000)
        settle(page)
        return page.evaluate(JS_PANEL_WIDGETS)
    finally:
        page.evaluate(JS_CLOSE_PANEL)


def settle(page, ms=400):
    page.wait_for_timeout(ms)


def view_picker(page, node_id, scale):
    """Zooms the canvas to ``scale`` with the picker near the top left; waits until its DOM follows."""
    page.evaluate(JS_VIEW_NODE, [node_id, scale])
    page.wait_for_function(
        """async (sel) => {
             const f = document.querySelector(sel + ' .headseg-stage');
             if (!f) return false;
             const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
             const a = f.getBoundingClientRect();
             await frame();
             const b = f.getBoundingClientRect();
             return a.width > 20 && a.left === b.left && a.top === b.top && a.width === b.width
               && b.left > 0 && b.top > 0 && b.bottom < window.innerHeight && b.right < window.innerWidth;
           }""",
        arg=picker_selector(node_id),
        timeout=15_000,
    )


def add_picker(page, picture: str = "", scale: float = 1.0) -> int:
    """Adds the picker graph (Load Image of ``picture``, or none) and views it at ``scale`` -> its node id."""
    node_id = page.evaluate(JS_PICKER_GRAPH, [picture, bool(picture)])
    view_picker(page, node_id, scale)
    return node_id


def ready_picker(page, name):
    """A picker node on picture ``name``, its picture shown -> (node id, its CSS selector)."""
    node_id = add_picker(page, name)
    wait_picture_ready(page, node_id)
    return node_id, picker_selector(node_id)


def picker_payload(name, size, pixel, masks=2, index=0, asked=None, info=True) -> dict:
    """The UI payload of a Mask Select run whose picture and ``masks`` thumbnails are the input folder's
    picture ``name``: the grid ``size`` [W, H], the ``pixel`` used and the one ``asked`` (default: the same);
    ``info``: an area, k and cluster for each mask (else none)."""
    ref = {"filename": name, "subfolder": "", "type": "input"}
    return {
        "headseg_image": [ref], "headseg_size": list(size), "headseg_pixel": list(pixel),
        "headseg_pixel_asked": list(asked or pixel),
        "headseg_index": [index], "headseg_masks": [ref] * masks,
        "headseg_mask_info": [{"area": 10 * (i + 1), "k": 2, "cluster": i} for i in range(masks)] if info else [],
    }  # fmt: skip


def synthetic_run(
    page, node_id, name, size, pixel, masks=2, index=0, stored=True, asked=None, points=None, picture_size=None
):
    """Feeds the picker the payload of a run (two masks of the coded picture), as ComfyUI does after
    executing the node; with ``stored`` also keeps it as ComfyUI does (JS_KEEP_OUTPUT). ``asked``:
    the x / y the run was given, when the node mapped them onto the masks' grid. ``points``: (the
    more_points text the run was given, its pixels used [[x, y, 1 or 0], ...]). ``picture_size``: [w, h] of the
    image connected to the run (else none was)."""
    payload = picker_payload(name, size, pixel, masks=masks, index=index, asked=asked)
    if points is not None:
        payload.update(headseg_points_asked=[points[0]], headseg_points=list(points[1]))
    if picture_size is not None:
        payload.update(headseg_picture_size=list(picture_size))
    page.evaluate(
        f"""([id, payload, stored]) => {{ if (stored) ({JS_KEEP_OUTPUT})(id, payload);
                                         app.graph.getNodeById(id).onExecuted(payload); }}""",
        [node_id, payload, stored],
    )
    wait_picture_ready(page, node_id)


@contextlib.contextmanager
def vue_nodes(page):
    """Runs the block with Nodes 2.0 (ComfyUI's Vue node renderer) on, then turns it off again."""
    page.evaluate("async () => { await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true); }")
    try:
        yield
    finally:
        page.evaluate("async () => { await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false); }")
        settle(page, 500)
