"""Outputs that no node of the prompt reads are not kept in ComfyUI's cache (nodes/output_links.py): the
prompt hook writes each node's linked outputs into its inputs, ComfyUI's cache key then changes when a link
does, and the node leaves out only what the prompt it runs in does not link. Through ComfyUI's own executor
and cache: an unread output is not kept; linked later, the node runs again and hands over the same output as a
node run outside any prompt; a prompt without the hook's key, or with a key its links contradict, makes all."""

from __future__ import annotations

import copy

import pytest
import torch

from headseg.nodes import output_links
from headseg.nodes.core.pca import HeadFeatures
from headseg.nodes.output_links import LINKED_OUTPUTS_KEY, outputs_to_keep
from headseg.tests.core.planted import nested_scene, planted_recording, small_layout

pytestmark = pytest.mark.comfy

H, W = 96, 128
PCA, UPSAMPLE, KMEANS, MERGE, SELECT = "3", "4", "5", "6", "7"
# (node id, output index, output name) of every output a node may leave out
OPTIONAL = [
    (PCA, 1, "pca_rgb"), (KMEANS, 1, "colour_maps"), (MERGE, 1, "all_masks"),
    (SELECT, 0, "mask"), (SELECT, 1, "masks_at_pixel"), (SELECT, 2, "overlay"),
]


def chain_prompt() -> dict:
    """Recording source -> Head PCA -> Upsample -> Multi K-Means -> Mask Merge -> Mask Select, each node
    linked by its first output only."""
    return {
        "2": {"class_type": "HeadSegTest_Recording", "inputs": {}},
        PCA: {"class_type": "HeadSeg_HeadPCA", "inputs": {
            "recording": ["2", 0], "positions": "down+up", "levels": "all", "components": 4, "device": "cpu"}},
        UPSAMPLE: {"class_type": "HeadSeg_Upsample", "inputs": {"features": [PCA, 0], "mode": "bilinear", "reweight": False}},
        KMEANS: {"class_type": "HeadSeg_MultiKMeans", "inputs": {
            "stack": [UPSAMPLE, 0], "cluster_counts": "2,3,4", "seed": 0, "device": "cpu"}},
        MERGE: {"class_type": "HeadSeg_MaskMerge", "inputs": {
            "clusters": [KMEANS, 0], "iou_threshold": 0.9, "min_area": 0.0, "batch_index": 0}},
        SELECT: {"class_type": "HeadSeg_MaskSelectAtPixel", "inputs": {"masks": [MERGE, 0], "x": 60, "y": 50, "index": 0}},
    }  # fmt: skip


def with_readers(prompt: dict) -> dict:
    """``prompt`` with one test reader linked to every output in OPTIONAL (node ids 'r<node>_<index>')."""
    prompt = copy.deepcopy(prompt)
    for node, index, _ in OPTIONAL:
        prompt[f"r{node}_{index}"] = {"class_type": "HeadSegTest_Reader", "inputs": {"value": [node, index]}}
    return prompt


def queued(prompt: dict) -> dict:
    """``prompt`` as the server hands it on: through the pack's on-prompt hook."""
    return output_links.on_prompt({"prompt": copy.deepcopy(prompt)})["prompt"]


