"""Head PCA against scikit-learn's PCA, its sign convention, properties and bad input."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from threadpoolctl import threadpool_limits

from headseg.nodes.core import pca
from headseg.nodes.core.pca import HeadFeatures, head_pca, recording_pca
from headseg.nodes.core.recording import LayerKey, Recording


def structured_heads(lead, N, D, seed=0, dtype=torch.float32):
    """[*lead, N, D]: random rotations of features with a geometric spectrum (well-separated components)."""
    g = torch.Generator().manual_seed(seed)
    G = int(np.prod(lead)) if lead else 1
    spectrum = 0.8 ** torch.arange(D, dtype=torch.float64)  # std per latent direction
    z = torch.randn(G, N, D, generator=g, dtype=torch.float64) * spectrum  # [G, N, D]
    rot, _ = torch.linalg.qr(torch.randn(G, D, D, generator=g, dtype=torch.float64))  # [G, D, D]
    offset = 3 * torch.randn(G, 1, D, generator=g, dtype=torch.float64)
    x = z @ rot.transpose(1, 2) + offset  # [G, N, D]
    return x.reshape(*lead, N, D).to(dtype)


def sklearn_scores(x2d: torch.Tensor, c: int) -> torch.Tensor:
    with threadpool_limits(1):  # tiny problems: BLAS threads only contend on a busy machine
        return torch.from_numpy(PCA(n_components=c, svd_solver="full").fit_transform(x2d.double().numpy()))


@pytest.mark.parametrize("grid", [(8, 8), (6, 10)], ids=["square", "non-square"])
@pytest.mark.parametrize("D", [40, 64, 160])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_scores_equal_sklearn_including_signs(grid, D, dtype):
    N, c = grid[0] * grid[1] * 4, 8
    x = structured_heads((2, 3), N, D, seed=D, dtype=dtype)
    ours = head_pca(x, c)
    assert ours.shape == (2, 3, N, c)
    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for b in range(2):
        for h in range(3):
            ref = sklearn_scores(x[b, h], c)  # sklearn on exactly the values we got (fp16-rounded if fp16)
            err = (ours[b, h].double() - ref).abs().max() / ref.abs().max()
            assert err < tol, (b, h, float(err))


@pytest.mark.parametrize("offset, spread", [(1.0, 1e-5), (100.0, 1e-3), (1000.0, 1e-3)])
def test_float32_heads_with_a_large_offset_equal_sklearn(offset, spread):
    """A float32 head whose values sit far from 0 compared with their spread: float32's rounding of
    the mean is then a sizeable part of each centred value; the scores still equal scikit-learn's
    (in float64 on the same values)."""
    g = torch.Generator().manual_seed(3)
    x = structured_heads((2,), 1024, 16, seed=3, dtype=torch.float64) * spread
    x = (x + offset * (1 + torch.rand(2, 1, 16, generator=g, dtype=torch.float64))).float()  # [2, N, D]
    ours = head_pca(x, 4)
    for h in range(2):
        ref = sklearn_scores(x[h], 4)
        err = (ours[h].double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-4, (h, float(err))


@pytest.mark.parametrize("offset", [2.0**31, 2.0**40, -(2.0**45)])
@pytest.mark.parametrize("D", [1, 40])
def test_float64_heads_far_beyond_the_unscaled_range_are_centred_as_accurately(offset, D):
    """A float64 head beyond 2**30 is scaled by a power of two before its covariance; its mean must be
    taken out as accurately as an unscaled head's (two passes), or a small spread about a large offset
    loses digits to the mean's rounding. The offset is exact, so x - offset is exactly the same head
    about 0: scikit-learn on it is the reference."""
    spread = 1e-2 if abs(offset) < 2.0**44 else 1.0
    x = structured_heads((3,), 512, D, seed=D, dtype=torch.float64) * spread + offset  # [3, N, D]
    ours = head_pca(x, 1)
    for h in range(3):
        ref = sklearn_scores(x[h] - offset, 1)  # exact shift: the same head about 0
        err = (ours[h] - ref).abs().max() / ref.abs().max()
        assert err < 1e-9, (h, float(err))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("offset", [0, 10**6, 10**8, 2**30 - 200])
def test_integer_heads_about_a_large_offset_equal_sklearn(dtype, offset):
    """head_pca takes integer heads: a spread of a few units about a large offset is centred exactly
    (float32 holds integers only up to 2**24: converted first, the spread vanished)."""
    x = torch.randint(0, 100, (2, 256, 8), generator=torch.Generator().manual_seed(5)).to(dtype) + offset
    ours = head_pca(x, 3)
    assert ours.dtype == torch.float32
    for h in range(2):
        ref = sklearn_scores(x[h] - offset, 3)  # the same head about 0, exactly
        err = (ours[h].double() - ref).abs().max() / ref.abs().max()
        assert err < 2e-4, (h, float(err))


@pytest.mark.parametrize("solver", ["full", "covariance_eigh", "auto"])
def test_sign_convention_matches_every_sklearn_solver(solver):
    x = structured_heads((), 500, 24, seed=7, dtype=torch.float64)
    with threadpool_limits(1):
        ref = PCA(n_components=5, svd_solver=solver).fit_transform(x.numpy())
    torch.testing.assert_close(head_pca(x, 5), torch.from_numpy(ref), rtol=1e-7, atol=1e-9)


def test_sign_convention_largest_loading_positive():
    x = structured_heads((4,), 300, 16, seed=3, dtype=torch.float64)
    scores = head_pca(x, 6)  # [4, 300, 6]
    xc = x - x.mean(dim=1, keepdim=True)
    loadings = torch.linalg.lstsq(xc, scores).solution  # [4, 16, 6]: scores = xc @ loadings
    pivot = loadings.abs().argmax(dim=1, keepdim=True)
    assert (loadings.gather(1, pivot) > 0).all()


def test_subspace_matches_sklearn_components():
    x = structured_heads((), 1024, 64, seed=11, dtype=torch.float32)
    c = 8
    with threadpool_limits(1):
        pca = PCA(n_components=c, svd_solver="full").fit(x.double().numpy())  # exact (not "auto": randomized)
    scores = head_pca(x, c).double()  # [N, c]
    xc = x.double() - x.double().mean(0)
    ref = xc @ torch.from_numpy(pca.components_.T)  # [N, c] the reference's scores
    # the spans of the two score sets, compared as projectors in sample space (well conditioned; a
    # least-squares fit of loadings would amplify float32 rounding along the tiny late components)
    q_ours, q_ref = torch.linalg.qr(scores).Q, torch.linalg.qr(ref).Q  # [N, c] each
    assert (q_ours @ q_ours.T - q_ref @ q_ref.T).abs().max() < 1e-5


def test_properties_centred_uncorrelated_sorted():
    x = structured_heads((3,), 400, 32, seed=5, dtype=torch.float64)
    s = head_pca(x, 10)  # [3, 400, 10]
    assert s.mean(dim=1).abs().max() < 1e-10
    gram = s.transpose(1, 2) @ s  # [3, 10, 10]
    off = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    assert off.abs().max() < 1e-8 * gram.abs().max()
    var = torch.diagonal(gram, dim1=1, dim2=2)
    assert (var[:, :-1] >= var[:, 1:]).all()


def test_sample_order_equivariant_and_deterministic():
    x = structured_heads((2,), 256, 40, seed=9)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    a = head_pca(x, 8)
    assert torch.equal(a, head_pca(x, 8))
    torch.testing.assert_close(head_pca(x[:, perm], 8), a[:, perm], rtol=1e-4, atol=1e-4)


def test_full_rank_components_equal_d():
    x = structured_heads((), 200, 12, seed=2, dtype=torch.float64)
    ref = sklearn_scores(x, 12)
    torch.testing.assert_close(head_pca(x, 12), ref, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_constant_heads_give_zeros_not_nan(dtype):
    x = structured_heads((2, 3), 64, 16, dtype=dtype).clone()
    x[0, 1] = 0.1  # constant head (0.1 is not exact in binary: the mean rounds)
    x[1, 2] = 0.0
    s = head_pca(x, 4)
    assert torch.isfinite(s).all()
    assert (s[0, 1] == 0).all() and (s[1, 2] == 0).all()
    assert (s[0, 0].abs().amax(0) > 0).all()  # other heads untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_heads_with_some_constant_channels_equal_sklearn(dtype):
    """A head whose channels are constant only in part (a dead channel of the attention output) is no
    constant head: its scores are scikit-learn's, not zeros."""
    x = structured_heads((2,), 96, 16, seed=5, dtype=dtype).clone()
    x[0, :, :3] = 0.5  # three dead channels in head 0
    x[1, :, 7] = 0.0  # one in head 1
    ours = head_pca(x, 4)
    for h in range(2):
        ref = sklearn_scores(x[h], 4)
        assert float(ref.abs().max()) > 0
        err = (ours[h].double() - ref).abs().max() / ref.abs().max()
        assert err < (1e-9 if dtype == torch.float64 else 2e-4), (h, float(err))


