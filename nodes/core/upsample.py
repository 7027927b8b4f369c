"""Upsampling head features to a common grid (paper section 4.1) and reweighting (eq. 5); the
upsampling-error map (eq. 6), built on these interpolations, is error_map.py's.

Bilinear (align_corners=False) and nearest upsampling are separable linear maps: along one axis
they are an [n_out, n_in] matrix, identical to ``torch.nn.functional.interpolate``. A
``FeatureStack`` keeps the features on their native grids (layers sharing a grid concatenated) and
stands for the virtual [B, C, H, W] stack of all of them upsampled to the image size; downstream
work (k-means scores) can run on the native grids and upsample k channels instead of C.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from .pca import HeadFeatures
from .numerics import FEATURE_DTYPES, all_finite, check_one_device
from .recording import MAX_IMAGE_SIDE, LayerKey, check_size, grid_levels
from .values import check_batch_index, is_int

MODES = ("bilinear", "nearest")
_CHUNK_BYTES = 16 * 2**20  # working memory per chunk of channels in channel_means
# Features are float32 in k-means and the error map: larger values cannot be represented.
_MAX_FEATURE = float(torch.finfo(torch.float32).max)
# The k-means and the error map take out channel means above this fraction of the channel's largest
# |feature| (kmeans_image._centred, error_map._channel_offsets): k-means' distances and both
# interpolations keep constants, and a large offset would leave the float32 differences of a small spread about it to
# rounding (1e-2 about 1e4: 10 % of the map).
MAX_OFFSET = 2.0**-10


def check_mode(mode) -> str:
    """mode -> mode, or a ValueError listing the modes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    return mode


def check_reweight(reweight) -> bool:
    """reweight -> reweight, or a ValueError: True or False."""
    if not isinstance(reweight, bool):
        raise ValueError(f"reweight must be True or False, got {reweight!r}")
    return reweight


def _check_length(n, name: str) -> int:
    if not is_int(n) or not 1 <= n <= MAX_IMAGE_SIDE:
        raise ValueError(f"{name} must be an int from 1 to {MAX_IMAGE_SIDE}, got {n!r}")
    return int(n)


def _span(n_out: int, span) -> float:
    """The pixels the input samples span along an axis (see interpolation_matrix): n_out when span is None."""
    return n_out if span is None else span


def nearest_index(n_in: int, n_out: int, span=None) -> torch.Tensor:
    """[n_out] int64 source index of each output sample, as F.interpolate(mode="nearest") (to ``span``
    samples, of which the first n_out are kept, when given)."""
    out = torch.arange(n_out, device="cpu")
    span = _span(n_out, span)
    if span == n_out == n_in:
        return out
    if span == n_out == 2 * n_in:
        return out // 2
    scale = torch.tensor(float(n_in), dtype=torch.float32, device="cpu") / span  # float32, as ATen
    src = torch.floor(out.to(torch.float32) * scale).to(torch.int64)
    return src.clamp_max(n_in - 1)


def _linear_taps(n_in: int, n_out: int, dtype: torch.dtype = torch.float32, span=None):
    """Two-tap bilinear weights along one axis: (i0, i1 [n_out] int64, w0, w1 [n_out] dtype).

    Output sample i = w0[i] * x[i0[i]] + w1[i] * x[i1[i]], exactly as ATen computes the source
    index and weights for F.interpolate(mode="bilinear", align_corners=False) (no antialias); to
    ``span`` samples, of which the first n_out are kept, when given (see interpolation_matrix).
    """
    rows = torch.arange(n_out, device="cpu")
    span = _span(n_out, span)
    if span == n_out == n_in:
        return rows, rows, torch.ones(n_out, dtype=dtype, device="cpu"), torch.zeros(n_out, dtype=dtype, device="cpu")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(float(n_in), dtype=work, device="cpu") / span
    # ATen evaluates scale * (i + 0.5) - 0.5 as one fused multiply-add: exact in float64, then rounded
    src = (scale.double() * (rows.double() + 0.5) - 0.5).to(work).clamp_min(0.0)  # [n_out] source position
    i0 = torch.floor(src).to(torch.int64).clamp_max(n_in - 1)  # [n_out]
    lam1 = (src - i0.to(work)).clamp(0.0, 1.0)  # [n_out]
    lam0 = 1.0 - lam1
    i1 = (i0 + 1).clamp_max(n_in - 1)  # at the last sample both taps read one input sample
    return i0, i1, lam0.to(dtype), lam1.to(dtype)


