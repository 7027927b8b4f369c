"""The upsampling-error map (paper eq. 6, its appendix): for every output pixel, the mean over the
channels of a FeatureStack of |bilinear - nearest| upsampling, where the features change within a
token's cell. Chunk by chunk over channels, image by image; at every pixel (upsampling_error), at
chosen rows and columns (upsampling_error_at) or, for a large image, at a lattice of block centres
(upsampling_error_blocks). The interpolation itself is upsample.py's.
"""

from __future__ import annotations

import math

import torch

from .numerics import power_of_two_scale
from .upsample import (
    MAX_OFFSET,
    FeatureStack,
    channel_means,
    check_stack,
    interpolation_matrix,
    nearest_index,
    peak_abs,
    resample_axis,
)

_CHUNK_BYTES = 16 * 2**20  # working memory per chunk of channels in upsampling_error and upsampling_error_at


def _column_phases(w: int, W: int):
    """For W = s * w: output column b*s + q of a bilinear upsample is y[b] + c[q] * (y[b + d[q]] - y[b])
    with d[q] = -1 for q < m and +1 for q >= m (y edge-replicated); returns (m, c [s] float32)."""
    s = W // w
    frac = (torch.arange(s, dtype=torch.float64, device="cpu") + 0.5) / s - 0.5  # offset of the source position
    m = int((frac < 0).sum())
    return m, frac.abs().to(torch.float32)


