"""Preview pictures: shapes, value range, determinism and planted content."""

import dataclasses

import pytest
import torch

from headseg.nodes.core.pca import HeadFeatures
from headseg.nodes.core.preview import (
    _HEAT_ANCHORS,
    error_map_image,
    fit_to_pixels,
    label_colours,
    overlay_masks,
    palette,
    pca_rgb_grid,
    pca_rgb_grid_size,
)
from headseg.nodes.core.recording import LayerKey


def assert_image(img, shape):
    assert img.shape == shape
    assert img.dtype == torch.float32
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0


@pytest.mark.parametrize("k", [1, 2, 20, 21, 64])
def test_palette_distinct_and_fixed(k):
    p = palette(k)
    assert_image(p, (k, 3))
    assert len({tuple(c) for c in p.tolist()}) == k
    assert torch.equal(palette(k), p)
    assert torch.equal(palette(k + 5)[:k], p)  # growing k keeps earlier colours


def test_palette_beyond_twenty_follows_golden_ratio_hues():
    """Colours 20 and up: hue i / golden ratio, saturation and value alternating in runs of 7 and 3
    (colour maps at k > 20 keep their colours from version to version); HSV converted by colorsys."""
    import colorsys

    got = palette(64)[20:]
    want = [
        colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.55 + 0.35 * ((i // 7) % 2), 0.95 - 0.25 * ((i // 3) % 2))
        for i in range(20, 64)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=0, atol=1e-6)


def test_label_colours():
    labels = torch.tensor([[[0, 1], [2, 1]], [[2, 2], [0, 0]]])  # [2, 2, 2]
    img = label_colours(labels, 3)
    assert_image(img, (2, 2, 2, 3))
    p = palette(3)
    assert torch.equal(img[0, 0, 1], p[1]) and torch.equal(img[1, 0, 0], p[2])
    assert torch.equal(img[0, 0, 1], img[0, 1, 1])  # same label, same colour
    assert torch.equal(label_colours(labels, 3), img)


def test_label_colours_into_a_slice_of_a_batch():
    """out: the colours written into a slice of a larger batch (Multi K-Means' colour_maps), the same as
    a new tensor's; the rest of the batch untouched; a tensor of another shape, dtype or layout refused."""
    labels = torch.tensor([[[0, 1], [2, 1]], [[2, 2], [0, 0]]])  # [2, 2, 2]
    batch = torch.full((5, 2, 2, 3), -1.0)
    assert label_colours(labels, 3, out=batch[1:3]).data_ptr() == batch[1:3].data_ptr()
    assert torch.equal(batch[1:3], label_colours(labels, 3))
    assert bool((batch[[0, 3, 4]] == -1).all())
    for bad in (torch.empty(2, 2, 3, 3), torch.empty(2, 2, 2, 3, dtype=torch.float64), torch.empty(2, 2, 3, 2).transpose(2, 3)):
        with pytest.raises(ValueError, match="out must be"):
            label_colours(labels, 3, out=bad)
    with pytest.raises(ValueError, match=r"got a non-contiguous torch.float32 \(2, 2, 2, 3\)"):  # says why it is refused
        label_colours(labels, 3, out=torch.empty(2, 2, 3, 2).transpose(2, 3))


@pytest.mark.parametrize("labels,k", [(torch.tensor([[[0, 3]]]), 3), (torch.tensor([[[-1, 0]]]), 3), (torch.zeros(2, 2, dtype=torch.int64), 2), (torch.zeros(1, 2, 2), 2)])
def test_label_colours_bad_input(labels, k):
    with pytest.raises(ValueError, match="labels"):
        label_colours(labels, k)


def test_label_colours_bad_k():
    with pytest.raises(ValueError, match="k must"):
        label_colours(torch.zeros(1, 2, 2, dtype=torch.int64), 0)


def planted_features(c=3):
    """Two layers: 3 heads on 4x4 and 1 head on 2x2; head 0 of the first splits left (low) / right (high)."""
    first = torch.randn(2, 3, 4, 4, c, generator=torch.Generator().manual_seed(0))
    first[0, 0] = 0.0
    first[0, 0, :, 2:, :] = 1.0  # all components: 0 on the left half, 1 on the right half
    second = torch.full((2, 1, 2, 2, c), 3.0)  # constant head
    return HeadFeatures({LayerKey("input", 1, 0): first, LayerKey("output", 9, 0): second}, (32, 32), c)


def test_pca_rgb_grid_layout_and_content():
    img = pca_rgb_grid(planted_features(), batch_index=0, cell=8)
    assert_image(img, (1, 2 * 8, 3 * 8, 3))  # one row per layer, as many columns as the widest layer
    tile = img[0, :8, :8]  # layer 0, head 0
    assert (tile[:, :4] == 0).all() and (tile[:, 4:] == 1).all()
    assert (img[0, 8:, :8] == 0.5).all()  # constant head: mid grey
    assert (img[0, 8:, 8:] == 0).all()  # padding to the right of a shorter row: black
    assert torch.equal(pca_rgb_grid(planted_features(), batch_index=0, cell=8), img)


@pytest.mark.parametrize("c", [1, 2, 5])
def test_pca_rgb_grid_any_component_count(c):
    img = pca_rgb_grid(planted_features(c), batch_index=1, cell=5)
    assert_image(img, (1, 10, 15, 3))
    if c == 1:
        assert torch.equal(img[..., 0], img[..., 1]) and torch.equal(img[..., 1], img[..., 2])  # grey


@pytest.mark.parametrize("image_size, tile", [((64, 96), (8, 12)), ((96, 64), (12, 8)), ((64, 64), (12, 12))])
def test_pca_rgb_grid_tiles_keep_the_images_aspect(image_size, tile):
    """A 64 x 96 image has 8 x 12 token grids: its tiles are 8 x 12 pixels at cell 12 (longer side),
    each token a 1 x 1 block, not squeezed into a square."""
    H, W = image_size
    h, w = H // 8, W // 8
    ramp = torch.arange(w, dtype=torch.float32).expand(h, w)  # [h, w] rising left to right
    layer = ramp[None, None, :, :, None].expand(1, 2, h, w, 3).contiguous()  # [1, 2, h, w, 3], two heads
    feats = HeadFeatures({LayerKey("input", 1, 0): layer}, image_size, 3)
    img = pca_rgb_grid(feats, cell=12)
    th, tw = tile
    assert_image(img, (1, th, 2 * tw, 3))
    if (th, tw) == (h, w):  # one pixel per token: the tile is the normalised ramp itself
        torch.testing.assert_close(img[0, :, :tw, 0], ramp / (w - 1))


def test_pca_rgb_grid_bad_input():
    with pytest.raises(ValueError, match="batch_index"):
        pca_rgb_grid(planted_features(), batch_index=2)
    with pytest.raises(ValueError, match="cell"):
        pca_rgb_grid(planted_features(), cell=0)
    for size in ((0, 0), (32,), "32x32", None):  # (0, 0) divided by zero; the others failed to unpack or iterate
        feats = dataclasses.replace(planted_features(), image_size=size)
        with pytest.raises(ValueError, match=r"^features\.image_size must be \(height, width\) in pixels, two positive ints"):
            pca_rgb_grid(feats)


@pytest.mark.parametrize("layout", ["sd21", "sdxl"])
@pytest.mark.parametrize("image_size", [(32, 32), (40, 24), (24, 56)])
def test_pca_rgb_grid_at_every_step_th_pixel_is_the_whole_pictures_every_step_th_pixel(layout, image_size):
    """With step, pca_rgb_grid draws only the pixels a caller shows of a long picture (Head PCA with pca_rgb
    unread: SDXL's 3840 x 1280 grid at every 2nd pixel): they must be the very pixels of the whole picture at
    [:, ::step, ::step], for tiles of either aspect, layers whose tiles start anywhere on the step's lattice,
    one to three components, and steps past a tile's side or the picture's."""
    from headseg.nodes.core.pca import recording_pca
    from headseg.tests.core.planted import planted_recording, sd21_layout, sdxl_layout, split_scene

    layers = sdxl_layout() if layout == "sdxl" else sd21_layout()
    rec = planted_recording(split_scene(*image_size, cut_sizes=(2, 5), seed=1), layers, d=6, seed=2)
    for c in (1, 2, 3):
        feats = recording_pca(rec.select(positions=("down", "up")), c)
        whole = pca_rgb_grid(feats)  # [1, rows*th, cols*tw, 3]
        for step in (2, 3, 7, 64, 100, 5000):
            drawn = pca_rgb_grid(feats, step=step)
            assert drawn.shape[1:3] == pca_rgb_grid_size(feats.layers, feats.image_size, step=step)
            assert torch.equal(drawn, whole[:, ::step, ::step]), (c, step)
    assert torch.equal(pca_rgb_grid(feats, step=1), whole)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"^step must be an int >= 1"):
            pca_rgb_grid(feats, step=bad)


def test_overlay_masks_blends_inside_only():
    image = torch.rand(1, 6, 6, 3, generator=torch.Generator().manual_seed(1))
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[0, :3] = True
    masks[1, :, :2] = True
    out = overlay_masks(image, masks, alpha=0.25)
    assert_image(out, (2, 6, 6, 3))
    colour = palette(2)[0]
    torch.testing.assert_close(out[0, :3], 0.75 * image[0, :3] + 0.25 * colour)
    assert torch.equal(out[0, 3:], image[0, 3:])
    assert torch.equal(out[1, :, 2:], image[0, :, 2:])
    assert torch.equal(overlay_masks(image, masks, alpha=0.0), image.expand(2, 6, 6, 3))


@pytest.mark.parametrize("low", [0.0, -0.5])  # a picture in 0..1, and one that needs clamping
def test_overlay_masks_holds_one_float_copy_of_the_masks(low):
    """Mask Select's overlays of the masks at a pixel ([M, H, W, 3], its output) are made with one float
    temporary of the masks and no copy of a picture already in 0..1: a clamped copy of the masks and
    alpha times it, and a clamped copy of the picture, held 8 bytes per mask and pixel and 12 per pixel
    more (487 MB at the peak of 285 MB of outputs at 2048 x 2048). The same pixels either way."""
    from headseg.tests.support.peak_memory import PeakBytes

    g = torch.Generator().manual_seed(2)
    M, H, W = 6, 256, 256
    masks = (torch.rand(M, H, W, generator=g) < 0.3).float()  # a MASK batch, as Mask Select passes it
    masks[0, 0, :4] = torch.tensor([-1.0, 0.25, 1.0, 2.0])  # soft and out-of-range values are clamped
    image = torch.rand(1, H, W, 3, generator=g) * (1 - low) + low
    with PeakBytes() as mem:
        out = overlay_masks(image, masks, alpha=0.4)
    want = torch.lerp(image.clamp(0, 1), palette(M)[:, None, None, :], (0.4 * masks.clamp(0, 1))[..., None]).clamp_(0, 1)
    assert torch.equal(out, want)
    picture = 0 if low == 0.0 else H * W * 12  # the clamped copy, only when needed
    assert mem.peak <= out.numel() * 4 + M * H * W * 4 + picture, (mem.peak, out.numel() * 4)


def test_overlay_masks_without_image_and_per_mask_images():
    masks = torch.zeros(3, 4, 5, dtype=torch.bool)
    masks[1, 0, 0] = True
    out = overlay_masks(None, masks, alpha=1.0)
    assert_image(out, (3, 4, 5, 3))
    assert torch.equal(out[1, 0, 0], palette(3)[1])
    assert (out[0] == 0.5).all()
    images = torch.rand(3, 4, 5, 3)
    paired = overlay_masks(images, masks)
    assert torch.equal(paired[2], images[2])


@pytest.mark.parametrize(
    "image,alpha,match",
    [(torch.rand(1, 5, 5, 3), 0.5, "image is"), (torch.rand(2, 4, 5, 3), 0.5, "batch"), (torch.rand(1, 4, 5), 0.5, "image must"), (None, 1.5, "alpha")],
)
def test_overlay_masks_bad_input(image, alpha, match):
    with pytest.raises(ValueError, match=match):
        overlay_masks(image, torch.zeros(3, 4, 5, dtype=torch.bool), alpha)


def test_pictures_refuse_complex_and_meta_tensors_by_name():
    """A complex map was drawn from its real parts (torch's warning the only word of it); a meta tensor failed
    inside torch ('Tensor.item() cannot be called on meta tensors')."""
    masks = torch.rand(2, 4, 5)
    for bad, what in ((masks.to(torch.complex64), "torch.complex64"), (masks.to("meta"), "a meta tensor")):
        with pytest.raises(ValueError, match=f"^masks must hold real values, got {what}$"):
            overlay_masks(None, bad)
        with pytest.raises(ValueError, match=f"^err must hold real values, got {what}$"):
            error_map_image(bad)
    image = torch.rand(1, 4, 5, 3)
    for bad, what in ((image.to(torch.complex64), "torch.complex64"), (image.to("meta"), "a meta tensor")):
        with pytest.raises(ValueError, match=f"^image must hold real values, got {what}$"):
            overlay_masks(bad, masks)


def test_error_map_image():
    err = torch.zeros(2, 3, 4)
    err[0, 1, 2] = 2.0
    err[0, 0, 0] = 1.0
    img = error_map_image(err)
    assert_image(img, (2, 3, 4, 3))
    low, high = img[0, 2, 3], img[0, 1, 2]
    assert float(high.sum()) > float(img[0, 0, 0].sum()) > float(low.sum())  # brighter with more error
    assert (img[1] == img[0, 2, 3]).all()  # an all-zero map is the zero colour everywhere
    assert torch.equal(error_map_image(err * 10), img)  # scaled per image by its maximum
    assert torch.equal(error_map_image(err), img)


@pytest.mark.parametrize("err,match", [(torch.full((1, 2, 2), -1.0), "non-negative"), (torch.full((1, 2, 2), float("nan")), "NaN"), (torch.zeros(2, 2), r"\[B, H, W\]")])
def test_error_map_image_bad_input(err, match):
    with pytest.raises(ValueError, match=match):
        error_map_image(err)


@pytest.mark.parametrize(
    "layer, match",
    [
        (torch.zeros(1, 2, 4, 4), r"output\.9\.0.*\[B, heads, h, w, c\]"),
        (torch.zeros(1, 2, 4, 4, 0), r"output\.9\.0.*no empty dimension"),
        (torch.zeros(1, 2, 0, 4, 3), r"output\.9\.0.*no empty dimension"),
        (torch.zeros(1, 2, 4, 4, 3, dtype=torch.int64), r"output\.9\.0.*floating"),
        (torch.zeros(2, 2, 4, 4, 3), r"one batch size, got \[1, 2\]"),
    ],
)
def test_pca_rgb_grid_names_a_bad_layer(layer, match):
    feats = HeadFeatures({LayerKey("input", 1, 0): torch.zeros(1, 2, 8, 8, 3), LayerKey("output", 9, 0): layer}, (64, 64), 3)
    with pytest.raises(ValueError, match=match):
        pca_rgb_grid(feats, batch_index=0)


def test_label_colours_builds_only_the_colours_in_use():
    """A huge k with few labels present costs nothing extra; the colours are palette(k)'s."""
    labels = torch.tensor([[[0, 3], [1, 0]]])  # [1, 2, 2]
    out = label_colours(labels, 10**8)
    torch.testing.assert_close(out, palette(4)[labels])
    with pytest.raises(ValueError, match="k must be an int"):
        label_colours(labels, 0)


def test_previews_never_carry_autograd():
    masks = torch.rand(2, 4, 5, requires_grad=True)
    image = torch.rand(1, 4, 5, 3, requires_grad=True)
    assert not overlay_masks(image, masks).requires_grad
    assert not error_map_image(torch.rand(1, 4, 5, requires_grad=True)).requires_grad
    feats = HeadFeatures({LayerKey("input", 1, 0): torch.randn(1, 2, 3, 3, 3, requires_grad=True)}, (24, 24), 3)
    assert not pca_rgb_grid(feats, cell=4).requires_grad


def test_error_map_beyond_float32_is_named_as_such():
    with pytest.raises(ValueError, match="beyond float32's range"):
        error_map_image(torch.full((1, 2, 2), 1e300, dtype=torch.float64))


def test_previews_refuse_nan_instead_of_drawing_grey():
    feats = HeadFeatures({LayerKey("input", 1, 0): torch.full((1, 2, 3, 3, 3), float("nan"))}, (24, 24), 3)
    with pytest.raises(ValueError, match=r"layer input\.1\.0 contains NaN or inf"):
        pca_rgb_grid(feats, cell=4)
    with pytest.raises(ValueError, match="masks contain NaN"):
        overlay_masks(None, torch.full((1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="image contains NaN"):
        overlay_masks(torch.full((1, 2, 2, 3), float("nan")), torch.ones(1, 2, 2))


def test_error_map_scales_each_image_to_the_whole_colour_scale():
    """Image 0 peaks at 1, image 1 at 4: each peak gets the top colour and each zero the bottom one."""
    err = torch.zeros(2, 2, 2)
    err[0, 0, 0] = 1.0
    err[1, 0, 0] = 4.0
    err[1, 0, 1] = 2.0  # half way along image 1's scale
    img = error_map_image(err)
    anchors = torch.tensor(_HEAT_ANCHORS, dtype=torch.float32) / 255.0  # [A, 3] the scale's colours
    for b in range(2):
        torch.testing.assert_close(img[b, 0, 0], anchors[-1])
        torch.testing.assert_close(img[b, 1, 1], anchors[0])
    pos = 0.5 * (len(anchors) - 1)  # between two anchors: their blend
    lo = int(pos)
    torch.testing.assert_close(img[1, 0, 1], anchors[lo] * (1 - (pos - lo)) + anchors[lo + 1] * (pos - lo))


def test_pca_rgb_of_two_components_leaves_blue_black():
    feats = HeadFeatures({LayerKey("input", 1, 0): torch.randn(1, 2, 4, 4, 2)}, (32, 32), 2)
    grid = pca_rgb_grid(feats, cell=4)
    assert float(grid[..., 2].abs().max()) == 0.0 and float(grid[..., :2].max()) > 0.0


def test_pca_rgb_shows_the_first_three_components_of_many():
    """Red, green, blue = components 1, 2, 3 (paper figure 3), whatever c is: here each component of
    one head is its own 2 x 2 pattern, the fourth unlike the first three."""
    patterns = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 0.0]]])
    layer = patterns.permute(1, 2, 0)[None, None]  # [1, 1, 2, 2, 4]: B, heads, h, w, c
    feats = HeadFeatures({LayerKey("input", 1, 0): layer}, (16, 16), 4)
    img = pca_rgb_grid(feats, cell=2)  # one pixel per token
    assert_image(img, (1, 2, 2, 3))
    assert torch.equal(img[0].permute(2, 0, 1), patterns[:3])