def interpolation_matrix(n_in: int, n_out: int, mode: str, dtype: torch.dtype = torch.float32, span=None) -> torch.Tensor:
    """[n_out, n_in] weights: row i = weights of output sample i along one axis.

    Identical to F.interpolate(mode="bilinear", align_corners=False) (one axis of it, including
    the clamping at both edges, and downscaling without antialias) or F.interpolate(mode="nearest").
    span (default n_out): the output samples the n_in input samples span, when they reach past the
    n_out kept: the first n_out rows of the matrix to ``span`` samples (F.interpolate with
    scale_factor = span / n_in). A UNet's token grid of ceil(latent / 2**l) cells spans that many
    cells of 8 * 2**l pixels, more than the image when the latent side is no multiple of 2**l.
    The index arithmetic is done in float32 like ATen does for float32 tensors (the pipeline's case);
    float64 weights may differ from ATen's float64 path in a few rows of large sizes (nearest 3 -> 9999,
    bilinear 2049 -> 16384). Built on the CPU, whatever the device of the features: callers move it.
    """
    n_in = _check_length(n_in, "n_in")
    n_out = _check_length(n_out, "n_out")
    check_mode(mode)
    if dtype not in FEATURE_DTYPES:  # an integer dtype would truncate the weights, a string fail inside torch
        raise ValueError(f"dtype must be torch.float16, bfloat16, float32 or float64, got {dtype!r}")
    span = _check_span(n_out, span)
    rows = torch.arange(n_out, device="cpu")
    matrix = torch.zeros(n_out, n_in, dtype=dtype, device="cpu")
    if mode == "nearest":
        matrix[rows, nearest_index(n_in, n_out, span)] = 1.0
        return matrix
    i0, i1, w0, w1 = _linear_taps(n_in, n_out, dtype, span)
    matrix.index_put_((rows, i0), w0, accumulate=True)
    matrix.index_put_((rows, i1), w1, accumulate=True)
    return matrix