def test_the_hook_names_each_nodes_linked_outputs_and_the_node_trusts_only_a_key_its_links_agree_with():
    prompt = queued(chain_prompt())
    assert prompt[PCA]["inputs"][LINKED_OUTPUTS_KEY] == "features"
    assert prompt[SELECT]["inputs"][LINKED_OUTPUTS_KEY] == ""
    assert LINKED_OUTPUTS_KEY not in prompt[UPSAMPLE]["inputs"]  # a node with one output leaves none out
    assert outputs_to_keep(prompt, PCA, "HeadSeg_HeadPCA") == {"features"}
    assert outputs_to_keep(prompt, SELECT, "HeadSeg_MaskSelectAtPixel") == set()

    read = queued(with_readers(chain_prompt()))
    assert read[PCA]["inputs"][LINKED_OUTPUTS_KEY] == "features,pca_rgb"
    assert read[SELECT]["inputs"][LINKED_OUTPUTS_KEY] == "mask,masks_at_pixel,overlay"
    assert outputs_to_keep(read, MERGE, "HeadSeg_MaskMerge") == {"masks", "all_masks"}

    float_index = chain_prompt()  # a link whose index is a float still counts as reading that output
    float_index["8"] = {"class_type": "PreviewImage", "inputs": {"images": [PCA, 1.0]}}
    assert outputs_to_keep(queued(float_index), PCA, "HeadSeg_HeadPCA") == {"features", "pca_rgb"}

    stale = with_readers(prompt)  # links added after the hook ran: the key no longer agrees
    assert outputs_to_keep(stale, PCA, "HeadSeg_HeadPCA") is None
    assert outputs_to_keep(chain_prompt(), PCA, "HeadSeg_HeadPCA") is None  # no key (not through the hook)
    assert outputs_to_keep(prompt, "99", "HeadSeg_HeadPCA") is None  # a node the prompt does not hold
    assert outputs_to_keep(prompt, PCA, "HeadSeg_MaskMerge") is None  # another class under that id
    assert outputs_to_keep(None, PCA, "HeadSeg_HeadPCA") is None
    assert outputs_to_keep(prompt, None, "HeadSeg_HeadPCA") is None
    odd = {"1": "junk", "2": {"class_type": "HeadSeg_HeadPCA"}}  # no inputs
    for request in ({"prompt": "junk"}, {"prompt": odd}, None, "junk"):
        assert output_links.on_prompt(request) is request  # left for ComfyUI's validation to answer


def test_the_hook_leaves_a_node_whose_class_type_is_not_text_to_comfyuis_validation_and_annotates_the_rest():
    """A prompt in which some node's class_type is a list or an object (a hand-made or damaged API prompt):
    the hook raised TypeError (unhashable type) on it, so ComfyUI logged a traceback from this pack's hook for
    a prompt it does not check, and the HeadSeg nodes after that one went unannotated."""
    prompt = chain_prompt()
    odd = {"0": {"class_type": ["HeadSeg_HeadPCA"], "inputs": {}}, "1": {"class_type": {"a": 1}, "inputs": {}}}
    request = {"prompt": {**odd, **prompt}}
    assert output_links.on_prompt(request) is request
    assert request["prompt"][PCA]["inputs"][LINKED_OUTPUTS_KEY] == "features"
    assert request["prompt"][SELECT]["inputs"][LINKED_OUTPUTS_KEY] == ""
    assert all(LINKED_OUTPUTS_KEY not in node["inputs"] for node in odd.values())


@pytest.fixture()
def executor(monkeypatch, nodes):
    """ComfyUI's own executor and cache, with HeadSeg's chain and two test nodes: the planted recording as a
    source (``executor.recording``: a test may set another before its first prompt), and a reader that takes
    any value (and remembers it by node id)."""
    import nodes as comfy_nodes

    from headseg.tests.support.comfy_in_process import quiet_executor

    recording = planted_recording([nested_scene(H, W)], layout=small_layout(heads=3), d=16, noise=0.2, seed=1)
    seen: dict = {}

    class RecordingSource:
        RETURN_TYPES = ("HEADSEG_RECORDING",)
        FUNCTION = "run"
        CATEGORY = "test"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {}}

        def run(self):
            return (run.recording,)  # the executor's, as the test left it

    class Reader:
        RETURN_TYPES = ()
        FUNCTION = "run"
        CATEGORY = "test"
        OUTPUT_NODE = True

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": ("*", {})}, "hidden": {"node": "UNIQUE_ID"}}

        def run(self, value, node):
            seen[node] = value
            return {}

    classes = {"HeadSegTest_Recording": RecordingSource, "HeadSegTest_Reader": Reader}
    for cls in (nodes.HeadPCA, nodes.Upsample, nodes.MultiKMeans, nodes.MaskMerge, nodes.MaskSelectAtPixel):
        classes[cls.GET_SCHEMA().node_id] = cls
    for name, cls in classes.items():
        monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, name, cls)
    run = quiet_executor()
    run.seen, run.recording = seen, recording
    return run