def test_pca_rgb_normalises_each_component_of_each_head_on_its_own():
    """Components of very different spreads (the first has the most variance) each span 0..1: the pattern
    of the third is as visible as the first's; a second head of another scale is stretched the same way."""
    pattern = torch.tensor([[0.0, 1.0], [2.0, 3.0]])  # [2, 2]
    spreads = torch.tensor([100.0, 1.0, 0.01])
    offsets = torch.tensor([-50.0, 7.0, 0.5])
    head = pattern[:, :, None] * spreads + offsets  # [2, 2, 3]
    layer = torch.stack([head, 1e-3 * head])[None]  # [1, 2, 2, 2, 3]: two heads
    feats = HeadFeatures({LayerKey("input", 1, 0): layer}, (16, 16), 3)
    img = pca_rgb_grid(feats, cell=2)  # one pixel per token
    assert_image(img, (1, 2, 4, 3))
    expected = (pattern / 3.0)[:, :, None].expand(2, 2, 3)  # every channel the pattern, min-max normalised
    torch.testing.assert_close(img[0, :, :2], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(img[0, :, 2:], expected, rtol=0, atol=1e-6)


def test_overlay_masks_treats_soft_masks_beyond_zero_and_one_as_zero_and_one():
    image = torch.rand(1, 1, 4, 3, generator=torch.Generator().manual_seed(2))
    soft = torch.tensor([[[2.0, -1.0, 1.0, 0.0]]])
    out = overlay_masks(image, soft, alpha=0.5)
    colour = palette(1)[0]
    torch.testing.assert_close(out[0, 0, 0], 0.5 * image[0, 0, 0] + 0.5 * colour)  # 2 draws as 1
    torch.testing.assert_close(out[0, 0, 1], image[0, 0, 1])  # -1 draws as 0: the picture unchanged
    torch.testing.assert_close(out[0, 0, 2], 0.5 * image[0, 0, 2] + 0.5 * colour)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor", [2, 3])
def test_fit_to_pixels_averages_each_block_at_a_whole_factor(dtype, factor):
    """A picture made of factor x factor blocks of one colour each shrinks to exactly those colours."""
    g = torch.Generator().manual_seed(factor)
    small = torch.rand(2, 6, 10, 3, generator=g, dtype=dtype)  # [B, h, w, 3] the block colours
    big = small.repeat_interleave(factor, 1).repeat_interleave(factor, 2)  # [B, h*f, w*f, 3]
    out = fit_to_pixels(big, 6 * 10)
    assert out.shape == small.shape and out.dtype == dtype
    torch.testing.assert_close(out, small)


@pytest.mark.parametrize("size", [(1024, 1024), (832, 1216), (1216, 832), (513, 512), (3, 100_000), (100_000, 2)])
def test_fit_to_pixels_keeps_under_the_cap_and_the_aspect_ratio(size):
    H, W = size
    cap = 512 * 512 if H * W > 512 * 512 else 100
    image = torch.zeros(1, H, W, 1).expand(1, H, W, 3)  # [1, H, W, 3] a view: big sizes stay cheap
    out = fit_to_pixels(image, cap)
    h, w = out.shape[1:3]
    assert h * w <= cap and h >= 1 and w >= 1
    if min(H, W) * (cap / (H * W)) ** 0.5 >= 2:  # both sides shrink by the same factor, to within a pixel
        scale = (cap / (H * W)) ** 0.5
        assert abs(h - H * scale) < 1 and abs(w - W * scale) < 1
        assert h * w > cap * 0.99 - (h + w)  # and not much smaller than the cap


def _area_means(image, h, w):
    """Reference: output pixel (i, j) = mean of input rows floor(i*H/h) .. ceil((i+1)*H/h) - 1, and the same
    for columns (each output pixel's share of the picture, widened to whole input pixels)."""
    B, H, W, C = image.shape
    out = torch.empty(B, h, w, C, dtype=image.dtype)
    for i in range(h):
        r0, r1 = (i * H) // h, -((-(i + 1) * H) // h)
        for j in range(w):
            c0, c1 = (j * W) // w, -((-(j + 1) * W) // w)
            out[:, i, j] = image[:, r0:r1, c0:c1].mean(dim=(1, 2))
    return out


@pytest.mark.parametrize("H, W, cap", [(30, 45, 100), (21, 14, 24), (17, 50, 60)])
def test_fit_to_pixels_takes_the_mean_of_the_area_each_pixel_covers(H, W, cap):
    """Random pictures at factors that are not whole numbers, against a loop over the covered areas."""
    image = torch.rand(2, H, W, 3, generator=torch.Generator().manual_seed(H), dtype=torch.float64)
    out = fit_to_pixels(image, cap)
    torch.testing.assert_close(out, _area_means(image, *out.shape[1:3]))


def test_fit_to_pixels_returns_a_picture_that_fits_as_it_is():
    image = torch.rand(1, 512, 512, 3)
    assert fit_to_pixels(image, 512 * 512) is image


@pytest.mark.parametrize(
    "images, cap, message",
    [(torch.zeros(4, 4, 3), 4, "images must be a float tensor"), (torch.zeros(1, 1, 4, 4, 3), 4, r"\[B, H, W, C\]"), (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), 4, "float"),
     ([[0.0]], 4, "images must be"), (torch.zeros(1, 4, 4, 3), 0, "max_pixels must be an int >= 1"),
     (torch.zeros(1, 4, 4, 3), 2.5, "max_pixels"), (torch.zeros(1, 4, 4, 3), True, "max_pixels")],
)  # fmt: skip
def test_fit_to_pixels_bad_input(images, cap, message):
    with pytest.raises(ValueError, match=message):
        fit_to_pixels(images, cap)


