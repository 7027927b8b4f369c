"""HeadSeg's web front end in a real browser against a live ComfyUI (issue: front end).

What a user sees is checked, not what the code believes: a click on the picker is judged by the
colour under the mouse pointer in a screenshot (the test pictures encode each pixel's column and
row in their red and green channels), and the console is compared with the same page whose pack
scripts are replaced by empty modules, so ComfyUI's own start-up messages do not count against us.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import pathlib
import re

import pytest

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


# -- test pictures ------------------------------------------------------------------------------
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


@pytest.fixture(scope="session")
def pictures(comfy_server):
    """The coded test pictures, in the server's input folder (Load Image serves them from there)."""
    for name, w, h in (LANDSCAPE, PORTRAIT):
        coded_picture(w, h).save(comfy_server.input_dir / name)
    return {"landscape": LANDSCAPE, "portrait": PORTRAIT}


# -- page helpers -------------------------------------------------------------------------------
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


def wait_picture_ready(page, node_id, timeout=30_000):
    page.wait_for_function(
        """(sel) => { const f = document.querySelector(sel + ' .headseg-frame');
                      const i = document.querySelector(sel + ' img.headseg-base');
                      return f && i && i.complete && i.naturalWidth > 0 && getComputedStyle(f).display !== 'none'
                             && f.getBoundingClientRect().width > 20; }""",
        arg=picker_selector(node_id),
        timeout=timeout,
    )
    page.wait_for_timeout(300)  # DOM widget positions follow the canvas on the next frames


def add_merge_with_note(page, text: str, pos) -> int:
    """Adds a Mask Merge node as if it had run: ComfyUI keeps its output {text: [text]} and the node has
    been told of it (its note line shows text) -> its id."""
    return page.evaluate(
        """([text, pos]) => { const m = LiteGraph.createNode('HeadSeg_MaskMerge'); m.pos = pos; app.graph.add(m);
                              const out = {text: [text]};
                              app.nodeOutputs[String(m.id)] = out; m.onExecuted(out); return m.id; }""",
        [text, list(pos)],
    )


def rebuild_as_undo_does(page, node_id) -> None:
    """Rebuilds every node from the saved graph, keeping the outputs (loadGraphData without clearing, as
    undo does), and waits until node ``node_id`` is a new object."""
    page.evaluate(
        """async (id) => { app.graph.getNodeById(id).headsegOld = true;
                           await app.loadGraphData(app.graph.serialize(), false, false); }""",
        node_id,
    )
    page.wait_for_function("(id) => app.graph.getNodeById(id) && !app.graph.getNodeById(id).headsegOld", arg=node_id)


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


# -- extension and nodes ------------------------------------------------------------------------

def test_extension_loads_without_console_errors(open_page):
    baseline = open_page(stub_pack_scripts=True)
    real = open_page()
    assert real.pack_scripts, "the page did not request the pack's scripts from /extensions/HeadSeg/"
    assert real.page.evaluate("() => app.extensions.some(e => e.name === 'HeadSeg.Frontend')")
    assert not baseline.page.evaluate("() => app.extensions.some(e => e.name === 'HeadSeg.Frontend')")
    # Let the default graph draw for a while with the extension active.
    real.page.mouse.move(700, 450)
    settle(real.page, 1000)
    known = set(baseline.problems())
    added = [p for p in real.problems() if p not in known]
    assert added == [], "console errors/warnings that appear only with HeadSeg's scripts:\n" + "\n".join(added)
    assert real.pack_problems() == []


def test_workflow_without_headseg_nodes_is_unchanged(open_page):
    """The default graph (no HeadSeg node) loads and serialises exactly as without the extension."""
    js = "() => JSON.stringify(app.graph.serialize().nodes.map(n => [n.type, n.widgets_values, n.size, n.inputs?.length, n.outputs?.length]).sort())"
    baseline = open_page(stub_pack_scripts=True)
    real = open_page()
    base_nodes = json.loads(baseline.page.evaluate(js))
    assert len(base_nodes) > 3, "the default graph did not load"
    assert json.loads(real.page.evaluate(js)) == base_nodes


