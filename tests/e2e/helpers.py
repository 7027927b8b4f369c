"""Helpers of the end-to-end tests: example workflows, test picture, API-prompt substitutions."""

from __future__ import annotations

import os
import pathlib

from headseg.tests.support.workflow_api import nodes_of

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / "example_workflows"
TEST_IMAGE = "headseg_e2e_photo.png"
STEPS = int(os.environ.get("HEADSEG_E2E_STEPS", "1"))
# The side in pixels of the test picture, of every image and latent the examples make at 512x512, and so of
# every MASK and label map the tests read back; HEADSEG_E2E_SIDE=512 runs them at their own size. A multiple
# of 64, so that each level of SD2.1's token grid (side / 8 / 2**level, levels 0 to 3) is whole.
SIDE = int(os.environ.get("HEADSEG_E2E_SIDE", "256"))
if SIDE < 64 or SIDE % 64:
    raise ValueError(f"HEADSEG_E2E_SIDE: expected a multiple of 64 from 64 up, got {SIDE}")
# the nodes whose width and height set the size of what the examples sample
SIZED = ("EmptyLatentImage", "ImageScale")
MASK_OUTPUTS = {"HeadSeg_MaskMerge": [1], "HeadSeg_MaskSelectAtPixel": [0, 1]}


def workflow_files() -> list[pathlib.Path]:
    return sorted(WORKFLOWS_DIR.glob("*.json"))


def make_test_picture(path: pathlib.Path, size=(SIDE, SIDE)) -> None:
    """A SIDE x SIDE "photo": sky, ground, a disc and a box, with a little seeded noise."""
    import numpy as np
    from PIL import Image

    W, H = size
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.zeros((H, W, 3), np.float32)
    img[:] = (0.45, 0.65, 0.9)
    img[yy > H * 0.6] = (0.35, 0.55, 0.25)
    disc = (xx - W * 0.35) ** 2 + (yy - H * 0.5) ** 2 < (W * 0.16) ** 2
    img[disc] = (0.85, 0.2, 0.15)
    box = (abs(xx - W * 0.72) < W * 0.1) & (abs(yy - H * 0.55) < H * 0.14)
    img[box] = (0.95, 0.85, 0.3)
    img += np.random.default_rng(0).normal(0, 0.02, img.shape).astype(np.float32)
    Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(path)


def without_inpainting(api: dict) -> dict:
    """The prompt without GrowMask and every node after it (the inpainting pass)."""
    drop = set(nodes_of(api, "GrowMask"))
    grew = True
    while grew:
        grew = False
        for nid, node in api.items():
            if nid not in drop and any(isinstance(v, list) and len(v) == 2 and v[0] in drop for v in node["inputs"].values()):
                drop.add(nid)
                grew = True
    return {nid: node for nid, node in api.items() if nid not in drop}


def prepare(api: dict, server, add_save_recording: bool = False) -> dict:
    """Test substitutions on an API prompt (see the module docstring); returns the same dict."""
    for nid in nodes_of(api, "CheckpointLoaderSimple"):
        api[nid]["inputs"]["ckpt_name"] = server.checkpoint_name
    for nid in nodes_of(api, "LoadImage"):
        api[nid]["inputs"]["image"] = TEST_IMAGE
    sized = [api[nid]["inputs"] for ctype in SIZED for nid in nodes_of(api, ctype)]
    if sized:
        # the picked pixel keeps its place in the picture: the examples' (256, 256) of 512 is the middle
        width, height = int(sized[0]["width"]), int(sized[0]["height"])
        for nid in nodes_of(api, "HeadSeg_MaskSelectAtPixel"):
            inputs = api[nid]["inputs"]
            inputs["x"], inputs["y"] = int(inputs["x"]) * SIDE // width, int(inputs["y"]) * SIDE // height
        for inputs in sized:
            inputs["width"] = inputs["height"] = SIDE
    for ctype in ("KSampler", "KSamplerAdvanced"):
        for nid in nodes_of(api, ctype):
            inputs = api[nid]["inputs"]
            inputs["steps"] = min(int(inputs["steps"]), STEPS)
    next_id = max(int(k) for k in api) + 1
    for ctype, slots in MASK_OUTPUTS.items():
        for nid in nodes_of(api, ctype):
            for slot in slots:
                img, save = str(next_id), str(next_id + 1)
                next_id += 2
                api[img] = {"class_type": "MaskToImage", "inputs": {"mask": [nid, slot]}}
                api[save] = {
                    "class_type": "SaveImage",
                    "inputs": {"images": [img, 0], "filename_prefix": f"probe/{ctype}_{nid}_{slot}"},
                    "_meta": {"probe": [ctype, nid, slot]},
                }
    if add_save_recording:
        for nid in nodes_of(api, "HeadSeg_RecordSelfAttention"):
            # after the sampler that uses this recording model: the HeadPCA's latent input
            pca = [p for p in nodes_of(api, "HeadSeg_HeadPCA") if api[p]["inputs"].get("recording") == [nid, 1]]
            latent = api[pca[0]]["inputs"].get("latent") if pca else None
            inputs = {"recording": [nid, 1], "filename_prefix": "e2e/recording"}
            if latent:
                inputs["latent"] = latent
            api[str(next_id)] = {"class_type": "HeadSeg_SaveRecording", "inputs": inputs}
            next_id += 1
    return api
