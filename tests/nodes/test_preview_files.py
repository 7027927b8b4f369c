"""Preview PNGs: a picture that stays the same is written once (preview_refs(reuse=True)), and Mask
Select's thumbnails are written at up to 512 x 512 pixels' worth while its picture keeps its size."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture()
def previews():
    from headseg.nodes import previews

    previews._saved_previews.clear()
    yield previews
    previews._saved_previews.clear()


def flat(value: float, h: int = 4, w: int = 6) -> torch.Tensor:
    return torch.full((1, h, w, 3), value)


def name(refs) -> str:
    (ref,) = refs
    return ref["filename"]


def test_same_bytes_in_another_shape_get_their_own_file(previews):
    """One colour at 4x6 and at 6x4: the same pixel bytes, two pictures."""
    assert name(previews.preview_refs(flat(0.3, 4, 6), reuse=True)) != name(previews.preview_refs(flat(0.3, 6, 4), reuse=True))


def test_pictures_are_told_apart_by_the_bytes_the_png_writer_sees(previews):
    """ComfyUI writes clip(255 x, 0, 255) cut to an integer: 10.2 and 10.8 are both written as 10 (one
    file will do), 10.8 and 11.2 as 10 and 11 (two files), though both round to 11."""
    a = name(previews.preview_refs(flat(10.2 / 255), reuse=True))
    assert name(previews.preview_refs(flat(10.8 / 255), reuse=True)) == a
    assert name(previews.preview_refs(flat(11.2 / 255), reuse=True)) != a


def test_the_last_pictures_used_are_kept(previews, comfy_folders):
    """The _SAVED_PREVIEWS_KEPT pictures used last are reused; the least recently used one goes first."""
    n = previews._SAVED_PREVIEWS_KEPT
    pictures = [flat(i / (n + 4)) for i in range(n + 1)]
    names = [name(previews.preview_refs(p, reuse=True)) for p in pictures[:n]]
    assert len(set(names)) == n
    assert name(previews.preview_refs(pictures[0], reuse=True)) == names[0]  # used again: now the most recent
    previews.preview_refs(pictures[n], reuse=True)  # one more: the least recently used (picture 1) goes
    assert name(previews.preview_refs(pictures[0], reuse=True)) == names[0]
    for i in range(2, n):
        assert name(previews.preview_refs(pictures[i], reuse=True)) == names[i], i
    assert name(previews.preview_refs(pictures[1], reuse=True)) != names[1]  # written again


def test_a_batch_reuses_each_saved_picture_and_writes_the_others(previews, comfy_folders, monkeypatch):
    """Mask Select's thumbnails at another pixel often share a few pictures with the last run's (the
    coarse masks, in the same place of the list): those refs are reused, one by one, the others written;
    the refs keep the batch's order and each file holds its picture's bytes."""
    import numpy as np
    from PIL import Image

    monkeypatch.setattr(previews.os, "cpu_count", lambda: 4)  # the threaded path on any machine
    pictures = torch.rand(5, 9, 7, 3, generator=torch.Generator().manual_seed(0))  # [5, 9, 7, 3]
    first = previews.preview_refs(pictures[:3], reuse=True)
    files = lambda: sorted(p.name for p in comfy_folders["temp"].rglob("*.png"))  # noqa: E731
    before = files()
    refs = previews.preview_refs(pictures[[3, 1, 4, 0]], reuse=True)
    assert refs[1] == first[1] and refs[3] == first[0]
    assert len(files()) == len(before) + 2 and len({r["filename"] for r in refs + first}) == 5
    for b, ref in zip([3, 1, 4, 0], refs):
        read = np.asarray(Image.open(comfy_folders["temp"] / ref["subfolder"] / ref["filename"]).convert("RGB"))
        assert np.array_equal(read, (pictures[b] * 255.0).clamp(0, 255).to(torch.uint8).numpy()), b


@pytest.mark.parametrize("B", [1, 2, 5, 13])
def test_a_batch_is_written_one_file_per_picture_in_order(previews, comfy_folders, B, monkeypatch):
    """The pictures of a batch are written on several threads: every ref names its own file, and the
    file holds that picture's bytes (as ComfyUI writes them: clip(255 x) cut to an integer)."""
    import numpy as np
    from PIL import Image

    monkeypatch.setattr(previews.os, "cpu_count", lambda: 4)  # the threaded path on any machine

    pictures = torch.rand(B, 9, 7, 3, generator=torch.Generator().manual_seed(B))  # [B, 9, 7, 3]
    refs = previews.preview_refs(pictures)
    assert len(refs) == B and len({(r["subfolder"], r["filename"]) for r in refs}) == B
    for b, ref in enumerate(refs):
        assert ref["type"] == "temp"
        read = np.asarray(Image.open(comfy_folders["temp"] / ref["subfolder"] / ref["filename"]).convert("RGB"))
        expected = (pictures[b] * 255.0).clamp(0, 255).to(torch.uint8).numpy()
        assert np.array_equal(read, expected), b


