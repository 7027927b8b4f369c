"""Save Label Maps in-process: the index PNGs read back with PIL (an independent reader) hold the planted
regions and exactly Multi K-Means' labels; names, counters, pictures, metadata and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from headseg.nodes.core import masks as core_masks
from headseg.nodes.core.metrics import best_match_iou
from headseg.tests.core.planted import nested_scene, planted_recording, small_layout

pytestmark = pytest.mark.comfy

H, W = 128, 192  # non-square: catches a transposed file


@pytest.fixture(scope="module")
def scenes():
    flipped = nested_scene(H, W)
    flipped.masks = flipped.masks.flip(-1)  # a second, different image: the batch must not mix them up
    return [nested_scene(H, W), flipped]


@pytest.fixture(scope="module")
def sweep(nodes, scenes):
    rec = planted_recording(scenes, layout=small_layout(heads=3), d=16, noise=0.2, seed=1)
    feats = nodes.HeadPCA.execute(rec, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    return nodes.MultiKMeans.execute(stack, "2,4,9", 0).args[0]


@pytest.fixture(scope="module")
def save():
    from headseg.nodes.label_map_nodes import SaveLabelMaps

    return SaveLabelMaps


def read(path):
    with Image.open(path) as im:
        return im.mode, np.array(im), dict(im.text)


def test_the_files_hold_the_labels_and_the_planted_regions(save, sweep, scenes, comfy_folders):
    out = save.execute(sweep, "data/cats")
    folder = comfy_folders["output"] / "data"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"cats_{n:05}_k{k}.png" for n in (1, 2) for k in (2, 4, 9)
    )
    for b, scene in enumerate(scenes):
        for k in (2, 4, 9):
            mode, pixels, text = read(folder / f"cats_{b + 1:05}_k{k}.png")
            assert mode == "L" and pixels.dtype == np.uint8 and pixels.shape == (H, W)
            assert torch.equal(torch.from_numpy(pixels).long(), sweep.results[k].labels[b])
            about = json.loads(text["headseg"])
            assert about == {
                "format": "headseg-labels/1", "list_index": 0, "batch_index": b, "cluster_counts": [2, 4, 9], "size": [H, W], "k": k,
                "recording": {"model": "planted", "steps": "last", "branch": "cond"},  # recorded, not read from a file
            }
            assert "workflow" not in text and "prompt" not in text
        # k = 4: the four planted leaves, whatever numbers the clusters got
        _, pixels, _ = read(folder / f"cats_{b + 1:05}_k4.png")
        found = torch.from_numpy(pixels).long()[None] == torch.arange(4)[:, None, None]  # [4, H, W]
        assert best_match_iou(scene.leaf_masks, found) >= 0.95
        _, coarse, _ = read(folder / f"cats_{b + 1:05}_k2.png")
        found = torch.from_numpy(coarse).long()[None] == torch.arange(2)[:, None, None]
        assert best_match_iou(scene.cut_masks(1), found) >= 0.95
    # cluster 0 is the largest, as Multi K-Means orders them
    _, pixels, _ = read(folder / "cats_00001_k9.png")
    areas = np.bincount(pixels.ravel(), minlength=9)
    assert list(areas) == sorted(areas, reverse=True)
    listed = out.ui["headseg_label_maps"]
    assert [(r["filename"], r["subfolder"], r["type"], r["k"], r["list_index"], r["batch_index"]) for r in listed] == [
        (f"cats_{b + 1:05}_k{k}.png", "data", "output", k, 0, b) for b in (0, 1) for k in (2, 4, 9)
    ]
    assert out.ui["images"] == []
    assert out.ui["text"] == ["data/cats_00001_* ... data/cats_00002_*: 2 images, 3 label maps (k = 2, 4, 9) each"]


def test_each_run_takes_the_next_counters(save, sweep, comfy_folders):
    save.execute(sweep, "run")
    save.execute(sweep, "run")
    names = sorted(p.name for p in comfy_folders["output"].iterdir())
    assert [n for n in names if n.endswith("_k2.png")] == [f"run_{n:05}_k2.png" for n in (1, 2, 3, 4)]


def test_the_picture_is_saved_next_to_its_labels_with_the_workflow(save, sweep, comfy_folders):
    pictures = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(0))
    hidden = {"PROMPT": {"1": {"class_type": "HeadSeg_SaveLabelMaps"}}, "EXTRA_PNGINFO": {"workflow": {"nodes": []}}}
    out = save.PREPARE_CLASS_CLONE(hidden).execute(sweep, "pics", pictures)
    for b in range(2):
        mode, pixels, text = read(comfy_folders["output"] / f"pics_{b + 1:05}_image.png")
        assert mode == "RGB"
        assert np.array_equal(pixels, np.clip(255.0 * pictures[b].numpy(), 0, 255).astype(np.uint8))  # Save Image's rounding
        assert json.loads(text["workflow"]) == {"nodes": []}
        assert json.loads(text["prompt"]) == hidden["PROMPT"]
        assert json.loads(text["headseg"])["batch_index"] == b
        _, _, label_text = read(comfy_folders["output"] / f"pics_{b + 1:05}_k4.png")
        assert set(label_text) == {"headseg", "prompt"}  # the workflow only once per image, the prompt in every file
        assert json.loads(label_text["prompt"]) == hidden["PROMPT"]
    assert out.ui["images"] == [{"filename": f"pics_{n:05}_image.png", "subfolder": "", "type": "output"} for n in (1, 2)]
    assert out.ui["text"] == ["pics_00001_* ... pics_00002_*: 2 images, 3 label maps (k = 2, 4, 9) + the picture each"]


@pytest.mark.parametrize("channels, dtype", [(3, torch.float16), (4, torch.float32), (3, torch.float64)])
def test_the_picture_has_the_bytes_save_image_writes(save, sweep, comfy_folders, channels, dtype):
    """ComfyUI's own Save Image is the reference: the same tensor gives the same pixels (float16 rounds in
    float16, an alpha channel is kept as RGBA), and the picture's colours are not moved by NaN handling."""
    import nodes as comfy_nodes

    g = torch.Generator().manual_seed(3)
    pictures = (torch.rand(2, H, W, channels, generator=g) * 1.2 - 0.1).to(dtype)  # some out of 0 .. 1
    save.execute(sweep, "ours", pictures)
    comfy_nodes.SaveImage().save_images(pictures, "theirs")
    for b in range(2):  # Save Image gives each image of the batch the next counter too
        mode, ours, _ = read(comfy_folders["output"] / f"ours_{b + 1:05}_image.png")
        their_mode, theirs, _ = read(comfy_folders["output"] / f"theirs_{b + 1:05}_.png")
        assert mode == their_mode == ("RGBA" if channels == 4 else "RGB")
        assert np.array_equal(ours, theirs)


