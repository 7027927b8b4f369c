"""The example workflows as a user sees them after a run: no node covers another once the HeadSeg nodes show
their run's previews and note lines (the nodes grow to fit them)."""

from __future__ import annotations

import json
import os

import pytest

from headseg.tests.browser.helpers import WORKFLOWS_DIR, example_names, load_workflow, settle

# What a run of the examples shows on each HeadSeg node (texts from a real run of the explore example at 256x192):
# pictures (n of them) and the note's text / Multi K-Means' colour map labels. The picker keeps its own size.
RUN_PAYLOADS = {
    "HeadSeg_HeadPCA": (1, {"text": ["195 heads recorded in 16 layers; 175 heads in 15 layers selected (down+up, levels all); 8 components each"]}),
    "HeadSeg_Upsample": (0, {"text": ["1400 channels on 3 grids (24x32, 12x16, 6x8) -> 256x192 px, bilinear"]}),
    "HeadSeg_UpsamplingError": (1, {}),
    "HeadSeg_MultiKMeans": (5, {"text": [], "headseg_labels": ["k=2", "k=5", "k=6", "k=10", "k=20"]}),
    "HeadSeg_MaskMerge": (0, {"text": ["merged masks per image: 40"]}),
    "HeadSeg_SaveLabelMaps": (1, {"text": ["headseg/labels_00001_*: 5 label maps (k = 2, 5, 6, 10, 20) + the picture"]}),
}

# Gives each HeadSeg node its run's payload as ComfyUI does after a run, then shows each node at 100 % (the
# canvas lays a node's widgets and preview out when it draws it, and grows the node to fit) -> the overlaps of
# node boxes (title bar included) as text.
JS_RUN_AND_OVERLAPS = """
async ([payloads, ref]) => {
  const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  const shown = [];
  for (const node of app.graph.nodes) {
    const p = payloads[node.type];
    if (!p) continue;
    const out = {...p[1], images: Array.from({length: p[0]}, () => ({...ref}))};
    if (!p[0]) delete out.images;
    app.nodeOutputs[String(node.id)] = out;
    node.onExecuted?.(out);
    shown.push(node);
  }
  const loaded = (n) => !n.imgs?.length || n.imgs.every(i => i.complete && i.naturalWidth > 0);
  for (let tries = 0; tries < 3; tries++) {
    for (const node of shown) {
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [100 - node.pos[0], 120 - node.pos[1]];
      app.canvas.setDirty(true, true);
      app.canvas.draw(true, true);
      await frame();
      for (let i = 0; i < 50 && !loaded(node); i++) await new Promise(r => setTimeout(r, 100));
      app.canvas.setDirty(true, true);
      app.canvas.draw(true, true);
      await frame();
    }
  }
  const T = LiteGraph.NODE_TITLE_HEIGHT;
  const box = (n) => ({id: n.id, name: n.title || n.type, x: n.pos[0], y: n.pos[1] - T, w: n.size[0], h: n.size[1] + T});
  const boxes = app.graph.nodes.map(box);
  const overlaps = [];
  for (const a of boxes) for (const b of boxes) {
    if (a.id >= b.id) continue;
    const ox = Math.min(a.x + a.w, b.x + b.w) - Math.max(a.x, b.x), oy = Math.min(a.y + a.h, b.y + b.h) - Math.max(a.y, b.y);
    if (ox > 0 && oy > 0) overlaps.push(`${a.name} (${a.id}) and ${b.name} (${b.id}): ${Math.round(ox)} x ${Math.round(oy)} px`);
  }
  return overlaps;
}
"""


@pytest.mark.parametrize("name", example_names())
def test_no_node_of_an_example_covers_another_after_a_run(comfy_page, pictures, name):
    """Head PCA, Multi K-Means, Mask Merge and Save Label Maps grow after a run to show their previews and note
    lines. The examples' sizes were those before a run: Head PCA's picture then ran under Mask Merge's title bar
    (zero-shot photo, text-to-image inpaint) and, in the explore example, the node column below it was covered
    node by node (Upsample's note hid Head PCA's picture, Mask Merge Multi K-Means' colour maps)."""
    page = comfy_page.page
    wf = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    for node in wf["nodes"]:  # no Missing Models dialog (test_example_workflows_are_templates_and_load checks it)
        node.get("properties", {}).pop("models", None)
    load_workflow(page, wf, name)
    settle(page, 800)
    ref = {"filename": pictures["landscape"][0], "subfolder": "", "type": "input"}
    overlaps = page.evaluate(JS_RUN_AND_OVERLAPS, [{k: list(v) for k, v in RUN_PAYLOADS.items()}, ref])
    assert overlaps == [], f"{name}: nodes cover each other after a run: {overlaps}"
    assert comfy_page.pack_problems() == []


def test_the_template_thumbnails_show_the_examples_as_they_are_now(open_page, comfy_server, tmp_path):
    """The templates dialog shows example_workflows/<name>.jpg: drawn again by tests/support/template_thumbnails.py
    (the examples after a run, at their own view), they must match the files kept. The files had been drawn before
    the examples' nodes got their after-run heights: Head PCA showed no picture and the rows below it sat higher
    (9 - 15 % of the pixels off). Remake them with that script when an example's layout changes. The files are
    drawn by the frontend ComfyUI pins: another one (HEADSEG_FRONTEND_ROOT) draws nodes, fonts and links
    otherwise (1.58.1: 1.3 % of the blocks off), so the comparison is left out there."""
    if os.environ.get("HEADSEG_FRONTEND_ROOT"):
        pytest.skip("the thumbnails are drawn with the frontend ComfyUI pins, not the one HEADSEG_FRONTEND_ROOT names")
    import numpy as np
    from PIL import Image

    from headseg.tests.support.template_thumbnails import SIZE, draw

    made = draw(open_page().page, comfy_server.input_dir, tmp_path)
    assert sorted(p.stem for p in made) == example_names()
    for new in made:
        kept = Image.open(WORKFLOWS_DIR / new.name)
        assert kept.size == SIZE and kept.format == "JPEG", (new.name, kept.size, kept.format)
        # compared in blocks of 8 x 8 pixels, so that another Chromium's text and anti-aliasing do not count (other
        # font hinting and subpixel positioning: no block's mean grey off by more than 4 of 255). A block counts as
        # changed when its mean is more than 8 off: a dark node moved over the dark canvas changes the means of the
        # blocks at its edges by 8 to 32, not more than 24 (Upsample moved 60 units down and Grow Mask 60 right in
        # the zero-shot example: 2.9 % of the blocks more than 8 off, 0.03 % more than 24, which passed)
        a, b = (np.asarray(Image.open(f).convert("L").resize((64, 48), Image.BOX), np.float64) for f in (kept.filename, new))
        off = float((np.abs(a - b) > 8).mean())
        assert off < 0.01, f"{new.name}: {off:.1%} of its 8x8 blocks differ from the example as drawn now: remake it"
