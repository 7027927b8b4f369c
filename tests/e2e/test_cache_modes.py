"""ComfyUI's other cache modes on a live server of their own: prompts queued again, and prompts that change only
a node after the sampler, read the recording of the image the sampler's cached LATENT holds.

Small prompts (the text-to-image example without its inpainting pass, 64x64 pixels, one step) keep the
full-size SD2.1 UNet quick on a CPU.
"""

from __future__ import annotations

import copy
import json

import pytest

from headseg.tests.e2e.helpers import WORKFLOWS_DIR, prepare, without_inpainting
from headseg.tests.support.server import ComfyServer
from headseg.tests.support.workflow_api import nodes_of

pytestmark = pytest.mark.server

SIDE = 64


@pytest.fixture(scope="module")
def lru_server():
    """A live ComfyUI with --cache-lru 100: it keeps the outputs of earlier prompts, not only the last one's."""
    from headseg.tests.support.checkpoint import ensure_checkpoint

    path = ensure_checkpoint()
    server = ComfyServer(checkpoints=[path.parent], extra_args=["--cache-lru", "100"])
    server.checkpoint_name = path.name
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


def test_lru_cache_latent_of_an_earlier_prompt_finds_its_recording(lru_server):
    """keep_runs = 1: sampling seeds 2 and 3 pushes seed 1's run out of the record node (the run read last is
    kept besides the last keep_runs), while --cache-lru still holds seed 1's LATENT. Changing only Head PCA's components for seed 1 then runs Head PCA alone on that cached
    LATENT: it must read seed 1's recording (as after sampling it anew), not stop with 'not the output of any
    of the last 1 sampling run(s)'."""
    ui = json.loads((WORKFLOWS_DIR / "headseg_text_to_image_inpaint.json").read_text())
    base = without_inpainting(prepare(lru_server.api_from_ui(ui), lru_server))
    (empty,) = nodes_of(base, "EmptyLatentImage")
    base[empty]["inputs"].update(width=SIDE, height=SIDE)
    (record,) = nodes_of(base, "HeadSeg_RecordSelfAttention")
    base[record]["inputs"]["keep_runs"] = 1
    (sampler,) = nodes_of(base, "KSampler")
    (pca,) = nodes_of(base, "HeadSeg_HeadPCA")
    (select,) = nodes_of(base, "HeadSeg_MaskSelectAtPixel")
    base[select]["inputs"].update(x=SIDE // 2, y=SIDE // 2)

    def prompt(seed, components=8, keep_runs=1):
        api = copy.deepcopy(base)
        api[sampler]["inputs"]["seed"] = seed
        api[pca]["inputs"]["components"] = components
        api[record]["inputs"]["keep_runs"] = keep_runs
        return api

    for seed in (1, 2, 3):
        result = lru_server.run(prompt(seed), timeout=900)
        assert result.ok, result.error
    result = lru_server.run(prompt(1, components=6), timeout=900)
    assert result.ok, result.error and result.error.get("exception_message")
    assert sampler not in result.progress  # seed 1's LATENT came from the cache: no sampling again
    masks = result.outputs(select)["headseg_mask_info"]

    # the same prompt sampled anew (keep_runs 2 makes a new record node, so every node after it runs)
    fresh = lru_server.run(prompt(1, components=6, keep_runs=2), timeout=900)
    assert fresh.ok, fresh.error
    assert sampler in fresh.progress  # sampled anew
    assert fresh.outputs(select)["headseg_mask_info"] == masks
