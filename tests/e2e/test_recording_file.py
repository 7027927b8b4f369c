"""A recording saved by the live server round-trips, and Load Recording -> masks needs no model."""

from __future__ import annotations

import pytest
import torch

from headseg.nodes.core.recording_file import FORMAT, load_recording, save_recording
from headseg.tests.support.workflow_api import nodes_of

from headseg.tests.e2e.helpers import SIDE, prepare

pytestmark = pytest.mark.server

SD21_LAYERS = {  # layer -> heads, grid level (token grid side: image side / 8 / 2**level; 64 at 512 px)
    **{f"input.{n}.0": (5, 0) for n in (1, 2)},
    **{f"input.{n}.0": (10, 1) for n in (4, 5)},
    **{f"input.{n}.0": (20, 2) for n in (7, 8)},
    "middle.0.0": (20, 3),
    **{f"output.{n}.0": (20, 2) for n in (3, 4, 5)},
    **{f"output.{n}.0": (10, 1) for n in (6, 7, 8)},
    **{f"output.{n}.0": (5, 0) for n in (9, 10, 11)},
}
SD21_HEADS = {layer: (heads, SIDE // 8 >> level) for layer, (heads, level) in SD21_LAYERS.items()}  # -> heads, side


@pytest.fixture(scope="module")
def saved(workflow_runs, comfy_server):
    """(explore api prompt, its run, path of the recording its Save Recording node wrote)."""
    name = next(n for n in workflow_runs if "explore" in n)
    api, result = workflow_runs[name]
    assert result.ok, result.error
    (nid,) = nodes_of(api, "HeadSeg_SaveRecording")
    info = result.outputs(nid)["headseg_recording"][0]
    return api, result, comfy_server.output_dir / info["subfolder"] / info["filename"]


def test_saved_recording_holds_every_sd21_head(saved):
    _, _, path = saved
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta["format"] == FORMAT
        assert (meta["image_height"], meta["image_width"]) == (str(SIDE), str(SIDE))
        assert meta["branch"] == "cond"
        keys = set(f.keys())
        assert keys == set(SD21_HEADS)
        for key in keys:
            t = f.get_tensor(key)
            heads, side = SD21_HEADS[key]
            assert t.dtype == torch.float16
            assert tuple(t.shape) == (1, heads, side, side, 64), key
    rec = load_recording(path)
    assert rec.num_heads == 195 and len(rec.layers) == 16
    assert rec.select().num_heads == 175


def test_recording_file_round_trips(saved, tmp_path):
    _, _, path = saved
    rec = load_recording(path)
    again_path = tmp_path / "again.safetensors"
    save_recording(rec, again_path)
    again = load_recording(again_path)
    meta = lambda r: (r.image_size, r.model, r.steps, r.branch)  # noqa: E731
    assert meta(again) == meta(rec)
    assert list(again.layers) == list(rec.layers)
    for key in rec.layers:
        assert torch.equal(again.layers[key], rec.layers[key]), key


def _load_recording_prompt(api: dict, path) -> dict:
    """The explore workflow's HeadSeg part, fed by Load Recording instead of the sampler."""
    keep = {"HeadSeg_HeadPCA", "HeadSeg_Upsample", "HeadSeg_MultiKMeans", "HeadSeg_MaskMerge"}
    keep.add("HeadSeg_MaskSelectAtPixel")
    prompt = {
        nid: {"class_type": n["class_type"], "inputs": dict(n["inputs"])}
        for nid, n in api.items()
        if n["class_type"] in keep
    }
    prompt["9000"] = {"class_type": "HeadSeg_LoadRecording", "inputs": {"file": "", "path": str(path)}}
    for node in prompt.values():
        if node["class_type"] == "HeadSeg_HeadPCA":
            node["inputs"]["recording"] = ["9000", 0]
            node["inputs"].pop("latent", None)
        if node["class_type"] == "HeadSeg_MaskSelectAtPixel":
            node["inputs"].pop("image", None)
        if node["class_type"] == "HeadSeg_MultiKMeans":
            assert node["inputs"].pop("device") == "auto"  # as in prompts saved before this input existed
    return prompt


def test_load_recording_to_masks_without_a_model(saved, comfy_server):
    api, live, path = saved
    prompt = _load_recording_prompt(api, path)
    assert not any(n["class_type"].startswith(("Checkpoint", "KSampler", "VAE")) for n in prompt.values())
    result = comfy_server.run(prepare(prompt, comfy_server), timeout=300)
    assert result.ok, result.error
    (pca,) = nodes_of(prompt, "HeadSeg_HeadPCA")
    assert result.outputs(pca)["headseg_summary"][0]["recorded_heads"] == 195
    for nid in nodes_of(prompt, "HeadSeg_MaskSelectAtPixel"):
        out = result.outputs(nid)
        assert out["headseg_size"] == [SIDE, SIDE]
        # the same recording, the same settings: the same masks as in the live run
        assert out["headseg_mask_info"] == live.outputs(nid)["headseg_mask_info"]


def test_a_pixel_past_the_edge_is_moved_onto_the_grid(saved, comfy_server):
    """x = SIDE + 88 on a SIDE-wide image (600 at 512: e.g. a pixel picked on a larger image): the run goes on
    at the nearest pixel of the grid, and the picker is told both pixels."""
    api, _, path = saved
    prompt = _load_recording_prompt(api, path)
    (sel,) = nodes_of(prompt, "HeadSeg_MaskSelectAtPixel")[:1]
    prompt[sel]["inputs"]["x"], prompt[sel]["inputs"]["y"] = SIDE + 88, SIDE // 2  # the image is SIDE wide
    result = comfy_server.run(prepare(prompt, comfy_server), timeout=300)
    assert result.ok, result.error
    out = result.outputs(sel)
    assert out["headseg_pixel"] == [SIDE - 1, SIDE // 2] and out["headseg_pixel_asked"] == [SIDE + 88, SIDE // 2]
    assert out["headseg_mask_info"]  # masks at the pixel used


def test_bad_input_gives_an_error_naming_it(saved, comfy_server):
    api, _, path = saved
    prompt = _load_recording_prompt(api, path)
    (km,) = nodes_of(prompt, "HeadSeg_MultiKMeans")
    prompt[km]["inputs"]["device"] = "gpu"  # this server runs ComfyUI with --cpu
    result = comfy_server.run(prepare(prompt, comfy_server), timeout=300)
    assert not result.ok
    assert result.error["node_type"] == "HeadSeg_MultiKMeans"
    assert result.error["exception_message"].startswith("device: 'gpu' runs HeadSeg on CUDA or ROCm GPUs only"), result.error

    prompt = _load_recording_prompt(api, path.with_name("no-such-recording.safetensors"))
    result = comfy_server.run(prepare(prompt, comfy_server), timeout=300)
    assert not result.ok
    assert result.error["node_type"] == "HeadSeg_LoadRecording"
    assert "path" in result.error["exception_message"]


def test_api_prompt_reading_upsamples_former_error_map_output_runs(saved, comfy_server):
    """A 0.1.0 API prompt read the error map as ["<upsample id>", 1]; the server rewires it."""
    api, _, path = saved
    prompt = _load_recording_prompt(api, path)
    (up,) = nodes_of(prompt, "HeadSeg_Upsample")
    prompt["9001"] = {"class_type": "PreviewImage", "inputs": {"images": [up, 1]}}
    mark = comfy_server.log_mark()
    result = comfy_server.run(prepare(prompt, comfy_server), timeout=300)
    assert result.ok, result.error
    added = f"{up}-error-map"
    assert result.outputs(added)["images"] and result.outputs("9001")["images"]
    picture = comfy_server.view(result.outputs("9001")["images"][0])
    assert picture.startswith(b"\x89PNG")
    log = comfy_server.log_text()[mark:]
    assert f"node(s) 9001 read output 1 (error_map) of Upsample node {up}" in log, log[-3000:]