def test_headseg_nodes_in_node_search(comfy_page, comfy_server, screenshots):
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    page = comfy_page.page
    info = comfy_server.object_info()
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"server does not list {missing}"
    registered = page.evaluate("(ids) => ids.filter(id => !LiteGraph.registered_node_types[id])", NODE_IDS)
    assert registered == []

    page.evaluate("() => app.graph.clear()")
    settle(page)
    search = None
    for _ in range(3):  # a double-click can land while the app is still busy after the page load
        page.mouse.dblclick(700, 500)
        try:
            search = page.wait_for_selector(".comfy-vue-node-search-box input", timeout=8_000)
            break
        except PlaywrightTimeoutError:
            page.keyboard.press("Escape")
            settle(page, 500)
    if search is None:
        page.screenshot(path=str(screenshots / "node-search-failed.png"))
    assert search is not None, "double-clicking the empty canvas did not open the node search box (3 tries)"
    search.type("HeadSeg")
    settle(page, 1200)
    shown = page.evaluate(
        "() => [...document.querySelectorAll('.p-autocomplete-option, .comfy-vue-node-search-container li')]"
        ".map(e => e.textContent)"
    )
    page.screenshot(path=str(screenshots / "node-search.png"))
    text = "\n".join(shown)
    for node_id in NODE_IDS:
        title = info[node_id]["display_name"]
        assert title in text, f"{title!r} ({node_id}) not offered by the node search; offered:\n{text}"


# -- node docs ----------------------------------------------------------------------------------
DOCS_DIR = REPO_ROOT / "js" / "docs"


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_docs_served_and_cover_inputs(comfy_server, node_id):
    """Each node has js/docs/<id>.md, served where ComfyUI's help panel looks, naming every input and output."""
    info = comfy_server.object_info()[node_id]
    assert info["python_module"].startswith("custom_nodes.HeadSeg"), info["python_module"]
    text = comfy_server.get_bytes(f"/extensions/HeadSeg/docs/{node_id}.md").decode()
    assert text == (DOCS_DIR / f"{node_id}.md").read_text()
    assert text.startswith("# ")
    inputs = [name for section in ("required", "optional") for name in info["input"].get(section, {})]
    missing = [name for name in inputs if f"`{name}`" not in text]
    assert missing == [], f"{node_id} docs do not mention inputs {missing}"
    outputs = info.get("output_name", [])
    missing = [name for name in outputs if f"`{name}`" not in text]
    assert missing == [], f"{node_id} docs do not mention outputs {missing}"


JS_OPEN_HELP = """
async (nodeId) => {
  // The node library's help page, opened the way its (?) button does (ComfyUI's own stores).
  const host = [...document.querySelectorAll('body *')].find(e => e.__vue_app__);
  const stores = host.__vue_app__.config.globalProperties.$pinia._s;
  const def = stores.get('nodeDef').nodeDefsByName[nodeId];
  if (app.extensionManager.sidebarTab.activeSidebarTabId !== 'node-library')
    app.extensionManager.sidebarTab.toggleSidebarTab('node-library');
  await new Promise(r => setTimeout(r, 300));
  stores.get('nodeHelp').openHelp(def);
}
"""


def test_node_docs_render_in_help_panel(comfy_page, comfy_server, screenshots):
    page = comfy_page.page
    for node_id in NODE_IDS:
        heading = (DOCS_DIR / f"{node_id}.md").read_text().splitlines()[0].lstrip("# ").strip()
        second = [ln for ln in (DOCS_DIR / f"{node_id}.md").read_text().splitlines()[1:] if ln.strip()][0]
        page.evaluate(JS_OPEN_HELP, node_id)
        page.get_by_role("heading", name=heading).first.wait_for(timeout=15_000)
        assert re.sub(r"[`*]", "", second)[:40] in page.inner_text("body")
        if node_id == PICKER:
            page.screenshot(path=str(screenshots / "node-docs.png"))
    page.evaluate("() => app.extensionManager.sidebarTab.toggleSidebarTab('node-library')")
    assert comfy_page.pack_problems() == []


