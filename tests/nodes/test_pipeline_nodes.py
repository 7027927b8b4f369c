"""HeadSeg's stage nodes in-process, on planted recordings with known answers (no model, no server).

Checks the node layer itself: ComfyUI types in and out (MASK [B, H, W] 0/1 at image resolution,
IMAGE [B, H, W, 3]), x = column / y = row on a non-square image, the UI payload the front end
reads, no mutation of inputs (ComfyUI shares cached outputs), and errors that name the input.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch

from headseg.nodes.core.masks import masks_at_pixel, parse_points
from headseg.nodes.core.metrics import iou
from headseg.nodes.core.preview import error_map_image
from headseg.nodes.core.error_map import upsampling_error
from headseg.nodes.core.recording import Recording
from headseg.tests.core.planted import nested_scene, planted_recording, small_layout

pytestmark = pytest.mark.comfy

H, W = 192, 256  # non-square on purpose: catches x/y swaps


@pytest.fixture(scope="module")
def scene():
    return nested_scene(H, W)


@pytest.fixture(scope="module")
def recording(scene):
    return planted_recording([scene, scene], layout=small_layout(heads=3), d=16, noise=0.2, seed=1)


def run_chain(nodes, rec, x, y, index=0, image=None, counts="2,3,4"):
    feats = nodes.HeadPCA.execute(rec, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    sweep = nodes.MultiKMeans.execute(stack, counts, 0).args[0]
    masks = nodes.MaskMerge.execute(sweep, 0.9, 0.0).args[0]
    return nodes.MaskSelectAtPixel.execute(masks, x, y, index, image), (feats, stack, sweep, masks)


def snapshot(value):
    """Deep copy of a value's tensors, for 'was it mutated?' checks."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if dataclasses.is_dataclass(value):
        return {f.name: snapshot(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [snapshot(v) for v in value]
    return copy.deepcopy(value)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return a == b


def test_masks_at_a_pixel_are_the_planted_chain(nodes, scene):
    rec = planted_recording([scene], layout=small_layout(heads=3), d=16, noise=0.2, seed=1)
    x, y = 180, 120  # inside the ball; the swapped pixel (120, 180) is background
    out, _ = run_chain(nodes, rec, x, y)
    chosen, at_pixel, overlay, count = out.args
    chain = scene.chain(x, y)  # [ball, foreground]
    assert count == len(chain)
    for m, node in zip(at_pixel, chain):
        assert iou(m > 0.5, scene.masks[node]) >= 0.95, scene.names[node]
    assert torch.equal(chosen[0], at_pixel[0])
    assert overlay.shape == (count, H, W, 3)


def test_comfy_types_and_shapes_for_a_batch(nodes, recording):
    out, (feats, stack, sweep, masks) = run_chain(nodes, recording, 40, 30, index=1)
    chosen, at_pixel, overlay, count = out.args
    assert chosen.shape == (2, H, W) and chosen.dtype == torch.float32
    assert set(chosen.unique().tolist()) <= {0.0, 1.0}
    assert at_pixel.shape == (count, H, W) and overlay.shape == (count, H, W, 3)
    assert float(overlay.min()) >= 0 and float(overlay.max()) <= 1
    for b in range(2):
        assert chosen[b, 30, 40] == 1.0  # the chosen mask contains the pixel
        here = masks_at_pixel(masks[b], 40, 30)  # every image's own chain (index 1 past its end: the last)
        assert torch.equal(chosen[b].bool(), here.masks[min(1, here.masks.shape[0] - 1)]), b
    head = nodes.MaskSelectAtPixel.execute(masks, 87, 71, 1).args[0]  # the cat's head: head, cat, foreground
    for b in range(2):
        here = masks_at_pixel(masks[b], 87, 71)
        assert here.masks.shape[0] >= 3
        assert torch.equal(head[b].bool(), here.masks[1]), b  # index 1 applies to every image, not only image 0

    pca_out = nodes.HeadPCA.execute(recording, "down+up", "all", 4)
    summary = pca_out.ui["headseg_summary"][0]
    assert summary["recorded_heads"] == recording.num_heads == 21
    assert summary["selected_heads"] == 18  # 6 layers without the middle one, 3 heads each
    grid = pca_out.args[1]
    assert grid.dim() == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3

    up = nodes.Upsample.execute(feats, "bilinear", False)
    assert len(up.args) == 1 and up.ui == {"text": [f"{stack.num_channels} channels on 3 grids (24x32, 12x16, 6x8) -> {W}x{H} px, bilinear"]}
    err_out = nodes.UpsamplingErrorMap.execute(stack)
    err = err_out.args[0]
    assert err.shape == (2, H, W, 3) and len(err_out.ui["images"]) == 1  # the node shows image 0
    heat = error_map_image(upsampling_error(stack))  # H * W <= 256 * 256: every pixel
    torch.testing.assert_close(err, heat)
    km = nodes.MultiKMeans.execute(stack, "2,3,4", 0)
    assert km.args[1].shape == (3 * 2, H, W, 3)
    assert km.ui["headseg_labels"] == ["k=2 #0", "k=2 #1", "k=3 #0", "k=3 #1", "k=4 #0", "k=4 #1"]
    merged = nodes.MaskMerge.execute(sweep, 0.9, 0.0).args[1]
    assert merged.shape == (len(masks[0].masks), H, W) and merged.dtype == torch.float32


def test_head_pca_names_asked_for_levels_that_the_recording_lacks(nodes, recording, caplog):
    have = sorted({recording.grid_level(k) for k in recording.layers if k.position in ("down", "up")})
    asked = f"{have[0]},7"
    with caplog.at_level("WARNING", logger="HeadSeg"):
        out = nodes.HeadPCA.execute(recording, "down+up", asked, 4)
    note = f"level(s) 7 not in the recording (it has {', '.join(map(str, have))} at down+up)"
    assert out.ui["text"][0].endswith("; " + note)
    assert f"levels '{asked}': {note}" in caplog.text
    assert {recording.grid_level(k) for k in out.args[0].layers} == {have[0]}
    caplog.clear()
    with caplog.at_level("WARNING", logger="HeadSeg"):
        out = nodes.HeadPCA.execute(recording, "down+up", "all", 4)
    assert "not in the recording" not in out.ui["text"][0] and not caplog.records


def test_head_pca_says_how_to_get_past_a_layer_with_nan(nodes, recording):
    key = sorted(recording.select().layers, key=lambda k: k.sort_key)[-1]  # an 'up' layer
    bad = dataclasses.replace(recording, layers=dict(recording.layers))
    bad.layers[key] = bad.layers[key].clone()
    bad.layers[key][0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError) as info:
        nodes.HeadPCA.execute(bad, "down+up", "all", 3)
    message = str(info.value)
    assert message.startswith(f"Recording: layer {key!s} contains NaN or inf values (usually a float16 overflow")
    assert f"'{key.position}' layer at level {recording.grid_level(key)}" in message
    assert "positions / levels" in message and "--force-upcast-attention" in message
    assert nodes.HeadPCA.execute(bad, "down", "all", 3).args[0].layers  # left out: the rest runs


def test_all_masks_of_the_image_batch_index_picks(nodes, recording):
    _, (_, _, sweep, masks) = run_chain(nodes, recording, 40, 30)
    counts = [int(m.masks.shape[0]) for m in masks]
    assert len(counts) == 2 and min(counts) > 0
    default = nodes.MaskMerge.execute(sweep, 0.9, 0.0)
    assert torch.equal(default.args[1], masks[0].masks.float())  # image 0, as before batch_index existed
    assert default.ui == {"text": [f"merged masks per image: {counts[0]}, {counts[1]}"]}
    second = nodes.MaskMerge.execute(sweep, 0.9, 0.0, 1).args[1]
    assert torch.equal(second, masks[1].masks.float())
    every = nodes.MaskMerge.execute(sweep, 0.9, 0.0, -1).args[1]
    assert torch.equal(every, torch.cat([m.masks for m in masks]).float())
    for bad in (2, -2, 0.5, True):
        with pytest.raises(ValueError, match=r"^batch_index: expected an image of the batch of 2 \(0 \.\. 1\), or -1"):
            nodes.MaskMerge.execute(sweep, 0.9, 0.0, bad)


def test_a_pixel_in_no_mask_gives_zeros_and_says_why(nodes, recording, caplog):
    _, (_, _, sweep, _) = run_chain(nodes, recording, 40, 30)
    none_left = nodes.MaskMerge.execute(sweep, 0.9, 1.0).args[0]  # no mask covers the whole image
    for index in (0, -1):  # all_masks: one all-zero mask, as a MASK batch cannot be empty
        all_masks = nodes.MaskMerge.execute(sweep, 0.9, 1.0, index).args[1]
        assert all_masks.shape == (1, H, W) and all_masks.dtype == torch.float32 and not all_masks.any()
    with caplog.at_level("WARNING", logger="HeadSeg"):
        chosen, at_pixel, _, count = nodes.MaskSelectAtPixel.execute(none_left, 40, 30, 0).args
    assert count == 0 and not chosen.any() and at_pixel.shape == (1, H, W) and not at_pixel.any()
    assert "the pixel 40, 30 lies in no mask of image(s) 0, 1 (Mask Merge's min_area" in caplog.text
    caplog.clear()
    kept = nodes.MaskMerge.execute(sweep, 0.9, 0.0).args[0]
    with caplog.at_level("WARNING", logger="HeadSeg"):
        nodes.MaskSelectAtPixel.execute(kept, 40, 30, 0)
    assert "lies in no mask" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="HeadSeg"):  # with more_points: still min_area's doing, not theirs
        nodes.MaskSelectAtPixel.execute(none_left, 40, 30, 0, None, "1,2")
    assert "the pixel 40, 30 lies in no mask of image(s) 0, 1 (Mask Merge's min_area" in caplog.text
    assert "fits more_points" not in caplog.text and "remove a point" not in caplog.text


def test_index_past_the_last_mask_gives_the_coarsest(nodes, recording):
    out, (_, _, _, masks) = run_chain(nodes, recording, 180, 120, index=50)
    chosen, at_pixel, _, count = out.args
    assert torch.equal(chosen[0], at_pixel[count - 1])
    assert torch.equal(chosen[1].bool(), masks_at_pixel(masks[1], 180, 120).masks[-1])  # image 1's own coarsest
    assert out.ui["headseg_index"] == [count - 1]


def test_ui_payload_contract(nodes, recording, comfy_folders):
    image = torch.rand(1, H, W, 3)
    out, _ = run_chain(nodes, recording, 180, 120, index=0, image=image)
    ui = out.ui
    keys = ("headseg_image", "headseg_size", "headseg_pixel", "headseg_pixel_asked", "headseg_index", "headseg_masks",
            "headseg_mask_info", "headseg_points", "headseg_points_asked", "headseg_item",
            "headseg_picture_size", "headseg_run")  # fmt: skip
    assert set(ui) == set(keys)
    # a second run of the same inputs shows the same files; its own id tells the picker it is another run
    again = run_chain(nodes, recording, 180, 120, index=0, image=image)[0].ui
    assert {k: v for k, v in again.items() if k != "headseg_run"} == {k: v for k, v in ui.items() if k != "headseg_run"}
    assert len(again["headseg_run"]) == len(ui["headseg_run"]) == 1 and again["headseg_run"] != ui["headseg_run"]
    assert ui["headseg_picture_size"] == [W, H]  # the picture as connected, before it is fitted to the grid
    assert ui["headseg_size"] == [W, H] and ui["headseg_pixel"] == [180, 120] and ui["headseg_index"] == [0]
    assert ui["headseg_pixel_asked"] == [180, 120]
    assert ui["headseg_points"] == [] and ui["headseg_points_asked"] == [""]
    count = out.args[3]
    assert len(ui["headseg_masks"]) == len(ui["headseg_mask_info"]) == count
    assert ui["headseg_item"] == [{"masks": count, "points": 0}]
    areas = [m["area"] for m in ui["headseg_mask_info"]]
    assert areas == sorted(areas) and set(ui["headseg_mask_info"][0]) == {"area", "k", "cluster"}
    from PIL import Image

    for ref in ui["headseg_image"] + ui["headseg_masks"]:
        assert ref["type"] == "temp"
        path = comfy_folders["temp"] / ref["subfolder"] / ref["filename"]
        assert Image.open(path).size == (W, H)
    for key, value in ui.items():  # ComfyUI concatenates these per key: every value must be a list
        assert isinstance(value, list), key


def test_mask_pictures_for_the_browser_are_shrunk_to_the_preview_cap(nodes, recording, comfy_folders, monkeypatch):
    """The thumbnails (overlay PNGs) keep the aspect ratio within the pixel cap; the picture to click on
    and the overlay IMAGE output stay at the masks' size."""
    import numpy
    from PIL import Image

    from headseg.nodes import mask_select_node

    monkeypatch.setattr(mask_select_node, "_MASK_PREVIEW_PIXELS", 96 * 128)  # a quarter of 192 x 256
    image = torch.rand(1, H, W, 3)
    out, _ = run_chain(nodes, recording, 180, 120, index=0, image=image)
    _, _, overlay, count = out.args
    assert count >= 1 and overlay.shape == (count, H, W, 3)
    open_ref = lambda ref: Image.open(comfy_folders["temp"] / ref["subfolder"] / ref["filename"])  # noqa: E731
    assert open_ref(out.ui["headseg_image"][0]).size == (W, H)
    for i, ref in enumerate(out.ui["headseg_masks"]):
        thumb = open_ref(ref)
        assert thumb.size == (128, 96)
        block_means = overlay[i].reshape(96, 2, 128, 2, 3).mean((1, 3))  # [96, 128, 3] each 2x2 block
        pixels = torch.tensor(numpy.array(thumb.convert("RGB")), dtype=torch.float32)  # [96, 128, 3]
        assert (pixels / 255 - block_means).abs().max() <= 1 / 255 + 1e-6  # the overlay, 8-bit rounded


def test_the_picture_to_click_on_is_written_once_while_it_stays_the_same(nodes, recording, comfy_folders):
    """Clicking around re-runs Mask Select with the same picture: its PNG is written on the first run
    only, unless its file is gone; another picture gets a file of its own."""
    image = torch.rand(1, H, W, 3)
    out, (_, _, _, masks) = run_chain(nodes, recording, 180, 120, image=image)
    first = out.ui["headseg_image"]
    path = comfy_folders["temp"] / first[0]["subfolder"] / first[0]["filename"]
    written = path.stat().st_mtime_ns
    for x, y in [(10, 10), (100, 50)]:
        again = nodes.MaskSelectAtPixel.execute(masks, x, y, 0, image.clone())
        assert again.ui["headseg_image"] == first and path.stat().st_mtime_ns == written
        assert all(ref not in first for ref in again.ui["headseg_masks"])
    other = nodes.MaskSelectAtPixel.execute(masks, 10, 10, 0, 1.0 - image).ui["headseg_image"]
    assert other != first
    path.unlink()
    rewritten = nodes.MaskSelectAtPixel.execute(masks, 10, 10, 0, image).ui["headseg_image"]
    path = comfy_folders["temp"] / rewritten[0]["subfolder"] / rewritten[0]["filename"]
    assert path.is_file()
    no_picture = [nodes.MaskSelectAtPixel.execute(masks, x, 10, 0).ui["headseg_image"] for x in (10, 20)]
    assert no_picture[0] == no_picture[1] and no_picture[0] not in (first, rewritten, other)


def test_a_mask_thumbnail_is_written_once_while_it_stays_the_same(nodes, recording, comfy_folders):
    """Choosing another index re-runs Mask Select at the same pixel: its thumbnails are the same pictures,
    so their PNGs are not written again (the refs name the first run's files, which hold the bytes a new
    write would); a thumbnail whose file is gone is written again, and another pixel's masks get files of
    their own."""
    from headseg.nodes import previews

    # stored channel by channel, as VAE Decode's IMAGE is (pixels.movedim(1, -1)): the overlays are too
    image = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(3)).movedim(1, -1)  # [1, H, W, 3]
    out, (_, _, _, masks) = run_chain(nodes, recording, 180, 120, index=0, image=image)
    first = out.ui["headseg_masks"]
    assert out.args[3] >= 2 and len(first) == out.args[3]
    read = lambda ref: (comfy_folders["temp"] / ref["subfolder"] / ref["filename"]).read_bytes()  # noqa: E731
    files = lambda: sorted(p.name for p in comfy_folders["temp"].rglob("*.png"))  # noqa: E731
    before, written = files(), [read(ref) for ref in first]
    again = nodes.MaskSelectAtPixel.execute(masks, 180, 120, 1, image)
    assert again.ui["headseg_masks"] == first and again.ui["headseg_index"] == [1]
    assert files() == before  # no PNG written: the picture and every thumbnail were there
    (comfy_folders["temp"] / first[0]["subfolder"] / first[0]["filename"]).unlink()
    third = nodes.MaskSelectAtPixel.execute(masks, 180, 120, 0, image).ui["headseg_masks"]
    assert third[0] != first[0] and third[1:] == first[1:] and read(third[0]) == written[0]
    previews._saved_previews.clear()  # written anew: the same bytes
    fresh = nodes.MaskSelectAtPixel.execute(masks, 180, 120, 0, image).ui["headseg_masks"]
    assert not set(map(str, fresh)) & set(map(str, first + third)) and [read(r) for r in fresh] == written
    elsewhere = nodes.MaskSelectAtPixel.execute(masks, 10, 10, 0, image)
    assert [m["area"] for m in elsewhere.ui["headseg_mask_info"]] != [m["area"] for m in out.ui["headseg_mask_info"]]
    assert elsewhere.ui["headseg_masks"][0] not in first + third + fresh


