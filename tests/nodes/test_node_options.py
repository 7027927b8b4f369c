"""Every widget of the stage nodes reaches its stage: the node's output against the core function
called with the same option (an option hard-wired to its default fails here), and the node-side
pictures and pixel mapping against values worked out by hand."""

import pytest
import torch

from headseg.nodes.core import kmeans as core_kmeans
from headseg.nodes.core import masks as core_masks
from headseg.nodes.core.preview import label_colours
from headseg.nodes.core.upsample import FeatureStack, make_feature_stack
from headseg.tests.core.planted import Scene, nested_scene, planted_recording, small_layout

H, W = 192, 256


@pytest.fixture(scope="module")
def recording():
    scene = nested_scene(H, W)
    flipped = Scene(scene.masks.flip(-1), scene.parent, scene.names)  # two different images
    return planted_recording([scene, flipped], layout=small_layout(heads=3), d=16, noise=0.2, seed=1)


@pytest.fixture(scope="module")
def feats(nodes, recording):
    return nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]


def test_head_pca_positions_and_levels_reach_the_selection(nodes, recording):
    f = nodes.HeadPCA.execute(recording, "up", "0", 4).args[0]
    assert list(f.layers) == list(recording.select(("up",), [0]).layers)
    assert len(f.layers) < len(recording.select().layers)
    again = nodes.HeadPCA.execute(recording, "up+down+up", "all", 4).args[0]  # as an API prompt may spell it
    assert list(again.layers) == list(recording.select(("down", "up")).layers)


@pytest.mark.parametrize("mode, reweight", [("nearest", False), ("bilinear", True)])
def test_upsample_mode_and_reweight_reach_the_stack(nodes, feats, mode, reweight):
    out = nodes.Upsample.execute(feats, mode, reweight)
    stack = out.args[0]
    assert out.ui["text"][0].endswith(mode + (", reweighted (eq. 5)" if reweight else ""))
    ref = make_feature_stack(feats, mode=mode, reweight=reweight)
    assert stack.mode == mode and stack.weights == ref.weights
    assert all(torch.equal(a, b) for a, b in zip(stack.grids, ref.grids))


def test_multi_kmeans_seed_reaches_the_sweep(nodes):
    stack = FeatureStack([torch.randn(1, 6, 12, 16, generator=torch.Generator().manual_seed(0))], [1.0], [[]], (48, 64), "bilinear")
    refs = {s: core_kmeans.multi_kmeans(stack, [7], seed=s).results[7].labels for s in (0, 5)}
    assert not torch.equal(refs[0], refs[5])  # the seed matters on this input
    assert torch.equal(nodes.MultiKMeans.execute(stack, "7", 5, "cpu").args[0].results[7].labels, refs[5])


def test_multi_kmeans_stops_when_the_run_is_cancelled(nodes, monkeypatch):
    """Cancel in ComfyUI sets its interrupt flag: the node's sweep checks it at every k-means++ step
    and Lloyd iteration and stops with ComfyUI's own exception (clearing the flag, as ComfyUI does)."""
    import comfy.model_management as mm

    stack = FeatureStack([torch.randn(1, 6, 12, 16, generator=torch.Generator().manual_seed(0))], [1.0], [[]], (48, 64), "bilinear")
    asked = []
    check = mm.throw_exception_if_processing_interrupted

    def cancel_on_the_fifth_check():
        asked.append(True)
        if len(asked) == 5:
            mm.interrupt_current_processing(True)
        check()

    monkeypatch.setattr(mm, "throw_exception_if_processing_interrupted", cancel_on_the_fifth_check)
    with pytest.raises(mm.InterruptProcessingException):
        nodes.MultiKMeans.execute(stack, "2,7", 0, "cpu")
    assert not mm.processing_interrupted() and len(asked) >= 5


