"""Pixels between a picture and the masks' grid: VAE Encode's centred crop, the stretch, and a picked pixel.

The masks cover the image the sampler made. A photo whose sides are not multiples of 8 reaches VAE
Encode, which keeps its centred window of the latent's multiple of 8 pixels; the masks cover exactly
that window. A picture of any other size is shown stretched to the masks' grid, and its pixels map
through the stretch.
"""

from __future__ import annotations

import torch


def vae_crop_offsets(h: int, w: int, H: int, W: int) -> tuple[int, int]:
    """(top, left) of the centred H x W window of an h x w picture that is_vae_window: VAE Encode's
    ((h % 8) // 2, (w % 8) // 2) when H x W is its multiple of 8, (0, 0) when the sizes are the same."""
    return (h - H) // 2, (w - W) // 2


def is_vae_window(h: int, w: int, H: int, W: int) -> bool:
    """Whether the masks' H x W pixels are an h x w picture's: the same size (also when a recording file's
    sides are no multiples of 8), or the window VAE Encode keeps of a picture whose sides only lack a
    multiple of 8 (up to 7 px more per side)."""
    return (h, w) == (H, W) or (h // 8 * 8, w // 8 * 8) == (H, W)


def vae_crop(pictures: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, h, w, C] pictures that is_vae_window -> [B, H, W, C]: the centred window VAE Encode keeps (a view)."""
    top, left = vae_crop_offsets(pictures.shape[1], pictures.shape[2], H, W)
    return pictures[:, top : top + H, left : left + W]  # [B, H, W, C]


def fit_picture(pictures: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """[B, h, w, C] float pictures -> [B, H, W, C] shown on the masks' H x W grid: VAE Encode's centred
    window of a picture that is_vae_window (a view), any other size stretched (bilinear)."""
    B, h, w, C = pictures.shape
    if is_vae_window(h, w, H, W):
        return vae_crop(pictures, H, W)  # [B, H, W, C]
    stretched = torch.nn.functional.interpolate(pictures.movedim(-1, 1), size=(H, W), mode="bilinear", align_corners=False)
    return stretched.movedim(1, -1)  # [B, C, H, W] -> [B, H, W, C]


def aspect_differs(picture_hw, mask_hw, tolerance: float = 0.01) -> bool:
    """Whether a picture [h, w] shown stretched on the masks' grid [H, W] (not is_vae_window) has an aspect
    ratio more than ``tolerance`` (relative) from the grid's."""
    (h, w), (H, W) = picture_hw, mask_hw
    if is_vae_window(h, w, H, W):
        return False
    return max(w * H, h * W) / min(w * H, h * W) > 1.0 + tolerance


def picture_to_mask_pixel(x: int, y: int, picture_hw, mask_hw) -> tuple[int, int]:
    """A pixel (x, y) of the picture [h, w] -> the pixel of the masks [H, W] shown there: through VAE
    Encode's centred crop when the picture only lacks a multiple of 8, else through the stretch (pixel
    centres aligned, as fit_picture stretches: the grid pixel under the picture pixel's centre, (x + 0.5) *
    W / w, in integers); clamped to the grid."""
    (h, w), (H, W) = picture_hw, mask_hw
    if is_vae_window(h, w, H, W):
        top, left = vae_crop_offsets(h, w, H, W)
        mx, my = x - left, y - top
    else:
        mx, my = (2 * x + 1) * W // (2 * w), (2 * y + 1) * H // (2 * h)
    return min(max(mx, 0), W - 1), min(max(my, 0), H - 1)


def of_the_picture(point: tuple[int, int], picture_hw, mask_hw) -> bool:
    """Whether a pixel (x, y >= 0) is read as a pixel of the picture [h, w] (None: no picture): outside the
    masks' grid [H, W] but inside the picture, as when it was picked on the picture before the first run."""
    (x, y), (H, W) = point, mask_hw
    return picture_hw is not None and not (x < W and y < H) and x < picture_hw[1] and y < picture_hw[0]


def grid_pixel(point: tuple[int, int], picture_hw, mask_hw) -> tuple[int, int]:
    """A pixel asked for (x, y >= 0) -> the pixel of the masks' grid [H, W] used: one of_the_picture [h, w]
    is mapped from it; any other past the grid is moved to its nearest pixel."""
    (x, y), (H, W) = point, mask_hw
    if of_the_picture(point, picture_hw, mask_hw):
        x, y = picture_to_mask_pixel(x, y, picture_hw, mask_hw)
    return min(x, W - 1), min(y, H - 1)
