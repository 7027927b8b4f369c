"""Mistakes a user makes through the live server's API get a queue-time refusal or a message naming the
input, and the server stays healthy (64x64 latents, 1 step, cfg 1: a few seconds each)."""

from __future__ import annotations

import copy

import pytest

pytestmark = pytest.mark.server


def _prompt(server, seed=1):
    """Record -> KSampler (the recorded MODEL) -> Head PCA -> preview, at 64x64 pixels."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.checkpoint_name}},
        "2": {"class_type": "HeadSeg_RecordSelfAttention", "inputs": {
            "model": ["1", 0], "down": True, "middle": True, "up": True, "levels": "all", "steps": "last",
            "branch": "cond", "keep_runs": 3}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a cat"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "seed": seed, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["3", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "HeadSeg_HeadPCA", "inputs": {
            "recording": ["2", 1], "positions": "down+up", "levels": "all", "components": 4, "device": "auto",
            "latent": ["6", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 1]}},
    }  # fmt: skip


def _queue(server, prompt):
    """The answer to POST /prompt: {"prompt_id", "node_errors"} or, refused, the 400 body as text."""
    try:
        return server.post_json("/prompt", {"prompt": prompt, "client_id": "error-paths"})
    except RuntimeError as exc:
        return str(exc)


def test_a_save_prefix_outside_the_output_folder_is_refused_when_queued(comfy_server):
    prompt = _prompt(comfy_server, seed=11)
    prompt["9"] = {"class_type": "HeadSeg_SaveRecording",
                   "inputs": {"recording": ["2", 1], "latent": ["6", 0], "filename_prefix": "../x"}}
    answer = _queue(comfy_server, prompt)
    errors = answer["node_errors"]["9"]["errors"]  # the other outputs still run
    assert any("filename_prefix '../x': leads outside ComfyUI's output folder" in e["details"] for e in errors), errors
    result = comfy_server.run(prompt, timeout=300)
    assert result.ok, result.error  # the save node is left out; the server goes on


def test_a_save_prefix_windows_cannot_save_under_is_refused_when_queued_on_every_system(comfy_server):
    """A workflow shared from Linux with a folder named CON (a device on Windows) or a ':' (on Windows a drive or
    a stream of another file) is refused by name by the live server's prompt check, here as on Windows."""
    load = {"class_type": "HeadSeg_LoadRecording", "inputs": {"file": "", "path": "x.safetensors"}}
    to_clusters = {
        "2": {"class_type": "HeadSeg_HeadPCA", "inputs": {
            "recording": ["1", 0], "positions": "down+up", "levels": "all", "components": 4, "device": "auto"}},
        "3": {"class_type": "HeadSeg_Upsample", "inputs": {"features": ["2", 0], "mode": "bilinear", "reweight": False}},
        "4": {"class_type": "HeadSeg_MultiKMeans", "inputs": {"stack": ["3", 0], "cluster_counts": "2", "seed": 0, "device": "auto"}},
    }  # fmt: skip
    for prefix, why in (("CON/x", "names 'CON', which is a device on Windows"), ("runs/a:b", "holds ':' in 'a:b'")):
        for save in (
            {"class_type": "HeadSeg_SaveRecording", "inputs": {"recording": ["1", 0], "filename_prefix": prefix}},
            {"class_type": "HeadSeg_SaveLabelMaps", "inputs": {"clusters": ["4", 0], "filename_prefix": prefix}},
        ):
            answer = _queue(comfy_server, {"1": load, **to_clusters, "9": save})
            assert f"filename_prefix '{prefix}': {why}" in str(answer), (save["class_type"], answer)


def test_load_recording_without_its_file_input_is_a_missing_input(comfy_server):
    prompt = {
        "1": {"class_type": "HeadSeg_LoadRecording", "inputs": {"path": "x.safetensors"}},
        "2": {"class_type": "HeadSeg_HeadPCA", "inputs": {
            "recording": ["1", 0], "positions": "down+up", "levels": "all", "components": 4, "device": "auto"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 1]}},
    }  # fmt: skip
    answer = _queue(comfy_server, prompt)
    assert '"required_input_missing"' in answer and '"details": "file"' in answer, answer
    assert "exception_during_inner_validation" not in answer, answer


def test_head_pca_reading_another_record_nodes_recording_is_named(comfy_server):
    prompt = _prompt(comfy_server, seed=12)
    prompt["20"] = copy.deepcopy(prompt["2"])
    prompt["20"]["inputs"]["keep_runs"] = 2  # another record node: the sampler uses its MODEL
    prompt["6"]["inputs"]["model"] = ["20", 0]
    result = comfy_server.run(prompt, timeout=300)
    assert not result.ok and result.error["node_type"] == "HeadSeg_HeadPCA"
    message = result.error["exception_message"]  # (nothing recorded yet, when this record node is new)
    assert message.startswith(("latent: this LATENT (1x4x8x8) is not the output", "recording: nothing recorded yet")), message
    prompt["6"]["inputs"]["model"] = ["2", 0]
    result = comfy_server.run(prompt, timeout=300)
    assert result.ok, result.error  # the server is fine for the next prompt


def _to_mask_select(server, more_points, seed):
    """_prompt's Head PCA -> Upsample -> Multi K-Means -> Mask Merge -> Mask Select with ``more_points``."""
    prompt = _prompt(server, seed=seed)
    prompt.update({
        "10": {"class_type": "HeadSeg_Upsample", "inputs": {"features": ["7", 0], "mode": "bilinear", "reweight": False}},
        "11": {"class_type": "HeadSeg_MultiKMeans", "inputs": {"stack": ["10", 0], "cluster_counts": "2,3", "seed": 0}},
        "12": {"class_type": "HeadSeg_MaskMerge", "inputs": {"clusters": ["11", 0], "iou_threshold": 0.9, "min_area": 0.0}},
        "13": {"class_type": "HeadSeg_MaskSelectAtPixel", "inputs": {
            "masks": ["12", 0], "x": 10, "y": 20, "index": 0, "more_points": more_points}},
    })  # fmt: skip
    return prompt


def test_mask_select_more_points_refused_when_malformed_and_run_when_well_formed(comfy_server):
    answer = _queue(comfy_server, _to_mask_select(comfy_server, "12,40; oops", seed=21))
    errors = answer["node_errors"]["13"]["errors"]  # the preview still runs
    assert any("more_points: expected 'x,y' pixels" in e["details"] and "entry 2 is 'oops'" in e["details"] for e in errors), errors
    result = comfy_server.run(_to_mask_select(comfy_server, "40,50; -1000,3", seed=21), timeout=300)
    assert result.ok, result.error
    ui = result.outputs("13")
    assert ui["headseg_points_asked"] == ["40,50; -1000,3"]
    assert ui["headseg_points"] == [[40, 50, 1], [63, 3, 0]]  # the 64x64 image: a pixel past the edge is moved
