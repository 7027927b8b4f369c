"""Draws the README's pipeline figure from a planted recording (known regions inside regions).

    $PY tests/support/readme_figure.py [out.png]

Row 1: the planted regions, the PCA->RGB picture of the first head, the k-means label maps for k = 2, 5, 10.
Row 2: every merged mask containing one pixel (a cross), finest first, as MaskSelectAtPixel returns them.
A planted recording stands in for a real one because no Stable Diffusion weights ship with the tests.
"""

from __future__ import annotations

import pathlib
import runpy
import sys

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = pathlib.Path(__file__).resolve().parents[2]
runpy.run_path(str(ROOT / "tests" / "support" / "checkout.py"))["import_checkout"]()
sys.path.insert(0, str(ROOT / "tests" / "core"))

from headseg.nodes.core import masks as core_masks  # noqa: E402
from headseg.nodes.core import preview  # noqa: E402
from headseg.nodes.core.pipeline import segment  # noqa: E402
from planted import nested_scene, planted_recording, sd21_layout  # noqa: E402

TILE = 192


def _tile(img: torch.Tensor, label: str) -> Image.Image:
    """[H, W, 3] float 0..1 -> TILE x (TILE + 18) PIL image with a caption."""
    arr = (img.clamp(0, 1).numpy() * 255).astype(np.uint8)
    pic = Image.fromarray(arr).resize((TILE, TILE), Image.NEAREST)
    out = Image.new("RGB", (TILE, TILE + 18), (255, 255, 255))
    out.paste(pic, (0, 18))
    ImageDraw.Draw(out).text((4, 3), label, fill=(0, 0, 0))
    return out


def main(path: str) -> None:
    scene = nested_scene(256, 256)
    rec = planted_recording(scene, layout=sd21_layout(), d=64, noise=1.0, seed=0)
    result = segment(rec, cluster_counts=(2, 5, 10), seed=0)
    H, W = rec.image_size
    leaves = torch.zeros(H, W, dtype=torch.int64)
    for j, leaf in enumerate(scene.leaves):
        leaves[scene.masks[leaf]] = j
    top = [_tile(preview.label_colours(leaves[None], len(scene.leaves))[0], "planted regions")]
    heads = preview.pca_rgb_grid(result.features, cell=64)[0]  # [rows*64, cols*64, 3]
    top.append(_tile(heads[:64, :64], "PCA->RGB, first head"))  # tile of layer input.1.0, head 0
    for k, res in result.sweep.results.items():
        top.append(_tile(preview.label_colours(res.labels, k)[0], f"k-means, k={k}"))

    x, y = 96, 96  # inside the cat's head
    chain = core_masks.masks_at_pixel(result.masks[0], x, y)
    base = preview.label_colours(leaves[None], len(scene.leaves)) * 0.35 + 0.65  # pale planted regions
    overlays = preview.overlay_masks(base, chain.masks.float())
    bottom = []
    for i in range(len(chain)):
        t = _tile(overlays[i], f"mask {i} at pixel (k={int(chain.k[i])})")
        d = ImageDraw.Draw(t)
        cx, cy = x * TILE // W, y * TILE // H + 18
        d.line((cx - 6, cy, cx + 6, cy), fill=(255, 0, 0), width=2)
        d.line((cx, cy - 6, cx, cy + 6), fill=(255, 0, 0), width=2)
        bottom.append(t)

    cols = max(len(top), len(bottom))
    fig = Image.new("RGB", (cols * (TILE + 6), 2 * (TILE + 24)), (255, 255, 255))
    for r, row in enumerate((top, bottom)):
        for c, t in enumerate(row):
            fig.paste(t, (c * (TILE + 6), r * (TILE + 24)))
    fig.save(path)
    print(path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "js" / "docs" / "img" / "pipeline.png"))
