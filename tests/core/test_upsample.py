"""Interpolation matrices against F.interpolate, the feature stack, eq. 5 reweighting and eq. 6 error."""

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from headseg.nodes.core import error_map
from headseg.nodes.core import upsample as up
from headseg.nodes.core.error_map import upsampling_error
from headseg.nodes.core.pca import HeadFeatures
from headseg.nodes.core.recording import LayerKey
from headseg.nodes.core.upsample import (
    interpolation_matrix,
    make_feature_stack,
    resolution_weights,
    upsample,
)


SIZES = [(3, 64), (5, 96), (1, 8), (8, 1), (2, 5), (7, 3), (12, 8), (16, 64), (63, 64), (64, 63), (64, 16), (8, 512), (32, 48), (6, 6),
         (4, 8), (32, 64), (8, 82), (128, 164)]  # exact 2x; sizes where float64 nearest indices would differ from torch's


def reference_interpolate(x, size, mode):
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=size, mode=mode, **kwargs)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("n_in,n_out", SIZES)
def test_matrix_equals_f_interpolate_weights_exactly(n_in, n_out, mode):
    impulses = torch.eye(n_in).reshape(1, n_in, n_in, 1)  # channel j = unit impulse at sample j
    ref = reference_interpolate(impulses, (n_out, 1), mode).reshape(n_in, n_out).T  # [n_out, n_in]
    M = interpolation_matrix(n_in, n_out, mode)
    assert M.shape == (n_out, n_in) and M.dtype == torch.float32
    assert torch.equal(M, ref)
    torch.testing.assert_close(M.sum(1), torch.ones(n_out))  # partition of unity


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_matrix_along_width_axis_too(mode):
    impulses = torch.eye(5).reshape(5, 1, 1, 5)
    ref = reference_interpolate(impulses, (1, 96), mode).reshape(5, 96).T
    assert torch.equal(interpolation_matrix(5, 96, mode), ref)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("src,dst", [((3, 5), (64, 96)), ((8, 12), (64, 96)), ((1, 1), (8, 8)), ((16, 16), (5, 7)), ((4, 6), (4, 6))])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_upsample_equals_f_interpolate(mode, src, dst, dtype):
    x = torch.randn(2, 3, *src, generator=torch.Generator().manual_seed(0)).to(dtype)
    ours = upsample(x, dst, mode)
    ref = reference_interpolate(x.to(ours.dtype), dst, mode)
    assert ours.shape == (2, 3, *dst)
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    if mode == "nearest":
        assert torch.equal(ours, ref)
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [dict(n_in=0, n_out=4, mode="bilinear"), dict(n_in=3, n_out=4, mode="bicubic"), dict(n_in=3, n_out=2.0, mode="nearest")])
def test_matrix_bad_arguments(bad):
    with pytest.raises(ValueError, match="n_in|n_out|mode"):
        interpolation_matrix(**bad)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "float32", None])
def test_matrix_names_a_bad_dtype(dtype):
    with pytest.raises(ValueError, match="^dtype must be torch.float16"):
        interpolation_matrix(3, 6, "bilinear", dtype)


def test_upsample_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        upsample(torch.zeros(1, 1, 2, 2), (0, 4))
    with pytest.raises(ValueError, match="mode"):
        upsample(torch.zeros(1, 1, 2, 2), (4, 4), "area")
    with pytest.raises(ValueError, match="x must"):
        upsample(torch.zeros(1, 2, 2), (4, 4))
    x = torch.randn(1, 1, 2, 2) + 1j * torch.randn(1, 1, 2, 2)  # its imaginary parts were dropped, with a warning
    with pytest.raises(ValueError, match=r"^x must be a real tensor \[B, C, h, w\], got torch.complex64$"):
        upsample(x, (4, 4))
    with pytest.raises(ValueError, match="^x is on the meta device: it holds no values$"):  # returned as a meta tensor
        upsample(torch.zeros(1, 1, 2, 2, device="meta"), (4, 4))


# ------------------------------------------------------------------------------------------ FeatureStack
def features(latent=(8, 12), batch=2, c=3, seed=0):
    """SD-like layers on three grids (8x12, 4x6, 2x3), interleaved in UNet order."""
    g = torch.Generator().manual_seed(seed)
    layout = [("input", 1, 2, (8, 12)), ("input", 4, 3, (4, 6)), ("input", 7, 4, (2, 3)),
              ("output", 3, 4, (2, 3)), ("output", 6, 3, (4, 6)), ("output", 9, 2, (8, 12))]
    layers = {LayerKey(b, n, 0): torch.randn(batch, heads, *grid, c, generator=g) for b, n, heads, grid in layout}
    return HeadFeatures(layers, (latent[0] * 8, latent[1] * 8), c)


def explicit_stack(feats, size, mode, weights_by_grid=None):
    """Independent reference: every layer upsampled with F.interpolate, channels head-major, concat."""
    parts = {}
    for key, t in feats.layers.items():
        B, heads, h, w, c = t.shape
        chans = torch.stack([t[:, hd, :, :, j] for hd in range(heads) for j in range(c)], dim=1)  # [B, heads*c, h, w]
        scale = 1.0 if weights_by_grid is None else weights_by_grid[(h, w)]
        parts.setdefault((h, w), []).append(scale * reference_interpolate(chans, size, mode))
    return torch.cat([p for group in parts.values() for p in group], dim=1)