def test_picture_of_another_size_is_resized_for_display(nodes, recording):
    out, _ = run_chain(nodes, recording, 10, 10, image=torch.rand(1, H + 5, W - 3, 3))
    assert out.args[2].shape[1:] == (H, W, 3)


def test_inputs_are_not_mutated(nodes, recording):
    before = snapshot(recording)
    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    f0 = snapshot(feats)
    stack = nodes.Upsample.execute(feats, "bilinear", True).args[0]
    s0 = snapshot(stack)
    sweep = nodes.MultiKMeans.execute(stack, "2,3,4", 0).args[0]
    w0 = snapshot(sweep)
    masks = nodes.MaskMerge.execute(sweep, 0.9, 0.0).args[0]
    m0 = snapshot(masks)
    image = torch.rand(1, H, W, 3)
    i0 = image.clone()
    nodes.MaskSelectAtPixel.execute(masks, 5, 5, 0, image)
    assert same(snapshot(recording), before)
    assert same(snapshot(feats), f0) and same(snapshot(stack), s0)
    assert same(snapshot(sweep), w0) and same(snapshot(masks), m0)
    assert torch.equal(image, i0)


def test_live_recording_handle_is_read_through_snapshot_of_the_latent(nodes, recording):
    seen = []

    class Live:
        def snapshot(self, latent=None) -> Recording:
            seen.append(latent)
            return recording

    latent = {"samples": torch.zeros(recording.batch_size, 4, *recording.latent_size)}
    out = nodes.HeadPCA.execute(Live(), "down+up", "all", 4, latent=latent)
    assert out.ui["headseg_summary"][0]["recorded_heads"] == recording.num_heads
    assert len(seen) == 1 and seen[0] is latent["samples"]  # the run is looked up by this LATENT