def execute(executor, prompt: dict, outputs: list[str], prompt_id: str) -> dict:
    """Runs ``prompt`` (for ``outputs``) through ComfyUI's executor -> {node id: the outputs its cache keeps}."""
    from headseg.tests.support.comfy_in_process import run_on_own_thread

    run_on_own_thread(lambda: executor.execute_async(copy.deepcopy(prompt), prompt_id, {}, outputs))
    assert executor.success, executor.status_messages
    return {nid: executor.caches.outputs.get(nid).outputs for nid in prompt if executor.caches.outputs.get(nid)}


def reference_outputs(nodes, recording) -> dict:
    """Every output of the chain, its nodes run outside any prompt: {(node id, index): value}."""
    pca = nodes.HeadPCA.execute(recording, "down+up", "all", 4, device="cpu").args
    stack = nodes.Upsample.execute(pca[0], "bilinear", False).args
    sweep = nodes.MultiKMeans.execute(stack[0], "2,3,4", 0, "cpu").args
    merged = nodes.MaskMerge.execute(sweep[0], 0.9, 0.0, 0).args
    select = nodes.MaskSelectAtPixel.execute(merged[0], 60, 50, 0).args
    return {(nid, i): v for nid, args in ((PCA, pca), (KMEANS, sweep), (MERGE, merged), (SELECT, select))
            for i, v in enumerate(args)}  # fmt: skip


def test_an_unread_output_is_not_kept_and_once_linked_the_node_runs_again_and_hands_it_over(executor, nodes):
    kept = execute(executor, queued(chain_prompt()), [SELECT], "p1")
    for node, index, name in OPTIONAL:
        assert kept[node][index] == [None], name
    features = kept[PCA][0][0]
    assert isinstance(features, HeadFeatures)
    assert kept[SELECT][3] == [reference_outputs(nodes, executor.recording)[(SELECT, 3)]]  # count: always

    readers = [f"r{node}_{index}" for node, index, _ in OPTIONAL]
    kept = execute(executor, queued(with_readers(chain_prompt())), readers, "p2")
    assert kept[PCA][0][0] is not features  # Head PCA ran again: its cache key changed with its links
    reference = reference_outputs(nodes, executor.recording)
    for node, index, name in OPTIONAL:
        value = executor.seen[f"r{node}_{index}"]
        assert isinstance(value, torch.Tensor), name
        assert torch.equal(value, reference[(node, index)]), name

    # the links gone again: the key changes back and the node runs again, keeping no copy
    kept = execute(executor, queued(chain_prompt()), [SELECT], "p3")
    for node, index, name in OPTIONAL:
        assert kept[node][index] == [None], name


@pytest.mark.parametrize("key", ["none", "stale"])
def test_a_prompt_without_the_key_or_with_one_its_links_contradict_makes_every_output(executor, nodes, key):
    """API prompts queued past the server's hook (no key), or changed after it ran: every output is made."""
    prompt = with_readers(chain_prompt() if key == "none" else queued(chain_prompt()))
    readers = [f"r{node}_{index}" for node, index, _ in OPTIONAL]
    kept = execute(executor, prompt, readers, "p1")
    reference = reference_outputs(nodes, executor.recording)
    for node, index, name in OPTIONAL:
        assert torch.equal(kept[node][index][0], reference[(node, index)]), name
        assert torch.equal(executor.seen[f"r{node}_{index}"], reference[(node, index)]), name


def memory_checks(monkeypatch, module, name: str) -> list:
    """The memory check ``module.name`` (memory_checks.check_memory under the name the node module calls) still
    run, each call noted: -> the list of (need, what) it fills, one per check."""
    checks = []
    check = getattr(module, name)

    def noted(need, name, what, *rest):
        checks.append((need, what))
        return check(need, name, what, *rest)

    monkeypatch.setattr(module, name, noted)
    return checks


