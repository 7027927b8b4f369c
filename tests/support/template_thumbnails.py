"""Draws the templates dialog's thumbnails, example_workflows/<name>.jpg, from the example workflows as they
look after a run.

    $PY tests/support/template_thumbnails.py [out_dir]     (default: example_workflows/)

Starts a ComfyUI with the pack (tests/support/server.py, no checkpoint), opens it in headless Chromium as the
browser tests do (tests/browser/conftest.py: /usr/bin/chromium or HEADSEG_CHROMIUM), loads each example, gives
its HeadSeg nodes a run's payload as ComfyUI does after a run (the browser test of the examples' layout:
tests/browser/test_example_layout.py, which grows the nodes to show them), shows the workflow at its own view
(scale 0.6) and saves the canvas's top-left 1024 x 768 px, halved, as a 512 x 384 JPEG. The pictures of that
payload come from a planted recording (tests/support/readme_figure.py's scene) run through the core: the
PCA->RGB tiles, the k-means colour maps, the upsampling-error map and the planted regions. No Stable Diffusion
weights ship with the tests, so no picture is a real photo's.
"""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import sys

import numpy as np
import torch
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
runpy.run_path(str(ROOT / "tests" / "support" / "checkout.py"))["import_checkout"]()
sys.path.insert(0, str(ROOT / "tests" / "core"))

from headseg.nodes.core import preview  # noqa: E402
from headseg.nodes.core.pipeline import segment  # noqa: E402
from headseg.nodes.core.error_map import upsampling_error  # noqa: E402
from headseg.tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, FIRST_RUN_SETTINGS, VIEWPORT  # noqa: E402
from headseg.tests.browser.helpers import WORKFLOWS_DIR, example_names  # noqa: E402
from headseg.tests.browser.test_example_layout import JS_RUN_AND_OVERLAPS, RUN_PAYLOADS  # noqa: E402
from headseg.tests.support.server import ComfyServer  # noqa: E402
from planted import nested_scene, planted_recording, sd21_layout  # noqa: E402

CLIP = {"x": 54, "y": 98, "width": 1024, "height": 768}  # the canvas right of the side bar, below the menu
SIZE = (512, 384)
QUALITY = 85


def _png(img: torch.Tensor, path: pathlib.Path) -> str:
    """[H, W, 3] float 0..1 -> a PNG at path; returns its file name."""
    Image.fromarray((img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)
    return path.name


SUBFOLDER = "headseg_thumbnails"  # of the server's input folder: no file at its top for Load Image to list


def run_pictures(input_dir: pathlib.Path) -> dict:
    """The payload pictures of a run on the planted scene, in SUBFOLDER of the server's input folder -> node type
    -> file names."""
    input_dir = input_dir / SUBFOLDER
    input_dir.mkdir(exist_ok=True)
    scene = nested_scene(256, 192)
    rec = planted_recording(scene, layout=sd21_layout(), d=64, noise=1.0, seed=0)
    result = segment(rec, cluster_counts=(2, 5, 6, 10, 20), seed=0)
    leaves = torch.zeros(rec.image_size, dtype=torch.int64)
    for j, leaf in enumerate(scene.leaves):
        leaves[scene.masks[leaf]] = j
    names = {
        "HeadSeg_HeadPCA": [_png(preview.pca_rgb_grid(result.features, cell=64)[0], input_dir / "thumb_pca.png")],
        "HeadSeg_UpsamplingError": [_png(preview.error_map_image(upsampling_error(result.stack))[0],
                                         input_dir / "thumb_error.png")],
        "HeadSeg_MultiKMeans": [_png(preview.label_colours(res.labels, k)[0], input_dir / f"thumb_k{k}.png")
                                for k, res in result.sweep.results.items()],
        "HeadSeg_SaveLabelMaps": [_png(preview.label_colours(leaves[None], len(scene.leaves))[0],
                                       input_dir / "thumb_regions.png")],
    }  # fmt: skip
    return names


# After JS_RUN_AND_OVERLAPS: each node's pictures are the run's (that snippet gave every node copies of one
# reference), then the workflow's own view, drawn once the pictures have loaded.
JS_PICTURES_AND_VIEW = """
async ([pictures, subfolder, ds]) => {
  const frame = () => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)));
  for (const node of app.graph.nodes) {
    const names = pictures[node.type];
    if (!names) continue;
    const out = {...app.nodeOutputs[String(node.id)],
                 images: names.map(filename => ({filename, subfolder, type: 'input'}))};
    app.nodeOutputs[String(node.id)] = out;
    node.onExecuted?.(out);
  }
  app.canvas.ds.scale = ds.scale;
  app.canvas.ds.offset = [...ds.offset];
  for (let i = 0; i < 60; i++) {
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    await frame();
    const waiting = app.graph.nodes.filter(n => n.imgs?.length && !n.imgs.every(m => m.complete && m.naturalWidth));
    if (!waiting.length && i > 5) break;
    await new Promise(r => setTimeout(r, 100));
  }
}
"""


def draw(page, input_dir: pathlib.Path, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Draws every example's thumbnail into out_dir on ``page``, a ComfyUI tab whose server reads input_dir, with
    the viewport VIEWPORT -> the JPEG files."""
    pictures = run_pictures(input_dir)
    ref = {"filename": pictures["HeadSeg_HeadPCA"][0], "subfolder": SUBFOLDER, "type": "input"}
    made = []
    for name in example_names():
        wf = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
        for node in wf["nodes"]:  # no Missing Models dialog over the canvas
            node.get("properties", {}).pop("models", None)
        # the text is parsed in the page, as ComfyUI reads a template (Playwright would send 0.0 as -0)
        page.evaluate("async ([text, name]) => { await app.loadGraphData(JSON.parse(text), true, true, name); }",
                      [json.dumps(wf), name])
        page.keyboard.press("Escape")
        page.wait_for_timeout(800)
        overlaps = page.evaluate(JS_RUN_AND_OVERLAPS, [{k: list(v) for k, v in RUN_PAYLOADS.items()}, ref])
        if overlaps:
            raise RuntimeError(f"{name}: nodes cover each other after a run: {overlaps}")
        page.evaluate(JS_PICTURES_AND_VIEW, [pictures, SUBFOLDER, wf["extra"]["ds"]])
        page.wait_for_timeout(500)
        shot = out_dir / f"{name}.png"
        page.screenshot(path=str(shot), clip=CLIP)
        jpg = out_dir / f"{name}.jpg"
        Image.open(shot).convert("RGB").resize(SIZE, Image.LANCZOS).save(jpg, quality=QUALITY, optimize=True)
        shot.unlink()
        made.append(jpg)
    return made


def main(out_dir: pathlib.Path) -> None:
    from playwright.sync_api import sync_playwright

    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        raise SystemExit(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set HEADSEG_CHROMIUM)")
    with ComfyServer() as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport=VIEWPORT)
        context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server.url)
                      else route.abort())
        context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
        context.request.post(server.url + "/api/settings", data=json.dumps(FIRST_RUN_SETTINGS))
        page = context.new_page()
        page.goto(server.url, wait_until="domcontentloaded", timeout=90_000)
        page.wait_for_function("() => window.app && app.graph && app.canvas && window.LiteGraph "
                               "&& Object.keys(LiteGraph.registered_node_types).length > 50", timeout=90_000)
        page.wait_for_timeout(1500)
        for jpg in draw(page, server.input_dir, out_dir):
            print(jpg, jpg.stat().st_size, "bytes")
        browser.close()


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else WORKFLOWS_DIR)