def _is_real(v) -> bool:
    """Whether v is a finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_span(n_out: int, span):
    """span -> span (None, or a number of output samples >= n_out), else ValueError."""
    if span is not None and not (_is_real(span) and n_out <= span < 2**31):
        raise ValueError(f"span must be a number of pixels >= n_out ({n_out}), got {span!r}")
    return span


def resample_axis(x: torch.Tensor, dim: int, n_out: int, mode: str, span=None) -> torch.Tensor:
    """[..., n_in, ...] -> [..., n_out, ...]: x resampled along ``dim`` (gathers, no dense matrix); the
    input spanning ``span`` output samples when given (see interpolation_matrix)."""
    n_in = x.shape[dim]
    if mode == "nearest":
        return x.index_select(dim, nearest_index(n_in, n_out, span).to(x.device))
    i0, i1, w0, w1 = _linear_taps(n_in, n_out, x.dtype, span)
    along_dim = [1] * x.dim()
    along_dim[dim] = n_out  # [1, .., n_out, .., 1]: the weights broadcast along dim
    out = x.index_select(dim, i0.to(x.device)).mul_(w0.to(x.device).view(along_dim))  # [..., n_out, ...]
    return out.add_(x.index_select(dim, i1.to(x.device)).mul_(w1.to(x.device).view(along_dim)))


def upsample(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear", span=None) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, H, W] float32 (float64 for float64 input), same as F.interpolate (for
    float64 input up to a few rows of large sizes, see interpolation_matrix). span: (Hs, Ws) the
    pixels the grid spans when it reaches past the image (see interpolation_matrix; None, or None for a
    side: the image's size, as FeatureStack.span gives them)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor [B, C, h, w], got {shape}")
    if x.is_complex():  # x.to(float32) would drop the imaginary parts with no more than a warning
        raise ValueError(f"x must be a real tensor [B, C, h, w], got {x.dtype}")
    if x.is_meta:
        raise ValueError("x is on the meta device: it holds no values")
    B, C, h, w = x.shape
    if h == 0 or w == 0:
        raise ValueError(f"x must have a grid of at least 1x1 [B, C, h, w], got {tuple(x.shape)}")
    H, W = check_size(size)
    check_mode(mode)
    Hs, Ws = (None, None) if span is None else (_check_span(H, span[0]), _check_span(W, span[1]))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(dtype)
    return resample_axis(resample_axis(x, 2, H, mode, Hs), 3, W, mode, Ws)  # [B, C, H, w] -> [B, C, H, W]


def resolution_weights(resolutions: list[float]) -> list[float]:
    """Eq. 5: weight r_i / max(r) for each grid resolution r_i (a grid side in cells, or cells per pixel as
    grid_resolution gives it: a 16x16 grid among 64x64 ones gets 0.25)."""
    try:
        rs = list(resolutions)
    except TypeError:
        rs = []
    if not rs or any(not _is_real(r) or r <= 0 for r in rs):
        raise ValueError(f"resolutions must be a non-empty list of positive numbers, got {resolutions!r}")
    top = max(rs)
    return [r / top for r in rs]


def grid_resolution(grid: tuple[int, int], size: tuple[int, int]) -> float:
    """Eq. 5's r of a token grid (h, w) of an image of size (H, W) pixels, in cells per pixel: 1 / (8 * 2**l)
    for the UNet's grid at level l (ceil(latent / 2**l) cells of 8 * 2**l pixels, whatever the rounding of
    its sides: a 1000 px side's 1/4 grid has 32 cells, r = 1/32, not 32/1000), else the finer of h / H and
    w / W (a grid stretched onto the image, from no UNet level)."""
    (h, w), (H, W) = grid, size
    levels = grid_levels((max(1, H // 8), max(1, W // 8)))  # the levels Recording.grid_level checks grids against
    if (h, w) in levels:
        return 1.0 / (8 * 2 ** levels.index((h, w)))
    return max(h / H, w / W)


@dataclass
class FeatureStack:
    """Virtual [B, C, H, W]: concat over grids of weight_i * upsample(grid_i); never materialised.

    grids[i] is [B, C_i, h_i, w_i] float32 with weights[i] already multiplied in; keys[i] lists the
    layers it holds (channels head-major per layer, layers in UNet order). spans[i] (H_i, W_i) >= size:
    the pixels grid i spans, of which the image is the top-left size (a UNet's grid of ceil(latent /
    2**l) cells reaches past an image whose latent side is no multiple of 2**l); None: every grid spans
    the image (stretched onto it).
    """

    grids: list[torch.Tensor]
    weights: list[float]
    keys: list[list[LayerKey]]
    size: tuple[int, int]
    mode: str
    spans: list[tuple[float, float]] | None = None
    source: dict[str, str] | None = dataclasses.field(default=None, repr=False)  # HeadFeatures.source

    def span(self, index: int, size: tuple[int, int] | None = None) -> tuple:
        """(H_i, W_i): the pixels grid ``index`` spans at ``size`` (default self.size; another size scales
        the span with it), or (None, None) where it spans the image exactly."""
        H, W = self.size
        if not self.spans or tuple(self.spans[index]) == (H, W):
            return None, None
        Hs, Ws = self.spans[index]
        if size is None or tuple(size) == (H, W):
            return Hs, Ws
        return Hs * size[0] / H, Ws * size[1] / W

    @property
    def num_channels(self) -> int:
        return sum(int(g.shape[1]) for g in self.grids)

    @property
    def batch_size(self) -> int:
        return int(self.grids[0].shape[0])

    @property
    def grid_sizes(self) -> list[tuple[int, int]]:
        """(h_i, w_i) of each grid entry."""
        return [(int(g.shape[2]), int(g.shape[3])) for g in self.grids]

    def to(self, device) -> FeatureStack:
        """The same virtual stack with every grid on ``device`` (grids already there are shared)."""
        return dataclasses.replace(self, grids=[g.to(device) for g in self.grids])

    def matrices(self, index: int, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Mh [H, h_i], Mw [W, w_i]) float32 such that upsample(grid) = Mh @ grid @ Mw.T in self.mode."""
        H, W = self.size if size is None else check_size(size)
        h, w = self.grid_sizes[index]
        Hs, Ws = self.span(index, (H, W))
        return interpolation_matrix(h, H, self.mode, span=Hs), interpolation_matrix(w, W, self.mode, span=Ws)

    def materialise(self, size: tuple[int, int] | None = None, batch_index: int | None = None) -> torch.Tensor:
        """[B, C, H', W'] explicit stack at ``size`` (default self.size); batch_index b -> [1, C, H', W'].

        Memory is B*C*H'*W' floats: for small sizes and references only.
        """
        check_stack(self)  # grids of one batch and device, finite values: named, not failing inside torch.cat
        size = self.size if size is None else check_size(size)
        grids = self.grids
        if batch_index is not None:
            check_batch_index(batch_index, self.batch_size)
            grids = [g[batch_index : batch_index + 1] for g in grids]  # each [1, C_i, h_i, w_i]
        return torch.cat([upsample(g, size, self.mode, self.span(i, size)) for i, g in enumerate(grids)], dim=1)