# -- templates ----------------------------------------------------------------------------------
def example_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))


def test_example_workflows_are_templates_and_load(comfy_page, comfy_server, screenshots):
    """Every example is offered as a template and loads with its nodes; ComfyUI offers the download of
    the checkpoint it needs when it is missing."""
    names = example_names()
    assert names, "no example workflows in example_workflows/"
    listed = comfy_server.get_json("/workflow_templates")
    assert sorted(listed.get("HeadSeg", [])) == names

    page = comfy_page.page
    page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    page.wait_for_selector("[data-testid='template-workflows-content']", timeout=30_000)
    # The pack's templates are listed under its own entry in the dialog's side navigation.
    page.get_by_text("HeadSeg", exact=True).first.click()
    for name in names:
        page.wait_for_selector(f"[data-testid='template-workflow-{name}']", timeout=15_000)
    page.screenshot(path=str(screenshots / "templates.png"))

    for i, name in enumerate(names):
        if i:  # the dialog closes after loading a template
            page.evaluate("() => app.extensionManager.command.execute('Comfy.BrowseTemplates')")
            page.wait_for_selector("[data-testid='template-workflows-content']", timeout=30_000)
            page.get_by_text("HeadSeg", exact=True).first.click()
        page.click(f"[data-testid='template-workflow-{name}']")
        expected = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
        want = sorted(n["type"] for n in expected["nodes"])
        page.wait_for_function(
            "(want) => JSON.stringify(app.graph.nodes.map(n => n.type).sort()) === JSON.stringify(want)",
            arg=want,
            timeout=30_000,
        )
        settle(page, 800)
        page.screenshot(path=str(screenshots / f"template-{name}.png"))
        # the test server has no SD2.1 checkpoint: ComfyUI names the one the template loads and offers
        # its download (the Load Checkpoint node's properties.models), then the dialog is closed
        missing = page.get_by_role("dialog").filter(has_text="Missing Models")
        missing.wait_for(timeout=15_000)
        assert "checkpoints / v2-1_512-ema-pruned.safetensors" in missing.inner_text()
        assert missing.get_by_role("button", name="Download").count() == 1
        page.keyboard.press("Escape")
        missing.wait_for(state="detached", timeout=15_000)
    assert comfy_page.pack_problems() == []


# -- picker -------------------------------------------------------------------------------------
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


def synthetic_run(page, node_id, name, size, pixel, masks=2, index=0, stored=True, asked=None):
    """Feeds the picker the payload of a run (two masks of the coded picture), as ComfyUI does after
    executing the node; with ``stored`` also keeps it in app.nodeOutputs, as ComfyUI does. ``asked``:
    the x / y the run was given, when the node mapped them onto the masks' grid."""
    ref = {"filename": name, "subfolder": "", "type": "input"}
    payload = {
        "headseg_image": [ref], "headseg_size": list(size), "headseg_pixel": list(pixel),
        "headseg_pixel_asked": list(asked or pixel),
        "headseg_index": [index], "headseg_masks": [ref] * masks,
        "headseg_mask_info": [{"area": 10 * (i + 1), "k": 2, "cluster": i} for i in range(masks)],
    }  # fmt: skip
    page.evaluate(
        """([id, payload, stored]) => { if (stored) app.nodeOutputs[String(id)] = payload;
                                        app.graph.getNodeById(id).onExecuted(payload); }""",
        [node_id, payload, stored],
    )
    wait_picture_ready(page, node_id)


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


