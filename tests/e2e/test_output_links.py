"""On a live server, every prompt goes through the pack's on-prompt hook (nodes/output_links.py): each HeadSeg
node learns which of its outputs the prompt links, and an output linked in a later prompt makes the node run
again and hand over the real output, not what the earlier prompt left out. The text-to-image example at
64x64 pixels keeps the full-size SD2.1 UNet quick on a CPU."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pytest
from PIL import Image

from headseg.nodes.output_links import LINKED_OUTPUTS_KEY
from headseg.tests.e2e.helpers import WORKFLOWS_DIR, prepare
from headseg.tests.support.workflow_api import nodes_of

pytestmark = pytest.mark.server

SIDE = 64


def picture(server, ref: dict) -> np.ndarray:
    """A PNG the server shows (a ui ``images`` ref) -> its pixels [H, W, 3] uint8."""
    return np.asarray(Image.open(io.BytesIO(server.view(ref))).convert("RGB"))


def test_pca_rgb_linked_in_a_later_prompt_is_made_by_head_pca_running_again(comfy_server, test_picture):
    ui = json.loads((WORKFLOWS_DIR / "headseg_text_to_image_inpaint.json").read_text())
    api = prepare(comfy_server.api_from_ui(ui), comfy_server)
    for nid in nodes_of(api, "EmptyLatentImage"):
        api[nid]["inputs"].update(width=SIDE, height=SIDE)
    (pca,) = nodes_of(api, "HeadSeg_HeadPCA")
    sampler = api[pca]["inputs"]["latent"][0]  # Head PCA reads the LATENT of the sampler it recorded
    assert api[sampler]["class_type"] == "KSampler"
    for nid in nodes_of(api, "HeadSeg_MaskSelectAtPixel"):
        api[nid]["inputs"].update(x=SIDE // 2, y=SIDE // 2)
    assert not any(v == [pca, 1] for node in api.values() for v in node["inputs"].values())  # pca_rgb unread

    first = comfy_server.run(api, timeout=900)
    assert first.ok, first.error
    queued = first.history["prompt"][2]  # the prompt as the server ran it: after the on-prompt hooks
    assert queued[pca]["inputs"][LINKED_OUTPUTS_KEY] == "features"

    linked = copy.deepcopy(api)
    preview = str(max(int(k) for k in linked) + 1)
    linked[preview] = {"class_type": "PreviewImage", "inputs": {"images": [pca, 1]}}
    second = comfy_server.run(linked, timeout=900)
    assert second.ok, second.error
    assert second.history["prompt"][2][pca]["inputs"][LINKED_OUTPUTS_KEY] == "features,pca_rgb"
    assert sampler not in second.progress  # not sampled again: only Head PCA and the nodes after it ran
    shown = second.outputs(pca)["images"]
    assert shown != first.outputs(pca)["images"]  # Head PCA ran again (a cached node shows its old file)
    # the picture Preview Image got is the one Head PCA drew (it shows grids this small whole)
    (received,) = second.outputs(preview)["images"]
    got, drawn = picture(comfy_server, received), picture(comfy_server, shown[0])
    assert got.shape == drawn.shape and got.shape[0] > SIDE
    assert np.abs(got.astype(int) - drawn.astype(int)).max() <= 1