def test_a_batch_of_pictures_is_saved_without_a_copy_of_the_batch(save, sweep, comfy_folders, monkeypatch):
    """A batch of finite pictures is read where it lies: NaN handling copied the whole batch first (12 bytes
    per pixel of every image: 100 MB for eight SDXL images at 1024 x 1024). The files are the same."""
    from headseg.nodes import previews
    from headseg.tests.support.peak_memory import PeakBytes

    monkeypatch.setattr(previews, "_PNG_THREADS", 1)  # every file on this thread, where PeakBytes sees it
    pictures = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(4))
    with PeakBytes() as mem:
        save.execute(sweep, "batch/x", pictures)
    assert mem.peak < pictures.numel() * 4 // 4, (mem.peak, pictures.numel() * 4)
    for b in range(2):
        _, pixels, _ = read(comfy_folders["output"] / "batch" / f"x_{b + 1:05}_image.png")
        assert np.array_equal(pixels, np.clip(255.0 * pictures[b].numpy(), 0, 255).astype(np.uint8))
    spoilt = pictures.clone()
    spoilt[1, 0, 0] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save.execute(sweep, "spoilt/x", spoilt)  # drawn as Save Image would draw it after nan_to_num
    _, pixels, _ = read(comfy_folders["output"] / "spoilt" / "x_00002_image.png")
    assert pixels[0, 0].tolist() == [0, 255, 0] and np.array_equal(pixels[1:], np.clip(255.0 * pictures[1, 1:].numpy(), 0, 255).astype(np.uint8))


def test_a_photo_a_few_pixels_larger_is_cropped_as_vae_encode_crops_it(save, sweep, comfy_folders):
    photo = torch.rand(2, H + 5, W + 7, 3, generator=torch.Generator().manual_seed(1))  # VAE Encode keeps H x W
    save.execute(sweep, "photo", photo)
    _, pixels, _ = read(comfy_folders["output"] / "photo_00002_image.png")
    window = photo[1, 2 : 2 + H, 3 : 3 + W]  # (5 // 2, 7 // 2): the centred window
    assert np.array_equal(pixels, np.clip(255.0 * window.numpy(), 0, 255).astype(np.uint8))


@pytest.mark.parametrize(
    "image, words",
    [
        (torch.rand(2, H * 2, W * 2, 3), "192x128"),  # another size: would not line up with its labels
        (torch.rand(2, H + 8, W, 3), "192x128"),  # 8 more rows: another latent size
        (torch.rand(1, H, W, 3), "expected 2 picture(s)"),
        (torch.rand(2, H, W), "expected an IMAGE"),
        ((torch.rand(2, H, W, 3) * 255).to(torch.uint8), "expected an IMAGE of floats"),  # saved white
        (torch.ones(2, H, W, 3, dtype=torch.bool), "expected an IMAGE of floats"),
    ],
)
def test_a_picture_that_does_not_fit_is_refused_before_any_file_is_written(save, sweep, comfy_folders, image, words):
    with pytest.raises(ValueError, match=r"^image: .*" + words.replace("(", r"\(").replace(")", r"\)")):
        save.execute(sweep, "bad", image)
    assert list(comfy_folders["output"].iterdir()) == []


def test_bad_input_names_the_input(save, sweep, comfy_folders):
    with pytest.raises(TypeError, match="clusters"):
        save.execute({"2": torch.zeros(1, 4, 4)}, "x")
    for prefix in ("", "  ", "../outside", "a\x00b", "x" * 300, "a\ud800", "a/\udfff/b", "a\udc80", "a/\udcff/b"):
        with pytest.raises(ValueError, match=r"^filename_prefix"):
            save.execute(sweep, prefix)
    with pytest.raises(ValueError, match=r"^image: expected an IMAGE holding pixels, got a tensor on the meta device"):
        save.execute(sweep, "x", torch.rand(sweep.batch_size, *sweep.size, 3, device="meta"))  # failed inside torch
    for prefix in (None, 5):  # linked from a node whose output is no text (a widget's value is made text)
        with pytest.raises(ValueError, match=rf"^filename_prefix: expected a file name prefix such as 'headseg/labels', got {prefix}$"):
            save.execute(sweep, prefix)
    assert list(comfy_folders["output"].iterdir()) == []


def test_registered_with_a_docs_page(save):
    from headseg.tests.support.comfy_in_process import pack_node_classes

    assert save in pack_node_classes()
    info = save.GET_NODE_INFO_V1()
    assert info["name"] == "HeadSeg_SaveLabelMaps" and info["output_node"] is True and info["category"] == "HeadSeg"


def test_the_prefix_takes_save_images_size_variables(save, sweep, comfy_folders):
    save.execute(sweep, "%width%x%height%/cat")
    assert (comfy_folders["output"] / f"{W}x{H}" / "cat_00001_k9.png").is_file()


def test_batch_num_names_each_image_and_its_images_share_one_counter_that_never_overwrites(save, sweep, comfy_folders):
    out = comfy_folders["output"]
    save.execute(sweep, "set/cat_%batch_num%")
    (out / "set" / "cat_1_00005_k2.png").write_bytes(b"")  # a later file of image 1 only: both must skip past it
    save.execute(sweep, "set/cat_%batch_num%")
    assert sorted(p.name for p in (out / "set").glob("*_k2.png")) == [
        "cat_0_00001_k2.png", "cat_0_00006_k2.png", "cat_1_00001_k2.png", "cat_1_00005_k2.png", "cat_1_00006_k2.png"
    ]
    for b in (0, 1):
        _, pixels, text = read(out / "set" / f"cat_{b}_00006_k9.png")
        assert torch.equal(torch.from_numpy(pixels).long(), sweep.results[9].labels[b])
        assert json.loads(text["headseg"])["batch_index"] == b
    # in a subfolder's name too: one folder per image
    listed = save.execute(sweep, "by_image/%batch_num%/cat").ui["headseg_label_maps"]
    assert [(r["subfolder"], r["filename"], r["batch_index"]) for r in listed if r["k"] == 4] == [
        ("by_image/0", "cat_00001_k4.png", 0), ("by_image/1", "cat_00001_k4.png", 1)
    ]
    assert (out / "by_image" / "1" / "cat_00001_k4.png").is_file()