def test_picker_comes_back_when_the_node_is_rebuilt(comfy_page, pictures):
    """Undo rebuilds the nodes from the saved graph (loadGraphData without clearing outputs): the
    picker restores its last run from the outputs ComfyUI keeps, as ComfyUI's own previews do,
    instead of going blank."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
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


# -- thumbnails, wheel, unlinked picture, note line -----------------------------------------------
def _hovering(page, sel):
    return page.evaluate("(sel) => document.querySelector(sel + ' .headseg-frame').classList.contains('headseg-hovering')", sel)


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


def test_wheel_over_the_thumbnail_strip_does_not_zoom(comfy_page, pictures):
    """The strip scrolls its thumbnails: the wheel there never zooms the canvas."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page)
    sel = picker_selector(node_id)
    synthetic_run(page, node_id, name, (W, H), (0, 0), masks=8, stored=False)
    settle(page)
    box = page.eval_on_selector(sel + " .headseg-strip", "e => e.getBoundingClientRect().toJSON()")
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    before = page.evaluate("() => app.canvas.ds.scale")
    page.mouse.wheel(0, -240)
    settle(page)
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


def test_picker_forgets_the_picture_when_the_image_link_is_removed(comfy_page, pictures):
    """Before any run the picker shows the linked picture; unlinked, it says there is no image."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    # node ids are reused after graph.clear(): no run of an earlier test's node may stand in for this one's
    page.evaluate("() => { for (const id of Object.keys(app.nodeOutputs)) delete app.nodeOutputs[id]; }")
    node_id = add_picker(page, name)
    wait_picture_ready(page, node_id)
    sel = picker_selector(node_id)
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


# -- old layouts --------------------------------------------------------------------------------
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
            picker(5, [1400, 0], [-7, 99999999, 1.6], [{"name": "masks", "type": "HEADSEG_MASKS", "link": None}]),
        ],
        "links": [[1, 1, 0, 2, 1, "IMAGE"]],
    }  # fmt: skip


def test_old_widget_layout_loads(comfy_page, pictures, comfy_server):
    page = comfy_page.page
    spec = comfy_server.object_info()[PICKER]["input"]["required"]
    defaults = {k: spec[k][1]["default"] for k in ("x", "y", "index")}
    workflow = old_layout_workflow(pictures["landscape"][0])
    page.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, 'old-layout'); }", workflow)
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
    assert comfy_page.pack_problems() == []
    assert not [p for p in comfy_page.problems() if re.search(r"\bNaN\b", p)]


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


def test_a_workflow_saved_with_upsamples_error_map_output_is_rewired(comfy_page):
    """Old workflows queue as before: the links of Upsample's former error_map output now come from
    an Upsampling Error Map node fed by the same Upsample, and Upsample keeps one output."""
    page = comfy_page.page
    page.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, 'old-error-map'); }",
                  explore_as_saved_before_the_error_map_node())  # fmt: skip
    settle(page, 800)
    prompt = page.evaluate("async () => (await app.graphToPrompt()).output")
    maps = [i for i, n in prompt.items() if n["class_type"] == "HeadSeg_UpsamplingError"]
    assert len(maps) == 1
    assert prompt[maps[0]]["inputs"]["stack"] == ["10", 0]
    assert prompt["15"]["class_type"] == "PreviewImage" and prompt["15"]["inputs"]["images"] == [maps[0], 0]
    outputs = page.evaluate("() => app.graph.getNodeById(10).outputs.map(o => o.name)")
    assert outputs == ["stack"]
    assert comfy_page.pack_problems() == []


@pytest.mark.parametrize("node_id", ["HeadSeg_SaveLabelMaps", "HeadSeg_SaveRecording"])
def test_save_nodes_fill_in_date_and_widget_patterns_of_the_prefix_when_queued(comfy_page, node_id):
    """As ComfyUI's own save nodes: %date:...% and %Node name.widget% in filename_prefix reach the prompt
    filled in, the workflow keeps the pattern, and %width% / %height% are left to the server."""
    page = comfy_page.page
    prompt, kept, year = page.evaluate(
        """async (type) => {
          const seed = LiteGraph.createNode('HeadSeg_MultiKMeans'); app.graph.add(seed);
          seed.widgets.find((w) => w.name === 'seed').value = 17;
          const save = LiteGraph.createNode(type); app.graph.add(save);
          const prefix = save.widgets.find((w) => w.name === 'filename_prefix');
          prefix.value = 'runs/%date:yyyy%/%HeadSeg_MultiKMeans.seed%_%width%x%height%';
          const out = (await app.graphToPrompt()).output;
          return [out[String(save.id)].inputs.filename_prefix, save.serialize().widgets_values[0], new Date().getFullYear()];
        }""",
        node_id,
    )
    assert prompt == f"runs/{year}/17_%width%x%height%"
    assert kept == "runs/%date:yyyy%/%HeadSeg_MultiKMeans.seed%_%width%x%height%"
    assert comfy_page.pack_problems() == []


@contextlib.contextmanager
def vue_nodes(page):
    """Runs the block with Nodes 2.0 (ComfyUI's Vue node renderer) on, then turns it off again."""
    page.evaluate("async () => { await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true); }")
    try:
        yield
    finally:
        page.evaluate("async () => { await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false); }")
        settle(page, 500)


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


JS_TRACKER = """() => { const w = app.extensionManager.workflow.activeWorkflow;
  return {modified: !!w.isModified, undo: w.changeTracker.undoQueue.length}; }"""
JS_CHECK_STATE = "() => app.extensionManager.workflow.activeWorkflow.changeTracker.checkState()"


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


JS_TO_SUBGRAPH = """async (ids) => { app.canvas.deselectAll();
  for (const id of ids) app.canvas.select(app.graph.getNodeById(id));
  await app.extensionManager.command.execute('Comfy.Graph.ConvertToSubgraph');
  return app.graph.nodes.find(n => n.isSubgraphNode?.()).id; }"""


def test_an_old_error_map_output_inside_a_subgraph_is_rewired(comfy_page):
    """The explore example's Upsample and error-map preview in a subgraph, saved when Upsample had the
    error_map output: opening it rewires the subgraph as the root graph is rewired."""
    page = comfy_page.page
    wf = json.loads((WORKFLOWS_DIR / "headseg_explore.json").read_text())
    page.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, 'subgraph-old-error-map'); }", wf)
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
    page.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, 'subgraph-old-error-map'); }", saved)
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
    page.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, 'subgraph-old-error-map-out'); }", wf)
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
    page.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, 'subgraph-old-error-map-out'); }", saved)
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