def test_live_recording_without_the_samplers_latent_is_refused(nodes, recording):
    class Live:
        def snapshot(self, latent=None) -> Recording:
            return recording

    with pytest.raises(ValueError, match="^latent: connect the sampler's LATENT output here when the recording comes "
                       "from Record Self-Attention"):
        nodes.HeadPCA.execute(Live(), "down+up", "all", 4)
    with pytest.raises(ValueError, match="^latent: expected a LATENT"):
        nodes.HeadPCA.execute(Live(), "down+up", "all", 4, latent=torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda n, r: n.HeadPCA.execute("not a recording", "down+up", "all", 4), "recording"),
        (lambda n, r: n.HeadPCA.execute(r, "sideways", "all", 4), "positions"),
        (lambda n, r: n.HeadPCA.execute(r, "down+up", "zero", 4), "levels"),
        (lambda n, r: n.HeadPCA.execute(r, "down+up", "all", 99), "components"),
        (lambda n, r: n.Upsample.execute(r, "bilinear", False), "features"),
        (lambda n, r: n.UpsamplingErrorMap.execute(r), "stack"),
        (lambda n, r: n.MultiKMeans.execute(r, "2,3", 0), "stack"),
        (lambda n, r: n.MaskMerge.execute(r, 0.9, 0.0), "clusters"),
        (lambda n, r: n.MaskSelectAtPixel.execute(r, 0, 0, 0), "masks"),
    ],
)
def test_bad_input_names_the_input(nodes, recording, call, name):
    with pytest.raises((ValueError, TypeError), match=name):
        call(nodes, recording)