def test_label_maps_that_cannot_be_saved_are_refused_before_any_file_is_written(save, sweep, comfy_folders):
    """A hand-made sweep whose last k cannot be an 8-bit index PNG: an error naming clusters, and no file
    of the earlier k or images left behind (a dataset would get label maps missing some k)."""
    import dataclasses

    from headseg.nodes.core.kmeans import ClusterSweep

    wide = dataclasses.replace(sweep.results[9], k=300)  # labels 0..8 of k = 300: more than 8 bits can number
    bad = dataclasses.replace(sweep.results[9], labels=sweep.results[9].labels + 5)  # 5..13 for k = 9
    shifted = dataclasses.replace(sweep.results[4], labels=sweep.results[4].labels[:, :-1])  # [B, H - 1, W]
    for results, words in (({2: sweep.results[2], 300: wide}, "at most 256"), ({2: sweep.results[2], 9: bad}, "0..8"),
                           ({2: sweep.results[2], 4: shifted}, r"\[B, H, W\]"), ({}, "at least one k")):
        with pytest.raises(ValueError, match=r"^clusters: .*" + words):
            save.execute(ClusterSweep(results, sweep.size), "bad")
        assert list(comfy_folders["output"].iterdir()) == []


def test_a_failed_write_leaves_none_of_this_runs_files(save, sweep, comfy_folders, monkeypatch):
    """The disk fills up at the second image's picture: an error naming filename_prefix, and no label map
    without its picture (nor any other file of this run) in the dataset; files of earlier runs stay."""
    import errno

    save.execute(sweep, "full")
    before = sorted(p.name for p in comfy_folders["output"].iterdir())
    real_save, written = Image.Image.save, []

    def save_until_full(picture, fp, *args, **kwargs):
        if str(fp).endswith("full_00004_image.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(fp)
        return real_save(picture, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_until_full)
    with pytest.raises(ValueError, match=r"^filename_prefix 'full': cannot write .*full_00004_image.png.*free space"):
        save.execute(sweep, "full", torch.rand(2, H, W, 3))
    assert len(written) == 7  # image 3's label maps and picture, image 4's label maps: all removed again
    assert sorted(p.name for p in comfy_folders["output"].iterdir()) == before


@pytest.mark.parametrize("disable_metadata", [False, True])
def test_comfyui_hands_the_workflow_to_the_picture_unless_metadata_is_disabled(save, sweep, comfy_folders, disable_metadata):
    """The hidden prompt and workflow as ComfyUI's executor gathers them for this node (an output node gets
    them without asking), and --disable-metadata: then only the headseg entry, as Save Image writes none."""
    import execution
    from comfy.cli_args import args

    class Prompt:  # the executor's DynamicPrompt, as far as get_input_data reads it
        def get_original_prompt(self):
            return {"7": {"class_type": "HeadSeg_SaveLabelMaps", "inputs": {}}}

    extra = {"extra_pnginfo": {"workflow": {"nodes": [7]}}}
    _, _, hidden = execution.get_input_data({"filename_prefix": "meta"}, save, "7", None, Prompt(), extra)
    before, args.disable_metadata = args.disable_metadata, disable_metadata
    try:
        save.PREPARE_CLASS_CLONE(hidden).execute(sweep, "meta", torch.rand(2, H, W, 3))
    finally:
        args.disable_metadata = before
    _, _, text = read(comfy_folders["output"] / "meta_00002_image.png")
    _, _, label_text = read(comfy_folders["output"] / "meta_00002_k9.png")
    if disable_metadata:
        assert set(text) == set(label_text) == {"headseg"}
    else:
        assert set(text) == {"prompt", "workflow", "headseg"}
        assert json.loads(text["prompt"])["7"]["class_type"] == "HeadSeg_SaveLabelMaps"
        assert json.loads(text["workflow"]) == {"nodes": [7]}
        # a label map alone says how it was made: the prompt holds every node's inputs (seeds, layers, k)
        assert set(label_text) == {"prompt", "headseg"}
        assert json.loads(label_text["prompt"]) == json.loads(text["prompt"])


def test_metadata_that_cannot_be_written_leaves_none_of_the_claimed_files(save, sweep, comfy_folders):
    """The files are claimed (made empty) before their PNG text is made: a prompt json.dumps refuses (a
    node that put a set into it, as a Python caller of the executor can) raised after the claim and left
    the run's empty label maps and picture behind, under a counter no later run takes."""
    import execution

    class Prompt:  # the executor's DynamicPrompt, as far as get_input_data reads it
        def get_original_prompt(self):
            return {"7": {"class_type": "HeadSeg_SaveLabelMaps", "inputs": {"tags": {"a", "b"}}}}

    _, _, hidden = execution.get_input_data({"filename_prefix": "unjson/x"}, save, "7", None, Prompt(), {})
    with pytest.raises(TypeError, match="not JSON serializable"):
        save.PREPARE_CLASS_CLONE(hidden).execute(sweep, "unjson/x", torch.rand(2, H, W, 3))
    folder = comfy_folders["output"] / "unjson"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_a_workflow_entry_png_cannot_name_is_left_out_and_no_claimed_file_stays_empty(save, sweep, comfy_folders, caplog):
    """ComfyUI writes every key of a prompt's extra_pnginfo (sent by whoever queues it) as a PNG text entry, whose
    keyword PNG keeps in Latin-1. A key beyond it (an API client's '工作流') made PIL raise UnicodeEncodeError
    after the run's files were claimed: its label maps and picture stayed behind empty, under a counter no later
    run takes, and the error named nothing. Such an entry is left out with a log line; the files are written."""
    import execution

    class Prompt:  # the executor's DynamicPrompt, as far as get_input_data reads it
        def get_original_prompt(self):
            return {"7": {"class_type": "HeadSeg_SaveLabelMaps", "inputs": {}}}

    extra = {"extra_pnginfo": {"workflow": {"nodes": [7]}, "\u5de5\u4f5c\u6d41": {"a": 1}, "caf\u00e9": [2]}}
    _, _, hidden = execution.get_input_data({"filename_prefix": "keys/x"}, save, "7", None, Prompt(), extra)
    with caplog.at_level("WARNING"):
        save.PREPARE_CLASS_CLONE(hidden).execute(sweep, "keys/x", torch.rand(2, H, W, 3))
    folder = comfy_folders["output"] / "keys"
    files = sorted(p.name for p in folder.iterdir())
    assert files == [f"x_0000{n}_{s}.png" for n in (1, 2) for s in ("image", "k2", "k4", "k9")]
    assert all((folder / f).stat().st_size > 0 for f in files)
    _, _, text = read(folder / "x_00001_image.png")
    assert set(text) == {"prompt", "workflow", "caf\u00e9", "headseg"}  # Latin-1 keys are kept
    assert json.loads(text["caf\u00e9"]) == [2]
    assert "\u5de5\u4f5c\u6d41" in caplog.text and "left out" in caplog.text


def test_a_batch_is_written_on_several_threads_with_the_bytes_of_one_at_a_time(save, sweep, comfy_folders, monkeypatch):
    """Two writes overlap (each waits for the other at a barrier, which a one-at-a-time writer never
    passes), and every file has the bytes it gets when the files are written one after another."""
    import os
    import threading

    from headseg.nodes import previews

    pictures = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(previews, "_PNG_THREADS", 1)
    save.execute(sweep, "one/x", pictures)
    monkeypatch.setattr(previews, "_PNG_THREADS", 8)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    real_save, meet, threads = Image.Image.save, threading.Barrier(2), set()

    def save_meeting(picture, fp, *args, **kwargs):
        threads.add(threading.get_ident())
        if str(fp).endswith(("_00001_k2.png", "_00001_k4.png")):
            meet.wait(timeout=10)  # BrokenBarrierError unless both are being written at once
        return real_save(picture, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_meeting)
    save.execute(sweep, "many/x", pictures)
    assert len(threads) > 1
    one, many = comfy_folders["output"] / "one", comfy_folders["output"] / "many"
    names = sorted(p.name for p in one.iterdir())
    assert len(names) == 2 * 4 and names == sorted(p.name for p in many.iterdir())
    for name in names:
        assert (one / name).read_bytes() == (many / name).read_bytes(), name


def test_a_file_cut_short_by_a_full_disk_is_removed_too(save, sweep, comfy_folders):
    """The OS refuses the pictures' last bytes (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC), which PIL
    only writes when it closes the file, and then leaves the file cut short: it goes with the run's others."""
    resource = pytest.importorskip("resource")
    import signal

    if not hasattr(signal, "SIGXFSZ"):
        pytest.skip("no SIGXFSZ")
    pictures = torch.rand(1, H, W, 3, generator=torch.Generator().manual_seed(5)).expand(2, H, W, 3)
    save.execute(sweep, "whole/y", pictures)
    size = (comfy_folders["output"] / "whole" / "y_00001_image.png").stat().st_size  # noise: far larger than a label map
    old, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size - 1, old[1]))  # every byte but the last
    try:
        with pytest.raises(ValueError, match=r"^filename_prefix 'y': cannot write .*y_00001_image\.png"):
            save.execute(sweep, "y", pictures)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)
    assert sorted(p.name for p in comfy_folders["output"].iterdir()) == ["whole"]