def test_multi_kmeans_progress_names_its_node_from_the_worker_threads(nodes, monkeypatch):
    """The k run on worker threads, where ComfyUI's executing context is not set: the progress bar
    still names the node, and counts 3 stages per k up to its total."""
    import threading

    import comfy.utils
    from comfy_execution.utils import CurrentNodeContext

    stack = FeatureStack([torch.randn(1, 6, 12, 16, generator=torch.Generator().manual_seed(0))], [1.0], [[]], (48, 64), "bilinear")
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total, node_id, threading.current_thread() is threading.main_thread()))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with CurrentNodeContext("prompt-1", "17"):
            nodes.MultiKMeans.execute(stack, "2,3,7", 0, "cpu")
    finally:
        torch.set_num_threads(before)
    assert seen[-1][:2] == (9, 9) and [v for v, *_ in seen] == sorted(v for v, *_ in seen)
    assert {node for _, _, node, _ in seen} == {"17"}
    assert not all(main for *_, main in seen)  # some came from the workers


def test_multi_kmeans_colour_maps_are_k_major(nodes, feats):
    sweep, images = nodes.MultiKMeans.execute(make_feature_stack(feats), "2,3", 0, "cpu").args
    B = 2
    assert images.shape[0] == 2 * B
    for i, (k, r) in enumerate(sweep.results.items()):
        for b in range(B):
            assert torch.equal(images[i * B + b], label_colours(r.labels[b : b + 1], k)[0])


@pytest.mark.parametrize("iou_threshold, min_area", [(0.3, 0.0), (0.9, 0.2)])
def test_mask_merge_options_reach_the_merge(nodes, feats, iou_threshold, min_area):
    sweep = core_kmeans.multi_kmeans(make_feature_stack(feats), [2, 3, 4, 6])
    for b in range(2):
        ref = core_masks.merge_sweep(sweep, b, iou_threshold, min_area)
        assert len(ref) != len(core_masks.merge_sweep(sweep, b, 0.9, 0.0))  # the option matters here
        assert torch.equal(nodes.MaskMerge.execute(sweep, iou_threshold, min_area).args[0][b].masks, ref.masks)


def test_a_stretched_picture_maps_each_axis_by_its_own_ratio(nodes):
    masks = [core_masks.MaskSet(torch.ones(1, 8, 16, dtype=torch.bool), torch.tensor([1]), torch.tensor([0]))]
    out = nodes.MaskSelectAtPixel.execute(masks, 10, 20, 0, image=torch.rand(1, 32, 16, 3))  # 4x taller: a stretch
    assert out.ui["headseg_pixel"] == [10, 5]  # x * 16 // 16, y * 8 // 32


def test_an_image_with_inf_is_drawn_white_and_black():
    from headseg.nodes.node_utils import image_batch

    img = torch.zeros(1, 1, 2, 3)
    img[0, 0, 0] = float("inf")
    img[0, 0, 1] = float("-inf")
    out = image_batch(img)
    assert out[0, 0, 0].tolist() == [1.0, 1.0, 1.0] and out[0, 0, 1].tolist() == [0.0, 0.0, 0.0]


def test_load_recording_path_overrides_file(comfy_folders, recording):
    from headseg.nodes import recording_io_nodes as io_nodes
    from headseg.nodes.core.recording_file import save_recording

    a, b = comfy_folders["input"] / "a.safetensors", comfy_folders["input"] / "b.safetensors"
    save_recording(recording, a)
    save_recording(recording.select(("up",)), b)
    rec = io_nodes.LoadRecording.execute("a.safetensors", str(b)).args[0]
    assert list(rec.layers) == list(recording.select(("up",)).layers)


def test_a_live_recording_without_latent_says_to_connect_it(nodes, recording):
    class Live:  # what Record Self-Attention hands on
        def snapshot(self, latent=None):
            return recording

    with pytest.raises(ValueError, match="^latent: connect the sampler's LATENT"):
        nodes.HeadPCA.execute(Live(), "down+up", "all", 4)


