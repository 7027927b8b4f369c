"""A list of latents (RebatchLatents) sampled item by item with the recorded MODEL gives masks for
every item on the live server: ComfyUI samples the whole list before Head PCA reads any of it."""

from __future__ import annotations

import copy

import pytest

from headseg.tests.e2e.helpers import without_inpainting
from headseg.tests.support.workflow_api import nodes_of

pytestmark = pytest.mark.server

SIDE = 128  # pixels: a 16x16 latent keeps the full-size UNet quick on a CPU


def test_every_item_of_a_latent_list_gets_its_masks(workflow_runs, comfy_server):
    api, first = workflow_runs["headseg_text_to_image_inpaint"]
    assert first.ok, first.error
    # the inpainting pass (plain model, after the masks) is left out: it samples and decodes every item again
    prompt = without_inpainting(copy.deepcopy(api))
    (record,) = nodes_of(prompt, "HeadSeg_RecordSelfAttention")
    # one item more than the runs the record node keeps across prompts (keep_runs, run_history.HISTORY)
    items = prompt[record]["inputs"]["keep_runs"] + 1
    (empty,) = nodes_of(prompt, "EmptyLatentImage")
    prompt[empty]["inputs"].update(width=SIDE, height=SIDE, batch_size=items)
    (sampler,) = [n for n in nodes_of(prompt, "KSampler") if prompt[n]["inputs"]["model"] == [record, 0]]
    prompt["9100"] = {"class_type": "RebatchLatents", "inputs": {"latents": [empty, 0], "batch_size": 1}}
    prompt[sampler]["inputs"]["latent_image"] = ["9100", 0]
    for nid in nodes_of(prompt, "HeadSeg_MaskSelectAtPixel"):
        prompt[nid]["inputs"].update(x=SIDE // 2, y=SIDE // 2)

    result = comfy_server.run(prompt, timeout=900)
    assert result.ok, result.error
    (pca,) = nodes_of(prompt, "HeadSeg_HeadPCA")
    summaries = result.outputs(pca)["headseg_summary"]
    assert len(summaries) == items  # one Head PCA run per item of the list
    assert all(s["image_size"] == [SIDE, SIDE] and s["recorded_heads"] == 195 for s in summaries), summaries
    (select,) = nodes_of(prompt, "HeadSeg_MaskSelectAtPixel")
    assert len(result.outputs(select)["headseg_mask_info"]) >= items