def test_partition_picture_paints_the_finest_mask_on_top():
    from headseg.nodes.core.masks import MaskSet
    from headseg.nodes.core.preview import mask_partition_picture, palette

    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0] = True  # everything
    masks[1, :2, :2] = True  # a small corner, listed before the middle-sized mask
    masks[2, :3, :3] = True  # a larger corner around it
    picture = mask_partition_picture(MaskSet(masks, torch.tensor([1, 2, 2]), torch.tensor([0, 0, 1])))[0]
    colours = palette(4)  # 0: in no mask, then by area, coarse -> fine: everything, 3x3, 2x2
    assert picture.shape == (4, 4, 3)
    assert torch.equal(picture[0, 0], colours[3]) and torch.equal(picture[2, 2], colours[2])
    assert torch.equal(picture[3, 3], colours[1])


def test_pca_rgb_of_a_recording_is_each_heads_first_three_principal_components_as_scikit_learn_finds_them():
    """Paper figure 3 from the recorded heads: Head PCA's picture of a recording (8 components kept) shows,
    tile by tile, red, green, blue = components 1, 2, 3 of that head alone, each stretched over 0..1; the
    reference is scikit-learn's PCA(3) of the raw head [h*w, d], signs included, min-max normalised here."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    from headseg.nodes.core.pca import recording_pca
    from headseg.nodes.core.recording import Recording

    g = torch.Generator().manual_seed(5)
    mixing = torch.randn(2, 16, 16, generator=g, dtype=torch.float64)  # per head: correlated channels
    heads = torch.randn(2, 6 * 10, 16, generator=g, dtype=torch.float64) @ mixing  # [heads, N, d]
    layer = heads.reshape(1, 2, 6, 10, 16).to(torch.float32)  # [B, heads, h, w, d]: a 6x10 latent's grid
    rec = Recording({LayerKey("output", 9, 0): layer}, (48, 80))
    img = pca_rgb_grid(recording_pca(rec, 8), cell=10)  # tiles of 6x10 pixels: one pixel per token
    assert_image(img, (1, 6, 20, 3))
    for h in range(2):
        with threadpool_limits(1):
            ref = PCA(n_components=3, svd_solver="full").fit_transform(layer[0, h].reshape(60, 16).double().numpy())
        ref = torch.from_numpy(ref)  # [N, 3]
        ref = (ref - ref.amin(0)) / (ref.amax(0) - ref.amin(0))  # each component over 0..1
        torch.testing.assert_close(img[0, :, 10 * h : 10 * (h + 1)].reshape(60, 3).double(), ref, rtol=0, atol=1e-4)