@pytest.mark.parametrize("text", ["", "+", " , ", "down+sideways"])
def test_positions_without_a_position_are_named_before_the_run(nodes, text):
    from headseg.nodes.node_utils import parse_positions

    with pytest.raises(ValueError, match="^positions: expected UNet positions"):
        parse_positions(text)
    assert comfy_validation_errors(nodes, positions=text) == [parse_error(parse_positions, text)]


def parse_error(parse, text) -> str:
    try:
        parse(text)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"{text!r} parsed")


def comfy_validation_errors(nodes, **widgets) -> list[str]:
    """What ComfyUI's own prompt validation says about a Head PCA with these widget values."""
    inputs = {"recording": ["1", 0], "positions": "down+up", "levels": "all", "components": 8, **widgets}
    return validation_errors({"2": {"class_type": "HeadSeg_HeadPCA", "inputs": inputs}}, "2")


# A recording for the prompts below: Load Recording validates without reading its file.
_LOADED = {"1": {"class_type": "HeadSeg_LoadRecording", "inputs": {"file": "", "path": "x.safetensors"}}}


def validation_errors(prompt: dict, node_id: str) -> list[str]:
    """ComfyUI's own prompt validation (execution.validate_inputs) of ``node_id`` in ``prompt`` (plus a
    Load Recording as node "1"), with the pack's nodes registered, before anything runs: the details of
    the custom_validation_failed errors, deduplicated."""
    import importlib

    from headseg.tests.support.comfy_in_process import pack_node_classes, run_on_own_thread

    comfy_nodes, execution = importlib.import_module("nodes"), importlib.import_module("execution")
    added = {cls.GET_SCHEMA().node_id: cls for cls in pack_node_classes()}
    saved = {k: comfy_nodes.NODE_CLASS_MAPPINGS.get(k) for k in added}
    comfy_nodes.NODE_CLASS_MAPPINGS.update(added)
    try:
        _, errors, _ = run_on_own_thread(lambda: execution.validate_inputs("p", {**_LOADED, **prompt}, node_id, {}))
    finally:
        for k, v in saved.items():
            if v is None:
                comfy_nodes.NODE_CLASS_MAPPINGS.pop(k, None)
            else:
                comfy_nodes.NODE_CLASS_MAPPINGS[k] = v
    found = []
    for e in errors:
        if e["type"] == "custom_validation_failed":
            detail = e["details"].split(" - ", 1)[1]
            if detail not in found:
                found.append(detail)
    return found


_PCA = {"class_type": "HeadSeg_HeadPCA", "inputs": {"recording": ["1", 0], "positions": "down+up", "levels": "all",
                                                   "components": 8}}  # fmt: skip
_UP = {"class_type": "HeadSeg_Upsample", "inputs": {"features": ["2", 0], "mode": "bilinear", "reweight": False}}
_KM = {"class_type": "HeadSeg_MultiKMeans", "inputs": {"stack": ["3", 0], "cluster_counts": "2,5", "seed": 0,
                                                      "device": "auto"}}  # fmt: skip


@pytest.mark.parametrize(
    "node, name, bad, good",
    [("3", "mode", "bicubic", "nearest"), ("4", "device", "gpu2", "cpu"), ("4", "cluster_counts", "2,x", "3"),
     ("2", "device", "cuda", "cpu")],
)  # fmt: skip
def test_comfyui_refuses_bad_choices_of_the_stage_nodes_before_the_run(node, name, bad, good):
    """A combo's value is not checked by ComfyUI 0.3.75 for V3 nodes: the nodes' validate_inputs does it,
    so an API prompt with a bad choice is refused before sampling, naming the input."""
    import copy

    def prompt(value):
        p = {"2": copy.deepcopy(_PCA), "3": copy.deepcopy(_UP), "4": copy.deepcopy(_KM)}
        p[node]["inputs"][name] = value
        return p

    (message,) = validation_errors(prompt(bad), node)
    assert message.startswith(f"{name}:") or message.startswith(f"{name} must"), message
    assert validation_errors(prompt(good), node) == []