def test_stack_groups_layers_by_grid():
    feats = features()
    stack = make_feature_stack(feats)
    assert stack.size == (64, 96) and stack.mode == "bilinear"
    assert stack.grid_sizes == [(8, 12), (4, 6), (2, 3)]
    assert [[k.name for k in ks] for ks in stack.keys] == [["input.1.0", "output.9.0"], ["input.4.0", "output.6.0"], ["input.7.0", "output.3.0"]]
    assert stack.num_channels == (2 + 3 + 4 + 4 + 3 + 2) * 3
    assert stack.batch_size == 2 and stack.weights == [1.0, 1.0, 1.0]
    assert all(g.dtype == torch.float32 for g in stack.grids)


def test_features_that_carry_gradients_give_a_plain_stack():
    """Features with requires_grad (e.g. from a user's own torch code) are taken as values: the stack,
    the error map and the k-means all work on them (the error map wrote into a graph before)."""
    feats = features()
    plain = make_feature_stack(feats)
    tracked = HeadFeatures(
        {key: t.clone().requires_grad_(True) for key, t in feats.layers.items()}, feats.image_size, feats.components
    )
    stack = make_feature_stack(tracked)
    assert not any(g.requires_grad for g in stack.grids)
    assert all(torch.equal(a, b) for a, b in zip(stack.grids, plain.grids))
    torch.testing.assert_close(error_map.upsampling_error(stack), error_map.upsampling_error(plain), rtol=0, atol=0)


def test_stack_channels_are_head_major():
    feats = features()
    stack = make_feature_stack(feats)
    t = feats.layers[LayerKey("output", 6, 0)]  # second layer of grid entry 1, after input.4.0's 3 heads
    for head in range(3):
        for j in range(3):
            assert torch.equal(stack.grids[1][:, 9 + head * 3 + j], t[:, head, :, :, j])


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("reweight", [False, True])
def test_stack_is_built_once_in_memory(dtype, reweight):
    """The grids are the layers' channels head-major in float32 (times eq. 5's weight), bit for bit, and
    building them holds no second copy of the stack (per-layer copies joined by torch.cat held it twice:
    92 MB at the peak of SDXL's 46 MB stack at 1024 x 1024, 734 MB for a batch of eight)."""
    from headseg.tests.support.peak_memory import PeakBytes

    g = torch.Generator().manual_seed(3)
    layers = {
        LayerKey("input", 1, 0): torch.randn(2, 5, 32, 32, 8, generator=g),
        LayerKey("input", 4, 0): torch.randn(2, 10, 16, 16, 8, generator=g),
        LayerKey("output", 6, 0): torch.randn(2, 10, 16, 16, 8, generator=g),
        LayerKey("output", 9, 0): torch.randn(2, 5, 32, 32, 8, generator=g),
    }
    feats = HeadFeatures({key: t.to(dtype) for key, t in layers.items()}, (256, 256), 8)
    with PeakBytes() as mem:
        stack = make_feature_stack(feats, reweight=reweight)
    size = sum(grid.numel() * 4 for grid in stack.grids)
    assert mem.peak <= size + size // 10, (mem.peak, size)
    weights = {(32, 32): 1.0, (16, 16): 0.5 if reweight else 1.0}
    for grid, keys, (h, w) in zip(stack.grids, stack.keys, stack.grid_sizes):
        parts = [feats.layers[key].to(torch.float32).permute(0, 1, 4, 2, 3).reshape(2, -1, h, w) for key in keys]
        want = torch.cat(parts, 1)
        want = want * weights[h, w] if weights[h, w] != 1.0 else want
        assert grid.is_contiguous() and torch.equal(grid, want)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("size", [None, (20, 30), (5, 7)])