def test_picker_inside_a_subgraph_comes_back_when_the_node_is_rebuilt(comfy_page, pictures):
    """Inside a subgraph ComfyUI keeps a node's outputs under '<subgraph id>:<node id>': the picker
    finds its last run there after undo rebuilds the graph, as it does in the root graph."""
    name, W, H = pictures["landscape"]
    page = comfy_page.page
    node_id = add_picker(page, name)
    wait_picture_ready(page, node_id)
    sg = page.evaluate(JS_TO_SUBGRAPH, [node_id])
    ref = {"filename": name, "subfolder": "", "type": "input"}
    payload = {
        "headseg_image": [ref], "headseg_size": [W, H], "headseg_pixel": [3, 4], "headseg_pixel_asked": [3, 4],
        "headseg_index": [0], "headseg_masks": [ref, ref],
        "headseg_mask_info": [{"area": 10, "k": 2, "cluster": 0}, {"area": 20, "k": 2, "cluster": 1}],
    }  # fmt: skip
    page.evaluate(
        """([sg, id, payload]) => {
             const outer = app.graph.getNodeById(sg);
             const inner = outer.subgraph.nodes.find(n => n.type === 'HeadSeg_MaskSelectAtPixel');
             for (const w of inner.widgets) { if (w.name === 'x') w.value = 3; if (w.name === 'y') w.value = 4; }
             app.api.dispatchCustomEvent('executed', {node: `${sg}:${inner.id}`, display_node: `${sg}:${inner.id}`,
                                                      output: payload, prompt_id: 'p'}); }""",
        [sg, node_id, payload],
    )
    js_open = """(sg) => { const outer = app.graph.getNodeById(sg); app.canvas.openSubgraph(outer.subgraph, outer);
                   const inner = outer.subgraph.nodes.find(n => n.type === 'HeadSeg_MaskSelectAtPixel');
                   app.canvas.ds.scale = 1; app.canvas.ds.offset = [180 - inner.pos[0], 190 - inner.pos[1]];
                   app.canvas.setDirty(true, true); return inner.id; }"""
    inner = page.evaluate(js_open, sg)
    sel = picker_selector(inner)
    thumbs = "(sel) => document.querySelectorAll(sel + ' .headseg-thumb').length === 2"
    page.wait_for_function(thumbs, arg=sel, timeout=15_000)
    page.evaluate("() => app.canvas.setGraph(app.graph)")  # back to the root graph
    page.evaluate("async () => { await app.loadGraphData(app.graph.serialize(), false, false); }")  # as undo does
    settle(page, 500)
    inner = page.evaluate(js_open, sg)
    page.wait_for_function(thumbs, arg=picker_selector(inner), timeout=15_000)
    assert "2 masks here" in page.text_content(picker_selector(inner) + " .headseg-info")
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
    inner = page.evaluate(
        """(sg) => { const outer = app.graph.getNodeById(sg); app.canvas.openSubgraph(outer.subgraph, outer);
                     const inner = outer.subgraph.nodes.find(n => n.type === 'HeadSeg_MaskSelectAtPixel');
                     app.canvas.ds.scale = 1; app.canvas.ds.offset = [180 - inner.pos[0], 190 - inner.pos[1]];
                     app.canvas.setDirty(true, true); return inner.id; }""",
        sg,
    )
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