def test_comfyui_refuses_a_bad_branch_of_the_record_node_before_the_run():
    inputs = {"model": ["1", 0], "down": True, "middle": True, "up": True, "levels": "all", "steps": "last"}

    def prompt(branch):
        return {"5": {"class_type": "HeadSeg_RecordSelfAttention", "inputs": {**inputs, "branch": branch}}}

    assert validation_errors(prompt("both"), "5") == ["branch: expected one of ['cond', 'uncond'], got 'both'"]
    assert validation_errors(prompt("uncond"), "5") == []


@pytest.mark.parametrize(
    "widgets, fault",
    [({"positions": "down+sideways"}, "positions"), ({"levels": "0 1"}, "levels"), ({}, None),
     ({"positions": "down+middle+up", "levels": "0, 1"}, None)],
)  # fmt: skip
def test_comfyui_refuses_bad_positions_and_levels_before_the_run(nodes, widgets, fault):
    """ComfyUI 0.3.75 does not check a V3 combo's value: Head PCA's validate_inputs must, so a bad
    prompt is refused before sampling (the message names the input at fault)."""
    errors = comfy_validation_errors(nodes, **widgets)
    if fault is None:
        assert errors == []
    else:
        assert len(errors) == 1 and errors[0].startswith(f"{fault}:"), errors


def test_a_position_named_twice_counts_once(nodes, recording):
    from headseg.nodes.node_utils import parse_positions

    assert parse_positions("down, down+up") == ("down", "up")
    out = nodes.HeadPCA.execute(recording, "down+down+up", "all", 4)
    assert "(down+up, levels all)" in out.ui["text"][0]


@pytest.mark.parametrize("levels, shown", [("", "all"), ("  ALL ", "all"), ("*", "all"), ("2, 0,0,", "0,2")])
def test_head_pca_summary_names_the_levels_it_selected(nodes, recording, levels, shown):
    """An empty levels text means all levels (as 'all' and '*'): the summary says which levels were
    selected, not the text as typed."""
    out = nodes.HeadPCA.execute(recording, "down+up", levels, 4)
    assert f"(down+up, levels {shown})" in out.ui["text"][0]


@pytest.mark.parametrize("channels", [1, 4])
def test_mask_select_takes_grey_and_rgba_pictures(nodes, feats, channels):
    """ComfyUI IMAGEs are RGB, but grey and RGBA tensors occur (some loaders, alpha kept): grey is drawn
    as grey, RGBA without its alpha."""
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    masks = nodes.MaskMerge.execute(nodes.MultiKMeans.execute(stack, "2,3", 0).args[0], 0.9, 0.0).args[0]
    picture = torch.rand(2, H, W, channels, generator=torch.Generator().manual_seed(channels))
    rgb = picture.expand(-1, -1, -1, 3) if channels == 1 else picture[..., :3]
    got = nodes.MaskSelectAtPixel.execute(masks, 40, 30, 0, picture).args[2]  # overlays on image 0
    want = nodes.MaskSelectAtPixel.execute(masks, 40, 30, 0, rgb.contiguous()).args[2]
    assert got.shape == want.shape and got.shape[-1] == 3
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("text", ["x" * 5000, "1," * 3000 + "y"], ids=["5000-x", "3000-items"])
def test_a_long_refused_list_text_is_shown_by_its_start_and_length(text):
    """The refusals of cluster_counts, levels, positions and steps echoed the whole text back: a value of
    thousands of characters made a message as long."""
    from headseg.nodes.core.kmeans import parse_cluster_counts
    from headseg.nodes.core.recording import parse_levels
    from headseg.nodes.node_utils import parse_positions
    from headseg.nodes.step_selection import parse_steps

    for parse, name in ((parse_cluster_counts, "cluster_counts"), (parse_levels, "levels"),
                        (parse_positions, "positions"), (parse_steps, "steps")):
        with pytest.raises(ValueError, match=name) as info:
            parse(text)
        assert len(str(info.value)) < 400, (name, str(info.value)[:200])