def test_materialise_equals_explicit_reference(mode, size):
    feats = features()
    stack = make_feature_stack(feats, mode=mode, size=size)
    out_size = size or feats.image_size
    ref = explicit_stack(feats, out_size, mode)
    torch.testing.assert_close(stack.materialise(), ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stack.materialise(size=(9, 11), batch_index=1), explicit_stack(feats, (9, 11), mode)[1:2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_matrices_reproduce_upsample_of_a_grid(mode):
    """Both matrices follow the stack's mode, at its size or at the size asked for (rows and columns at
    different, non-integer ratios, where a wrong mode or a swapped axis changes the product)."""
    stack = make_feature_stack(features(), mode=mode, size=(24, 36))
    for size, expected in ((None, (24, 36)), ((17, 29), (17, 29))):
        mh, mw = stack.matrices(1, size)
        assert mh.shape == (expected[0], stack.grids[1].shape[2]) and mw.shape == (expected[1], stack.grids[1].shape[3])
        torch.testing.assert_close(mh @ stack.grids[1] @ mw.T, reference_interpolate(stack.grids[1], expected, mode), rtol=1e-6, atol=1e-6)


def test_resolution_weights_eq5():
    assert resolution_weights([16, 32, 64]) == [0.25, 0.5, 1.0]
    assert resolution_weights([64, 16]) == [1.0, 0.25]
    assert resolution_weights([7]) == [1.0]
    with pytest.raises(ValueError, match="^resolutions must be a non-empty list of positive numbers"):
        resolution_weights([])
    with pytest.raises(ValueError, match="^resolutions must be a non-empty list of positive numbers"):
        resolution_weights([0, 4])


def test_reweighted_stack():
    feats = features()
    stack = make_feature_stack(feats, reweight=True, size=(16, 24))
    assert stack.weights == [1.0, 0.5, 0.25]  # sides 12, 6, 3 (max of h, w)
    ref = explicit_stack(feats, (16, 24), "bilinear", {(8, 12): 1.0, (4, 6): 0.5, (2, 3): 0.25})
    torch.testing.assert_close(stack.materialise(), ref, rtol=1e-6, atol=1e-6)


def test_stack_bad_arguments():
    feats = features()
    with pytest.raises(ValueError, match="mode"):
        make_feature_stack(feats, mode="cubic")
    with pytest.raises(ValueError, match="size"):
        make_feature_stack(feats, size=(64,))
    with pytest.raises(ValueError, match="no layer"):
        make_feature_stack(HeadFeatures({}, (64, 64), 3))
    with pytest.raises(ValueError, match="batch_index"):
        make_feature_stack(feats).materialise(batch_index=2)


def test_materialise_checks_the_stack_first():
    """materialise read the grids unchecked: grids of two batch sizes or on the meta device failed inside
    torch.cat, and NaN features came back as NaN."""
    stack = make_feature_stack(features())
    g = stack.grids
    for grids, words in (
        ([g[0][:1]] + g[1:], r"^stack grids must share one batch size, got \[1, 2\]$"),
        ([g[0].to("meta")] + g[1:], r"^stack grid 0 \(8x12.*\) is on the meta device: it holds no values$"),
        ([g[0] * float("nan")] + g[1:], r"^stack contains NaN or inf features in grid 0 \(8x12"),
    ):
        with pytest.raises(ValueError, match=words):
            dataclasses.replace(stack, grids=grids).materialise()


# ------------------------------------------------------------------------------------------ eq. 6
@pytest.mark.parametrize("reweight", [False, True])
@pytest.mark.parametrize("size", [(32, 48), (24, 36), (30, 50), (5, 7)], ids=["even-ratios", "odd-ratios", "non-integer", "down"])
def test_upsampling_error_equals_reference(reweight, size):
    feats = features()
    stack = make_feature_stack(feats, reweight=reweight, size=size)
    weights = dict(zip(stack.grid_sizes, stack.weights))
    bil = explicit_stack(feats, size, "bilinear", weights)
    near = explicit_stack(feats, size, "nearest", weights)
    ref = (bil - near).abs().mean(dim=1)  # [B, H, W]
    err = upsampling_error(stack)
    assert err.shape == (2, *size)
    torch.testing.assert_close(err, ref, rtol=1e-5, atol=1e-6)


def test_upsampling_error_in_chunks_is_the_same(monkeypatch):
    stack = make_feature_stack(features(), size=(32, 48))
    whole = upsampling_error(stack)
    monkeypatch.setattr(error_map, "_CHUNK_BYTES", 1)  # one channel at a time
    monkeypatch.setattr(up, "_CHUNK_BYTES", 1)  # its channel means too
    torch.testing.assert_close(upsampling_error(stack), whole, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("size", [(32, 48), (30, 50), (5, 7)], ids=["even-ratios", "non-integer", "down"])
def test_upsampling_error_at_some_pixels_equals_the_reference_there(size):
    feats = features()  # batch 2
    stack = make_feature_stack(feats, reweight=True, size=size)
    weights = dict(zip(stack.grid_sizes, stack.weights))
    ref = (explicit_stack(feats, size, "bilinear", weights) - explicit_stack(feats, size, "nearest", weights)).abs().mean(1)
    g = torch.Generator().manual_seed(size[0])
    rows = torch.randperm(size[0], generator=g)[: max(1, size[0] // 3)]  # any rows, in any order
    cols = torch.arange(0, size[1], 4)
    got = error_map.upsampling_error_at(stack, rows, cols)
    assert got.shape == (2, rows.numel(), cols.numel())
    torch.testing.assert_close(got, ref[:, rows][:, :, cols], rtol=1e-5, atol=1e-6)
    for bad in (torch.tensor([size[0]]), torch.tensor([-1]), torch.tensor([], dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64)):
        with pytest.raises(ValueError, match="rows must be a non-empty 1-D index"):
            error_map.upsampling_error_at(stack, bad, cols)
    for bad in ([0.5], torch.tensor([1.7]), torch.tensor([True, False])):  # never truncated or read as indices
        with pytest.raises(ValueError, match="cols must hold integer pixel indices"):
            error_map.upsampling_error_at(stack, rows, bad)
    for bad in (None, "12", [[1], [2, 3]]):
        with pytest.raises(ValueError, match="^rows must be a 1-D tensor or list of integer pixel indices, got"):
            error_map.upsampling_error_at(stack, bad, cols)


def _stack(grids, size=(64, 64)):
    return up.FeatureStack(grids, [1.0] * len(grids), [[LayerKey("input", 1 + i, 0)] for i in range(len(grids))], size, "bilinear")


@pytest.mark.parametrize(
    "stack, match",
    [
        (_stack([torch.randn(2, 3, 8, 8), torch.randn(1, 3, 4, 4)]), r"^stack grids must share one batch size, got \[1, 2\]"),
        (_stack([]), "^stack has no feature grid"),
        (_stack([torch.randn(3, 8, 8)]), r"^stack grids must be floating \[B, C, h, w\] tensors \(float16 .. float64\), got torch.float32 \(3, 8, 8\)"),
        (_stack([torch.randn(1, 3, 8, 8)], size=(0, 64)), r"^stack.size"),
        (_stack([torch.full((1, 3, 8, 8), float("nan"))]), r"^stack contains NaN or inf features in grid 0 \(8x8: layers input.1.0\)"),
        (_stack([torch.randn(1, 3, 8, 8).double() * 1e300]), r"^stack: features beyond float32's range in grid 0"),
    ],
    ids=["batches", "no-grid", "3-d", "size", "nan", "beyond-float32"],
)
def test_upsampling_error_checks_its_stack_as_kmeans_does(stack, match):
    for error_of in (upsampling_error, lambda s: error_map.upsampling_error_at(s, [0, 1], [2])):
        with pytest.raises(ValueError, match=match):
            error_of(stack)


def test_upsampling_error_of_a_batch_equals_each_image_alone(monkeypatch):
    monkeypatch.setattr(error_map, "_CHUNK_BYTES", 3 * 32 * 48 * 4 * 2)  # two channels per chunk
    monkeypatch.setattr(up, "_CHUNK_BYTES", 3 * 32 * 48 * 4 * 2)  # and per channel mean
    stack = make_feature_stack(features(), size=(32, 48))
    both = upsampling_error(stack)
    for b in range(2):
        one = make_feature_stack(features(), size=(32, 48))
        one.grids = [g[b : b + 1] for g in one.grids]
        torch.testing.assert_close(upsampling_error(one)[0], both[b], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor", [2.0**100, 1e37, 1e-35, 1e-37], ids=["2^100", "1e37", "1e-35", "1e-37"])
def test_upsampling_error_of_any_float32_magnitude_scales_with_it(factor, dtype):
    """Eq. 6 is homogeneous: features times f give the error map times f, for any features within
    float32's range (the float32 sum over thousands of channels would overflow, and differences of tiny
    features would fall below float32's normal range and lose their digits, without an exact
    power-of-two scaling)."""
    feats = features()  # batch 2
    base = make_feature_stack(feats, size=(30, 50))
    big = make_feature_stack(feats, size=(30, 50))
    big.grids = [g.repeat(1, 60, 1, 1) for g in base.grids]  # many channels, as in a real stack
    base.grids = [g.repeat(1, 60, 1, 1) for g in base.grids]
    scaled = up.FeatureStack([(g.double() * factor).to(dtype) for g in big.grids], big.weights, big.keys, big.size, big.mode)
    want = upsampling_error(base).double() * factor
    got = upsampling_error(scaled)
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * factor)
    rows, cols = torch.tensor([0, 7, 29]), torch.tensor([3, 49])
    torch.testing.assert_close(error_map.upsampling_error_at(scaled, rows, cols).double(), want[:, rows][:, :, cols], rtol=1e-4, atol=1e-5 * factor)



@pytest.mark.parametrize("offset, spread", [(1e4, 1e-2), (-3e5, 1.0), (2.0**40, 2.0**20)])
@pytest.mark.parametrize("size", [(64, 64), (17, 130)])
def test_upsampling_error_of_features_about_a_large_offset_equals_that_about_zero(offset, spread, size):
    """Both interpolations keep constants, so eq. 6 of features offset + x is that of x. The offset is
    exact and offset + x is exactly x about it in float32 (the same values), so the map of the grids less
    the offset is the reference; a float32 map of the offset features themselves left the differences
    of a small spread about it to rounding (10 % of the map at 1e-2 about 1e4)."""
    gen = torch.Generator().manual_seed(3)
    grids = [torch.rand(2, c, h, w, generator=gen, dtype=torch.float64) * 2 - 1 for c, h, w in ((3, 2, 64), (2, 8, 8))]
    offset_grids = [(g * spread + offset).float() for g in grids]  # [B, C_g, h, w] each
    about_zero = [(g.double() - offset).float() for g in offset_grids]  # exact: the same values less the offset
    stack = up.FeatureStack(offset_grids, [1.0, 1.0], [[], []], size, "bilinear")
    reference = up.FeatureStack(about_zero, [1.0, 1.0], [[], []], size, "bilinear")
    want = upsampling_error(reference)
    assert float(want.abs().max()) > 0.05 * spread
    torch.testing.assert_close(upsampling_error(stack), want, rtol=1e-5, atol=1e-6 * spread)
    rows, cols = torch.tensor([0, 7, size[0] - 1]), torch.tensor([3, 49, size[1] - 1])
    torch.testing.assert_close(error_map.upsampling_error_at(stack, rows, cols), want[:, rows][:, :, cols], rtol=1e-5, atol=1e-6 * spread)

def test_upsampling_error_of_one_channel_about_a_large_offset_beside_centred_ones():
    """One channel 1e-2 about 1e4 beside channels about 0 (in one grid): eq. 6 of the offset channel is that
    of it less the offset, so the map is that of the grid with the offset taken out of that channel alone."""
    gen = torch.Generator().manual_seed(4)
    grid = torch.rand(2, 4, 3, 40, generator=gen, dtype=torch.float64) * 2 - 1  # [B, C, h, w]
    grid -= grid.mean(dim=(2, 3), keepdim=True)  # every channel's mean 0 (PCA scores)
    grid[:, 0] = grid[:, 0] * 1e-2 + 1e4
    offset_grid = grid.float()
    about_zero = offset_grid.double()
    about_zero[:, 0] -= 1e4  # exact: the same values less the offset
    size = (24, 120)
    stack = up.FeatureStack([offset_grid], [1.0], [[]], size, "bilinear")
    want = upsampling_error(up.FeatureStack([about_zero.float()], [1.0], [[]], size, "bilinear"))
    torch.testing.assert_close(upsampling_error(stack), want, rtol=1e-4, atol=1e-7)
    rows, cols = torch.tensor([0, 11, 23]), torch.tensor([2, 61, 119])
    torch.testing.assert_close(error_map.upsampling_error_at(stack, rows, cols), want[:, rows][:, :, cols], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("H, W", [(256, 256), (256, 257), (300, 300), (1, 65537), (1024, 1024), (1000, 664)])
def test_error_lattice_starts_above_max_pixels(H, W):
    """The map is computed at every pixel up to 65536 pixels in all (the node's tooltip) and above that on
    a lattice of at most that many block centres."""
    from headseg.nodes.core.error_map import error_lattice_step

    f = error_lattice_step(H, W)
    assert (f == 1) == (H * W <= 256 * 256)
    assert (H / f) * (W / f) <= 256 * 256


def test_upsampling_error_scales_each_image_of_a_batch_on_its_own():
    """A batch of a loud image (features near 1e37) and a quiet one (near 1e-37): each image's map is
    its own map alone, at both the full grid and a lattice."""
    feats = features()  # batch 2
    base = make_feature_stack(feats, size=(30, 50))
    base.grids = [g.repeat(1, 60, 1, 1) for g in base.grids]
    factors = torch.tensor([1e37, 1e-37], dtype=torch.float64)[:, None, None, None]  # [B, 1, 1, 1]
    mixed = up.FeatureStack([(g.double() * factors).float() for g in base.grids], base.weights, base.keys, base.size, base.mode)
    rows, cols = torch.tensor([0, 7, 29]), torch.tensor([3, 49])
    for b in range(2):
        alone = up.FeatureStack([g[b : b + 1] for g in mixed.grids], base.weights, base.keys, base.size, base.mode)
        torch.testing.assert_close(upsampling_error(mixed)[b : b + 1], upsampling_error(alone), rtol=1e-5, atol=0.0)
        torch.testing.assert_close(error_map.upsampling_error_at(mixed, rows, cols)[b : b + 1], error_map.upsampling_error_at(alone, rows, cols), rtol=1e-5, atol=0.0)
        assert bool((upsampling_error(alone) > 0).any())


def test_upsampling_error_planted():
    # at the native size both modes are the identity; a constant map has no error at any size
    feats = HeadFeatures({LayerKey("output", 9, 0): torch.randn(1, 2, 8, 8, 3)}, (64, 64), 3)
    assert (upsampling_error(make_feature_stack(feats, size=(8, 8))) == 0).all()
    flat = HeadFeatures({LayerKey("output", 9, 0): torch.full((1, 2, 8, 8, 3), 0.7)}, (64, 64), 3)
    assert upsampling_error(make_feature_stack(flat)).abs().max() < 1e-6
    # one step edge 0 | 1 on a 1x2 grid upsampled to 1x8: bilinear ramps, nearest jumps
    edge = HeadFeatures({LayerKey("input", 1, 0): torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2, 1)}, (8, 16), 1)
    err = upsampling_error(make_feature_stack(edge, size=(1, 8)))
    # bilinear: source x = (i + 0.5) / 4 - 0.5 clamped to [0, 1]; nearest: floor(i / 4)
    bil = torch.tensor([0, 0, 0.125, 0.375, 0.625, 0.875, 1, 1])
    near = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1.0])
    torch.testing.assert_close(err[0, 0], (bil - near).abs())


def test_empty_grids_are_refused():
    with pytest.raises(ValueError, match="at least 1x1"):
        up.upsample(torch.zeros(1, 1, 0, 2), (8, 8))
    for shape in [(0, 2, 8, 8, 3), (1, 0, 8, 8, 3), (1, 2, 8, 8, 0)]:
        feats = HeadFeatures({LayerKey("output", 9, 0): torch.zeros(shape)}, (64, 64), 3)
        with pytest.raises(ValueError, match=r"output\.9\.0.*no empty dimension"):
            make_feature_stack(feats)
    feats = HeadFeatures({LayerKey("output", 9, 0): torch.zeros(1, 2, 8, 8, 3, dtype=torch.int64)}, (64, 64), 3)
    with pytest.raises(ValueError, match=r"output\.9\.0.*real floating"):
        make_feature_stack(feats)


def test_layers_of_different_batch_sizes_are_refused():
    feats = HeadFeatures(
        {LayerKey("input", 1, 0): torch.zeros(1, 2, 8, 8, 3), LayerKey("output", 9, 0): torch.zeros(2, 2, 8, 8, 3)}, (64, 64), 3
    )
    with pytest.raises(ValueError, match=r"^features: the layers must share one batch size, got \[1, 2\]"):
        make_feature_stack(feats)


def test_sizes_beyond_the_largest_image_side_are_refused_up_front():
    with pytest.raises(ValueError, match=r"n_out must be an int from 1 to 16384, got 100000"):
        up.interpolation_matrix(4, 100000, "nearest")
    with pytest.raises(ValueError, match=r"size must be at most 16384 pixels per side, got \(64, 20000\)"):
        make_feature_stack(features(), size=(64, 20000))


@pytest.mark.parametrize("image, grids, cell_px", [
    ((64, 104), [(8, 13), (4, 7), (2, 4), (1, 2)], [8, 16, 32, 64]),  # latent 8x13: sides 13, 7, 4, 2 cells
    ((664, 1000), [(83, 125), (42, 63), (21, 32), (11, 16)], [8, 16, 32, 64]),  # a 1000x664 photo, latent 125x83
    ((64, 96), [(8, 12), (4, 6), (2, 3)], [8, 16, 32]),
    ((40, 40), [(5, 5), (1, 1)], [8, 64]),  # latent 5: its 1/8 grid is one cell of 64 px
], ids=["8x13", "1000x664", "8x12", "one-cell"])
def test_reweight_weighs_each_grid_by_its_resolution_as_the_unet_has_it(image, grids, cell_px):
    """Eq. 5 weighs the features of a grid by its resolution r over the finest one's: a UNet grid at level l has
    cells of 8 * 2**l pixels, so its weight is 2**-l whatever the rounding of its sides. The grids' sides
    (the longer one, r = max(h, w)) gave a latent 8x13 the weights 1, 7/13, 4/13, 2/13 for its 1/2, 1/4 and
    1/8 grids, and a 1000x664 photo 63/125, 32/125 and 16/125 for them."""
    layers = {LayerKey("input", i, 0): torch.randn(1, 1, h, w, 2) for i, (h, w) in enumerate(grids)}
    stack = make_feature_stack(HeadFeatures(layers, image, 2), reweight=True)
    assert stack.weights == [cell_px[0] / px for px in cell_px]  # r = 1 / cell size, over the finest r


def test_reweight_of_grids_that_fit_no_unet_level_counts_their_cells_per_pixel():
    """A grid stretched onto the image (no UNet level of it): r is its cells per pixel, on the finer axis."""
    layers = {LayerKey("input", 1, 0): torch.randn(1, 1, 8, 8, 2), LayerKey("input", 4, 0): torch.randn(1, 1, 3, 5, 2)}
    stack = make_feature_stack(HeadFeatures(layers, (64, 64), 2), reweight=True)
    assert stack.weights == pytest.approx([1.0, (5 / 64) / (8 / 64)])


def test_float64_features_beyond_float32_are_refused_naming_the_layer():
    key = LayerKey("output", 9, 0)
    feats = HeadFeatures({key: torch.randn(1, 2, 8, 8, 3, dtype=torch.float64) * 1e300}, (64, 64), 3)
    with pytest.raises(ValueError, match=r"^features: layer output\.9\.0 has values beyond float32's range"):
        make_feature_stack(feats)


@pytest.mark.parametrize("factor", [1e-46, 1e-60, 1e-300])
def test_float64_features_that_would_all_be_zero_in_float32_are_refused_naming_the_layer(factor):
    """A float64 layer whose every value lies below float32's smallest subnormal became all zeros in the
    float32 stack (k-means then found one cluster, silently); one just inside float32's range is kept."""
    key = LayerKey("output", 9, 0)
    values = torch.randn(1, 2, 8, 8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"^features: layer output\.9\.0 has values below float32's range"):
        make_feature_stack(HeadFeatures({key: values * factor}, (64, 64), 3))
    stack = make_feature_stack(HeadFeatures({key: values * 1e-38}, (64, 64), 3))
    assert bool(stack.grids[0].any())


@pytest.mark.parametrize("reweight", ["no", 1, None])
def test_reweight_must_be_a_bool(reweight):
    with pytest.raises(ValueError, match=r"^reweight must be True or False, got"):
        make_feature_stack(features(), reweight=reweight)


def test_bad_weights_and_non_finite_features_are_named():
    with pytest.raises(ValueError, match="^resolutions must be a non-empty list"):
        up.resolution_weights(5)
    feats = features()
    key = next(iter(feats.layers))
    feats.layers[key] = feats.layers[key].clone()
    feats.layers[key][0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match=rf"^features: layer {key!s} contains NaN or inf"):
        make_feature_stack(feats)


# ------------------------------------------------ grids that reach past the image (latent no multiple of 2**l)
def odd_features(batch=2, c=3, seed=1):
    """Layers on the UNet's grids of a 104x88-pixel image (latent 11x13): 11x13, 6x7 and 3x4 cells of 8, 16
    and 32 pixels, spanning 88x104, 96x112 and 96x128 pixels: the coarser grids reach past the image."""
    g = torch.Generator().manual_seed(seed)
    layout = [("input", 1, 2, (11, 13)), ("input", 4, 3, (6, 7)), ("input", 7, 2, (3, 4)), ("output", 9, 2, (11, 13))]
    layers = {LayerKey(b, n, 0): torch.randn(batch, heads, *grid, c, generator=g) for b, n, heads, grid in layout}
    return HeadFeatures(layers, (88, 104), c)


def unet_placed_stack(feats, mode, scale=(1, 1)):
    """Independent reference: each layer upsampled by its cell size (8 * 2**level pixels) with F.interpolate's
    scale_factor, where the UNet has its cells, and cut to the image: the stack of a photo of that size.
    scale (sy, sx) integers: the stack of the image scaled by them (cells of sy x sx times as many pixels)."""
    H, W = feats.image_size[0] * scale[0], feats.image_size[1] * scale[1]
    parts = {}
    for key, t in feats.layers.items():
        B, heads, h, w, c = t.shape
        cell = {11: 8, 6: 16, 3: 32}[h]
        chans = torch.stack([t[:, hd, :, :, j] for hd in range(heads) for j in range(c)], dim=1)  # [B, heads*c, h, w]
        kwargs = {"align_corners": False} if mode == "bilinear" else {}
        up = F.interpolate(chans, scale_factor=(cell * scale[0], cell * scale[1]), mode=mode, recompute_scale_factor=False, **kwargs)
        parts.setdefault((h, w), []).append(up[:, :, :H, :W])  # [B, heads*c, H, W]
    return torch.cat([p for group in parts.values() for p in group], dim=1)


def test_grid_span_of_unet_grids():
    # a 1000x664 photo (latent 125x83): the 1/2 and 1/4 grids span 1008x672 and 1024x672 pixels
    assert up.grid_span((83, 125), (664, 1000)) == (664, 1000)
    assert up.grid_span((42, 63), (664, 1000)) == (672, 1008)
    assert up.grid_span((21, 32), (664, 1000)) == (672, 1024)
    assert up.grid_span((16, 16), (512, 512)) == (512, 512)
    assert up.grid_span((1, 1), (8, 8)) == (8, 8)
    assert up.grid_span((5, 7), (64, 96)) == (64, 96)  # fits no level: stretched as before
    assert up.grid_span((32, 32), (1001, 1001)) == (1001, 1001)  # a side no multiple of 8 is not a UNet's image


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_stack_puts_each_cell_where_the_unet_has_it(mode):
    """A 1/4 grid of a 1000 px side has 32 cells of 32 px (1024 px): stretched onto 1000 px, its features
    moved left by up to 24 px, so masks of photos whose sides are no multiples of 32 px missed their objects."""
    feats = odd_features()
    stack = make_feature_stack(feats, mode=mode)
    ref = unet_placed_stack(feats, mode)
    torch.testing.assert_close(stack.materialise(), ref, rtol=1e-6, atol=1e-6)
    for i, g in enumerate(stack.grids):  # the matrices the k-means reads are the same interpolation
        mh, mw = stack.matrices(i)
        torch.testing.assert_close(mh @ g @ mw.T, up.upsample(g, stack.size, mode, span=stack.spans[i]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_stack_at_another_size_keeps_the_cells_where_the_unet_has_them(mode):
    """materialise and matrices at a size other than the stack's (2x the height, 3x the width): each grid's
    span scales with the image on its own axis, as the UNet's cells of a photo scaled that way would."""
    feats = odd_features()
    stack = make_feature_stack(feats, mode=mode)
    size = (88 * 2, 104 * 3)
    ref = unet_placed_stack(feats, mode, scale=(2, 3))
    torch.testing.assert_close(stack.materialise(size=size), ref, rtol=1e-6, atol=1e-6)
    start = 0
    for i, g in enumerate(stack.grids):
        mh, mw = stack.matrices(i, size)
        torch.testing.assert_close(mh @ g @ mw.T, ref[:, start : start + g.shape[1]], rtol=1e-5, atol=1e-5)
        start += g.shape[1]


def test_upsampling_error_where_the_unet_has_the_cells():
    feats = odd_features()
    stack = make_feature_stack(feats)
    ref = (unet_placed_stack(feats, "bilinear") - unet_placed_stack(feats, "nearest")).abs().mean(dim=1)  # [B, H, W]
    torch.testing.assert_close(upsampling_error(stack), ref, rtol=1e-5, atol=1e-6)
    rows, cols = torch.arange(88), torch.tensor([3, 50, 103])  # every row: the nearest cell of each
    torch.testing.assert_close(error_map.upsampling_error_at(stack, rows, cols), ref[:, rows][:, :, cols], rtol=1e-5, atol=1e-6)
    rows, cols = torch.tensor([0, 40, 87]), torch.arange(104)
    torch.testing.assert_close(error_map.upsampling_error_at(stack, rows, cols), ref[:, rows][:, :, cols], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spans", [[(10, 30)], [(30, 19.5)], [(30, 30), (30, 30)], [(30,)], [("30", 30)], [(30, float("nan"))]])
def test_spans_short_of_the_image_or_not_one_per_grid_are_named(spans):
    """A grid spans at least the image (its top-left part): spans short of the size, not one pair per
    grid, or not numbers are refused naming stack.spans, not read as a stretch or failing inside torch."""
    stack = up.FeatureStack([torch.randn(1, 2, 3, 3)], [1.0], [[]], (20, 20), "bilinear", spans)
    with pytest.raises(ValueError, match=r"^stack\.spans must hold one \(H_i, W_i\) >= the size 20x20 per grid"):
        upsampling_error(stack)


@pytest.mark.parametrize("size, max_pixels", [((48, 40), 48 * 40), ((48, 40), 100), ((33, 70), 64)])
def test_error_blocks_are_the_full_error_at_block_centres(size, max_pixels):
    """upsampling_error_blocks: at most about max_pixels computed, each the full map's value at its block's
    centre pixel, and every output pixel assigned the block it lies in."""
    from headseg.nodes.core.error_map import error_lattice_step, upsampling_error_blocks
    from headseg.nodes.core.upsample import FeatureStack

    g = torch.Generator().manual_seed(1)
    stack = FeatureStack([torch.randn(2, 3, 7, 5, generator=g), torch.randn(2, 2, 3, 3, generator=g)], [1.0, 1.0], [[], []], size, "bilinear")
    full = upsampling_error(stack)  # [B, H, W]
    small, by_row, by_col = upsampling_error_blocks(stack, max_pixels)
    H, W = size
    f = error_lattice_step(H, W, max_pixels)
    if by_row is None:
        assert f == 1 and torch.equal(small, full)
        return
    rows, cols = list(range(f // 2, H, f)), list(range(f // 2, W, f))
    assert small.shape == (2, len(rows), len(cols)) and len(rows) * len(cols) <= 2 * max_pixels
    torch.testing.assert_close(small, full[:, rows][:, :, cols], rtol=1e-5, atol=1e-6)
    assert by_row.tolist() == [min(y // f, len(rows) - 1) for y in range(H)]
    assert by_col.tolist() == [min(x // f, len(cols) - 1) for x in range(W)]


_OFFSETS_MEMORY = """
import pathlib, resource, runpy, sys
import torch
runpy.run_path(sys.argv[1])["import_checkout"]()
from headseg.nodes.core import error_map
from headseg.nodes.core import upsample as up
torch.set_num_threads(1)
grid = torch.randn(1, 160, 256, 256, generator=torch.Generator().manual_seed(0)).add_(1.0)  # 42 MB, about 1
stack = up.FeatureStack([grid], [1.0], [[]], (256, 256), "bilinear")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[2] == "error map":
    centred = error_map._channel_offsets(stack)[0] is not None
else:  # the k-means' check for offsets, on the grid less its means (PCA scores are centred: none taken out)
    from headseg.nodes.core import kmeans_image
    grid = grid.sub_(grid.mean(dim=(2, 3), keepdim=True))[0]  # [C, h, w]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    centred = kmeans_image._centred([grid])[1] is None
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(centred, (after - before) * 1024, grid.numel() * 4)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB and glibc's malloc: Linux")
@pytest.mark.parametrize("where", ["error map", "k-means"])
def test_the_error_maps_channel_means_take_no_float64_copy_of_a_grid(where):
    """The error map's channel offsets (upsampling_error, upsampling_error_at) are float64 means of every
    channel: mean(dtype=float64) of a whole grid converts all of it inside the mean, a float64 copy twice
    the grid's size that no memory estimate counts (error_map_bytes: SD1.5's 128x128 grid at 1024 px with 64
    components is 168 MB, its copy 335 MB, against an estimate of 62 MB). Taken a few channels at a time,
    the process's peak memory grows by less than the grid (one 16 MiB chunk; the copy grew it by twice the
    grid). In a subprocess: peak RSS is per process; glibc's malloc maps every block of 1 MiB or more on its
    own, so that a freed chunk leaves the process at once instead of staying in its heap. The k-means' own
    check for channel offsets (kmeans_image._centred, once per image; kmeans_work_bytes does not count a copy)
    takes its means the same way."""
    import os
    import pathlib
    import subprocess

    checkout = pathlib.Path(__file__).resolve().parents[1] / "support" / "checkout.py"
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20))
    done = subprocess.run(
        [sys.executable, "-c", _OFFSETS_MEMORY, str(checkout), where], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    centred, grew, grid = done.stdout.split()
    assert centred == "True"
    assert int(grew) < int(grid), (int(grew), int(grid))


def test_the_error_maps_channel_means_are_those_of_each_whole_channel(monkeypatch):
    """Taken a few channels at a time (here 3 of the first grid's 7), the offsets are the float64 means of
    whole channels, bit for bit."""
    monkeypatch.setattr(up, "_CHUNK_BYTES", 3 * 8 * 2 * 40 * 30)
    g = torch.Generator().manual_seed(0)
    grids = [torch.randn(2, 7, 40, 30, generator=g).add_(5.0), torch.randn(2, 3, 5, 4, generator=g).add_(5.0)]
    stack = up.FeatureStack(grids, [1.0, 1.0], [[], []], (80, 60), "bilinear")
    for grid, offset in zip(grids, error_map._channel_offsets(stack)):
        assert torch.equal(offset, grid.flatten(2).mean(2, dtype=torch.float64)[:, :, None, None])


@pytest.mark.parametrize("shape", [(37, 9, 11), (2, 40, 100), (1, 1, 1)])
def test_channel_means_are_one_means_bits_a_few_channels_at_a_time(shape, monkeypatch):
    """channel_means: the float64 mean of each channel (the last-but-one dim) over the last, in chunks of
    channels (forced small here), bit for bit as one mean(dtype=float64) over every channel."""
    from headseg.nodes.core import upsample as core_upsample

    g = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 3 + 100
    monkeypatch.setattr(core_upsample, "_CHUNK_BYTES", 8 * 3 * shape[-1])  # 3 channels per chunk
    got = core_upsample.channel_means(g)
    assert got.dtype == torch.float64 and got.shape == shape[:-1]
    assert torch.equal(got, g.mean(-1, dtype=torch.float64))


def test_the_error_map_readme_placed_in_upsample_is_still_importable_from_it():
    """README's core API named ``upsample`` for eq. 6, which moved to error_map: the imports written against it
    give error_map's own objects, and a name neither module has is still refused."""
    from headseg.nodes.core.upsample import upsampling_error as old_error, upsampling_error_blocks as old_blocks

    assert old_error is error_map.upsampling_error and old_blocks is error_map.upsampling_error_blocks
    for name in ("upsampling_error_at", "ERROR_MAP_PIXELS", "error_lattice_step"):
        assert getattr(up, name) is getattr(error_map, name), name
    with pytest.raises(AttributeError, match="no_such_name"):
        up.no_such_name
    assert not hasattr(up, "_channel_offsets")  # private to the error map
