"""A real run of an example workflow queued from the page: previews, mask thumbnails and note lines
render, and a new pick re-runs only the nodes after the clusters.
"""

from __future__ import annotations

import json
import math

from headseg.tests.browser.helpers import (
    JS_QUEUE_AND_WAIT,
    JS_WIDGETS,
    PICKER,
    WORKFLOWS_DIR,
    example_names,
    frame_rect,
    load_workflow,
    picker_selector,
    settle,
    view_picker,
    wait_picture_ready,
)


RUN_TIMEOUT_MS = 420_000
# Non-square, each side a multiple of 64: the latent (24 x 16) halves evenly down to the UNet's middle block
# (3 x 2). Small: each pixel costs time in the full-size test checkpoint's UNet and VAE on a CPU.
RUN_PICTURE = ("headseg_browser_run.png", 192, 128)
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
    // one step, and cfg 1: no unconditional pass (the inpainting sampler, cfg 7 in the example, runs again
    // in the re-run below)
    if (node.type === 'KSampler' || node.type === 'KSamplerAdvanced') { set('steps', 1); set('cfg', 1); }
    if (node.type === 'EmptyLatentImage') { set('width', W); set('height', H); set('batch_size', 1); }
    if (node.type === 'ImageScale') { set('width', W); set('height', H); }
    if (node.type === 'HeadSeg_MaskSelectAtPixel') { set('x', Math.floor(W / 3)); set('y', Math.floor(H / 2)); }
    set('control_after_generate', 'fixed');  // re-queueing must reuse the cached sampling
  }
  app.canvas.setDirty(true, true);
  return ids;
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
    load_workflow(page, wf, workflow)
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