def test_bad_widget_values_name_the_widget(nodes, recording):
    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    with pytest.raises(ValueError, match="cluster_counts"):
        nodes.MultiKMeans.execute(stack, "2,x", 0)
    with pytest.raises(ValueError, match="^cluster_counts must hold integers from 1 to 256, got 100000"):
        nodes.MultiKMeans.execute(stack, "2,100000", 0)
    assert "from 1 to 256" in nodes.MultiKMeans.validate_inputs("2,257")  # refused before sampling
    assert isinstance(nodes.MultiKMeans.validate_inputs("2,x"), str)
    assert nodes.MultiKMeans.validate_inputs("2,5") is True
    assert isinstance(nodes.HeadPCA.validate_inputs("down+sideways", "all"), str)
    sweep = nodes.MultiKMeans.execute(stack, "2,3", 0).args[0]
    masks = nodes.MaskMerge.execute(sweep, 0.9, 0.0).args[0]
    # a pixel past the grid is moved onto it (test_pixel_past_the_grid_is_the_nearest_pixel_of_it);
    # a negative (linked: the widget's min does not apply) or non-integer one is no pixel
    for bad in (-1, 2.5, 3.0, True, "3", None):
        with pytest.raises(ValueError, match=r"^x: expected a pixel column, an integer >= 0, got "):
            nodes.MaskSelectAtPixel.execute(masks, bad, 0, 0)
        with pytest.raises(ValueError, match=r"^y: expected a pixel row, an integer >= 0, got "):
            nodes.MaskSelectAtPixel.execute(masks, 0, bad, 0)
    for bad in (-1, 1.7, True, "1", None):  # a linked index skips the widget's checks too
        with pytest.raises(ValueError, match=r"^index: expected an integer >= 0 \(0 = finest mask\), got "):
            nodes.MaskSelectAtPixel.execute(masks, 0, 0, bad)
    # a linked INT or FLOAT comes as it is (ComfyUI makes only a widget's value an int or a float): None failed
    # with "int() argument must be a string, a bytes-like object or a real number, not 'NoneType'"
    for bad in (None, "4", 2.5):
        with pytest.raises(ValueError, match=rf"^components: expected an integer from 1 to the head width, got {bad!r}$"):
            nodes.HeadPCA.execute(recording, "down+up", "all", bad)
        with pytest.raises(ValueError, match=rf"^seed: expected an integer, got {bad!r}$"):
            nodes.MultiKMeans.execute(stack, "2,3", bad)
    for bad in (None, "0.5"):
        with pytest.raises(ValueError, match=rf"^iou_threshold must be a number in \(0, 1\], got {bad!r}$"):
            nodes.MaskMerge.execute(sweep, bad, 0.0)
        with pytest.raises(ValueError, match=rf"^min_area must be a fraction of the image in \[0, 1\], got {bad!r}$"):
            nodes.MaskMerge.execute(sweep, 0.9, bad)
    other = dataclasses.replace(masks[1], masks=masks[1].masks[:, : H // 2])  # failed inside torch, copying it
    with pytest.raises(ValueError, match=rf"^masks: expected the masks of every image at one size .*\[\({H // 2}, {W}\), \({H}, {W}\)\]$"):
        nodes.MaskSelectAtPixel.execute([masks[0], other], 0, 0, 0)


def test_picture_not_a_multiple_of_8_is_cropped_like_vae_encode(nodes, recording):
    """A 133x197 photo encodes to the centred 128x192 window: the picker shows that window unscaled."""
    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    clusters = nodes.MultiKMeans.execute(stack, "2", 0).args[0]
    masks = nodes.MaskMerge.execute(clusters, 0.9, 0.0).args[0]
    H, W = masks[0].masks.shape[-2:]
    photo = torch.rand(1, H + 5, W + 5, 3)
    overlay = nodes.MaskSelectAtPixel.execute(masks, 0, 0, 0, image=photo).args[2]  # [count, H, W, 3]
    window = photo[:, 2 : 2 + H, 2 : 2 + W]  # VAE Encode's crop: offset (5 % 8) // 2 = 2
    assert overlay.shape[1:3] == (H, W)
    # where the chosen mask is absent, the overlay is the picture itself
    chosen = nodes.MaskSelectAtPixel.execute(masks, 0, 0, 0, image=photo).args[1][0].bool()
    assert torch.allclose(overlay[0][~chosen], window[0][~chosen], atol=1e-6)


def test_picture_odd_values_and_shapes(nodes, recording, caplog):
    """NaN / inf in the picture are drawn (and logged), never passed on as NaN; empty pictures are named."""
    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    masks = nodes.MaskMerge.execute(nodes.MultiKMeans.execute(stack, "2", 0).args[0], 0.9, 0.0).args[0]
    H, W = masks[0].masks.shape[-2:]
    photo = torch.rand(1, H, W, 3)
    photo[0, :4] = float("nan")
    photo[0, 4:8] = float("inf")
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        out = nodes.MaskSelectAtPixel.execute(masks, 0, 0, 0, image=photo)
    assert "image holds NaN or inf" in caplog.text
    overlay = out.args[2]
    assert bool(torch.isfinite(overlay).all()) and float(overlay.min()) >= 0 and float(overlay.max()) <= 1
    caplog.clear()
    later = torch.rand(3, H, W, 3)
    later[2] = float("nan")  # only image 0 is drawn: the others are not even looked at
    with caplog.at_level(logging.WARNING, logger="HeadSeg"):
        nodes.MaskSelectAtPixel.execute(masks, 0, 0, 0, image=later)
    assert "NaN" not in caplog.text
    for bad in (torch.rand(0, H, W, 3), torch.rand(1, 0, 0, 3), torch.rand(1, H, 0, 3)):
        with pytest.raises(ValueError, match=r"^image: expected at least one image of at least 1x1 pixels"):
            nodes.MaskSelectAtPixel.execute(masks, 0, 0, 0, image=bad)
    with pytest.raises(ValueError, match=r"^image: expected an IMAGE holding pixels, got a tensor on the meta device"):
        nodes.MaskSelectAtPixel.execute(masks, 0, 0, 0, image=torch.rand(1, H, W, 3, device="meta"))  # failed in torch
    for bad in ((torch.rand(1, H, W, 3) * 255).to(torch.uint8), torch.ones(1, H, W, 3, dtype=torch.int64)):
        # 0..255 bytes from another pack were drawn white, with no word of why
        with pytest.raises(ValueError, match=r"^image: expected an IMAGE of floats from 0 to 1 .*torch\.(uint8|int64)"):
            nodes.MaskSelectAtPixel.execute(masks, 0, 0, 0, image=bad)


def test_mask_merge_names_an_empty_sweep(nodes):
    from headseg.nodes.core.kmeans import ClusterSweep

    with pytest.raises(ValueError, match="^clusters: the sweep holds no cluster count"):
        nodes.MaskMerge.execute(ClusterSweep(results={}, size=(8, 8)), 0.9, 0.0)


def test_mask_merge_refuses_masks_that_would_not_fit_in_free_memory(nodes, recording, monkeypatch):
    """Each image's cluster masks (1 byte per cluster and pixel) with the overlap counting (12 bytes per
    pixel and 48 per pair of clusters) and image 0's MASK batch (4 bytes per merged mask and pixel) must
    fit in 80 % of the free memory: otherwise a message naming
    cluster_counts, before the allocation; settings that fit run."""
    from headseg.nodes import memory_checks

    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    sweep = nodes.MultiKMeans.execute(stack, "2,5", 0).args[0]
    M = len(nodes.MaskMerge.execute(sweep, 0.9, 0.0).args[0][0].masks)  # merged masks of image 0
    assert 4 * M > 7 + 12  # the MASK batch is the larger need: its own case below
    assert 1 < M <= 7
    per_image = (7 + 12) * H * W + 48 * 7 * 7  # merge_sweep_bytes: masks, overlap counting, [M, M] tables
    batch = 4 * M * H * W
    cases = [  # free bytes -> the allocation refused (None: runs)
        (per_image / 0.8 - 1, f"up to 7 masks of image 0 (one per cluster where none merge) and the overlap counts at {W}x{H} pixels (cluster_counts 2,5) would take 0.0 GiB"),
        (batch / 0.8 - 1, f"all_masks, the {M} merged masks of image 0 as a MASK batch"),
        (batch / 0.8 + 1, None),
    ]
    for free, refused in cases:
        monkeypatch.setattr(memory_checks, "available_memory", lambda free=free: int(free))
        if refused is None:
            assert nodes.MaskMerge.execute(sweep, 0.9, 0.0).args[1].shape == (M, H, W)
            continue
        with pytest.raises(ValueError, match="^clusters: ") as info:
            nodes.MaskMerge.execute(sweep, 0.9, 0.0)
        message = str(info.value)
        assert refused in message and "(cluster_counts 2,5)" in message and "80 % of the" in message, message
        assert "Use fewer or smaller cluster counts in Multi K-Means" in message
    monkeypatch.setattr(memory_checks, "available_memory", lambda: None)  # unknown: a fixed 4 GiB each
    monkeypatch.setattr(memory_checks, "FALLBACK_MEMORY_BYTES", 7 * H * W - 1)
    with pytest.raises(ValueError, match=r"more than 0\.0 GiB\. Use fewer"):
        nodes.MaskMerge.execute(sweep, 0.9, 0.0)
    monkeypatch.undo()
    assert memory_checks.available_memory() > 0  # psutil is there in ComfyUI


def test_multi_kmeans_shows_the_colour_maps_of_the_first_images_of_a_large_batch(nodes, recording, monkeypatch, comfy_folders):
    """A PNG per k and image is written for the node's preview: of a batch larger than _PREVIEW_IMAGES only
    the first images' are (k-major, as captioned), the note says so, and colour_maps keeps every image. The
    PNGs are palette PNGs of the label maps whose pixels, read back, are the colour maps' as ComfyUI's
    writer cuts them to 8 bits."""
    import numpy as np
    from PIL import Image

    from headseg.nodes import kmeans_node
    from headseg.nodes.core.preview import label_colours

    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    monkeypatch.setattr(kmeans_node, "_PREVIEW_IMAGES", 1)  # the fixture's batch has 2 images
    out = nodes.MultiKMeans.execute(stack, "2,3", 0)
    sweep, colour_maps = out.args
    assert colour_maps.shape == (4, H, W, 3)  # every k and image
    want = torch.stack([label_colours(sweep.results[k].labels[:1], k)[0] for k in (2, 3)])  # image 0 of each k
    assert torch.equal(colour_maps[[0, 2]], want)
    assert len(out.ui["images"]) == 2 and out.ui["headseg_labels"] == ["k=2 #0", "k=3 #0"]
    for ref, colours in zip(out.ui["images"], want):
        assert ref["type"] == "temp"
        with Image.open(comfy_folders["temp"] / ref["subfolder"] / ref["filename"]) as im:
            assert im.mode == "P"
            shown = np.array(im.convert("RGB"))  # [H, W, 3] uint8
        assert np.array_equal(shown, np.clip(255.0 * colours.numpy(), 0, 255).astype(np.uint8))  # ComfyUI's writer's bytes
    assert out.ui["text"] == ["colour maps of the first 1 of 2 images shown; the colour_maps output holds all 2"]


def test_multi_kmeans_runs_of_a_list_of_unequal_batches_are_joined_by_comfyui(nodes, monkeypatch):
    """A list of latents of unequal batches (Rebatch Latents with batch_size 10 on 12 images: [10, 2]) runs
    Multi K-Means once per item, and ComfyUI's executor joins the runs' UI payloads by the first run's keys.
    The note on colour maps left out was in the payload of a batch beyond _PREVIEW_IMAGES only: a larger
    first item failed the whole prompt, after the clustering, with KeyError: 'text' raised in ComfyUI's own
    code, and a larger later item's note was dropped. Every run has the key; the joined text holds the note."""
    from execution import get_output_from_returns

    from headseg.nodes import kmeans_node

    def run(B, seed):
        rec = planted_recording([nested_scene(64, 64)] * B, layout=small_layout(heads=3), d=16, noise=0.2, seed=seed)
        feats = nodes.HeadPCA.execute(rec, "down+up", "all", 4).args[0]
        return nodes.MultiKMeans.execute(nodes.Upsample.execute(feats, "bilinear", False).args[0], "2,3", 0)

    monkeypatch.setattr(kmeans_node, "_PREVIEW_IMAGES", 2)
    large, small = run(3, 1), run(1, 2)
    note = "colour maps of the first 2 of 3 images shown; the colour_maps output holds all 3"
    for runs in ([large, small], [small, large]):
        _, joined, _ = get_output_from_returns(runs, nodes.MultiKMeans)
        assert joined["text"] == [note]
        assert len(joined["images"]) == len(joined["headseg_labels"]) == 2 * (2 + 1)  # k = 2, 3 of 2 + 1 images


def test_mask_select_refuses_outputs_that_would_not_fit_in_free_memory(nodes, recording, monkeypatch):
    """Mask Select's outputs grow with the masks at the pixel (a MASK batch and an overlay, 16 bytes per
    pixel each) and its working copies with the batch: when they would take more than 80 % of the free
    memory it stops with a message naming masks instead of running out of memory; settings that fit run."""
    from headseg.nodes import memory_checks

    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    merged = nodes.MaskMerge.execute(nodes.MultiKMeans.execute(stack, "2,5,6", 0).args[0], 0.9, 0.0).args[0]
    B, x, y = len(merged), W // 2, H // 3
    held = [int(ms.masks[:, y, x].sum()) for ms in merged]  # the masks holding the pixel, per image
    assert B == 2 and held[0] >= 2
    need = B * H * W * 4 + (held[0] + max(held)) * H * W + held[0] * H * W * 20 + H * W * 20
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(need / 0.8) - 1)
    with pytest.raises(ValueError, match=rf"^masks: the {held[0]} masks at pixel {x}, {y} as a MASK batch and overlays at "
                       rf"{W}x{H} pixels, and the chosen mask of 2 image\(s\) would take 0\.0 GiB, more than 80 % .* "
                       r"Use fewer cluster counts in Multi K-Means"):
        nodes.MaskSelectAtPixel.execute(merged, x, y, 0)
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(need / 0.8) + 1)
    mask, at_pixel, overlay, count = nodes.MaskSelectAtPixel.execute(merged, x, y, 0).args
    assert count == held[0]  # no more_points: every mask holding the pixel
    assert 4 * (at_pixel.numel() + overlay.numel()) == held[0] * H * W * 16  # the outputs the check counts
    assert 4 * mask.numel() == B * H * W * 4


def test_multi_kmeans_refuses_outputs_that_would_not_fit_before_clustering(nodes, recording, monkeypatch):
    """Multi K-Means keeps a uint8 label map and a float32 RGB colour map per k and image (13 bytes per
    pixel): when they would take more than 80 % of the free memory it stops at once with a message
    naming cluster_counts, instead of running out of memory after the clustering."""
    from headseg.nodes import kmeans_node, memory_checks
    from headseg.nodes.core import kmeans as core_kmeans

    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    need = 3 * 2 * H * W * 13 + 8 * 2 * H * W + 2**20  # k = 2, 3, 4 for the 2 images, and one k's int64 index
    ran = []
    monkeypatch.setattr(core_kmeans, "multi_kmeans", lambda *a, **kw: ran.append(1))
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(need / 0.8) - 1)
    with pytest.raises(ValueError, match=r"^cluster_counts: the label maps and colour maps of 3 cluster count\(s\) for 2 "
                       rf"image\(s\) at {W}x{H} pixels would take 0\.0 GiB, more than 80 % of the 0\.0 GiB free\. "
                       r"Use fewer cluster counts, or fewer images per batch"):
        nodes.MultiKMeans.execute(stack, "2,3,4", 0)
    assert ran == []  # refused before any clustering
    monkeypatch.undo()
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(need / 0.8) + 1)
    monkeypatch.setattr(kmeans_node, "kmeans_sweep_bytes", lambda stack, counts, busy: 0)  # the outputs' check alone (see below)
    sweep, colour_maps = nodes.MultiKMeans.execute(stack, "2,3,4", 0).args
    used = sum(r.labels.element_size() * r.labels.numel() for r in sweep.results.values())
    assert used + colour_maps.element_size() * colour_maps.numel() == need - 8 * 2 * H * W - 2**20  # the outputs counted