def test_an_error_that_is_no_oserror_leaves_none_of_this_runs_files(save, sweep, comfy_folders, monkeypatch):
    """A picture that cannot be made (MemoryError) while the other threads write theirs: the error as it is,
    and none of the run's files left."""
    import os

    from headseg.nodes import label_map_nodes

    monkeypatch.setattr(os, "cpu_count", lambda: 4)

    def out_of_memory(picture):
        raise MemoryError("the picture's bytes")

    monkeypatch.setattr(label_map_nodes, "_picture_png", out_of_memory)
    with pytest.raises(MemoryError, match="the picture's bytes"):
        save.execute(sweep, "z", torch.rand(2, H, W, 3))
    assert list(comfy_folders["output"].iterdir()) == []


def test_batch_num_that_the_path_drops_still_gives_each_image_its_own_files(save, sweep, comfy_folders):
    """'a/%batch_num%/../cat' is 'a/cat' for every image (ComfyUI normalises the path): the images then take
    successive counters, as without %batch_num%, instead of all writing the same files."""
    listed = save.execute(sweep, "a/%batch_num%/../cat").ui["headseg_label_maps"]
    assert [(r["subfolder"], r["filename"], r["batch_index"]) for r in listed if r["k"] == 2] == [
        ("a", "cat_00001_k2.png", 0), ("a", "cat_00002_k2.png", 1)
    ]
    for b in (0, 1):
        _, pixels, text = read(comfy_folders["output"] / "a" / f"cat_{b + 1:05}_k9.png")
        assert torch.equal(torch.from_numpy(pixels).long(), sweep.results[9].labels[b])
        assert json.loads(text["headseg"])["batch_index"] == b


def test_a_picture_of_the_label_maps_size_is_saved_when_the_sides_are_no_multiples_of_8(save, nodes, comfy_folders):
    # a recording file may hold any image size (here 100 x 60: latent grid 12 x 7): the decoded picture of
    # that size is the label maps' own, with nothing to crop; it was refused ('expected 60x100, got 60x100'),
    # and VAE Encode's offsets ((100 % 8) // 2 = 2) would have cut it to 98 rows
    rec = planted_recording([nested_scene(100, 60)], layout=small_layout(heads=2), d=8, noise=0.2, seed=1)
    feats = nodes.HeadPCA.execute(rec, "down+up", "all", 4).args[0]
    sweep = nodes.MultiKMeans.execute(nodes.Upsample.execute(feats, "bilinear", False).args[0], "2,3", 0).args[0]
    picture = torch.rand(1, 100, 60, 3, generator=torch.Generator().manual_seed(2))
    save.execute(sweep, "odd", picture)
    _, pixels, _ = read(comfy_folders["output"] / "odd_00001_image.png")
    assert np.array_equal(pixels, np.clip(255.0 * picture[0].numpy(), 0, 255).astype(np.uint8))
    # a picture a few pixels larger is no VAE Encode window of these sides (it would crop 103 rows to 96):
    # refused, and the message does not offer the crop
    with pytest.raises(ValueError, match=r"^image: expected pictures of the label maps' 60x100 pixels, got 60x103") as larger:
        save.execute(sweep, "odd", torch.rand(1, 103, 60, 3))
    assert "7 more" not in str(larger.value)


