"""Pictures of the pipeline's stages as ComfyUI IMAGE tensors ([B, H, W, 3] float32 in 0..1).

Everything here is deterministic: fixed palettes, no randomness.
"""

from __future__ import annotations

import math

import torch

from .masks import MaskSet, check_label_map
from .numerics import all_finite
from .pca import HeadFeatures
from .recording import MAX_IMAGE_SIDE, check_size
from .upsample import nearest_index, upsample
from .values import check_batch_index, is_int, is_real

# 20 well-separated colours (RGB 0..255); beyond them, colours come from golden-ratio hues.
_BASE_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
    (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
)
# Perceptually ordered dark -> bright anchors (inferno-like) for scalar maps.
_HEAT_ANCHORS = (
    (0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99),
    (212, 72, 66), (245, 125, 21), (250, 193, 39), (252, 255, 164),
)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def palette(k: int) -> torch.Tensor:
    """[k, 3] float32 in 0..1 on the CPU: colour of label 0..k-1 (the first 20 fixed, then golden-ratio hues)."""
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    colours = [tuple(c / 255.0 for c in rgb) for rgb in _BASE_PALETTE[:k]]
    for i in range(len(colours), k):
        hue = (i * 0.618033988749895) % 1.0
        colours.append(_hsv_to_rgb(hue, 0.55 + 0.35 * ((i // 7) % 2), 0.95 - 0.25 * ((i // 3) % 2)))
    return torch.tensor(colours, dtype=torch.float32, device="cpu")


def label_colours(labels: torch.Tensor, k: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """[B, H, W] int labels in 0..k-1 -> [B, H, W, 3] float32 IMAGE, one fixed colour per label.

    out: a contiguous float32 tensor [B, H, W, 3] on the labels' device to write the colours into (e.g. a
    slice of a larger batch), returned; without it a new tensor."""
    check_label_map(labels, k, "B, H, W")
    used = int(labels.max()) + 1 if labels.numel() else 1  # colours of the labels present (palette(k)'s first)
    colours = palette(used).to(labels.device)  # [used, 3]
    if out is None:
        out = torch.empty(*labels.shape, 3, dtype=torch.float32, device=labels.device)  # [B, H, W, 3]
    elif out.shape != (*labels.shape, 3) or out.dtype != torch.float32 or out.device != labels.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float32 tensor [{', '.join(map(str, labels.shape))}, 3] on {labels.device}, got "
            f"{'a' if out.is_contiguous() else 'a non-contiguous'} {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    torch.index_select(colours, 0, labels.reshape(-1).long(), out=out.view(-1, 3))  # [B*H*W, 3]: a gather
    return out


def _normalise_channels(x: torch.Tensor) -> torch.Tensor:
    """[..., h, w] -> same shape in 0..1 by min-max over (h, w); constant maps become 0.5."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    out = (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny)
    return torch.where(span > 0, out, torch.full_like(x, 0.5))


def _check_real(t: torch.Tensor, name: str) -> None:
    """ValueError naming ``name`` for a complex tensor (to(float32) would drop its imaginary parts with no more
    than a warning) or one on the meta device (no values to draw)."""
    if t.is_complex() or t.is_meta:
        raise ValueError(f"{name} must hold real values, got {'a meta tensor' if t.is_meta else t.dtype}")


def _check_cell(cell) -> int:
    if not is_int(cell) or not 1 <= cell <= MAX_IMAGE_SIDE:
        raise ValueError(f"cell must be an int from 1 to {MAX_IMAGE_SIDE} (tile side in pixels), got {cell!r}")
    return int(cell)


def _tile_size(image_size, cell: int) -> tuple[int, int]:
    """(th, tw): a head's tile, with the image's aspect ratio and ``cell`` pixels on its longer side."""
    H, W = check_size(image_size, "features.image_size")
    return (cell, max(1, round(cell * W / H))) if H >= W else (max(1, round(cell * H / W)), cell)


def _check_step(step) -> int:
    if not is_int(step) or step < 1:
        raise ValueError(f"step must be an int >= 1 (every step-th pixel of the picture drawn), got {step!r}")
    return int(step)


def pca_rgb_grid_size(layers: dict, image_size, cell: int = 64, step: int = 1) -> tuple[int, int]:
    """(height, width) in pixels of the picture pca_rgb_grid draws of ``layers`` ({key: [B, heads, h, w, c]},
    a HeadFeatures' or the Recording's they come from) of an image of ``image_size``: a row of tiles per layer,
    as many tiles as the most heads of a layer; with ``step``, of its every step-th row and column (the sides
    divided by step, rounded up). Nothing is drawn: a caller can check the memory first."""
    if not layers:
        raise ValueError("features: no layer to draw")
    step = _check_step(step)
    th, tw = _tile_size(image_size, _check_cell(cell))
    height, width = len(layers) * th, max(int(t.shape[1]) for t in layers.values()) * tw
    return -(-height // step), -(-width // step)


def pca_rgb_grid(features: HeadFeatures, batch_index: int = 0, cell: int = 64, step: int = 1) -> torch.Tensor:
    """HeadFeatures -> [1, rows*th, cols*tw, 3]: components 1-3 of each head as RGB (paper fig. 3).

    One row per layer in UNet order, one th x tw tile per head with the image's aspect ratio and
    ``cell`` pixels on its longer side (nearest upsampling, so token cells stay visible); rows shorter
    than the widest layer are padded with black. Each channel is min-max normalised per head; a head
    with fewer than 3 components repeats (c=1) or pads (c=2).

    step: only every step-th row and column of that picture, from the first, is drawn: [1, ceil(rows*th /
    step), ceil(cols*tw / step), 3], the very pixels of the whole picture's [:, ::step, ::step] (a smaller
    picture to show), without drawing the rest.
    """
    if not isinstance(features, HeadFeatures):
        raise TypeError(f"features must be HeadFeatures, got {type(features).__name__}")
    if not features.layers:
        raise ValueError("features: no layer to draw")
    cell = _check_cell(cell)
    step = _check_step(step)
    check_batch_index(batch_index, features.checked_batch_size())
    for key, t in features.layers.items():
        if not all_finite(t[batch_index]):
            raise ValueError(f"features: layer {key!s} contains NaN or inf values")
    height, width = pca_rgb_grid_size(features.layers, features.image_size, cell, step)  # (rows*th, cols*tw) / step
    th, tw = _tile_size(features.image_size, cell)
    device = next(iter(features.layers.values())).device
    canvas = torch.zeros(height, width, 3, dtype=torch.float32, device=device)
    for r, t in enumerate(features.layers.values()):
        heads, h, w, c = t.shape[1:]
        first = -(r * th) % step  # the first row of the layer's tiles that is drawn
        if first >= th:
            continue  # no row of this layer is drawn
        x = t[batch_index].detach().to(torch.float32).permute(0, 3, 1, 2)  # [heads, c, h, w]
        if c >= 3:
            x = x[:, :3]  # [heads, 3, h, w]
        elif c == 2:
            x = torch.cat([x, x.new_zeros(heads, 1, h, w)], dim=1)  # [heads, 3, h, w]
        else:
            x = x.expand(heads, 3, h, w)  # [heads, 3, h, w] grey
        x = _normalise_channels(x)
        if c == 2:
            x[:, 2] = 0.0
        if step == 1:
            tiles = upsample(x, (th, tw), "nearest")  # [heads, 3, th, tw]
            row = tiles.permute(2, 0, 3, 1).reshape(th, heads * tw, 3)  # [th, heads, tw, 3] -> [th, heads*tw, 3]
            canvas[r * th : (r + 1) * th, : heads * tw] = row
            continue
        # the drawn pixels of the row of tiles, each read from the token grid where nearest upsampling reads it
        rows = torch.arange(first, th, step)  # [Y] rows of the tiles drawn
        columns = torch.arange(0, heads * tw, step)  # [X] columns of the row drawn
        token_rows = nearest_index(h, th)[rows].to(device)  # [Y]
        token_columns = nearest_index(w, tw)[columns % tw].to(device)  # [X]
        head = (columns // tw).to(device)  # [X]
        top = (r * th + first) // step  # the canvas row of the tiles' row ``first``
        canvas[top : top + len(rows), : len(columns)] = x[head, :, token_rows[:, None], token_columns]  # [Y, X, 3]
    return canvas.clamp_(0.0, 1.0)[None]  # [1, rows*th, cols*tw, 3] (sides / step, rounded up)


def overlay_masks(image: torch.Tensor | None, masks: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """image [B, H, W, 3] or None, masks [M, H, W] -> [M, H, W, 3]: mask m tinted in colour m.

    Inside a mask the picture becomes (1 - alpha) * image + alpha * colour (soft masks blend
    proportionally); outside it is unchanged. image None draws on mid-grey; an image batch of 1 is
    shared by all masks, a batch of M pairs image m with mask m.
    """
    if not isinstance(masks, torch.Tensor) or masks.dim() != 3:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks must be a tensor [M, H, W], got {shape}")
    _check_real(masks, "masks")
    if not is_real(alpha) or not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be a number in 0..1, got {alpha!r}")
    M, H, W = masks.shape
    if masks.is_floating_point() and not all_finite(masks):
        raise ValueError("masks contain NaN or inf")
    if image is None:
        base = torch.full((1, H, W, 3), 0.5, dtype=torch.float32, device=masks.device)
    else:
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image must be an IMAGE tensor [B, H, W, 3], got {shape}")
        if tuple(image.shape[1:3]) != (H, W):
            raise ValueError(f"image is {image.shape[1]}x{image.shape[2]} but masks are {H}x{W}: sizes must match")
        if image.shape[0] not in (1, M):
            raise ValueError(f"image batch must be 1 or the number of masks ({M}), got {image.shape[0]}")
        _check_real(image, "image")
        if image.is_floating_point() and not all_finite(image):
            raise ValueError("image contains NaN or inf")
        if image.device != masks.device:
            raise ValueError(f"image and masks must be on one device, got {image.device} and {masks.device}")
        base = image.detach().to(torch.float32)  # [B, H, W, 3]: only read
        if base.numel() and not (float(base.amin()) >= 0.0 and float(base.amax()) <= 1.0):
            base = base.clamp(0.0, 1.0)  # a copy only when needed: a picture of the size of one mask's overlay
    colours = palette(max(M, 1))[:M].to(masks.device)[:, None, None, :]  # [M, 1, 1, 3]
    # alpha * mask in place in the clamped copy: one float temporary of the masks, not two
    weight = masks.detach().to(torch.float32).clamp(0.0, 1.0).mul_(float(alpha))[..., None]  # [M, H, W, 1]
    out = torch.lerp(base, colours, weight)  # [M, H, W, 3] = base + weight * (colour - base)
    return out.clamp_(0.0, 1.0)


def mask_partition_picture(ms: MaskSet) -> torch.Tensor:
    """MaskSet of one image ([M, H, W] masks) -> IMAGE [1, H, W, 3]: masks painted coarse first, finer on
    top, each in its own palette colour (by rank of area); pixels in no mask get colour 0."""
    M, H, W = ms.masks.shape
    labels = torch.zeros(1, H, W, dtype=torch.long)  # [1, H, W], 0 = in no mask
    order = torch.argsort(ms.area, descending=True, stable=True)  # coarse -> fine
    for rank, m in enumerate(order.tolist()):
        labels[0][ms.masks[m]] = rank + 1
    return label_colours(labels, M + 1)  # [1, H, W, 3]


def fit_to_pixels(images: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> [B, h, w, C] with h * w <= max_pixels, the aspect ratio kept (to within a
    pixel), each output pixel the mean of the input area it covers; the input itself when it fits."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, H, W, C], got {shape}")
    if not is_int(max_pixels) or max_pixels < 1:
        raise ValueError(f"max_pixels must be an int >= 1, got {max_pixels!r}")
    B, H, W, C = images.shape
    if H * W <= max_pixels:
        return images
    scale = math.sqrt(max_pixels / (H * W))
    short, long = sorted((H, W))
    new_short = max(1, math.floor(short * scale))  # <= sqrt(max_pixels)
    new_long = max(1, min(math.floor(long * scale), max_pixels // new_short))  # the cap holds, rounding or not
    h, w = (new_short, new_long) if H <= W else (new_long, new_short)
    x = images.movedim(-1, 1)  # [B, C, H, W]
    small = torch.nn.functional.interpolate(x, size=(h, w), mode="area")  # [B, C, h, w]
    return small.movedim(1, -1)  # [B, h, w, C]


def error_map_image(err: torch.Tensor) -> torch.Tensor:
    """[B, H, W] non-negative error (eq. 6) -> [B, H, W, 3] heat map, each image scaled by its maximum."""
    if not isinstance(err, torch.Tensor) or err.dim() != 3:
        shape = tuple(err.shape) if isinstance(err, torch.Tensor) else type(err).__name__
        raise ValueError(f"err must be a tensor [B, H, W], got {shape}")
    _check_real(err, "err")
    if not all_finite(err):
        raise ValueError("err contains NaN or inf")
    err = err.detach().to(torch.float32)
    if not all_finite(err):
        raise ValueError("err has values beyond float32's range: scale it down")
    if err.numel() and float(err.min()) < 0:
        raise ValueError(f"err must be non-negative, got minimum {float(err.min())}")
    top = err.flatten(1).amax(dim=1) if err.numel() else err.new_zeros(err.shape[0])  # [B]
    t = err / top.clamp_min(torch.finfo(torch.float32).tiny)[:, None, None]  # [B, H, W] in 0..1
    t = torch.where(top[:, None, None] > 0, t, torch.zeros_like(t)).clamp_(0.0, 1.0)
    anchors = torch.tensor(_HEAT_ANCHORS, dtype=torch.float32, device=err.device) / 255.0  # [A, 3]
    pos = t * (len(_HEAT_ANCHORS) - 1)  # [B, H, W] position along the anchors
    lo = pos.floor().long().clamp_max(len(_HEAT_ANCHORS) - 2)  # [B, H, W]
    frac = (pos - lo.to(torch.float32))[..., None]  # [B, H, W, 1]
    out = anchors[lo] * (1.0 - frac) + anchors[lo + 1] * frac  # [B, H, W, 3]
    return out.clamp_(0.0, 1.0)