@pytest.mark.parametrize("threads", [1, 2])
def test_multi_kmeans_on_the_cpu_counts_the_working_memory_of_the_k_clustered_at_once(nodes, recording, monkeypatch, threads):
    """Each k clustered at once on the CPU (one per intra-op thread, the largest first) holds its working
    memory while it runs (kmeans_work_bytes: 0.3 GB at 2048x2048 for k = 20): with many threads and a
    large image the clustering alone could exhaust the memory. It is refused by name before any clustering
    when it would not fit."""
    import torch

    from headseg.nodes import kmeans_node, memory_checks
    from headseg.nodes.core import kmeans as core_kmeans

    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    busy = [4, 3][:threads]
    need = 3 * 2 * H * W + kmeans_node.kmeans_sweep_bytes(stack, [2, 3, 4], busy)  # label maps + work
    assert need > 3 * 2 * H * W * 13  # more than the outputs: their check alone lets it through
    ran = []

    class Reached(Exception):
        pass

    def stand_in(*args, **kwargs):
        ran.append(1)
        raise Reached

    monkeypatch.setattr(core_kmeans, "multi_kmeans", stand_in)
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(need / 0.8) - 1)
    with pytest.raises(ValueError, match=rf"^cluster_counts: clustering at {W}x{H} pixels on the CPU \(k = "
                       rf"{', '.join(map(str, busy))} at once, the working sets of every k, and the label maps\) would "
                       r"take .* Use fewer or "
                       r"smaller cluster counts, or smaller images, or run Multi K-Means on a GPU"):
        nodes.MultiKMeans.execute(stack, "2,3,4", 0, "cpu")
    assert ran == []
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(need / 0.8) + 1)
    with pytest.raises(Reached):  # let through to the clustering
        nodes.MultiKMeans.execute(stack, "2,3,4", 0, "cpu")
    assert ran == [1]


@pytest.mark.parametrize("k", [2, 20, 64])
def test_kmeans_work_estimate_bounds_what_one_k_allocates(nodes, recording, k):
    """kmeans_work_bytes is an upper estimate of what one k's clustering allocates on one thread (every
    tensor counted by PeakBytes), and not a wild one."""
    import torch

    from headseg.nodes import kmeans_node
    from headseg.nodes.core.kmeans import multi_kmeans
    from headseg.tests.support.peak_memory import PeakBytes

    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    one = dataclasses.replace(stack, grids=[g[:1] for g in stack.grids])  # one image
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the work on this thread, seen by PeakBytes
    try:
        with PeakBytes() as allocated:
            multi_kmeans(one, [k], seed=0)
    finally:
        torch.set_num_threads(threads)
    estimate = kmeans_node.kmeans_work_bytes(stack, k)
    assert allocated.peak <= estimate <= 4 * allocated.peak, (allocated.peak, estimate)


def test_kmeans_cpu_check_counts_every_ks_working_set_and_the_starts_four_score_tensors(nodes, monkeypatch):
    """Several large k on one thread: the working sets of every k (a Gram matrix of 4 * (16 k)^2 bytes each)
    are made before the first k runs and held until the last ends, and one k's k-means++ starts hold up to
    four [starts, k, n] float32 tensors at once. The CPU check counted one working set and three such
    tensors, per k running: 169 MB here, where the clustering allocated 234 MB."""
    from headseg.nodes import kmeans_node
    from headseg.nodes.core.upsample import FeatureStack
    from headseg.tests.support.peak_memory import PeakBytes

    g = torch.Generator().manual_seed(0)
    stack = FeatureStack([torch.randn(1, 4, 32, 32, generator=g)], [1.0], [[]], (64, 64), "bilinear")
    counted = []
    check = kmeans_node._check_memory
    monkeypatch.setattr(kmeans_node, "_check_memory", lambda need, *a: counted.append(need) or check(need, *a))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one k at a time, all on this thread, seen by PeakBytes
    try:
        with PeakBytes() as allocated:
            nodes.MultiKMeans.execute(stack, "200,250", 0, "cpu")
    finally:
        torch.set_num_threads(threads)
    clustering = counted[1]  # (counted[0]: the outputs, checked first)
    assert allocated.peak <= clustering <= 1.5 * allocated.peak, (allocated.peak, clustering)


def test_kmeans_output_check_counts_the_colour_maps_int64_index(nodes, monkeypatch):
    """After the clustering Multi K-Means draws each k's colour maps through label_colours, which gathers
    with an int64 copy of that k's label maps (8 bytes per pixel and image) beside the label maps and the
    colour_maps output: the check of its outputs (the only one when the clustering runs on a GPU) must
    count it. It counted 13 bytes per pixel per k and image, so a single k took 21."""
    from headseg.nodes import kmeans_node
    from headseg.nodes.core import kmeans as core_kmeans
    from headseg.nodes.core.upsample import FeatureStack
    from headseg.tests.support.peak_memory import PeakBytes

    g = torch.Generator().manual_seed(0)
    stack = FeatureStack([torch.randn(2, 3, 16, 16, generator=g)], [1.0], [[]], (256, 256), "bilinear")
    sweep = core_kmeans.multi_kmeans(stack, [2], seed=0)  # label maps [2, 256, 256] uint8
    monkeypatch.setattr(core_kmeans, "multi_kmeans", lambda *a, **kw: sweep)
    counted = []
    check = kmeans_node._check_memory
    monkeypatch.setattr(kmeans_node, "_check_memory", lambda need, *a: counted.append(need) or check(need, *a))
    with PeakBytes() as mem:
        nodes.MultiKMeans.execute(stack, "2", 0, "cpu")
    held = mem.peak + sweep.results[2].labels.numel()  # the label maps were made before the block
    assert held <= counted[0], (held, counted[0])


def test_kmeans_work_estimate_is_close_to_what_one_k_allocates_at_a_real_size(nodes):
    """At a real model's size (SD2.1's layers, 175 heads of 8 components, 512x512) kmeans_work_bytes stays
    an upper estimate of one k's clustering (every tensor on one thread) and within 1.5x of it: a wild
    over-estimate refuses sweeps that fit (it was 2 - 2.5x over: 55 MB for k = 20 here, which allocates 28 MB;
    285 MB at 1024x1024 for k = 64, which allocates 139 MB)."""
    from headseg.nodes import kmeans_node
    from headseg.nodes.core.kmeans import multi_kmeans
    from headseg.tests.core.planted import sd21_layout, split_scene
    from headseg.tests.support.peak_memory import PeakBytes

    rec = planted_recording([split_scene(512, 512, seed=0)], layout=sd21_layout(), d=64, noise=1.0, seed=0)
    feats = nodes.HeadPCA.execute(rec, "down+up", "all", 8).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the work on this thread, seen by PeakBytes
    try:
        with PeakBytes() as allocated:
            multi_kmeans(stack, [20], seed=0)
    finally:
        torch.set_num_threads(threads)
    estimate = kmeans_node.kmeans_work_bytes(stack, 20)
    assert allocated.peak <= estimate <= 1.5 * allocated.peak, (allocated.peak, estimate)