# -- a real run ---------------------------------------------------------------------------------
RUN_TIMEOUT_MS = 420_000
RUN_PICTURE = ("headseg_browser_run.png", 256, 192)  # non-square, a multiple of 8: a cheap CPU run
PREFERRED_WORKFLOWS = ("zero_shot", "zero-shot", "photo", "explore", "text")


def cheapest_example() -> str:
    names = example_names()
    for key in PREFERRED_WORKFLOWS:
        for name in names:
            if key in name.lower():
                return name
    return names[0]


JS_PREPARE_RUN = """
([ckpt, picture, W, H]) => {
  const ids = {};
  for (const node of app.graph.nodes) {
    const set = (name, value) => { const w = node.widgets?.find(w => w.name === name); if (w) w.value = value; };
    (ids[node.type] ??= []).push(node.id);
    if (node.type === 'CheckpointLoaderSimple') set('ckpt_name', ckpt);
    if (node.type === 'LoadImage') { set('image', picture); node.widgets.find(w => w.name === 'image')?.callback?.(picture); }
    if (node.type === 'KSampler' || node.type === 'KSamplerAdvanced') set('steps', 1);
    if (node.type === 'EmptyLatentImage') { set('width', W); set('height', H); set('batch_size', 1); }
    if (node.type === 'ImageScale') { set('width', W); set('height', H); }
    if (node.type === 'HeadSeg_MaskSelectAtPixel') { set('x', Math.floor(W / 3)); set('y', Math.floor(H / 2)); }
    set('control_after_generate', 'fixed');  // re-queueing must reuse the cached sampling
  }
  app.canvas.setDirty(true, true);
  return ids;
}
"""

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


JS_ANCESTORS = """
(id) => {
  const out = {};
  const visit = (node) => {
    for (const input of node.inputs ?? []) {
      if (input.link == null) continue;
      const link = app.graph.links.get?.(input.link) ?? app.graph.links[input.link];
      const origin = link && app.graph.getNodeById(link.origin_id);
      if (origin && !(String(origin.id) in out)) { out[String(origin.id)] = origin.type; visit(origin); }
    }
  };
  visit(app.graph.getNodeById(id));
  return out;
}
"""