def test_rank_deficient_head_is_finite_and_zero_beyond_rank():
    x = structured_heads((), 2, 64, seed=1)  # a 1x2 grid: two samples, one direction of variance
    s = head_pca(x, 8)
    assert torch.isfinite(s).all()
    assert (s[:, 1:] == 0).all()
    assert torch.allclose(s[:, 0].abs(), (x[0] - x[1]).norm().expand(2) / 2, rtol=1e-4)


@pytest.mark.parametrize("factor", [1e-40, 1e-30, 1e-12, 1e12, 1e30])
def test_tiny_or_huge_heads_give_the_scores_in_their_own_units(factor):
    """Squares of such values underflow (below ~1e-19; 1e-40 is subnormal in float32) or overflow
    float32 in the covariance: each such head is scaled by a power of two inside and scaled back."""
    x = torch.randn(3, 200, 16, generator=torch.Generator().manual_seed(5))
    x[1] *= 1e-3  # heads of different magnitude in one batch
    expected = head_pca(x.double(), 4)  # [3, 200, 4]
    got = head_pca(x * factor, 4).double() / factor
    tol = 1e-3 if factor == 1e-40 else 1e-4  # subnormal inputs keep fewer digits
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))


def test_single_sample_gives_zeros():
    assert (head_pca(torch.randn(3, 1, 8), 2) == 0).all()