def _abs_diff_sum(part: torch.Tensor, size: tuple[int, int], span: tuple = (None, None)) -> torch.Tensor:
    """[B, n, h, w] -> [B, H, W]: sum over the n channels of |bilinear - nearest| upsampling (the grid
    spanning span = (Hs, Ws) pixels, see FeatureStack.span)."""
    H, W = size
    Hs, Ws = span
    B, n, h, w = part.shape
    device = part.device
    bil_rows = resample_axis(part, 2, H, "bilinear", Hs)  # [B, n, H, w]
    near_rows = part.index_select(2, nearest_index(h, H, Hs).to(device))  # [B, n, H, w]
    near_cols = nearest_index(w, W, Ws)  # [W]
    if Ws is not None or W % w or not torch.equal(near_cols, torch.arange(W, device="cpu") // (W // w)):  # general ratio
        diff = resample_axis(bil_rows, 3, W, "bilinear", Ws)  # [B, n, H, W]
        diff -= near_rows.index_select(3, near_cols.to(device))
        return diff.abs_().sum(dim=1)  # [B, H, W]
    # integer ratio: nearest column of output b*s + q is b; phases q on their own axis before w
    m, c = _column_phases(w, W)
    c = c.to(device)[:, None]  # [s, 1]
    base = (bil_rows - near_rows)[:, :, :, None]  # [B, n, H, 1, w]
    halves = []
    if m > 0:  # left-leaning phases read column b - 1 (column 0 reads itself: step 0)
        step = torch.zeros_like(bil_rows)  # [B, n, H, w]
        torch.sub(bil_rows[..., :-1], bil_rows[..., 1:], out=step[..., 1:])
        halves.append((step[:, :, :, None] * c[:m]).add_(base).abs_().sum(dim=1))  # [B, H, m, w]
    if m < c.shape[0]:  # right-leaning phases read column b + 1 (the last column reads itself)
        step = torch.zeros_like(bil_rows)  # [B, n, H, w]
        torch.sub(bil_rows[..., 1:], bil_rows[..., :-1], out=step[..., :-1])
        halves.append((step[:, :, :, None] * c[m:]).add_(base).abs_().sum(dim=1))  # [B, H, s - m, w]
    return torch.cat(halves, dim=2).transpose(2, 3).reshape(B, H, W)  # [B, H, s, w] -> [B, H, w, s] -> [B, H, W]


def upsampling_error(stack: FeatureStack) -> torch.Tensor:
    """[B, H, W] eq. 6: mean over channels of |bilinear(x) - nearest(x)| at stack.size.

    Works chunk by chunk over channels, so extra memory stays near _CHUNK_BYTES.
    """
    H, W = check_stack(stack)
    B = stack.batch_size
    offsets = _channel_offsets(stack)  # per grid [B, C_g, 1, 1] float64 or None
    scales = _image_scales(stack, offsets)  # B floats, powers of two
    total = torch.zeros(B, H, W, dtype=torch.float32, device=stack.grids[0].device)
    per_channel = 3 * H * W * 4  # about three full-size float32 temporaries per channel and image
    chunk = max(1, _CHUNK_BYTES // per_channel)
    for i, (grid, offset) in enumerate(zip(stack.grids, offsets)):
        span = stack.span(i)
        for b in range(B):  # image by image: the chunks stay as wide at any batch size
            for start in range(0, grid.shape[1], chunk):
                m = None if offset is None else offset[b : b + 1, start : start + chunk]  # [1, n, 1, 1]
                part = _scaled_float32(grid[b : b + 1, start : start + chunk], scales[b], m)  # [1, n, h, w]
                total[b : b + 1] += _abs_diff_sum(part, (H, W), span)  # [1, H, W]
    return _mean_in_units(total, stack.num_channels, scales)


def _channel_offsets(stack: FeatureStack) -> list[torch.Tensor | None]:
    """Per grid: [B, C_g, 1, 1] float64 channel means (per image) to take out before the error map, or
    None where no channel's mean is more than MAX_OFFSET of its own largest |value| (PCA scores). The
    means are taken a few channels at a time: mean(dtype=float64) converts all it is given inside the mean,
    and a whole grid's float64 copy (twice the grid) would pass what error_map_bytes counts."""
    offsets = []
    for g in stack.grids:
        flat = g.detach().flatten(2)  # [B, C_g, h*w]
        mean = channel_means(flat)  # [B, C_g]
        peak = peak_abs(flat, dim=2).double()  # [B, C_g]
        offsets.append(mean[:, :, None, None] if bool((mean.abs() > MAX_OFFSET * peak).any()) else None)
    return offsets


def _image_scales(stack: FeatureStack, offsets: list) -> list[float]:
    """B exact powers of two that bring each image's largest |feature| (less its channel's offset,
    _channel_offsets) near 1 where it lies outside 2**-SCALE_EXP .. 2**SCALE_EXP (else 1): sums of
    |differences| over thousands of channels then neither overflow nor lose tiny values in float32."""
    peaks = []
    for g, offset in zip(stack.grids, offsets):
        if offset is None:
            peaks.append(peak_abs(g.detach().flatten(1), dim=1).double())  # [B]
        else:
            low, high = torch.aminmax(g.detach().flatten(2), dim=2)  # [B, C_g] each
            m = offset[:, :, 0, 0]  # [B, C_g]
            peaks.append(torch.maximum(high.double() - m, m - low.double()).amax(1))  # [B]
    return power_of_two_scale(torch.stack(peaks).amax(0)).tolist()  # [grids, B] -> [B] -> B floats


def _scaled_float32(part: torch.Tensor, scale: float, offset: torch.Tensor | None = None) -> torch.Tensor:
    """(part - offset) * scale (exact scaling, in float64 when scaling or centring) as float32;
    offset broadcasts against part (channel means [.., n, 1, 1])."""
    if offset is not None:
        return ((part.double() - offset) * scale).to(torch.float32)
    return part.to(torch.float32) if scale == 1.0 else (part.double() * scale).to(torch.float32)


def _mean_in_units(total: torch.Tensor, channels: int, scales: list[float]) -> torch.Tensor:
    """[B, ...] sums in scaled units -> [B, ...] float32 means in the stack's units."""
    if all(s == 1.0 for s in scales):
        return total / channels
    divisor = torch.tensor(scales, dtype=torch.float64, device=total.device).view(-1, *[1] * (total.dim() - 1))  # [B, 1, ...]
    return (total.double() / channels / divisor).to(torch.float32)


def upsampling_error_at(stack: FeatureStack, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[B, ny, nx] eq. 6 at the output pixels rows [ny] x cols [nx] only (exactly as upsampling_error
    there), at a cost in proportion to ny * nx: a preview of a large image.
    """
    H, W = check_stack(stack)
    for name, idx in (("rows", rows), ("cols", cols)):
        try:
            t = torch.as_tensor(idx, device="cpu")
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a 1-D tensor or list of integer pixel indices, got {type(idx).__name__}") from None
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer pixel indices, got {t.dtype}")
    # indices on the CPU, where the interpolation matrices they pick from are built
    rows = torch.as_tensor(rows, dtype=torch.int64, device="cpu")
    cols = torch.as_tensor(cols, dtype=torch.int64, device="cpu")
    for name, idx, n in (("rows", rows, H), ("cols", cols, W)):
        if idx.dim() != 1 or idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ValueError(f"{name} must be a non-empty 1-D index into 0..{n - 1}, got {tuple(idx.shape)}")
    B, ny, nx = stack.batch_size, rows.numel(), cols.numel()
    device = stack.grids[0].device
    offsets = _channel_offsets(stack)  # per grid [B, C_g, 1, 1] float64 or None
    scales = _image_scales(stack, offsets)  # B floats, powers of two
    total = torch.zeros(B, ny, nx, dtype=torch.float32, device=device)
    chunk = max(1, _CHUNK_BYTES // (3 * ny * nx * 4))
    for i, (grid, offset) in enumerate(zip(stack.grids, offsets)):
        h, w = int(grid.shape[2]), int(grid.shape[3])
        Hs, Ws = stack.span(i)
        ry = interpolation_matrix(h, H, "bilinear", span=Hs)[rows].to(device)  # [ny, h]
        iy = nearest_index(h, H, Hs)[rows].to(device)  # [ny]
        # bilinear - nearest = [ry @ part, part[iy]] @ [Rx^T; -Nx^T] (Rx, Nx: the bilinear and nearest
        # column matrices at cols): one product for both
        cols_both = torch.cat(  # [2w, nx]
            [interpolation_matrix(w, W, "bilinear", span=Ws)[cols].t(), -interpolation_matrix(w, W, "nearest", span=Ws)[cols].t()]
        ).to(device, torch.float32)
        for b in range(B):
            for start in range(0, grid.shape[1], chunk):
                m = None if offset is None else offset[b, start : start + chunk]  # [n, 1, 1]
                part = _scaled_float32(grid[b, start : start + chunk], scales[b], m)  # [n, h, w]
                rows_both = torch.cat([torch.matmul(ry, part), part.index_select(1, iy)], dim=2)  # [n, ny, 2w]
                total[b] += torch.matmul(rows_both, cols_both).abs_().sum(0)  # [n, ny, nx] -> [ny, nx]
    return _mean_in_units(total, stack.num_channels, scales)


# Above this many pixels the error map is computed at a lattice (every f-th row and column, each value
# then covering its f x f block): exact there, at a small cost.
ERROR_MAP_PIXELS = 256 * 256


def error_lattice_step(H: int, W: int, max_pixels: int = ERROR_MAP_PIXELS) -> int:
    """f: the error map of an H x W image is computed at every f-th row and column (1: at every pixel), so
    that at most about max_pixels pixels are computed."""
    return max(1, math.ceil(math.sqrt(H * W / max_pixels)))


def upsampling_error_blocks(stack: FeatureStack, max_pixels: int = ERROR_MAP_PIXELS):
    """FeatureStack -> (eq. 6 error [B, ny, nx] at an f x f lattice of pixels, the lattice row of each output
    row [H] and column of each output column [W]; every lattice row and column is one of some output's):
    the block centres of a large image, or (error [B, H, W] at every pixel, None, None) for one of at most
    max_pixels pixels. error.index_select(1, by_row).index_select(2, by_col) spreads it to [B, H, W]."""
    H, W = check_stack(stack)
    f = error_lattice_step(H, W, max_pixels)
    if f == 1:
        return upsampling_error(stack), None, None  # [B, H, W]
    rows, cols = torch.arange(f // 2, H, f), torch.arange(f // 2, W, f)  # [ny], [nx] block centres
    small = upsampling_error_at(stack, rows, cols)  # [B, ny, nx]
    by_row = (torch.arange(H) // f).clamp_(max=rows.numel() - 1)  # [H] block of each output row
    by_col = (torch.arange(W) // f).clamp_(max=cols.numel() - 1)  # [W]
    return small, by_row, by_col