@pytest.mark.parametrize("prefix, folder", [("dataset/", ""), ("data/cats/", "data"), ("set/.", "")])
def test_a_prefix_that_ends_in_a_folder_never_overwrites_earlier_runs(save, sweep, comfy_folders, prefix, folder):
    """ComfyUI's counter for 'dataset/' is always 1 (it measures the name in the prefix as written, ''): each
    queue wrote its label maps over the last one's, so a dataset kept only the last batch."""
    for run in range(3):
        save.execute(sweep, prefix)
    name = {"dataset/": "dataset", "data/cats/": "cats", "set/.": "set"}[prefix]
    written = sorted(p.name for p in (comfy_folders["output"] / folder).glob("*.png"))
    assert written == sorted(f"{name}_{n:05}_k{k}.png" for n in range(1, 7) for k in (2, 4, 9))
    for n in range(1, 7):  # every run's images in their own files: image 0 then image 1 of each run
        _, pixels, text = read(comfy_folders["output"] / folder / f"{name}_{n:05}_k4.png")
        assert torch.equal(torch.from_numpy(pixels).long(), sweep.results[4].labels[(n - 1) % 2])
        assert json.loads(text["headseg"])["batch_index"] == (n - 1) % 2


@pytest.mark.parametrize("prefix", ["race", "race_%batch_num%"])
def test_files_another_comfyui_writes_at_the_same_moment_are_not_written_over(save, sweep, comfy_folders, monkeypatch, prefix):
    """Two ComfyUIs (one per GPU) saving a dataset into one output folder: the other one writes its files
    under the counter this one found free, just after it looked. Its files stay as they are, and this run
    moves on to the next free counter (with %batch_num%, both images together: they share a counter)."""
    from headseg.nodes import label_map_nodes

    real_place = label_map_nodes.output_place

    def place_then_other_comfyui_writes(filename_prefix, *args):
        folder, name, counter, subfolder = real_place(filename_prefix, *args)
        if name in ("race", "race_1"):  # the other ComfyUI's file of this counter (of image 1 with %batch_num%)
            (comfy_folders["output"] / f"{name}_{counter:05}_k9.png").write_bytes(b"the other one's")
        return folder, name, counter, subfolder

    monkeypatch.setattr(label_map_nodes, "output_place", place_then_other_comfyui_writes)
    listed = save.execute(sweep, prefix).ui["headseg_label_maps"]
    assert (comfy_folders["output"] / prefix.replace("%batch_num%", "1")).with_name(
        prefix.replace("%batch_num%", "1") + "_00001_k9.png").read_bytes() == b"the other one's"
    names = [r["filename"] for r in listed if r["k"] == 9]
    assert names == (["race_00002_k9.png", "race_00003_k9.png"] if prefix == "race" else ["race_0_00002_k9.png", "race_1_00002_k9.png"])
    for b, filename in enumerate(names):
        _, pixels, _ = read(comfy_folders["output"] / filename)
        assert torch.equal(torch.from_numpy(pixels).long(), sweep.results[9].labels[b])
    # nothing of this run under the taken counter: no half-set of label maps beside the other one's file
    assert sorted(p.name for p in comfy_folders["output"].glob("*_00001_*")) == [prefix.replace("%batch_num%", "1") + "_00001_k9.png"]


def test_a_name_that_only_some_files_can_take_leaves_none_of_this_runs_files(save, sweep, comfy_folders):
    """A 242-character name fits '_00001_k9.png' (255 characters) but not '_00001_image.png': the label maps
    made for it before the picture's name failed are removed again, and the error names filename_prefix."""
    prefix = "n" * 242
    with pytest.raises(ValueError, match=r"^filename_prefix 'n+': cannot write .*_00001_image.png .*shorter prefix"):
        save.execute(sweep, prefix, torch.rand(2, H, W, 3))
    assert list(comfy_folders["output"].iterdir()) == []


def _stale_counter_and_counted_tries(monkeypatch):
    """output_place as ComfyUI's for 'dataset/': counter 1 whatever the folder holds; and a list that gets
    one entry per file found taken by _claim_places' exclusive create."""
    import builtins

    from headseg.nodes import label_map_nodes

    real_place, taken = label_map_nodes.output_place, []

    def counter_one(filename_prefix, *args):
        folder, name, _, subfolder = real_place(filename_prefix, *args)
        return folder, name, 1, subfolder

    def counting_open(file, mode="r", *args, **kwargs):
        try:
            return builtins.open(file, mode, *args, **kwargs)
        except FileExistsError:
            taken.append(file)
            raise

    monkeypatch.setattr(label_map_nodes, "output_place", counter_one)
    monkeypatch.setattr(label_map_nodes, "open", counting_open, raising=False)
    return taken


@pytest.mark.parametrize("prefix", ["many", "many_%batch_num%"])
def test_a_taken_counter_moves_on_past_the_highest_in_one_step(save, sweep, comfy_folders, monkeypatch, prefix):
    """Counter 1 taken and 40 earlier images in the folder (60 of image 1's name with %batch_num%): each image
    of the batch takes its counter after one file found taken in all (one look at the folder, past the highest
    of every name that shares the counter), not one try per earlier image; a batch without %batch_num% takes
    successive counters without trying its own first image's."""
    taken = _stale_counter_and_counted_tries(monkeypatch)
    for b in (0, 1):
        name = prefix.replace("%batch_num%", str(b))
        for n in range(1, 41 + 20 * b):
            (comfy_folders["output"] / f"{name}_{n:05}_k2.png").write_bytes(b"earlier")
    listed = save.execute(sweep, prefix).ui["headseg_label_maps"]
    names = sorted(r["filename"] for r in listed if r["k"] == 2)
    if prefix == "many":
        assert names == ["many_00061_k2.png", "many_00062_k2.png"]
        assert len(taken) == 1, taken
    else:
        assert names == ["many_0_00061_k2.png", "many_1_00061_k2.png"]
        assert len(taken) == 1, taken
    taken.clear()
    save.execute(sweep, "fresh")  # a folder without files of the name: none found taken
    assert taken == []