@pytest.mark.parametrize("components", [0, -1, 17, 2.5, True, "8"])
def test_bad_components(components):
    with pytest.raises(ValueError, match="components"):
        head_pca(torch.randn(10, 16), components)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(bad):
    x = torch.randn(2, 10, 8)
    x[1, 3, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        head_pca(x, 2)


def test_bad_x_shape():
    with pytest.raises(ValueError, match="x must"):
        head_pca(torch.randn(5), 1)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_x_is_refused_by_name(dtype):
    """float8 (which a Recording refuses too) failed inside torch: "max_values_cpu" not implemented."""
    with pytest.raises(ValueError, match=rf"^x must be float16, bfloat16, float32, float64 or integers, got {dtype}$"):
        head_pca(torch.randn(2, 10, 8).to(dtype), 2)


# ------------------------------------------------------------------------------------------ recording_pca
def small_recording(latent=(6, 10), batch=2, d=16, dtype=torch.float16):
    g = torch.Generator().manual_seed(0)
    layers = {
        LayerKey("input", 1, 0): torch.randn(batch, 2, *latent, d, generator=g).to(dtype),
        LayerKey("output", 4, 0): torch.randn(batch, 3, (latent[0] + 1) // 2, (latent[1] + 1) // 2, d, generator=g).to(dtype),
        LayerKey("middle", 0, 0): torch.randn(batch, 1, 2, 3, d, generator=g).to(dtype),
    }
    return Recording(layers, (latent[0] * 8, latent[1] * 8))


def test_recording_pca_shapes_and_sklearn():
    rec = small_recording()
    feats = recording_pca(rec, components=5)
    assert isinstance(feats, HeadFeatures)
    assert feats.image_size == rec.image_size and feats.components == 5
    assert list(feats.layers) == list(rec.layers)
    assert feats.num_heads == rec.num_heads and feats.batch_size == 2
    for key, t in rec.layers.items():
        B, heads, h, w, d = t.shape
        f = feats.layers[key]
        assert f.shape == (B, heads, h, w, 5) and f.dtype == torch.float32
        # batch item 1, last head, pixels in row-major order, against scikit-learn
        ref = sklearn_scores(t[1, -1].reshape(h * w, d), 5).reshape(h, w, 5)
        torch.testing.assert_close(f[1, -1].double(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_recording_pca_components_above_head_dim_names_layer():
    layers = {
        LayerKey("input", 1, 0): torch.randn(1, 2, 8, 8, 64),
        LayerKey("output", 9, 0): torch.randn(1, 2, 8, 8, 40),
    }
    with pytest.raises(ValueError, match=r"components.*40.*output\.9\.0"):
        recording_pca(Recording(layers, (64, 64)), components=48)


def test_recording_pca_validates_recording():
    rec = small_recording()
    rec.layers[LayerKey("output", 4, 0)][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"output\.4\.0"):
        recording_pca(rec)


def test_recording_pca_threads_give_the_same_bits():
    rec = small_recording()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = recording_pca(rec, components=4)
        torch.set_num_threads(2)
        two = recording_pca(rec, components=4)
    finally:
        torch.set_num_threads(before)
    assert list(two.layers) == list(rec.layers)
    for key in rec.layers:
        assert torch.equal(one.layers[key], two.layers[key])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_recording_pca_names_the_layer_with_non_finite_values(bad):
    rec = small_recording()
    rec.layers[LayerKey("input", 1, 0)][1, 0, 0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"input\.1\.0 contains NaN or inf"):
        recording_pca(rec)


def test_recording_pca_gives_float32_features_for_float64_recordings():
    rec = Recording({LayerKey("output", 9, 0): torch.randn(1, 2, 8, 8, 6, dtype=torch.float64)}, (64, 64))
    assert recording_pca(rec, 3).layers[LayerKey("output", 9, 0)].dtype == torch.float32
    with pytest.raises(ValueError, match="empty"):
        recording_pca(Recording({}, (64, 64)))


def test_huge_heads_with_an_offset_do_not_overflow_the_mean():
    x = torch.randn(1, 256, 4, generator=torch.Generator().manual_seed(2)) + 10.0
    expected = head_pca(x.double(), 2)
    got = head_pca(x * 1e37, 2).double() / 1e37  # the raw sum of 256 values would exceed float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("factor", [1e-50, 1e40])
def test_float64_recordings_beyond_float32_are_refused_naming_the_layer(factor):
    key = LayerKey("output", 9, 0)
    rec = Recording({key: torch.randn(1, 2, 8, 8, 6, dtype=torch.float64) * factor}, (64, 64))
    with pytest.raises(ValueError, match=r"^Recording: layer output\.9\.0 has values whose principal-component scores lie beyond float32's range"):
        recording_pca(rec, 3)


def test_float32_head_whose_scores_overflow_is_refused_naming_the_layer():
    """Every value is a finite float32 (+-1e38), but a score adds up 64 of them: beyond float32.
    A recording ten times smaller reduces to finite scores."""
    key = LayerKey("output", 9, 0)
    signs = torch.randint(0, 2, (1, 2, 8, 8, 64), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    with pytest.raises(ValueError, match=r"^Recording: layer output\.9\.0 has values whose principal-component scores lie beyond float32's range"):
        recording_pca(Recording({key: signs * 1e38}, (64, 64)), 3)
    scores = recording_pca(Recording({key: signs * 1e37}, (64, 64)), 3).layers[key]  # [1, 2, 8, 8, 3]
    assert bool(torch.isfinite(scores).all()) and float(scores.abs().max()) > 1e37


def test_of_several_layers_out_of_range_the_first_in_recording_order_is_named():
    """The layers run on worker threads and their range is read once at the end: the layer named is
    the first of the recording, not the first to finish."""
    gen = torch.Generator().manual_seed(1)
    signs = lambda: torch.randint(0, 2, (1, 2, 8, 8, 64), generator=gen).float() * 2 - 1  # noqa: E731
    layers = {
        LayerKey("output", 9, 0): signs() * 1e38,
        LayerKey("input", 1, 0): torch.randn(1, 2, 8, 8, 64, generator=gen),
        LayerKey("input", 2, 0): signs() * 1e38,
    }
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match=r"^Recording: layer input\.2\.0 has values whose"):
            recording_pca(Recording(layers, (64, 64)), 3)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("factor", [1e-300, 1e-50])
@pytest.mark.parametrize("batch", [1, 2])
def test_one_float64_head_below_float32_in_a_normal_layer_is_refused(factor, batch):
    """The layer's other heads are ordinary: the head alone would become all zeros in float32."""
    key = LayerKey("output", 9, 0)
    x = torch.randn(batch, 3, 8, 8, 6, dtype=torch.float64)
    x[-1, 1] *= factor
    with pytest.raises(ValueError, match=r"^Recording: layer output\.9\.0 has values whose principal-component scores lie beyond float32's range"):
        recording_pca(Recording({key: x}, (64, 64)), 3)
    x[-1, 1] = 0.0  # a head of zeros is constant, not lost
    assert not recording_pca(Recording({key: x}, (64, 64)), 3).layers[key][-1, 1].any()


def test_meta_tensors_are_refused_by_name():
    with pytest.raises(ValueError, match="meta device"):
        head_pca(torch.empty(2, 10, 4, device="meta"), 2)
    rec = Recording({LayerKey("output", 9, 0): torch.empty(1, 2, 8, 8, 6, device="meta")}, (64, 64))
    with pytest.raises(ValueError, match=r"layer output\.9\.0 is on the meta device"):
        recording_pca(rec, 3)


# ----------------------------------------------------------------------------- layers on a GPU
# On a GPU the covariances of all layers are decomposed by one batched eigh per head size
# (_reduce_on_gpu). It takes any device, so it is checked here on the CPU.
def gpu_path(monkeypatch, eigh_on):
    monkeypatch.setattr(pca, "_on_cpu", lambda rec: False)
    monkeypatch.setattr(pca, "_GPU_EIGH", eigh_on)


@pytest.mark.parametrize("eigh_on", ["device", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_one_eigh_for_all_layers_equals_the_layer_by_layer_pca(eigh_on, dtype, monkeypatch):
    rec = small_recording(dtype=dtype)
    g = torch.Generator().manual_seed(5)
    rec.layers[LayerKey("output", 9, 0)] = torch.randn(2, 2, 3, 5, 12, generator=g).to(dtype)  # another head size
    rec.layers[LayerKey("input", 1, 0)][0, 1] = 0.1  # a constant head (0.1: centring leaves rounding noise)
    rec.layers[LayerKey("output", 4, 0)][1, 2] *= 1e-4 if dtype == torch.float16 else 1e-36  # a scaled head
    rec = Recording(rec.layers, rec.image_size)
    expected = recording_pca(rec, components=3)
    gpu_path(monkeypatch, eigh_on)
    got = recording_pca(rec, components=3)
    assert list(got.layers) == list(rec.layers)
    for key, t in rec.layers.items():
        assert got.layers[key].dtype == torch.float32
        scale = float(expected.layers[key].abs().max())
        torch.testing.assert_close(got.layers[key], expected.layers[key], rtol=1e-4, atol=1e-5 * scale)
    assert not bool(got.layers[LayerKey("input", 1, 0)][0, 1].any())
    x = rec.layers[LayerKey("output", 4, 0)][1, 2].double()  # [h, w, d], the scaled head against scikit-learn
    ref = sklearn_scores(x.reshape(-1, x.shape[-1]) * 1e36, 3) / 1e36
    torch.testing.assert_close(got.layers[LayerKey("output", 4, 0)][1, 2].reshape(-1, 3).double(), ref,
                               rtol=1e-2, atol=1e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", [LayerKey("input", 1, 0), LayerKey("middle", 0, 0), LayerKey("output", 4, 0)],
                         ids=["first", "middle", "last"])
def test_one_eigh_for_all_layers_names_the_layer_with_non_finite_values(bad, key, monkeypatch):
    rec = small_recording()  # three layers of one head size: one eigh for all
    rec.layers[key][1, -1, 0, 1, 2] = bad
    gpu_path(monkeypatch, "device")
    with pytest.raises(ValueError, match=rf"^Recording: layer {key.name.replace('.', '[.]')} contains NaN or inf"):
        recording_pca(rec)


def test_one_eigh_for_all_layers_refuses_float64_beyond_float32_naming_the_layer(monkeypatch):
    rec = small_recording(dtype=torch.float64)
    rec.layers[LayerKey("output", 4, 0)] *= 1e40
    gpu_path(monkeypatch, "cpu")
    with pytest.raises(ValueError, match=r"^Recording: layer output\.4\.0 has values whose principal-component scores lie beyond float32's range"):
        recording_pca(rec, 3)


@pytest.mark.parametrize("threads", [2, 3])
def test_eigh_split_over_worker_threads_gives_the_bits_of_one_call(threads):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 40, 6, generator=g)
    cov = x.transpose(1, 2) @ x  # [7, 6, 6]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        evals, evecs = pca._eigh_on_cpu(cov)
    finally:
        torch.set_num_threads(before)
    want = torch.linalg.eigh(cov)
    assert torch.equal(evals, want[0]) and torch.equal(evecs, want[1])
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad_layer", [None, 0, 1])
def test_layers_of_one_grid_reduced_together_equal_the_layer_by_layer_pca(bad_layer, monkeypatch):
    """On a GPU layers of one grid, head size and dtype form one batch: each layer's scores as alone,
    and a NaN is still blamed on its own layer."""
    g = torch.Generator().manual_seed(4)
    keys = [LayerKey("input", 1, 0), LayerKey("input", 2, 0), LayerKey("output", 9, 0)]
    rec = Recording({key: torch.randn(2, heads, 4, 6, 8, generator=g) for key, heads in zip(keys, (2, 3, 1))}, (32, 48))
    if bad_layer is not None:
        rec.layers[keys[bad_layer]][1, 0, 2, 3, 4] = float("nan")
    gpu_path(monkeypatch, "cpu")
    if bad_layer is not None:
        with pytest.raises(ValueError, match=rf"^Recording: layer {keys[bad_layer].name.replace('.', '[.]')} contains"):
            recording_pca(rec, 3)
        return
    got = recording_pca(rec, 3)
    for key in keys:
        want = head_pca(rec.layers[key].flatten(2, 3), 3).reshape(got.layers[key].shape)
        torch.testing.assert_close(got.layers[key], want, rtol=1e-5, atol=1e-5)


def test_eigh_pool_serves_several_threads_with_their_own_sizes():
    """Two threads asking for 2 and 3 workers at once, many times: every call gets its own results."""
    import threading

    g = torch.Generator().manual_seed(8)
    covs = [torch.randn(n, 5, 5, generator=g) for n in (2, 3)]
    covs = [c @ c.transpose(1, 2) for c in covs]
    want = [torch.linalg.eigh(c) for c in covs]
    errors = []

    def work(i):
        try:
            for _ in range(200):
                parts = pca._EIGH_POOL.map(torch.linalg.eigh, list(covs[i].tensor_split(covs[i].shape[0])))
                got = torch.cat([p[1] for p in parts])
                assert torch.equal(got, want[i][1])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_recording_pca_bytes_bounds_what_recording_pca_allocates(dtype):
    """recording_pca_bytes(workers=1) against every tensor recording_pca allocates on one thread
    (tests/support/peak_memory.py), its result held: four layers of one size (every layer's features are
    kept), float32 and float64 heads (a float64 layer's working copies take 8 bytes a value)."""
    from headseg.tests.support.peak_memory import PeakBytes

    g = torch.Generator().manual_seed(0)
    layers = {LayerKey("input", n, 0): torch.randn(2, 5, 16, 16, 8, generator=g, dtype=dtype) for n in (1, 2)}
    layers.update({LayerKey("output", n, 0): torch.randn(2, 5, 16, 16, 8, generator=g, dtype=dtype) for n in (9, 10)})
    rec = Recording(layers, (128, 128))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with PeakBytes() as mem:
            feats = recording_pca(rec, 4)
    finally:
        torch.set_num_threads(threads)
    assert len(feats.layers) == 4
    estimate = pca.recording_pca_bytes(rec, 4, workers=1)
    assert mem.peak <= estimate <= 2 * mem.peak, (mem.peak, estimate)
    # two workers reduce two of the equal layers at once: their working copies count twice
    assert pca.recording_pca_bytes(rec, 4, workers=2) > estimate


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_heads_are_centred_alike_in_place_and_by_a_promoting_mean(dtype):
    """_centred centres float16 / bfloat16 heads in one float32 copy, in place, on the CPU, and by subtracting
    a float32 mean read from the half values on a GPU (less memory there): the two ways give the same bits."""
    g = torch.Generator().manual_seed(0)
    xg = (torch.randn(6, 500, 16, generator=g) * 3 + 7).to(dtype)  # [G, N, D] about an offset
    xc, constant, scale = pca._centred(xg, torch.float32)
    promoted = xg - xg.mean(dim=1, keepdim=True, dtype=torch.float32)  # [G, N, D] float32
    assert xc.dtype == promoted.dtype == torch.float32 and scale is None and not bool(constant.any())
    assert torch.equal(xc, promoted)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_half_heads_on_a_gpu_are_centred_without_a_second_full_size_tensor():
    """SDXL's 1/4-grid layers at 1024 x 1024 (1000 heads of 1024 tokens x 64), float16 on a GPU: centring them
    allocates little beyond the float32 result. A float32 copy centred by its own float32 mean held a temporary
    of over half of it on top (SDXL's PCA peaked at 731 MB instead of 567 MB on an H200). (A mean that converts
    as it reads can itself take a temporary, freed before the result is allocated: up to twice the result for
    fewer heads, on an H200, which stays below the peak of the PCA around it.)"""
    xg = torch.randn(1000, 1024, 64, device="cuda").half()  # [G, N, D]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    xc, _, _ = pca._centred(xg, torch.float32)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base <= 1.1 * xc.numel() * 4