def test_batches_with_the_same_random_prefix_keep_every_picture(previews, comfy_folders, monkeypatch):
    """Even when two batches draw the same random prefix, no picture overwrites another: the index in
    the batch is part of the name, and ComfyUI's writer counts up past files already there."""
    import numpy as np
    from PIL import Image

    monkeypatch.setattr(previews.secrets, "token_hex", lambda n: "same")
    monkeypatch.setattr(previews.os, "cpu_count", lambda: 4)  # the threaded path on any machine
    batches = [torch.rand(4, 5, 6, 3, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    refs = [previews.preview_refs(pictures) for pictures in batches]
    names = {r["filename"] for part in refs for r in part}
    assert len(names) == 8
    for pictures, part in zip(batches, refs):
        for picture, ref in zip(pictures, part):
            read = np.asarray(Image.open(comfy_folders["temp"] / ref["subfolder"] / ref["filename"]).convert("RGB"))
            assert np.array_equal(read, (picture * 255.0).clamp(0, 255).to(torch.uint8).numpy())


def test_a_picture_saved_for_reuse_is_the_png_comfyuis_writer_writes(previews, comfy_folders):
    """preview_refs(reuse=True) writes the PNG itself, from the 8-bit pixels it keys the picture on: byte for
    byte the file ComfyUI's writer makes of the picture (without reuse), at the edges of 8-bit values too."""
    edges = torch.tensor([0.0, 1.0, 10.2 / 255, 10.8 / 255, 11.2 / 255, 0.5, 254.999 / 255, 1e-7])
    pictures = torch.rand(3, 9, 7, 3, generator=torch.Generator().manual_seed(5))  # [3, 9, 7, 3]
    pictures[0].view(-1)[: edges.numel()] = edges
    read = lambda ref: (comfy_folders["temp"] / ref["subfolder"] / ref["filename"]).read_bytes()  # noqa: E731
    theirs = previews.preview_refs(pictures)
    ours = previews.preview_refs(pictures, reuse=True)
    assert [read(r) for r in ours] == [read(r) for r in theirs]
    previews._saved_previews.clear()  # the same pictures stored channel by channel (as a stretched image's overlay is)
    strided = previews.preview_refs(pictures.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1), reuse=True)
    assert [read(r) for r in strided] == [read(r) for r in theirs]
    assert all(r["type"] == "temp" and r["filename"].endswith("_00001_.png") for r in ours)
    nan = flat(0.5).clone()
    nan[0, 1, 2, 0] = float("nan")  # no 8-bit value to key it on: written as ComfyUI writes it, every time
    assert name(previews.preview_refs(nan, reuse=True)) != name(previews.preview_refs(nan, reuse=True))


def test_without_reuse_every_call_writes_a_file(previews):
    assert name(previews.preview_refs(flat(0.5))) != name(previews.preview_refs(flat(0.5)))


@pytest.mark.parametrize("H, W", [(768, 1024), (1024, 576)])
def test_mask_select_thumbnails_at_512_squared_pixels_worth(previews, comfy_folders, H, W):
    from PIL import Image

    from headseg.nodes.core.masks import MaskSet
    from headseg.nodes.mask_select_node import MaskSelectAtPixel

    masks = torch.zeros(2, H, W, dtype=torch.bool)
    masks[0, : H // 2] = True
    masks[1] = True
    ms = MaskSet(masks, torch.tensor([2, 1]), torch.tensor([0, 0]))
    out = MaskSelectAtPixel.execute([ms], 5, 5, 0, torch.rand(1, H, W, 3))
    size = lambda ref: Image.open(comfy_folders["temp"] / ref["subfolder"] / ref["filename"]).size  # noqa: E731
    assert size(out.ui["headseg_image"][0]) == (W, H)
    assert out.args[2].shape == (2, H, W, 3)  # the overlay output keeps the masks' size
    for ref in out.ui["headseg_masks"]:
        w, h = size(ref)
        assert 0.99 * 512 * 512 <= w * h <= 512 * 512 and abs(w / h - W / H) < 0.01


def test_head_pca_shows_a_long_grid_at_every_other_pixel_and_outputs_all_of_it(previews, comfy_folders):
    """SDXL's 60 layers of down+up make a 3840 x 1280 grid: the node's preview PNG holds every 2nd row and
    column of it (at most 2048 px per side, the colours the PNG writer makes of them), the pca_rgb
    output every pixel; SD2.1's 960 x 1280 grid is shown whole."""
    import numpy as np
    from PIL import Image

    from headseg.nodes.head_pca_node import HeadPCA
    from headseg.tests.core.planted import nested_scene, planted_recording, sd21_layout, sdxl_layout

    def shown(ref):
        with Image.open(comfy_folders["temp"] / ref["subfolder"] / ref["filename"]) as im:
            return torch.from_numpy(np.array(im))  # [h, w, 3] uint8

    eight_bit = lambda x: (255.0 * x).clamp(0, 255).to(torch.uint8)  # noqa: E731  as ComfyUI's writer
    for layout, size, f in ((sdxl_layout(), (3840, 1280), 2), (sd21_layout(), (960, 1280), 1)):
        rec = planted_recording(nested_scene(32, 32), layout, d=8, noise=0.5, seed=0)
        out = HeadPCA.execute(rec, "down+up", "all", 3, device="cpu")
        grid = out.args[1]  # [1, H, W, 3]
        assert tuple(grid.shape) == (1, *size, 3)
        (ref,) = out.ui["images"]
        assert torch.equal(shown(ref), eight_bit(grid[0, ::f, ::f]))


def test_a_label_preview_reads_back_as_preview_refs_writes_its_colour_map(previews, comfy_folders):
    """label_previews' palette PNG of a label map with all 256 labels (the fixed colours and the golden-ratio
    hues) holds, read back, the pixels of the PNG that preview_refs writes of its colour map."""
    import numpy as np
    from PIL import Image

    from headseg.nodes.core.preview import label_colours, palette

    labels = torch.arange(256).repeat_interleave(3).view(24, 32).flip(0)  # [24, 32], every label three times
    (palette_ref,) = previews.label_previews([(labels, palette(256))])
    (rgb_ref,) = previews.preview_refs(label_colours(labels[None], 256))

    def read(ref):
        with Image.open(comfy_folders["temp"] / ref["subfolder"] / ref["filename"]) as im:
            return im.mode, np.array(im.convert("RGB"))

    (mode, shown), (_, want) = read(palette_ref), read(rgb_ref)
    assert mode == "P" and shown.shape == (24, 32, 3) and np.array_equal(shown, want)