def test_the_highest_counter_is_read_from_files_of_this_very_name(save, sweep, comfy_folders, monkeypatch):
    """The name is matched as text: 'cat.v1' moves on past its own counter 1, not past 'catXv1_00099' (a
    '.' read as a pattern matches any character)."""
    _stale_counter_and_counted_tries(monkeypatch)
    (comfy_folders["output"] / "cat.v1_00001_k2.png").write_bytes(b"earlier")
    (comfy_folders["output"] / "catXv1_00099_k2.png").write_bytes(b"another name")
    listed = save.execute(sweep, "cat.v1").ui["headseg_label_maps"]
    assert sorted(r["filename"] for r in listed if r["k"] == 2) == ["cat.v1_00002_k2.png", "cat.v1_00003_k2.png"]


def test_a_file_the_second_image_cannot_make_leaves_none_of_the_first_images(save, sweep, comfy_folders, monkeypatch):
    """Making the second image's first file fails (permission): the error names filename_prefix, and the
    files the first image already holds are removed with it."""
    import builtins
    import errno

    from headseg.nodes import label_map_nodes

    def refuse_the_second(file, mode="r", *args, **kwargs):
        if mode == "xb" and "_00002_" in str(file):
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(label_map_nodes, "open", refuse_the_second, raising=False)
    with pytest.raises(ValueError, match=r"^filename_prefix 'perm': cannot write .*perm_00002_k2\.png"):
        save.execute(sweep, "perm")
    assert list(comfy_folders["output"].iterdir()) == []


def test_each_item_of_a_list_is_named_in_its_files(save, sweep, comfy_folders):
    """A list of latents (Rebatch Latents) runs the node once per item, through ComfyUI's own list mapping:
    every item's images were labelled batch_index 0, 1, ... alike, so a label map or picture alone did not
    say which item of the list it belongs to. The headseg entry and the payload carry the item's list_index
    (ComfyUI's executing context), beside the image's batch_index; the counters never collide."""
    from headseg.tests.support.comfy_in_process import run_on_own_thread

    import execution

    inputs = {"clusters": [sweep, sweep, sweep], "filename_prefix": ["items"], "image": [torch.rand(2, H, W, 3)]}
    results = run_on_own_thread(lambda: execution._async_map_node_over_list("p", "7", save, inputs, "execute", hidden_inputs={}))
    assert len(results) == 3
    for item, out in enumerate(results):
        listed = out.ui["headseg_label_maps"]
        assert [(r["list_index"], r["batch_index"]) for r in listed] == [(item, b) for b in (0, 1) for _ in (2, 4, 9)]
        for b in range(2):
            n = 2 * item + b + 1  # the next counter for every image of every item
            for suffix in ("k2", "k4", "k9", "image"):
                _, _, text = read(comfy_folders["output"] / f"items_{n:05}_{suffix}.png")
                about = json.loads(text["headseg"])
                assert (about["list_index"], about["batch_index"]) == (item, b), (n, suffix)
    assert len(list(comfy_folders["output"].iterdir())) == 3 * 2 * 4


@pytest.mark.parametrize("disable_metadata", [False, True])
def test_label_maps_of_loaded_recordings_name_the_file_and_the_sampling_that_made_it(
    save, nodes, comfy_folders, monkeypatch, disable_metadata
):
    """A dataset made from recording files (a list of paths into Load Recording, through ComfyUI's own executor):
    each file's label maps carried only the prompt that loaded it, which names no seed, model or text, and a
    list_index that counts the paths, so nothing said which file, nor which sampling, a label map came from.
    The headseg entry's "recording" names the file and carries its own metadata (its prompt, list_index; not its
    workflow); with --disable-metadata the file's prompt is left out, as ComfyUI writes none."""
    import copy

    import nodes as comfy_nodes
    from comfy.cli_args import args

    from headseg.nodes import recording_io_nodes
    from headseg.nodes.core.recording_file import save_recording
    from headseg.tests.support.comfy_in_process import TextListNode, quiet_executor, run_on_own_thread

    for name, cls in (("Paths", TextListNode), ("HeadSeg_LoadRecording", recording_io_nodes.LoadRecording),
                      ("HeadSeg_HeadPCA", nodes.HeadPCA), ("HeadSeg_Upsample", nodes.Upsample),
                      ("HeadSeg_MultiKMeans", nodes.MultiKMeans), ("HeadSeg_SaveLabelMaps", save)):
        monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, name, cls)
    monkeypatch.setattr(args, "disable_metadata", disable_metadata)
    made = {}  # file -> the prompt that sampled it (its seed) and its list_index
    for name, seed, batch, item in (("a.safetensors", 11, 2, "0"), ("b.safetensors", 22, 1, "3")):
        rec = planted_recording([nested_scene(64, 96)] * batch, layout=small_layout(heads=2), d=8, seed=seed)
        sampled = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": seed}}})
        made[name] = {"prompt": sampled, "list_index": item}
        save_recording(rec, comfy_folders["input"] / name, extra_metadata={**made[name], "workflow": '{"nodes": []}'})
    prompt = {
        "1": {"class_type": "Paths", "inputs": {"value": "a.safetensors,b.safetensors"}},
        "2": {"class_type": "HeadSeg_LoadRecording", "inputs": {"file": "", "path": ["1", 0]}},
        "3": {"class_type": "HeadSeg_HeadPCA", "inputs": {"recording": ["2", 0], "components": 4, "device": "cpu"}},
        "4": {"class_type": "HeadSeg_Upsample", "inputs": {"features": ["3", 0]}},
        "5": {"class_type": "HeadSeg_MultiKMeans", "inputs": {"stack": ["4", 0], "cluster_counts": "2,4", "device": "cpu"}},
        "6": {"class_type": "HeadSeg_SaveLabelMaps", "inputs": {"clusters": ["5", 0], "filename_prefix": "ds/x"}},
    }

    executor = quiet_executor()
    run_on_own_thread(lambda: executor.execute_async(copy.deepcopy(prompt), "p", {}, ["6"]))
    assert executor.success
    expected = {1: ("a.safetensors", 0, 0), 2: ("a.safetensors", 0, 1), 3: ("b.safetensors", 1, 0)}
    assert len(list((comfy_folders["output"] / "ds").iterdir())) == 2 * len(expected)
    for n, (name, item, b) in expected.items():
        for k in (2, 4):
            _, _, text = read(comfy_folders["output"] / "ds" / f"x_{n:05}_k{k}.png")
            about = json.loads(text["headseg"])
            assert (about["list_index"], about["batch_index"], about["k"]) == (item, b, k)
            source = {"model": "planted", "steps": "last", "branch": "cond", "file": name, **made[name]}
            if disable_metadata:
                del source["prompt"]
            assert about["recording"] == source, (n, k)