JS_FIT_HEADSEG = """
() => {
  // Frame the mask nodes (PCA ... picker), not below the zoom where ComfyUI stops drawing
  // node contents.
  const nodes = app.graph.nodes.filter(n => n.type.startsWith('HeadSeg_') && n.type !== 'HeadSeg_RecordSelfAttention');
  const T = LiteGraph.NODE_TITLE_HEIGHT;
  const x0 = Math.min(...nodes.map(n => n.pos[0])), y0 = Math.min(...nodes.map(n => n.pos[1] - T));
  const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
  const r = app.canvas.canvas.getBoundingClientRect();
  const scale = Math.max(0.62, Math.min(1, (r.width - 120) / (x1 - x0), (r.height - 140) / (y1 - y0)));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [80 / scale - x0, 110 / scale - y0];
  app.canvas.setDirty(true, true);
}
"""


def test_queue_runs_and_previews_render(comfy_page, comfy_server, screenshots):
    from PIL import Image

    import numpy as np

    # A small non-square photo-like picture: coloured shapes on two backgrounds.
    name, W, H = RUN_PICTURE
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.zeros((H, W, 3), np.uint8)
    img[:] = (110, 165, 230)
    img[yy > H * 0.6] = (90, 140, 60)
    img[(xx - W * 0.35) ** 2 + (yy - H * 0.5) ** 2 < (H * 0.22) ** 2] = (215, 50, 40)
    img[(abs(xx - W * 0.72) < W * 0.1) & (abs(yy - H * 0.55) < H * 0.16)] = (240, 215, 80)
    # A few random pixels make this picture new to the server, so the first run really runs
    # (a cached run would not send the nodes' previews again).
    rng = np.random.default_rng()
    img[rng.integers(0, H, 8), rng.integers(0, W, 8)] = rng.integers(0, 256, (8, 3))
    Image.fromarray(img).save(comfy_server.input_dir / name)

    page = comfy_page.page
    workflow = cheapest_example()
    wf = json.loads((WORKFLOWS_DIR / f"{workflow}.json").read_text())
    for node in wf["nodes"]:  # the server's own checkpoint is swapped in below: no Missing Models dialog over the
        node.get("properties", {}).pop("models", None)  # canvas (test_example_workflows_are_templates_and_load checks it)
    page.evaluate("async ([wf, name]) => { await app.loadGraphData(wf, true, true, name); }", [wf, workflow])
    settle(page, 800)
    ids = page.evaluate(JS_PREPARE_RUN, [comfy_server.checkpoint_name, name, W, H])
    assert ids.get(PICKER), f"{workflow} has no {PICKER}"
    picker_id = ids[PICKER][0]

    events = page.evaluate(JS_QUEUE_AND_WAIT, RUN_TIMEOUT_MS)
    assert events["error"] is None, f"run failed: {json.dumps(events['error'])[:2000]}"
    assert str(picker_id) in events["executed"]

    view_picker(page, picker_id, 1.0)
    wait_picture_ready(page, picker_id, timeout=60_000)
    sel = picker_selector(picker_id)
    page.wait_for_function(
        "(sel) => { const t = [...document.querySelectorAll(sel + ' .headseg-thumb img')];"
        " return t.length > 0 && t.every(i => i.complete && i.naturalWidth > 0); }",
        arg=sel,
        timeout=30_000,
    )
    size = page.evaluate(
        "(id) => { const p = app.graph.getNodeById(id).headsegPicker; return p.size; }", picker_id
    )
    assert size == [W, H]

    # previews on the other nodes: PCA->RGB tiles, one colour map per k, result lines
    for node_type in ("HeadSeg_HeadPCA", "HeadSeg_MultiKMeans"):
        for nid in ids.get(node_type, []):
            page.wait_for_function(
                "(id) => { const n = app.graph.getNodeById(id); return n.imgs?.length > 0"
                " && n.imgs.every(i => i.complete && i.naturalWidth > 0); }",
                arg=nid,
                timeout=30_000,
            )
    for nid in ids.get("HeadSeg_MultiKMeans", []):
        counts = page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'cluster_counts').value", nid)
        n_k = len({int(c) for c in str(counts).split(",") if c.strip()})
        assert page.evaluate("(id) => app.graph.getNodeById(id).imgs.length", nid) == n_k
        note = page.evaluate("(id) => app.graph.getNodeById(id).headsegNote?.root.textContent ?? ''", nid)
        assert "k=" in note
    for nid in ids.get("HeadSeg_HeadPCA", []):
        note = page.evaluate("(id) => app.graph.getNodeById(id).headsegNote?.root.textContent ?? ''", nid)
        assert "heads" in note

    page.evaluate(JS_FIT_HEADSEG)
    settle(page, 800)
    page.screenshot(path=str(screenshots / "workflow-after-run.png"))

    # Pick another pixel and the second-coarsest mask, re-queue: only the cheap end re-runs.
    view_picker(page, picker_id, 1.0)
    rect = frame_rect(page, picker_id)
    page.mouse.click(rect["left"] + 0.72 * rect["width"], rect["top"] + 0.55 * rect["height"])
    settle(page, 300)
    picked = page.evaluate(JS_WIDGETS, picker_id)
    assert picked["x"] == math.floor(0.72 * W) and picked["y"] == math.floor(0.55 * H)
    assert page.evaluate(f"() => document.querySelector(\"{sel} .headseg-strip\").classList.contains('headseg-stale')")

    events = page.evaluate(JS_QUEUE_AND_WAIT, RUN_TIMEOUT_MS)
    assert events["error"] is None, f"re-run failed: {json.dumps(events['error'])[:2000]}"
    ancestors = page.evaluate(JS_ANCESTORS, picker_id)
    assert {"KSampler", "HeadSeg_HeadPCA", "HeadSeg_MultiKMeans"} <= set(ancestors.values())
    reran = {nid: t for nid, t in ancestors.items() if nid not in events["cached"]}
    assert reran == {}, f"nodes upstream of the picker ran again after a pixel change: {reran}"
    page.wait_for_function(
        "(sel) => !document.querySelector(sel + ' .headseg-strip').classList.contains('headseg-stale')"
        " && [...document.querySelectorAll(sel + ' .headseg-thumb img')].every(i => i.complete && i.naturalWidth > 0)",
        arg=sel,
        timeout=30_000,
    )
    thumbs = page.query_selector_all(sel + " .headseg-thumb")
    assert thumbs
    target = min(1, len(thumbs) - 1)
    thumbs[target].hover()
    settle(page, 400)
    assert page.evaluate(f"() => document.querySelector(\"{sel} .headseg-frame\").classList.contains('headseg-hovering')")
    thumbs[target].click()
    settle(page, 300)
    assert page.evaluate(JS_WIDGETS, picker_id)["index"] == target
    thumbs[target].hover()
    settle(page, 300)
    page.screenshot(path=str(screenshots / "picker-after-run.png"))
    node_box = page.evaluate(
        """(id) => { const n = app.graph.getNodeById(id); const ds = app.canvas.ds;
                     const r = app.canvas.canvas.getBoundingClientRect();
                     return [r.left + (n.pos[0] + ds.offset[0]) * ds.scale - 10,
                             r.top + (n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT + ds.offset[1]) * ds.scale - 30,
                             n.size[0] * ds.scale + 20, (n.size[1] + LiteGraph.NODE_TITLE_HEIGHT) * ds.scale + 40]; }""",
        picker_id,
    )
    x, y, w, h = node_box
    page.screenshot(path=str(screenshots / "picker.png"), clip={"x": max(0, x), "y": max(0, y), "width": w, "height": h})
    assert comfy_page.pack_problems() == []
