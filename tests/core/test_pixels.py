"""Pixels between a picture and the masks' grid, against VAE Encode's crop rule and the stretch written out."""

import pytest
import torch

from headseg.nodes.core.pixels import (
    aspect_differs,
    fit_picture,
    grid_pixel,
    is_vae_window,
    of_the_picture,
    picture_to_mask_pixel,
    vae_crop,
)


def vae_encode_crop(pictures):
    """ComfyUI's VAE Encode rule, written out: keep the (side // 8) * 8 pixels from offset (side % 8) // 2."""
    h, w = pictures.shape[1:3]
    top, left = (h % 8) // 2, (w % 8) // 2
    return pictures[:, top : top + h // 8 * 8, left : left + w // 8 * 8]


@pytest.mark.parametrize("h, w", [(667, 1001), (64, 64), (71, 64), (129, 67), (15, 8)])
def test_a_picture_vae_encode_crops_maps_through_its_crop(h, w):
    H, W = h // 8 * 8, w // 8 * 8
    pictures = torch.rand(2, h, w, 3, generator=torch.Generator().manual_seed(h * w))
    assert is_vae_window(h, w, H, W)
    assert torch.equal(vae_crop(pictures, H, W), vae_encode_crop(pictures))
    assert torch.equal(fit_picture(pictures, H, W), vae_encode_crop(pictures))
    # every pixel of the kept window maps onto the mask pixel that shows the same picture pixel
    cropped = vae_encode_crop(pictures)[0]
    for x, y in [(0, 0), (w - 1, h - 1), (w // 2, h // 3), ((w % 8) // 2, (h % 8) // 2)]:
        mx, my = picture_to_mask_pixel(x, y, (h, w), (H, W))
        inside = (h % 8) // 2 <= y < (h % 8) // 2 + H and (w % 8) // 2 <= x < (w % 8) // 2 + W
        if inside:
            assert torch.equal(cropped[my, mx], pictures[0, y, x])
        assert 0 <= mx < W and 0 <= my < H  # a pixel of the cut-off border goes to the nearest edge


def test_any_other_size_is_stretched_and_maps_each_axis_by_its_own_ratio():
    pictures = torch.rand(1, 32, 16, 3, generator=torch.Generator().manual_seed(0))
    H, W = 8, 16
    assert not is_vae_window(32, 16, H, W)
    expected = torch.nn.functional.interpolate(pictures.permute(0, 3, 1, 2), size=(H, W), mode="bilinear", align_corners=False)
    assert torch.equal(fit_picture(pictures, H, W), expected.permute(0, 2, 3, 1))
    assert picture_to_mask_pixel(10, 20, (32, 16), (H, W)) == (10, 5)  # x * 16 // 16, y * 8 // 32
    assert picture_to_mask_pixel(15, 31, (32, 16), (H, W)) == (15, 7)
    # mask row 5 is stretched over picture rows 20..23: the last of them is row 5's, not rounded to row 6
    assert picture_to_mask_pixel(3, 23, (32, 16), (H, W)) == (3, 5)
    # VAE Encode crops both sides: a picture with one side as the grid's (no multiple of 8, as a recording
    # file's may be) and the other 7 px longer is stretched, not taken as a window
    assert not is_vae_window(71, 60, 64, 60) and not is_vae_window(60, 71, 60, 64)


@pytest.mark.parametrize(
    "picture_hw, mask_hw, differs",
    [((512, 512), (512, 512), False), ((519, 515), (512, 512), False), ((1024, 1024), (512, 512), False),
     ((1024, 1034), (512, 512), False), ((1024, 1040), (512, 512), True), ((600, 800), (512, 512), True),
     ((1000, 1010), (500, 500), False), ((1010, 1000), (500, 500), False)],  # exactly 1 % off: not more
)
def test_the_aspect_warning_is_for_stretches_more_than_one_percent_off(picture_hw, mask_hw, differs):
    assert aspect_differs(picture_hw, mask_hw) is differs


def test_a_pixel_past_the_grid_is_the_pictures_only_inside_the_picture():
    # masks 64x64, picture 128x128: (100, 10) lies past the grid, inside the picture -> mapped by the stretch
    assert of_the_picture((100, 10), (128, 128), (64, 64))
    assert grid_pixel((100, 10), (128, 128), (64, 64)) == (50, 5)
    # inside the grid: taken as it is, whatever the picture
    assert not of_the_picture((63, 63), (128, 128), (64, 64))
    assert grid_pixel((63, 63), (128, 128), (64, 64)) == (63, 63)
    # past the picture too, or no picture: moved to the nearest pixel of the grid
    assert not of_the_picture((500, 10), (128, 128), (64, 64))
    assert not of_the_picture((128, 10), (128, 128), (64, 64)) and not of_the_picture((10, 128), (128, 128), (64, 64))
    assert of_the_picture((127, 127), (128, 128), (64, 64))
    assert grid_pixel((500, 10), (128, 128), (64, 64)) == (63, 10)
    assert grid_pixel((500, 70), None, (64, 64)) == (63, 63)
    assert grid_pixel((500, 70), None, (32, 96)) == (95, 31) and grid_pixel((70, 500), None, (96, 32)) == (31, 95)
    # a photo VAE Encode cropped: (66, 3) of a 71x67 picture -> through the crop's offsets (3, 1)
    assert grid_pixel((66, 3), (71, 67), (64, 64)) == (63, 0)
    assert grid_pixel((65, 70), (71, 67), (64, 64)) == (63, 63)


@pytest.mark.parametrize("w, W", [(1000, 512), (768, 512), (300, 64), (530, 512), (97, 40), (40, 97), (512, 768)])
def test_a_picture_pixel_of_a_stretch_maps_to_the_grid_pixel_under_its_centre(w, W):
    # fit_picture stretches the picture onto the grid with pixel centres aligned (bilinear, align_corners=False):
    # picture column x covers grid columns [x W / w, (x + 1) W / w), and the grid pixel shown under it is the one
    # under its centre (x + 0.5) W / w: torch's centre-aligned nearest ("nearest-exact") of the grid's columns
    h, H = 16, 16  # rows as they are (not a VAE window: the widths differ by more than 7 px or the grid is wider)
    assert not is_vae_window(h, w, H, W)
    grid_columns = torch.arange(W, dtype=torch.float64).view(1, 1, 1, W)
    shown = torch.nn.functional.interpolate(grid_columns, size=(1, w), mode="nearest-exact").view(w).long().tolist()
    got = [picture_to_mask_pixel(x, 0, (h, w), (H, W))[0] for x in range(w)]
    assert got == shown
    # and the same along rows
    got_rows = [picture_to_mask_pixel(0, y, (w, h), (W, H))[1] for y in range(w)]
    assert got_rows == shown
    if w > W:  # a picture pixel narrower than a grid pixel: the grid pixel it overlaps most (exact fractions)
        from fractions import Fraction

        for x in range(w):
            lo, hi = Fraction(x * W, w), Fraction((x + 1) * W, w)
            X = got[x]
            mine = min(hi, X + 1) - max(lo, X)
            assert all(mine >= min(hi, Y + 1) - max(lo, Y) for Y in (X - 1, X + 1)), (x, X)