class _KeepMasks:
    """An output node that keeps the MASK batches it is given (one per run of a list), in order."""

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "test"
    INPUT_IS_LIST = True
    kept: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK", {})}}

    def run(self, mask):
        _KeepMasks.kept.extend(mask)
        return {}


def test_each_images_files_list_its_merged_masks_in_the_order_of_all_masks(save, nodes, comfy_folders, monkeypatch):
    """Mask Merge's all_masks with batch_index -1 holds every image's masks one image after the other, with the
    counts only in the node's text: a saved dataset could not say which image a mask belongs to. With Mask
    Merge's masks connected, each image's files list its merged masks as [k, cluster] pairs, in Mask Merge's
    order: through ComfyUI's executor, for a list of two recordings (batches of 2 and 1), the label maps read
    back rebuild all_masks of every item, image after image."""
    import copy

    import nodes as comfy_nodes

    from headseg.nodes import recording_io_nodes
    from headseg.nodes.core.recording_file import save_recording
    from headseg.tests.support.comfy_in_process import TextListNode, quiet_executor, run_on_own_thread

    for name, cls in (("Paths", TextListNode), ("Keep", _KeepMasks), ("HeadSeg_LoadRecording", recording_io_nodes.LoadRecording),
                      ("HeadSeg_HeadPCA", nodes.HeadPCA), ("HeadSeg_Upsample", nodes.Upsample),
                      ("HeadSeg_MultiKMeans", nodes.MultiKMeans), ("HeadSeg_MaskMerge", nodes.MaskMerge),
                      ("HeadSeg_SaveLabelMaps", save)):
        monkeypatch.setitem(comfy_nodes.NODE_CLASS_MAPPINGS, name, cls)
    monkeypatch.setattr(_KeepMasks, "kept", [])
    flipped = nested_scene(64, 96)
    flipped.masks = flipped.masks.flip(-1)
    for name, scenes in (("a.safetensors", [nested_scene(64, 96), flipped]), ("b.safetensors", [flipped])):
        save_recording(planted_recording(scenes, layout=small_layout(heads=2), d=8, seed=5), comfy_folders["input"] / name)
    prompt = {
        "1": {"class_type": "Paths", "inputs": {"value": "a.safetensors,b.safetensors"}},
        "2": {"class_type": "HeadSeg_LoadRecording", "inputs": {"file": "", "path": ["1", 0]}},
        "3": {"class_type": "HeadSeg_HeadPCA", "inputs": {"recording": ["2", 0], "components": 4, "device": "cpu"}},
        "4": {"class_type": "HeadSeg_Upsample", "inputs": {"features": ["3", 0]}},
        "5": {"class_type": "HeadSeg_MultiKMeans", "inputs": {"stack": ["4", 0], "cluster_counts": "2,4,6", "device": "cpu"}},
        "6": {"class_type": "HeadSeg_MaskMerge", "inputs": {"clusters": ["5", 0], "iou_threshold": 0.9, "min_area": 0.05, "batch_index": -1}},
        "7": {"class_type": "HeadSeg_SaveLabelMaps", "inputs": {"clusters": ["5", 0], "filename_prefix": "ds/x", "masks": ["6", 0]}},
        "8": {"class_type": "Keep", "inputs": {"mask": ["6", 1]}},
    }

    executor = quiet_executor()
    run_on_own_thread(lambda: executor.execute_async(copy.deepcopy(prompt), "p", {}, ["7", "8"]))
    assert executor.success
    all_masks = _KeepMasks.kept  # one MASK batch per item of the list
    assert len(all_masks) == 2
    folder = comfy_folders["output"] / "ds"
    for item, images in ((0, (1, 2)), (1, (3,))):
        rebuilt = []
        for n in images:
            entries = []
            for suffix in ("k2", "k4", "k6"):
                _, _, text = read(folder / f"x_{n:05}_{suffix}.png")
                entries.append(json.loads(text["headseg"])["masks"])
            assert entries[0] == entries[1] == entries[2] and entries[0]  # every file of the image lists them
            labels = {k: read(folder / f"x_{n:05}_k{k}.png")[1] for k in (2, 4, 6)}
            rebuilt += [torch.from_numpy(labels[k] == cluster).float() for k, cluster in entries[0]]
        assert torch.equal(torch.stack(rebuilt), all_masks[item]), item


def test_masks_of_other_clusters_are_refused_before_any_file_is_written(save, nodes, sweep, scenes, comfy_folders):
    from headseg.nodes.core import masks as core_masks

    merged = nodes.MaskMerge.execute(sweep, 0.9, 0.0, -1).args[0]
    with pytest.raises(ValueError, match=r"^masks: expected Mask Merge's masks of these clusters \(2 image\(s\).*got the masks of 1 image"):
        save.execute(sweep, "refused", masks=merged[:1])
    swapped = [merged[1], merged[0]]  # the other image's masks
    with pytest.raises(ValueError, match=r"^masks: .*mask 0 of image 0 is not cluster"):
        save.execute(sweep, "refused", masks=swapped)
    other = nodes.MultiKMeans.execute(
        nodes.Upsample.execute(nodes.HeadPCA.execute(
            planted_recording(scenes, layout=small_layout(heads=3), d=16, noise=0.2, seed=9), "down+up", "all", 4
        ).args[0], "bilinear", False).args[0], "2,4,9", 3
    ).args[0]
    foreign = nodes.MaskMerge.execute(other, 0.9, 0.0, -1).args[0]
    assert any(a.masks.shape != b.masks.shape or not torch.equal(a.masks, b.masks) for a, b in zip(foreign, merged))
    with pytest.raises(ValueError, match=r"^masks: .*is not cluster"):
        save.execute(sweep, "refused", masks=foreign)
    with pytest.raises(ValueError, match=r"^masks: expected .* got Tensor"):
        save.execute(sweep, "refused", masks=torch.zeros(2, H, W))
    assert not list(comfy_folders["output"].iterdir())
    assert isinstance(merged[0], core_masks.MaskSet)