def _check_values(g: torch.Tensor, where: str) -> None:
    """NaN, inf, or features beyond float32's range -> ValueError naming ``where`` (the grid). One
    reduction (the norm) and no temporary the size of g; only a grid whose norm is not finite is
    looked at again."""
    norm = float(torch.linalg.vector_norm(g, dtype=torch.float32 if g.element_size() < 4 else None))
    if math.isfinite(norm) and norm <= _MAX_FEATURE:
        return
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"stack contains NaN or inf features in {where}")
    peak = float(peak_abs(g))
    if peak > _MAX_FEATURE:
        raise ValueError(
            f"stack: features beyond float32's range in {where} (largest |value| {peak:.3g}, at most "
            f"{_MAX_FEATURE:.3g}); scale them down"
        )


def channel_means(flat: torch.Tensor) -> torch.Tensor:
    """flat [..., C, N] -> [..., C] float64 mean of each channel's N values, a few channels at a time:
    mean(dtype=float64) converts all it is given inside the mean, and a whole grid's float64 copy is
    twice the grid (the same bits as one mean over all channels)."""
    C, N = flat.shape[-2:]
    step = max(1, _CHUNK_BYTES // (8 * max(1, flat[..., :1, :].numel())))  # channels per float64 copy
    return torch.cat([part.mean(-1, dtype=torch.float64) for part in flat.split(step, -2)], -1)  # [..., C]


def peak_abs(g: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """g [...] -> [] largest |value|, or along ``dim``: g's shape without dim; in g's dtype (aminmax,
    no copy of g)."""
    low, high = torch.aminmax(g) if dim is None else torch.aminmax(g, dim=dim)
    return torch.maximum(-low, high)


def _grid_name(stack: FeatureStack, i: int) -> str:
    """'grid 2 (16x16: layers input.4.0, output.3.0)' -- the layers when the stack lists them."""
    g = stack.grids[i]
    keys = stack.keys[i] if i < len(stack.keys) else []
    names = ", ".join(getattr(key, "name", str(key)) for key in keys[:6]) + (", ..." if len(keys) > 6 else "")
    return f"grid {i} ({int(g.shape[2])}x{int(g.shape[3])}" + (f": layers {names})" if names else ")")


def check_stack(stack) -> tuple[int, int]:
    """FeatureStack -> (H, W), or an error naming what is wrong: the grids (floating [B, C, h, w], one
    batch size, one device, values), the size. Every stage that reads a stack checks it first."""
    if not isinstance(stack, FeatureStack):
        raise TypeError(f"stack must be a FeatureStack, got {type(stack).__name__}")
    if not stack.grids:
        raise ValueError("stack has no feature grid")
    H, W = check_size(stack.size, "stack.size")
    first = None
    for i, g in enumerate(stack.grids):
        if not isinstance(g, torch.Tensor) or g.dim() != 4 or g.dtype not in FEATURE_DTYPES:
            what = f"{g.dtype} {tuple(g.shape)}" if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"stack grids must be floating [B, C, h, w] tensors (float16 .. float64), got {what}")
        if g.numel() == 0:
            raise ValueError(f"stack grids must have no empty dimension [B, C, h, w], got {tuple(g.shape)}")
        name = _grid_name(stack, i)
        first = check_one_device(first, name, g, "stack", "grid")
        if g.is_meta:
            raise ValueError(f"stack {name} is on the meta device: it holds no values")
        _check_values(g, name)
    batches = sorted({int(g.shape[0]) for g in stack.grids})
    if len(batches) > 1:
        raise ValueError(f"stack grids must share one batch size, got {batches}")
    if stack.spans is not None and (
        len(stack.spans) != len(stack.grids)
        or not all(len(sp) == 2 and all(_is_real(v) for v in sp) and sp[0] >= H and sp[1] >= W for sp in stack.spans)
    ):
        raise ValueError(f"stack.spans must hold one (H_i, W_i) >= the size {H}x{W} per grid, got {stack.spans!r}")
    return H, W


def make_feature_stack(
    features: HeadFeatures, mode: str = "bilinear", reweight: bool = False, size: tuple[int, int] | None = None
) -> FeatureStack:
    """HeadFeatures -> FeatureStack at ``size`` (None = features.image_size); layers grouped by grid.

    Channels of a layer are head-major ([heads * c] from [B, heads, h, w, c]); grid entries come in
    order of first appearance in UNet order. reweight=True applies eq. 5 with each grid's resolution r (grid_resolution).
    """
    if not isinstance(features, HeadFeatures):
        raise TypeError(f"features must be HeadFeatures, got {type(features).__name__}")
    check_mode(mode)
    size = check_size(features.image_size if size is None else size)
    if not features.layers:
        raise ValueError("features: no layer (the selection left nothing to upsample)")
    check_reweight(reweight)
    features.checked_batch_size()
    for key, t in features.layers.items():
        if not all_finite(t):
            raise ValueError(f"features: layer {key!s} contains NaN or inf values")
        if t.dtype == torch.float64:
            peak = float(peak_abs(t.detach()))
            if peak > _MAX_FEATURE:
                raise ValueError(
                    f"features: layer {key!s} has values beyond float32's range (the stack is float32): scale it "
                    f"into about 1e-38 .. 1e38"
                )
            if peak > 0 and not bool(torch.tensor(peak, dtype=torch.float64).to(torch.float32)):
                # every value would become 0 in the float32 stack: k-means would see one constant feature
                raise ValueError(
                    f"features: layer {key!s} has values below float32's range (largest |value| {peak:.3g}; the "
                    f"stack is float32, where they would all be 0): scale it into about 1e-38 .. 1e38"
                )
    groups: dict[tuple[int, int], list[tuple[LayerKey, torch.Tensor]]] = {}
    for key, t in features.layers.items():
        h, w = int(t.shape[2]), int(t.shape[3])
        groups.setdefault((h, w), []).append((key, t.detach()))  # [B, heads, h, w, c]
    resolutions = [grid_resolution(hw, features.image_size) for hw in groups]
    weights = resolution_weights(resolutions) if reweight else [1.0] * len(resolutions)
    # the pixels each grid spans on the features' own image, scaled with it when size differs
    (H0, W0), (H, W) = features.image_size, size
    spans = [(Hs * H / H0, Ws * W / W0) if (H, W) != (H0, W0) else (Hs, Ws)
             for Hs, Ws in (grid_span(hw, features.image_size) for hw in groups)]
    grids, keys = [], []
    for weight, ((h, w), members) in zip(weights, groups.items()):
        B = int(members[0][1].shape[0])
        C = sum(int(t.shape[1]) * int(t.shape[4]) for _, t in members)
        # every layer's channels copied straight into the grid (float32): no per-layer copy joined by
        # torch.cat, which held the stack twice at its peak
        grid = torch.empty(B, C, h, w, dtype=torch.float32, device=members[0][1].device)  # [B, C_i, h, w]
        start = 0
        for _, t in members:
            n = int(t.shape[1]) * int(t.shape[4])  # heads * c, head-major
            grid[:, start : start + n].view(B, t.shape[1], t.shape[4], h, w).copy_(t.permute(0, 1, 4, 2, 3))
            start += n
        grids.append(grid.mul_(weight) if weight != 1.0 else grid)
        keys.append([key for key, _ in members])
    return FeatureStack(grids, weights, keys, size, mode, spans, features.source)


def grid_span(grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """A UNet token grid (h, w) of an image of size (H, W) pixels -> (H_i, W_i) >= (H, W), the pixels it spans.

    The UNet's grid at level l has ceil(latent / 2**l) cells of 8 * 2**l pixels each side (latent = the
    image's side / 8; stride-2 convolutions pad the last cell), so it reaches past the image where the
    latent side is no multiple of 2**l: a 1000 px side (latent 125) has a 1/4 grid of 32 cells spanning
    1024 px. Stretching that grid onto the image would move features by up to half a cell per 32 cells
    (24 px at the far edge). A side the grid fits no level of (not from a UNet) spans the image."""
    span = []
    for n, N in zip(grid, size):
        latent, cells = N // 8, None
        if N % 8 == 0 and latent >= 1:
            level, side = 0, latent
            while side > n:
                level, side = level + 1, math.ceil(side / 2)
            if side == n and n > 1:
                cells = n * 8 * 2**level
        span.append(cells if cells is not None and cells >= N else N)
    return tuple(span)


# The upsampling-error map (eq. 6), which README's core API placed in this module, is error_map.py's now;
# its public names stay importable from here, loaded on first use (error_map imports this module).
_ERROR_MAP_NAMES = (
    "upsampling_error", "upsampling_error_at", "ERROR_MAP_PIXELS", "error_lattice_step", "upsampling_error_blocks",
)


def __getattr__(name: str):
    if name in _ERROR_MAP_NAMES:
        from . import error_map

        return getattr(error_map, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