def test_pixel_of_a_larger_picture_outside_the_masks_is_mapped(nodes, recording, caplog):
    """A click on a 2x picture before the first run gives picture pixels: one outside the masks' frame is
    mapped through the stretch (or VAE Encode's crop) instead of failing the run."""
    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    masks = nodes.MaskMerge.execute(nodes.MultiKMeans.execute(stack, "2,5", 0).args[0], 0.9, 0.0).args[0]
    H, W = masks[0].masks.shape[-2:]
    x, y = W + W // 2, H + H // 3  # inside a 2x picture, outside the masks
    with caplog.at_level("WARNING", logger="HeadSeg"):
        got = nodes.MaskSelectAtPixel.execute(masks, x, y, 0, image=torch.rand(1, 2 * H, 2 * W, 3))
    (said,) = [r.getMessage() for r in caplog.records]  # a linked x, y in the picture's pixels is not silent
    assert f"x, y = {x}, {y} lie outside the masks' {W}x{H} grid but inside the {2 * W}x{2 * H} image" in said
    assert f"{x // 2}, {y // 2} on the masks' grid" in said
    caplog.clear()
    want = nodes.MaskSelectAtPixel.execute(masks, x // 2, y // 2, 0)
    assert not caplog.records
    assert got.ui["headseg_pixel"] == [x // 2, y // 2]
    assert got.ui["headseg_pixel_asked"] == [x, y]  # the picker sets its widgets to the mapped pixel
    assert torch.equal(got.args[1], want.args[1])
    assert got.ui["headseg_picture_size"] == [2 * W, 2 * H] and "headseg_picture_size" not in want.ui
    cropped = nodes.MaskSelectAtPixel.execute(masks, W + 2, H + 1, 0, image=torch.rand(1, H + 7, W + 5, 3))
    assert cropped.ui["headseg_pixel"] == [W - 1, H - 2]  # minus the crop offsets (5 // 2, 7 // 2), x clamped
    assert cropped.ui["headseg_picture_size"] == [W + 5, H + 7]  # as connected: the picker crops it as the node does
    caplog.clear()
    with caplog.at_level("WARNING", logger="HeadSeg"):  # outside both: the nearest pixel of the grid
        outside = nodes.MaskSelectAtPixel.execute(masks, 3 * W, 0, 0, image=torch.rand(1, 2 * H, 2 * W, 3))
    assert outside.ui["headseg_pixel"] == [W - 1, 0] and outside.ui["headseg_pixel_asked"] == [3 * W, 0]
    (said,) = [r.getMessage() for r in caplog.records]
    assert "nearest pixel of the grid is used" in said and "read as a pixel of the image" not in said


def test_more_points_keep_the_planted_regions_holding_them_or_not(nodes, scene, recording, caplog):
    """Head and body of the planted cat: with the body too, the cat and the foreground (not the head);
    leaving the ball out keeps the cat; leaving the body out, the head alone. For every image of the batch."""
    masks = masks_of(nodes, recording, "2,3,4")
    head, body, ball = (87, 71), (60, 150), (180, 120)
    names = {n: i for i, n in enumerate(scene.names)}
    for more, want in [
        (f"{body[0]},{body[1]}", ["cat", "foreground"]),
        (f"-{ball[0]},{ball[1]}", ["head", "cat"]),
        (f" {body[0]} , {body[1]} ; -{ball[0]},{ball[1]} ", ["cat"]),
        (f"-{body[0]},{body[1]}", ["head"]),
    ]:
        assert [n for n in want if n in scene.names] == want, scene.names
        out = nodes.MaskSelectAtPixel.execute(masks, *head, 1, None, more)
        chosen, at_pixel, _, count = out.args
        assert count == len(want), (more, count)
        for m, name in zip(at_pixel, want):
            assert iou(m > 0.5, scene.masks[names[name]]) >= 0.95, (more, name)
        for b in range(2):  # index 1 of each image's own narrowed list (past its end: the last)
            inc, exc = parse_points(more)
            here = masks_at_pixel(masks[b], *head, include=inc, exclude=exc)
            assert torch.equal(chosen[b].bool(), here.masks[min(1, len(here) - 1)]), (more, b)
        assert out.ui["headseg_points_asked"] == [more]
    out = nodes.MaskSelectAtPixel.execute(masks, *head, 0, None, f"{body[0]},{body[1]};-{ball[0]},{ball[1]}")
    assert out.ui["headseg_points"] == [[*body, 1], [*ball, 0]]
    with caplog.at_level("WARNING", logger="HeadSeg"):  # nothing left: zeros, and the log says which points
        none = nodes.MaskSelectAtPixel.execute(masks, *head, 0, None, f"{ball[0]},{ball[1]}; -{body[0]},{body[1]}")
    assert none.args[3] == 0 and not bool(none.args[0].any())
    assert any("fits more_points" in r.getMessage() and "remove a point" in r.getMessage() for r in caplog.records)


def test_more_points_of_a_larger_picture_are_mapped_and_past_the_grid_moved(nodes, recording, caplog):
    masks = masks_of(nodes, recording)
    picture = torch.rand(1, 2 * H, 2 * W, 3)
    out = nodes.MaskSelectAtPixel.execute(masks, 10, 10, 0, picture, f"{W + 20},{H + 40}; -{3 * W},5")
    assert out.ui["headseg_points"] == [[(W + 20) // 2, (H + 40) // 2, 1], [W - 1, 5, 0]]
    plain = nodes.MaskSelectAtPixel.execute(masks, 10, 10, 0, None, f"{W + 20},{H + 40}")  # no picture: moved
    assert plain.ui["headseg_points"] == [[W - 1, H - 1, 1]]
    caplog.clear()
    with caplog.at_level("WARNING", logger="HeadSeg"):  # as for x and y, the log says where they went
        nodes.MaskSelectAtPixel.execute(masks, 10, 10, 0, picture, f"3,4; {W + 20},{H + 40}; -{3 * W},5")
    (said,) = [r.getMessage() for r in caplog.records if "lie outside" in r.getMessage()]
    assert f"more_points {W + 20},{H + 40}; -{3 * W},5 lie outside the masks' {W}x{H} grid" in said
    assert f"read as {(W + 20) // 2},{(H + 40) // 2}; -{W - 1},5 " in said
    caplog.clear()
    with caplog.at_level("WARNING", logger="HeadSeg"):
        nodes.MaskSelectAtPixel.execute(masks, 10, 10, 0, picture, "3,4; -5,6")
    assert not [r for r in caplog.records if "lie outside" in r.getMessage()]


@pytest.mark.parametrize("text", ["12", "a,b", "1,2,3", "1.5,2", "1;2"])
def test_malformed_more_points_are_refused_when_queued_and_at_run_time(nodes, recording, text):
    said = nodes.MaskSelectAtPixel.validate_inputs(more_points=text)
    assert isinstance(said, str) and said.startswith("more_points: expected 'x,y' pixels"), said
    assert nodes.MaskSelectAtPixel.validate_inputs(more_points="1,2; -3,4") is True
    with pytest.raises(ValueError, match="^more_points: expected 'x,y' pixels"):
        nodes.MaskSelectAtPixel.execute(masks_of(nodes, recording), 1, 1, 0, None, text)


def test_more_points_past_the_limit_are_refused_when_queued_and_at_run_time(nodes, recording):
    """Hundreds of thousands of more_points (a damaged or crafted shared workflow, or a node linked to it) ran for
    seconds per image and went to the picker as one ring each: more than MAX_POINTS are refused by name, typed
    (the prompt check) or linked (the run)."""
    from headseg.nodes.core.masks import MAX_POINTS

    many = "; ".join(["3,4"] * (MAX_POINTS + 1))
    said = nodes.MaskSelectAtPixel.validate_inputs(more_points=many)
    assert isinstance(said, str) and said.startswith(f"more_points: expected at most {MAX_POINTS} 'x,y' pixels"), said
    with pytest.raises(ValueError, match=f"^more_points: expected at most {MAX_POINTS} 'x,y' pixels"):
        nodes.MaskSelectAtPixel.execute(masks_of(nodes, recording), 1, 1, 0, None, many)
    out = nodes.MaskSelectAtPixel.execute(masks_of(nodes, recording), 1, 1, 0, None, "; ".join(["3,4"] * MAX_POINTS))
    assert len(out.ui["headseg_points"]) == MAX_POINTS


def test_a_list_of_items_joined_by_comfyui_tells_the_first_items_share_of_the_payload(nodes, recording, comfy_folders):
    """A list input (latents from Rebatch Latents, here of two sizes) runs Mask Select once per item, and
    ComfyUI's executor joins the runs' UI payloads key by key. The picker shows the first item: headseg_item's
    counts pick its thumbnails, mask details and more_points pixels out of the joined lists."""
    from execution import get_output_from_returns

    small = planted_recording([nested_scene(96, 128)], layout=small_layout(heads=3), d=16, noise=0.2, seed=2)
    more = "40,30; -100,70; 5,5"
    runs = [nodes.MaskSelectAtPixel.execute(masks_of(nodes, rec, "2,3,5"), 60, 40, 0, None, more)
            for rec in (recording, small, recording)]  # fmt: skip
    _, joined, _ = get_output_from_returns(runs, nodes.MaskSelectAtPixel)
    first = runs[0].ui
    assert runs[0].args[3] != runs[1].args[3]  # the items have other numbers of masks at the pixel
    assert len(joined["headseg_masks"]) == sum(run.args[3] for run in runs)
    item = joined["headseg_item"][0]
    assert item == {"masks": runs[0].args[3], "points": len(parse_points(more)[0]) + len(parse_points(more)[1])}
    for key, count in (("headseg_masks", "masks"), ("headseg_mask_info", "masks"), ("headseg_points", "points")):
        assert joined[key][: item[count]] == first[key], key
    for key in ("headseg_image", "headseg_size", "headseg_pixel", "headseg_index", "headseg_points_asked"):
        assert joined[key][: len(first[key])] == first[key], key


def masks_of(nodes, recording, counts="2,5"):
    feats = nodes.HeadPCA.execute(recording, "down+up", "all", 4).args[0]
    stack = nodes.Upsample.execute(feats, "bilinear", False).args[0]
    return nodes.MaskMerge.execute(nodes.MultiKMeans.execute(stack, counts, 0).args[0], 0.9, 0.0).args[0]


@pytest.mark.parametrize(
    "asked, used",
    [
        ((W, 0), (W - 1, 0)),  # one past the right edge
        ((0, H), (0, H - 1)),  # one past the bottom edge
        ((256, 256), (W - 1, H - 1)),  # the examples' pixel (of 512x512) on this 256x192 image
        ((W + 500, 17), (W - 1, 17)),  # only x is moved
    ],
)
def test_pixel_past_the_grid_is_the_nearest_pixel_of_it(nodes, recording, caplog, asked, used):
    """x, y past the right / bottom edge of the masks (the examples' 256, 256 on a smaller image, or a pixel
    kept from a larger one) are moved to the nearest pixel of the grid, with a log line, instead of failing
    the run: a failed run sends the picker no picture, so queueing again failed the same way. The UI
    reports the pixel used beside the one asked (the picker sets its widgets to it)."""
    masks = masks_of(nodes, recording)
    with caplog.at_level("WARNING", logger="HeadSeg"):
        got = nodes.MaskSelectAtPixel.execute(masks, *asked, 1)
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(
        f"HeadSeg Mask Select: x, y = {asked[0]}, {asked[1]} lie outside the masks' {W}x{H} grid (x from 0 to "
        f"{W - 1}, y from 0 to {H - 1}: pixels of the sampled image), so the nearest pixel of the grid is used: "
        f"{used[0]}, {used[1]}."
    ), said
    caplog.clear()
    with caplog.at_level("WARNING", logger="HeadSeg"):
        want = nodes.MaskSelectAtPixel.execute(masks, *used, 1)
    assert not caplog.records  # a pixel of the grid is silent
    assert got.ui["headseg_pixel"] == list(used) and got.ui["headseg_pixel_asked"] == list(asked)
    assert want.ui["headseg_pixel"] == want.ui["headseg_pixel_asked"] == list(used)
    assert got.args[3] == want.args[3] >= 1
    for a, b in zip(got.args[:3], want.args[:3]):  # mask, masks_at_pixel, overlay
        assert torch.equal(a, b)
    assert got.ui["headseg_index"] == want.ui["headseg_index"]
    assert got.ui["headseg_mask_info"] == want.ui["headseg_mask_info"]


def test_picture_of_another_aspect_ratio_is_stretched_with_a_log_line(nodes, recording, caplog):
    """A picture of another aspect ratio than the masks (more than 1 % off) is stretched, and the log says
    so, once per pair of sizes (not at every click in the picker): it is most likely the unscaled photo.
    Same ratio, VAE Encode's crop (up to 7 px larger) and a ratio within 1 % are silent."""
    from headseg.nodes import mask_select_node

    mask_select_node._stretch_warned.clear()
    masks = masks_of(nodes, recording, "2")
    for h, w, warned in [
        (H, W, False),
        (2 * H, 2 * W, False),  # the same ratio, larger
        (H + 7, W + 5, False),  # VAE Encode's crop
        (2 * H, 2 * W + 4, False),  # 0.8 % wider: within 1 %
        (2 * H, 2 * W + 8, True),  # 1.6 % wider
        (H, W + 8, True),  # 3 % wider, 8 px more: not VAE Encode's crop
        (W, W, True),  # square: the unscaled photo
        (4 * H, W, True),
    ]:
        caplog.clear()
        with caplog.at_level("WARNING", logger="HeadSeg"):
            out = nodes.MaskSelectAtPixel.execute(masks, 5, 5, 0, image=torch.rand(1, h, w, 3))
        assert out.args[2].shape[1:3] == (H, W)
        said = [r.getMessage() for r in caplog.records]
        if not warned:
            assert said == [], (h, w, said)
            continue
        assert said == [
            f"HeadSeg Mask Select: the {w}x{h} image has another aspect ratio than the masks' {W}x{H} grid, so "
            "the picture and the overlays are stretched to the grid; the image is probably the picture before "
            "it was scaled to the sampled size: connect the scaled one (or the decoded image)."
        ], (h, w, said)
        caplog.clear()
        with caplog.at_level("WARNING", logger="HeadSeg"):
            nodes.MaskSelectAtPixel.execute(masks, 6, 5, 0, image=torch.rand(1, h, w, 3))  # a second click
        assert caplog.records == []


def _spread_error_map(stack) -> torch.Tensor:
    """The [B, H, W] eq. 6 error that Upsampling Error Map draws: its lattice values, each filling its block."""
    from headseg.nodes.core.error_map import upsampling_error_blocks

    small, by_row, by_col = upsampling_error_blocks(stack)  # [B, ny, nx], [H], [W]
    return small if by_row is None else small.index_select(1, by_row).index_select(2, by_col)  # [B, H, W]


def test_error_map_of_a_large_image_is_computed_at_a_lattice():
    """Above 256x256 pixels the preview is the exact eq. 6 error at every f-th pixel, filling its block."""
    from headseg.nodes.core.error_map import upsampling_error
    from headseg.nodes.core.upsample import FeatureStack

    g = torch.Generator().manual_seed(0)
    grids = [torch.randn(2, 3, 13, 11, generator=g), torch.randn(2, 2, 7, 6, generator=g)]
    stack = FeatureStack(grids, [1.0, 1.0], [[], []], (600, 520), "bilinear")
    preview = _spread_error_map(stack)  # f = ceil(sqrt(600 * 520 / 65536)) = 3
    full = upsampling_error(stack)
    assert preview.shape == full.shape == (2, 600, 520)
    f = 3
    torch.testing.assert_close(preview[:, 1::f, 1::f], full[:, 1::f, 1::f], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(preview[:, 0:f, 0:f], full[:, 1:2, 1:2].expand(2, f, f), rtol=1e-5, atol=1e-6)
    small = FeatureStack([x[:, :, :5, :5] for x in grids], [1.0, 1.0], [[], []], (64, 64), "bilinear")
    torch.testing.assert_close(_spread_error_map(small), upsampling_error(small))  # small: all pixels


def _block_sweep(B, H, W, ks=(2, 5, 10, 20)):
    """A ClusterSweep whose clusters are all non-empty and pairwise unlike (every mask survives a merge)."""
    from headseg.nodes.core.kmeans import ClusterSweep, KMeansResult

    results = {}
    for k in ks:
        lab = (torch.arange(H * W).view(H, W) * 7919 // 1000) % k  # [H, W]
        lab = torch.stack([lab.roll(b * 13, 1) for b in range(B)])  # [B, H, W]
        results[k] = KMeansResult(k, lab, torch.zeros(B, k, 1), torch.zeros(B, dtype=torch.float64), 1)
    return ClusterSweep(results, (H, W))


def test_all_masks_of_every_image_is_built_without_a_second_copy(nodes):
    """batch_index = -1 puts every image's merged masks in one MASK batch: its memory check counts that
    batch once (4 bytes per mask and pixel), so the node must not hold it twice (per-image float copies
    joined by torch.cat) at its peak."""
    from headseg.tests.support.peak_memory import PeakBytes

    sweep = _block_sweep(3, 64, 64)
    with PeakBytes() as mem:
        masks, every = nodes.MaskMerge.execute(sweep, 0.9, 0.0, -1).args
    kept = sum(m.masks.numel() for m in masks)  # bool masks of every image, kept in the output
    assert every.shape == (37 * 3, 64, 64)
    assert torch.equal(every, torch.cat([m.masks for m in masks]).float())
    assert mem.peak <= every.numel() * 4 + kept + 37 * 64 * 64 * 3, (mem.peak, every.numel() * 4)


def test_error_map_of_a_batch_is_coloured_without_full_size_temporaries(nodes):
    """The error_map IMAGE is error_map_image of the lattice preview, bit for bit, coloured where it is
    computed: colouring the full-size map of a batch held about five times the picture in float
    temporaries (252 MB for four SDXL images at 1024 x 1024, whose picture is 50 MB)."""
    from headseg.nodes.core.preview import error_map_image
    from headseg.nodes.core.upsample import FeatureStack
    from headseg.tests.support.peak_memory import PeakBytes

    g = torch.Generator().manual_seed(0)
    grids = [torch.randn(3, 2, 16, 12, generator=g), torch.randn(3, 2, 8, 6, generator=g)]
    grids[0][1] = 0.0  # image 1: no error in this grid
    stack = FeatureStack(grids, [1.0, 1.0], [[], []], (1000, 760), "bilinear")  # f = 4: a 250 x 190 lattice
    want = error_map_image(_spread_error_map(stack))  # [3, 1000, 760, 3]
    with PeakBytes() as mem:
        got = nodes.UpsamplingErrorMap.execute(stack).args[0]
    assert torch.equal(got, want)
    picture = got.numel() * 4
    assert mem.peak <= picture + picture // 2, (mem.peak, picture)  # the rows spread first: a quarter of it


def test_error_map_estimate_counts_the_preview_conversion_beside_the_picture(nodes):
    """Upsampling Error Map's preview PNG of the first image is made by ComfyUI's writer, which converts it
    through two float32 numpy copies (255 x, clipped: 24 bytes per pixel) while the error_map output (12
    bytes per pixel and image) is alive: its memory check must count them. It counted the tensors alone
    (a 2048x2048 image: 78 MB allowed, 152 MB of RSS at the peak)."""
    import tracemalloc

    from headseg.nodes import upsample_nodes
    from headseg.nodes.core.upsample import FeatureStack

    g = torch.Generator().manual_seed(0)
    grids = [torch.randn(1, 2, 16, 16, generator=g), torch.randn(1, 2, 8, 8, generator=g)]
    stack = FeatureStack(grids, [1.0, 1.0], [[], []], (2048, 2048), "bilinear")
    tracemalloc.start()  # numpy's arrays are traced (torch's tensors are not)
    try:
        error_map = nodes.UpsamplingErrorMap.execute(stack).args[0]
        _, converted = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    held = error_map.numel() * 4 + converted  # both alive while the PNG is made
    assert converted >= 20 * 2048 * 2048, converted
    assert held <= upsample_nodes.error_map_bytes(stack), (held, upsample_nodes.error_map_bytes(stack))


@pytest.mark.parametrize("B, size", [(4, (256, 256)), (4, (200, 150)), (3, (1000, 760))])
def test_error_map_refuses_a_picture_that_would_not_fit_in_free_memory(nodes, monkeypatch, B, size):
    """Upsampling Error Map's picture is 12 bytes per pixel and image (a batch of 16384 x 16384 recordings:
    3.2 GB each): when what it allocates would take more than 80 % of the free memory it stops at once with
    a message naming stack, like the other nodes, instead of running out of memory. Its estimate
    (error_map_bytes) bounds what it allocates, at every pixel of a small image and at a lattice of a large one."""
    from headseg.nodes import memory_checks, upsample_nodes
    from headseg.nodes.core import error_map as core_error_map
    from headseg.nodes.core.upsample import FeatureStack
    from headseg.tests.support.peak_memory import PeakBytes

    g = torch.Generator().manual_seed(0)
    grids = [torch.randn(B, 40, 32, 32, generator=g), torch.randn(B, 40, 8, 8, generator=g)]
    stack = FeatureStack(grids, [1.0, 1.0], [[], []], size, "bilinear")
    need = upsample_nodes.error_map_bytes(stack)
    H, W = size
    ran = []
    monkeypatch.setattr(core_error_map, "upsampling_error_blocks", lambda stack: ran.append(1))
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(need / 0.8) - 1)
    with pytest.raises(ValueError, match=rf"^stack: the upsampling-error map of {B} image\(s\) at {W}x{H} pixels "
                       r"would take 0\.\d GiB, more than 80 % of the 0\.\d GiB free\. Leave Upsampling Error Map out"):
        nodes.UpsamplingErrorMap.execute(stack)
    assert ran == []  # refused before any work
    monkeypatch.undo()
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(need / 0.8) + 1)
    with PeakBytes() as mem:
        error_map = nodes.UpsamplingErrorMap.execute(stack).args[0]
    assert error_map.shape == (B, H, W, 3)
    assert 12 * B * H * W <= mem.peak <= need, (mem.peak, need)


def test_head_pca_memory_check_counts_the_principal_components_and_their_working_copies(nodes, monkeypatch):
    """Head PCA's memory check counts what the PCA itself allocates, not only the pca_rgb picture: the
    features it outputs (4 bytes per component, token and head) and the float32 centred copy of each layer
    being reduced. It counted the picture alone (a 64-pixel tile per head, whatever the image size), so for
    two SD2.1 images at 1024x1024 it allowed 22 MB where the node took 95 MB of tensors (203 MB of RSS on
    two threads), and more with larger images or components."""
    from headseg.nodes import head_pca_node, memory_checks
    from headseg.tests.support.peak_memory import PeakBytes

    rec = planted_recording([nested_scene(256, 256)] * 2, layout=small_layout(heads=5), d=64)  # grids 32x32 .. 4x4
    counted = []
    check = head_pca_node._check_memory
    monkeypatch.setattr(head_pca_node, "_check_memory", lambda need, *a: counted.append(need) or check(need, *a))
    monkeypatch.setattr(memory_checks, "available_memory", lambda: 1 << 40)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the PCA on this thread, seen by PeakBytes
    try:
        with PeakBytes() as mem:
            nodes.HeadPCA.execute(rec, "down+up", "all", 8)
    finally:
        torch.set_num_threads(threads)
    assert len(counted) == 1
    assert mem.peak <= counted[0] <= 2 * mem.peak, (mem.peak, counted[0])


def test_head_pca_names_components_beyond_the_head_width_before_its_memory_check(nodes, recording, monkeypatch):
    """components is checked against the selected heads' width before the memory check, which counts 4
    bytes per component, token and head: 1024 components (the widget's maximum) of 16-wide heads were
    refused as memory 'recording: the 1024 principal components ... Select fewer layers' where the input
    at fault is components (a large recording, or little free memory)."""
    from headseg.nodes import head_pca_node, memory_checks
    from headseg.nodes.core import pca as core_pca

    selected = recording.select(positions=("down", "up"))
    fits = core_pca.recording_pca_bytes(selected, 16) + head_pca_node.pca_rgb_bytes(selected)
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(fits / 0.8) + 1)  # 16 components fit
    with pytest.raises(ValueError, match=r"^components must be between 1 and the head dimension 16 of layer "):
        nodes.HeadPCA.execute(recording, "down+up", "all", 1024)
    assert nodes.HeadPCA.execute(recording, "down+up", "all", 16).args[0].components == 16


def test_head_pca_refuses_a_picture_of_more_heads_than_fit_in_free_memory(nodes, monkeypatch):
    """pca_rgb draws a 64-pixel tile per head: a recording file can hold any number of heads (one layer of
    200 000 heads of width 1 is a 400 kB file, and its picture 9.8 GB). When the picture would take more than
    80 % of the free memory Head PCA stops before the PCA with a message naming recording; the estimate
    (pca_rgb_bytes) bounds what pca_rgb_grid allocates."""
    from headseg.nodes import head_pca_node, memory_checks
    from headseg.nodes.core import pca as core_pca
    from headseg.nodes.core import preview as core_preview
    from headseg.nodes.core.recording import LayerKey
    from headseg.tests.support.peak_memory import PeakBytes

    g = torch.Generator().manual_seed(0)
    layers = {LayerKey("input", 1, 0): torch.randn(1, 600, 2, 3, 2, generator=g), LayerKey("output", 9, 0): torch.randn(1, 4, 2, 3, 2, generator=g)}
    rec = Recording(layers, (16, 24))
    need = core_pca.recording_pca_bytes(rec, 2) + head_pca_node.pca_rgb_bytes(rec)
    assert need >= 12 * 2 * 43 * 600 * 64  # the picture: 2 rows of 43 x 64 tiles, 600 tiles wide
    ran = []
    monkeypatch.setattr(core_pca, "recording_pca", lambda *a, **kw: ran.append(1))
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(need / 0.8) - 1)
    with pytest.raises(ValueError, match=r"^recording: the 2 principal components of the 604 selected heads in 2 layer\(s\) "
                       r"and pca_rgb, their picture \(38400x86 pixels\), would take 0\.\d GiB, more than 80 % of the 0\.\d GiB free\. Select fewer layers"):
        nodes.HeadPCA.execute(rec, "down+up", "all", 2)
    assert ran == []  # refused before the PCA
    monkeypatch.undo()
    monkeypatch.setattr(memory_checks, "available_memory", lambda: int(need / 0.8) + 1)
    assert nodes.HeadPCA.execute(rec, "down+up", "all", 2).args[1].shape == (1, 86, 38400, 3)
    sd21 = planted_recording([nested_scene(256, 256)], layout=small_layout(heads=5), d=4)  # grids 32x32 .. 4x4
    for r in (rec, sd21):
        feats = core_pca.recording_pca(r, 2)
        with PeakBytes() as mem:
            core_preview.pca_rgb_grid(feats)
        assert mem.peak <= head_pca_node.pca_rgb_bytes(r), (mem.peak, head_pca_node.pca_rgb_bytes(r))


def test_head_pca_picture_estimate_at_every_step_th_pixel_counts_only_the_pixels_drawn(nodes):
    """With pca_rgb unread Head PCA draws only the picture it shows (every f-th pixel of a long grid), and its
    memory check counts pca_rgb_bytes(rec, f): that bounds what pca_rgb_grid allocates at that step, and counts
    the pixels drawn, not the whole picture's (it counted SDXL's 3840 x 1280 grid, 59 MB, where 15 MB are
    drawn)."""
    from headseg.nodes import head_pca_node
    from headseg.nodes.core import pca as core_pca
    from headseg.nodes.core import preview as core_preview
    from headseg.nodes.core.recording import LayerKey
    from headseg.tests.core.planted import sd21_layout, sdxl_layout
    from headseg.tests.support.peak_memory import PeakBytes

    wide = {LayerKey("input", 1, 0): torch.randn(1, 3000, 2, 3, 2, generator=torch.Generator().manual_seed(0))}
    recordings = [
        planted_recording([nested_scene(64, 64)], layout, d=4).select(positions=("down", "up"))
        for layout in (sd21_layout(), sdxl_layout())
    ] + [Recording(wide, (16, 24))]  # one layer of 3000 heads: 43 x 192 000 pixels
    for rec in recordings:
        feats = core_pca.recording_pca(rec, 2)
        height, width = core_preview.pca_rgb_grid_size(rec.layers, rec.image_size)
        rest = head_pca_node.pca_rgb_bytes(rec) - 12 * height * width  # what is not the picture, drawn whole
        for step in sorted({1, 2, head_pca_node._preview_step(height, width)}):
            with PeakBytes() as mem:
                drawn = core_preview.pca_rgb_grid(feats, step=step)
            need = head_pca_node.pca_rgb_bytes(rec, step)
            assert mem.peak <= need, (step, mem.peak, need)
            assert need - 12 * drawn.shape[1] * drawn.shape[2] <= rest, (step, need)
    assert head_pca_node._preview_step(height, width) == 94  # the wide one's: shown 1 x 2043 pixels


class _BoolToFloatCopies:
    """A dispatch mode counting the ops that read a bool tensor and write float32 values (copy_, _to_copy):
    the slow way to turn masks into MASKs (torch converts their uint8 bytes about 1.3 - 1.4x as fast)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                reads_bool = any(isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args)
                if reads_bool and isinstance(out, torch.Tensor) and out.dtype == torch.float32:
                    seen.append(str(func))
                return out

        self.mode = Mode()


def test_masks_become_mask_outputs_from_their_bytes(nodes, recording):
    """Mask Merge's all_masks and Mask Select's mask and masks_at_pixel copy the bool masks into float32
    through their uint8 bytes: the same 0/1 values, about 15 - 20 % of Mask Merge's time less for SDXL at
    1024 x 1024, where filling all_masks is most of the node after the merge."""
    _, (_, _, sweep, _) = run_chain(nodes, recording, 180, 120)  # inside the ball: ball, foreground
    counter = _BoolToFloatCopies()
    with counter.mode:
        merged, every = nodes.MaskMerge.execute(sweep, 0.9, 0.0, -1).args
        chosen, at_pixel, _, count = nodes.MaskSelectAtPixel.execute(merged, 180, 120, 1).args
    assert counter.seen == []
    assert torch.equal(every, torch.cat([m.masks for m in merged]).float())
    here = [masks_at_pixel(m, 180, 120) for m in merged]
    assert count == len(here[0]) > 1
    assert torch.equal(at_pixel, here[0].masks.float())
    assert torch.equal(chosen, torch.stack([h.masks[min(1, len(h) - 1)].float() for h in here]))
    assert every.dtype == at_pixel.dtype == chosen.dtype == torch.float32