@pytest.mark.parametrize("where", ["first", "last", "inside", "outside"])
def test_a_mask_one_pixel_off_its_cluster_is_refused(save, nodes, sweep, comfy_folders, where):
    """Each mask is compared with its cluster pixel by pixel: one pixel added to or taken from any mask of any
    image (at the first or last pixel of the image too) is refused, naming the mask, before any file is written."""
    merged = nodes.MaskMerge.execute(sweep, 0.9, 0.0, -1).args[0]
    b, j = 1, len(merged[1]) - 1  # the last mask of the second image
    ms = merged[b]
    masks = ms.masks.clone()  # [M, H, W]
    flat = masks[j].view(-1)  # [H*W]
    if where in ("first", "last"):
        p = 0 if where == "first" else flat.numel() - 1
    else:  # a pixel of the cluster taken out, or one of another cluster put in
        p = int(flat.nonzero()[len(flat.nonzero()) // 2]) if where == "inside" else int((~flat).nonzero()[-1])
    flat[p] = not flat[p]
    planted = list(merged)
    planted[b] = core_masks.MaskSet(masks, ms.k, ms.cluster)
    with pytest.raises(ValueError, match=rf"^masks: .*; mask {j} of image {b} is not cluster {int(ms.cluster[j])} of the k = {int(ms.k[j])} label map"):
        save.execute(sweep, "refused", masks=planted)
    assert not list(comfy_folders["output"].iterdir())
    save.execute(sweep, "kept", masks=merged)  # the masks as Mask Merge made them pass
    assert len(list(comfy_folders["output"].iterdir())) == 2 * 3


def test_a_mask_one_pixel_off_is_refused_at_sides_of_any_length(save, comfy_folders):
    """Label maps of 13x11 pixels (143, no multiple of 8: the masks' bytes are compared 8 at a time, the rest
    one by one): a mask one pixel off in the last few pixels is refused; the masks of the clusters pass."""
    from headseg.nodes.core.kmeans import ClusterSweep, KMeansResult

    h, w = 13, 11
    labels = torch.randint(0, 3, (1, h, w), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    sweep = ClusterSweep({3: KMeansResult(3, labels, torch.zeros(1, 3, 2), torch.zeros(1, dtype=torch.float64), 1)}, (h, w))
    exact = core_masks.MaskSet(labels[0][None] == torch.arange(3)[:, None, None], torch.full((3,), 3), torch.arange(3))
    save.execute(sweep, "exact", masks=[exact])
    for p in (h * w - 1, h * w - 5, h * w - 9):
        masks = exact.masks.clone()
        masks[2].view(-1)[p] ^= True
        with pytest.raises(ValueError, match=r"^masks: .*; mask 2 of image 0 is not cluster 2 of the k = 3 label map"):
            save.execute(sweep, "refused", masks=[core_masks.MaskSet(masks, exact.k, exact.cluster)])
    floats = core_masks.MaskSet(exact.masks.float(), exact.k, exact.cluster)  # the same pixels, not Mask Merge's bool masks
    with pytest.raises(ValueError, match=r"^masks: .*; the masks of image 0 are float32, not bool$"):
        save.execute(sweep, "refused", masks=[floats])
    assert [p.name for p in comfy_folders["output"].iterdir()] == ["exact_00001_k3.png"]


class _TorchOps(TorchDispatchMode):
    """Counts the torch operations run inside the block (on the calling thread)."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_masks_are_checked_without_a_torch_operation_per_mask(save, nodes, sweep):
    """Save Label Maps compared each mask with its cluster through torch (a compare of the label map, then
    torch.equal): for the merged masks of four 1024x1024 images with k = 2,5,6,10,20,50,100 (683 masks) that
    took 5.1 s on two loaded cores, more than the node's other work (tests/bench/bench_save_label_maps.py); the
    numpy compare takes a tenth of it. The torch operations of the check no longer grow with the number of
    masks: one mask of each image or all of them dispatch as many."""
    from headseg.nodes.label_map_nodes import _mask_entries

    merged = nodes.MaskMerge.execute(sweep, 0.9, 0.0, -1).args[0]
    assert min(len(ms) for ms in merged) >= 5
    first = [ms.subset(torch.tensor([0])) for ms in merged]
    counts = []
    for masks in (first, merged):
        with _TorchOps() as ops:
            _mask_entries(masks, sweep)
        counts.append(ops.count)
    assert counts[0] == counts[1], counts


def test_a_backslash_in_the_prefix_is_a_folder_and_a_name_windows_cannot_hold_is_refused(save, sweep, comfy_folders):
    """As on Windows, 'sub\\cats_%batch_num%' saves into the folder 'sub' (on Linux it made files named
    'sub\\cats_0_00001_k2.png'); 'CON/x' (a device on Windows) is refused on every system, before any file."""
    listed = save.execute(sweep, "sub\\cats_%batch_num%").ui["headseg_label_maps"]
    assert {(r["subfolder"], r["filename"]) for r in listed if r["k"] == 2} == {("sub", "cats_0_00001_k2.png"), ("sub", "cats_1_00001_k2.png")}
    assert sorted(p.name for p in comfy_folders["output"].iterdir()) == ["sub"]
    with pytest.raises(ValueError, match=r"^filename_prefix 'CON/x_0': names 'CON', which is a device on Windows"):
        save.execute(sweep, "CON/x_%batch_num%")
    assert sorted(p.name for p in comfy_folders["output"].iterdir()) == ["sub"]


def test_after_a_taken_counter_files_whose_name_differs_in_case_are_counted(save, sweep, comfy_folders):
    """On Windows and macOS 'DATASET_00002_k2.png' is the file 'dataset_00002_k2.png': after a taken counter
    ('dataset/', which ComfyUI counts from 1 at every run) the next counter looked for was one past the
    highest of the same case only, so each earlier run's files, in another case, cost a failed try per
    image. Here (Linux) the taken counter 1 is in the same case and 2 .. 7 in another: the run goes on at 8."""
    out = comfy_folders["output"]
    (out / "dataset_00001_k2.png").write_bytes(b"earlier")
    for n in range(2, 8):
        (out / f"DATASET_{n:05}_k2.png").write_bytes(b"earlier, another case")
    listed = save.execute(sweep, "dataset/").ui["headseg_label_maps"]
    assert sorted({r["filename"].split("_k")[0] for r in listed}) == ["dataset_00008", "dataset_00009"]
    assert (out / "dataset_00001_k2.png").read_bytes() == b"earlier"