def test_multi_kmeans_memory_check_counts_colour_maps_only_when_some_node_reads_them(executor, monkeypatch):
    """Multi K-Means checks the memory of its outputs before it clusters (the only check when it clusters on a
    GPU). With colour_maps unread it draws none, so the check must not count them: it counted 13 bytes per
    pixel per k and image either way (12 of them the colour maps), and so refused sweeps whose label maps fit,
    naming colour maps it would not make."""
    from headseg.nodes import kmeans_node

    checks = memory_checks(monkeypatch, kmeans_node, "_check_memory")  # the outputs' first
    execute(executor, queued(chain_prompt()), [SELECT], "p1")
    unread_need, unread_what = checks[0]

    checks.clear()
    reader = "r" + KMEANS
    prompt = chain_prompt()
    prompt[reader] = {"class_type": "HeadSegTest_Reader", "inputs": {"value": [KMEANS, 1]}}
    execute(executor, queued(prompt), [SELECT, reader], "p2")
    read_need, read_what = checks[0]
    colour_maps = executor.seen[reader]
    assert isinstance(colour_maps, torch.Tensor)
    assert read_need - unread_need >= colour_maps.numel() * colour_maps.element_size()
    assert "colour maps" in read_what and "colour maps" not in unread_what


def test_mask_select_memory_check_counts_the_mask_output_only_when_some_node_reads_it(executor, monkeypatch):
    """Mask Select checks the memory of its outputs before it makes them. With its mask unread it makes no
    MASK, so the check must not count one: it counted the chosen mask of every image (4 bytes per pixel and
    image) either way, and named it in its refusal."""
    from headseg.nodes import mask_select_node

    checks = memory_checks(monkeypatch, mask_select_node, "check_memory")
    execute(executor, queued(chain_prompt()), [SELECT], "p1")
    (unread_need, unread_what), = checks

    checks.clear()
    reader = "r" + SELECT
    prompt = chain_prompt()
    prompt[reader] = {"class_type": "HeadSegTest_Reader", "inputs": {"value": [SELECT, 0]}}
    execute(executor, queued(prompt), [reader], "p2")
    (read_need, read_what), = checks
    mask = executor.seen[reader]
    assert isinstance(mask, torch.Tensor)
    assert read_need - unread_need >= mask.numel() * mask.element_size()
    assert "chosen mask" in read_what and "chosen mask" not in unread_what


def test_mask_selects_log_names_the_mask_output_only_when_some_node_reads_it(executor, caplog):
    """Where no mask at the pixel fits more_points, Mask Select's log line said the mask output is all zeros
    there, also when no node reads mask and the node makes none."""
    prompt = chain_prompt()
    prompt[SELECT]["inputs"]["more_points"] = "-60,50"  # the pixel itself left out: no mask at it fits
    with caplog.at_level("WARNING"):
        execute(executor, queued(prompt), [SELECT], "p1")
    (unread,) = [r.getMessage() for r in caplog.records if "fits more_points" in r.getMessage()]
    assert "mask output" not in unread

    caplog.clear()
    reader = "r" + SELECT
    prompt[reader] = {"class_type": "HeadSegTest_Reader", "inputs": {"value": [SELECT, 0]}}
    with caplog.at_level("WARNING"):
        execute(executor, queued(prompt), [reader], "p2")
    (read,) = [r.getMessage() for r in caplog.records if "fits more_points" in r.getMessage()]
    assert "the mask output is all zeros" in read
    assert not executor.seen[reader].any()  # as the line says


def test_multi_kmeans_note_names_the_colour_maps_output_as_holding_every_image_only_when_it_is_made(
    executor, monkeypatch
):
    """Multi K-Means shows the colour maps of the first images of a batch and notes that the colour_maps
    output holds all of them: with colour_maps unread it holds none, and the note said it did."""
    from headseg.nodes import kmeans_node

    monkeypatch.setattr(kmeans_node, "_PREVIEW_IMAGES", 0)  # the one image of the chain's batch not shown
    execute(executor, queued(chain_prompt()), [SELECT], "p1")
    (unread,) = executor.history_result["outputs"][KMEANS]["text"]
    assert "colour_maps" in unread and "holds" not in unread

    reader = "r" + KMEANS
    prompt = chain_prompt()
    prompt[reader] = {"class_type": "HeadSegTest_Reader", "inputs": {"value": [KMEANS, 1]}}
    execute(executor, queued(prompt), [SELECT, reader], "p2")
    (read,) = executor.history_result["outputs"][KMEANS]["text"]
    assert "the colour_maps output holds all 1" in read
    assert executor.seen[reader].shape[0] == 3  # as the note says: the one image for each of the 3 k


@pytest.mark.parametrize("layout, step", [("sd21", 1), ("sdxl", 2)])
def test_head_pca_with_pca_rgb_unread_draws_only_the_picture_it_shows(executor, monkeypatch, layout, step):
    """With pca_rgb unread, Head PCA drew the whole pca_rgb picture (SDXL's 60 layers of down+up: 3840 x 1280,
    59 MB), showed every 2nd pixel of it and dropped it. It draws only the picture it shows, the same pixels as
    that of the whole picture (which a prompt reading pca_rgb gets, and sees shown as before), and its memory
    check counts only those pixels. SD2.1's 960 x 1280 grid is shown whole, so drawn whole either way."""
    from headseg.nodes import head_pca_node
    from headseg.nodes.core import preview as core_preview
    from headseg.tests.core.planted import sd21_layout, sdxl_layout

    layers = sdxl_layout() if layout == "sdxl" else sd21_layout()
    executor.recording = planted_recording(nested_scene(32, 32), layers, d=8, noise=0.5, seed=0)
    checks = memory_checks(monkeypatch, head_pca_node, "_check_memory")
    drawn, shown = [], []
    draw, show = core_preview.pca_rgb_grid, head_pca_node.preview_refs
    monkeypatch.setattr(core_preview, "pca_rgb_grid", lambda *a, **kw: drawn.append(draw(*a, **kw)) or drawn[-1])
    monkeypatch.setattr(head_pca_node, "preview_refs", lambda images, *a: shown.append(images) or show(images, *a))
    prompt = {
        "2": {"class_type": "HeadSegTest_Recording", "inputs": {}},
        PCA: chain_prompt()[PCA],
        "r0": {"class_type": "HeadSegTest_Reader", "inputs": {"value": [PCA, 0]}},
    }
    kept = execute(executor, queued(prompt), ["r0"], "p1")
    assert kept[PCA][1] == [None]
    (unread_picture,), (unread_shown,), ((unread_need, unread_what),) = drawn, shown, checks

    drawn.clear(), shown.clear(), checks.clear()
    prompt["r1"] = {"class_type": "HeadSegTest_Reader", "inputs": {"value": [PCA, 1]}}
    execute(executor, queued(prompt), ["r0", "r1"], "p2")
    whole = executor.seen["r1"]  # [1, H, W, 3]: pca_rgb, every pixel
    (read_shown,), ((read_need, read_what),) = shown, checks
    _, H, W, _ = whole.shape
    assert (H, W) == ((3840, 1280) if layout == "sdxl" else (960, 1280))
    assert torch.equal(read_shown, whole[:, ::step, ::step])  # what the node shows, as before
    assert torch.equal(unread_shown, read_shown)  # pixel for pixel, whether pca_rgb is read or not
    assert unread_picture.shape == unread_shown.shape  # the one picture drawn: the one shown
    assert read_need - unread_need >= 12 * (H * W - unread_shown[0, ..., 0].numel())
    assert f"pca_rgb, their picture ({W}x{H} pixels)" in read_what
    h, w = unread_shown.shape[1:3]
    assert f"the picture of them the node shows ({w}x{h} pixels; no node reads pca_rgb)" in unread_what
