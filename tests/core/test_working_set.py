"""k-means on the working set in Gram space against the same algorithm written in feature space,
and against scikit-learn on planted blobs."""

import math

import pytest
import torch
from sklearn.cluster import KMeans

from headseg.nodes.core import kmeans_batched
from headseg.nodes.core import working_set as wsm
from headseg.nodes.core.working_set import WorkingSet, kmeans_pp, lloyd, sample_pixels, starts


def blobs(n=300, C=12, k=4, spread=0.3, seed=0, dtype=torch.float32):
    """n points around k well-separated random centres -> (X [n, C], true labels [n])."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, C, generator=g, dtype=torch.float64) * 4.0
    truth = torch.arange(n) % k
    X = centres[truth] + spread * torch.randn(n, C, generator=g, dtype=torch.float64)
    return X.to(dtype), truth


def feature_space_lloyd(X, picks, iters):
    """Plain Lloyd in feature space (float64) from the points ``picks``: iters update/assign rounds."""
    X = X.double()
    C = X[picks].clone()  # [k, C]
    for _ in range(iters):
        labels = torch.cdist(X, C).argmin(1)  # [n]
        for j in range(C.shape[0]):
            if bool((labels == j).any()):
                C[j] = X[labels == j].mean(0)
    labels = torch.cdist(X, C).argmin(1)
    return C, labels, float(((X - C[labels]) ** 2).sum())


@pytest.mark.parametrize("shape", [(64, 5), (300, 12), (257, 40)])
@pytest.mark.parametrize("blocks", [1, 3, 4])
def test_gram_equals_explicit_products(shape, blocks, monkeypatch):
    monkeypatch.setattr(wsm, "GRAM_BLOCKS", blocks)
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ws = WorkingSet.from_features(X)
    Xd = X.double()
    torch.testing.assert_close(ws.G.double(), Xd @ Xd.t(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ws.xx.double(), (Xd * Xd).sum(1), rtol=1e-5, atol=1e-4)
    rows = torch.tensor([0, 3, shape[0] - 1])
    torch.testing.assert_close(ws.sq_dist(rows), torch.cdist(Xd[rows], Xd) ** 2, rtol=1e-4, atol=1e-3)
    mean = Xd.mean(0)
    assert ws.var == pytest.approx(float(((Xd - mean) ** 2).mean()), rel=1e-4)


@pytest.mark.parametrize("k", [2, 4, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_lloyd_in_gram_space_equals_lloyd_in_feature_space(k, seed, monkeypatch):
    monkeypatch.setattr(wsm, "RTOL", 0.0)  # stop only when no label moves
    X, _ = blobs(n=240, C=10, k=4, spread=1.5, seed=seed)  # overlapping: several iterations
    ws = WorkingSet.from_features(X)
    picks = kmeans_pp(ws, k, 3, torch.Generator().manual_seed(seed))  # [3, k]
    runs = lloyd(ws, picks, max_iter=100, tol=0.0)
    assert len(runs) == 3
    for start, run in zip(picks, runs):
        centroids, inertia, iters = run.centroids(ws), run.inertia, run.iters
        ref_c, ref_labels, ref_inertia = feature_space_lloyd(X, start, iters)
        torch.testing.assert_close(centroids.double(), ref_c, rtol=1e-4, atol=1e-4)
        assert inertia == pytest.approx(ref_inertia, rel=1e-5)


@pytest.mark.parametrize("tol", [0.0, 1e-2])
def test_starts_run_together_exactly_as_alone(tol):
    X, _ = blobs(n=200, C=9, k=5, spread=1.2, seed=4)
    ws = WorkingSet.from_features(X)
    picks = kmeans_pp(ws, 6, 4, torch.Generator().manual_seed(2))  # [4, 6]
    together = lloyd(ws, picks, max_iter=100, tol=tol)
    iters = {run.iters for run in together}
    for start, run in zip(picks, together):
        alone = lloyd(ws, start[None], max_iter=100, tol=tol)[0]
        torch.testing.assert_close(run.centroids(ws), alone.centroids(ws), rtol=1e-5, atol=1e-5)
        assert torch.equal(run.members, alone.members) and torch.equal(run.point, alone.point)
        assert run.inertia == pytest.approx(alone.inertia, rel=1e-6) and run.iters == alone.iters
    assert len(iters) > 1 or tol > 0  # the starts stop at different iterations: dropping them is exercised


def test_each_run_reports_the_inertia_of_its_own_centroids():
    """With the early stops on (RTOL, tol), a start may stop while labels still move: its centroids
    (the means of its members, or points) are still the ones its inertia belongs to."""
    X, _ = blobs(n=300, C=10, k=6, spread=1.5, seed=5)
    ws = WorkingSet.from_features(X)
    runs = starts(ws, 8, 6, torch.Generator().manual_seed(0), 100, 1e-4)
    for run in runs:
        d = torch.cdist(X.double(), run.centroids(ws).double()) ** 2  # [n, k]
        assert run.inertia == pytest.approx(float(d.min(1).values.sum()), rel=1e-5)


def test_kmeans_pp_picks_distinct_points_spread_over_blobs():
    X, truth = blobs(n=400, C=8, k=5, spread=0.1, seed=3)
    picks = kmeans_pp(WorkingSet.from_features(X), 5, 3, torch.Generator().manual_seed(0))
    assert picks.shape == (3, 5) and picks.dtype == torch.int64
    for start in picks:
        assert sorted(truth[start].tolist()) == [0, 1, 2, 3, 4]  # one centre in every planted blob


def greedy_pp_reference(D, k, first, u):
    """Greedy k-means++ as scikit-learn's _kmeans_plusplus, one start: squared distances D [n, n], the
    first pick, uniforms u [k-1, trials] -> the k picks. Candidates by inverse CDF of the distances to the
    nearest pick (uniform when every point sits on a pick); the candidate of least potential wins."""
    n = D.shape[0]
    picks, closest = [first], D[first].clone()
    for step in range(1, k):
        weights = closest if float(closest.sum()) > 0 else torch.ones_like(closest)
        cdf = weights.cumsum(0)
        cands = [min(int((cdf <= float(t) * float(cdf[-1])).sum()), n - 1) for t in u[step - 1]]
        potentials = [float(torch.minimum(closest, D[c]).sum()) for c in cands]
        best = cands[potentials.index(min(potentials))]
        picks.append(best)
        closest = torch.minimum(closest, D[best])
    return picks


@pytest.mark.parametrize("k", [2, 5, 9, 24])
def test_kmeans_pp_equals_greedy_kmeans_pp_with_the_same_draws(k):
    """Every start of kmeans_pp is scikit-learn's greedy k-means++ with 2 + ln k candidates per step,
    fed the same random numbers (pp_draws, drawn up front)."""
    X, _ = blobs(n=200, C=6, k=6, spread=0.8, seed=k)
    ws = WorkingSet.from_features(X)
    D = ws.sq_dist(torch.arange(ws.n))  # [n, n] float64, the distances kmeans_pp reads
    first, u = wsm.pp_draws(k, 4, ws.n, torch.Generator().manual_seed(7))
    assert tuple(u.shape) == (k - 1, 4, 2 + int(math.log(k)))  # scikit-learn's n_local_trials
    picks = kmeans_pp(ws, k, 4, torch.Generator().manual_seed(7))  # [4, k]
    for i in range(4):
        assert picks[i].tolist() == greedy_pp_reference(D, k, int(first[i]), u[:, i]), i


def test_pp_candidates_never_draw_a_pick_and_draw_uniformly_when_all_are_picked():
    """Inverse CDF: candidate j is drawn for targets in [cdf[j-1], cdf[j]), so a point of weight 0 (on a
    pick) is never drawn, even for a uniform of 0 or a target on a step of the CDF; when every point sits
    on a pick the draw is uniform over the points."""
    closest = torch.tensor([[0.0, 0.0, 1.0, 0.0, 1.0, 2.0], [0.0] * 6], dtype=torch.float64)  # cdf 0 0 1 1 2 4
    u = torch.tensor([[0.0, 0.25, 0.5, 0.999], [0.0, 0.25, 0.5, 0.999]], dtype=torch.float64)
    # targets 0, 1, 2, 3.996 -> points 2, 4, 5, 5; uniform over 6 points: 0, 1.5, 3, 5.994 -> 0, 1, 3, 5
    assert wsm.pp_candidates(closest, u).tolist() == [[2, 4, 5, 5], [0, 1, 3, 5]]


def test_starts_do_not_depend_on_the_features_scale():
    """tol is relative to the working set's variance (scikit-learn's rule): features scaled by an exact
    power of two give the same picks, members and iterations."""
    X, _ = blobs(n=300, C=8, k=5, spread=1.5, seed=4)
    runs = {}
    for scale in (1.0, 2.0**-12, 2.0**12):
        ws = WorkingSet.from_features(X * scale)
        runs[scale] = starts(ws, 5, 6, torch.Generator().manual_seed(3), 100, 1e-2)
    for scale in (2.0**-12, 2.0**12):
        for a, b in zip(runs[1.0], runs[scale]):
            assert torch.equal(a.members, b.members) and torch.equal(a.point, b.point)
            assert a.iters == b.iters
            assert b.inertia == pytest.approx(a.inertia * scale**2, rel=1e-6)


def test_empty_cluster_is_refilled_on_the_farthest_point():
    X, _ = blobs(n=90, C=6, k=3, spread=0.2, seed=2)
    X[-1] = 50.0  # one far outlier
    ws = WorkingSet.from_features(X)
    picks = torch.tensor([[0, 0, 1], [1, 2, 3]])  # start 0: clusters 0 and 1 on one point, 1 gets nothing
    run, other = lloyd(ws, picks, max_iter=50, tol=0.0)
    centroids, inertia = run.centroids(ws), run.inertia
    assert bool(torch.isfinite(other.centroids(ws)).all())
    labels = torch.cdist(X.double(), centroids.double()).argmin(1)
    assert torch.bincount(labels, minlength=3).min() >= 1
    assert bool(torch.isfinite(centroids).all())
    assert inertia == pytest.approx(float(((X.double() - centroids.double()[labels]) ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("k", [3, 5])
def test_best_start_finds_the_planted_blobs_like_sklearn(k):
    X, truth = blobs(n=500, C=16, k=k, spread=0.5, seed=k)
    ws = WorkingSet.from_features(X)
    runs = starts(ws, k, 3, torch.Generator().manual_seed(0), 100, 1e-4)
    centroids = min(runs, key=lambda run: run.inertia).centroids(ws)
    labels = torch.cdist(X, centroids).argmin(1)
    contingency = torch.zeros(k, k, dtype=torch.int64).index_put_((truth, labels), torch.ones(500, dtype=torch.int64), accumulate=True)
    assert int((contingency > 0).sum()) == k  # a bijection between clusters and blobs
    ours = float(((X.double() - centroids.double()[labels]) ** 2).sum())
    ref = KMeans(n_clusters=k, random_state=0, n_init=1).fit(X.numpy()).inertia_
    assert ours == pytest.approx(ref, rel=1e-4)


def test_constant_points_give_no_nan():
    ws = WorkingSet.from_features(torch.ones(50, 4))
    for run in lloyd(ws, kmeans_pp(ws, 3, 2, torch.Generator().manual_seed(0)), 20, 0.0):
        assert bool(torch.isfinite(run.centroids(ws)).all()) and run.inertia == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    "X",
    [torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, 0), torch.zeros(0, 3), torch.zeros(2, 3, 4), [[1.0, 2.0]]],
)
def test_from_features_names_x(X):
    with pytest.raises(ValueError, match=r"^X must be a float32 tensor \[n, C\]"):
        WorkingSet.from_features(X)


@pytest.mark.parametrize("args, name", [((0, 5, 10), "k"), ((9, 5, 10), "k"), ((2, 0, 10), "count"),
                                        ((2, 5, 0), "max_iter"), ((2.0, 5, 10), "k"), ((2, True, 10), "count")])
def test_starts_names_bad_counts(args, name):
    ws = WorkingSet.from_features(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
    k, count, max_iter = args
    with pytest.raises(ValueError, match=rf"^{name} must be an int"):
        starts(ws, k, count, torch.Generator().manual_seed(0), max_iter, 1e-4)


@pytest.mark.parametrize("shape, dim", [((7, 5), 0), ((3, 20, 33), 1), ((2, 4, 6, 9), 2), ((4, 1, 8), 1), ((1, 300), 1), ((3, 20, 33), -2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_at_minimum_matches_torch_min_indices_with_ties(shape, dim, dtype):
    g = torch.Generator().manual_seed(len(shape) * 10 + dim)
    d = torch.randint(-3, 4, shape, generator=g).to(dtype) * 0.25  # few distinct values: many ties
    d.view(-1)[::5] = torch.randn(d.numel() // 5 + (d.numel() % 5 > 0), generator=g).to(dtype)
    expected = d.min(dim).indices
    low = d.amin(dim, keepdim=True)
    got = wsm.first_at_minimum(d.clone(), low, dim)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected)


def test_first_at_minimum_separates_values_one_ulp_apart():
    a = torch.tensor(1.0)
    d = torch.stack([torch.nextafter(a, torch.tensor(2.0)), a, a, torch.nextafter(a, torch.tensor(0.0))])[:, None]  # [4, 1]
    assert int(wsm.first_at_minimum(d.clone(), d.amin(0, keepdim=True), 0)) == 3
    d[3] = 1.0
    assert int(wsm.first_at_minimum(d.clone(), d.amin(0, keepdim=True), 0)) == 1


@pytest.mark.parametrize("tol", ["x", float("nan"), -1.0, True])
def test_starts_names_a_bad_tol(tol):
    ws = WorkingSet.from_features(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="^tol must be a finite number"):
        starts(ws, 2, 2, torch.Generator().manual_seed(0), 10, tol)


def test_an_emptied_cluster_moves_onto_the_far_outlier():
    X, _ = blobs(n=90, C=6, k=3, spread=0.2, seed=2)
    X[-1] = 50.0  # one far outlier
    ws = WorkingSet.from_features(X)
    run = lloyd(ws, torch.tensor([[0, 0, 1]]), max_iter=50, tol=0.0)[0]  # two starts on one point: one empties
    labels = torch.cdist(X.double(), run.centroids(ws).double()).argmin(1)
    assert int((labels == labels[-1]).sum()) == 1  # the refilled cluster holds the outlier alone


@pytest.mark.parametrize("N, n", [(10, 3), (10, 9), (1000, 7), (262144, 512)])
def test_sampled_pixels_are_distinct_uniform_and_seeded(N, n):
    pix = sample_pixels(N, n, torch.Generator().manual_seed(0))
    assert pix.dtype == torch.int64 and pix.shape == (n,) and pix.device.type == "cpu"
    assert int(pix.unique().numel()) == n and 0 <= int(pix.min()) and int(pix.max()) < N
    assert torch.equal(pix, sample_pixels(N, n, torch.Generator().manual_seed(0)))
    if N == 1000:  # every index equally likely: 3000 draws of 7 of 1000, counted in 10 bins of 100
        gen = torch.Generator().manual_seed(1)
        hits = torch.cat([sample_pixels(N, n, gen) for _ in range(3000)]) // 100
        counts = torch.bincount(hits, minlength=10).double()
        assert float((counts - 2100).abs().max()) < 5 * 2100**0.5


def feature_space_lloyd_with_tol(X, start, tol, refill=None, max_iter=100):
    """scikit-learn's Lloyd in feature space (float64) from the centroids ``start`` [k, C], with the
    one-k code's refill of empty clusters (the r-th empty one onto the point of ``refill`` [n, C],
    default X, r-th farthest from its nearest centroid) -> (centroids, iterations, squared centroid
    shift of each iteration). Stops when no label changes or the shift (squared, summed; a refilled
    centroid's move counts) is <= tol."""
    X = X.double()
    refill = X if refill is None else refill.double()
    C = start.double().clone()  # [k, C]
    labels = torch.cdist(X, C).argmin(1)
    shifts = []
    for it in range(1, max_iter + 1):
        counts = torch.bincount(labels, minlength=C.shape[0])
        new = torch.stack([X[labels == j].mean(0) if counts[j] else C[j] for j in range(C.shape[0])])
        empty = (counts == 0).nonzero().flatten().tolist()
        if empty:
            order = (torch.cdist(refill, new) ** 2).min(1).values.argsort(descending=True, stable=True)
            for r, j in enumerate(empty):
                new[j] = refill[order[r % refill.shape[0]]]
        shifts.append(float(((new - C) ** 2).sum()))
        C, old = new, labels
        labels = torch.cdist(X, C).argmin(1)
        if bool((labels == old).all()) or shifts[-1] <= tol:
            return C, it, shifts
    return C, max_iter, shifts


def deciding_tols(shifts, stop_iters):
    """Tolerances just below and just above each iteration's shift, skipping those within rounding of
    another shift (ill-posed) and those where unchanged labels, not the shift, stop the reference:
    stop_iters(tol) -> the reference's iterations at that tol."""
    full = stop_iters(0.0)
    for tol in [s * f for s in shifts for f in (0.95, 1.05)]:
        if not any(0.97 < s / tol < 1.03 for s in shifts) and stop_iters(tol) < full:
            yield tol


def assert_both_lloyds_stop_at(ws, start, tol, want_c, want_iters, atol=1e-4, what=None):
    """The one-k Gram-space Lloyd and the batched one (kmeans_batched._gram_lloyd, what a GPU runs) from the
    picks ``start`` [k] with ``tol``: each stops after want_iters iterations, at the centroids want_c [k, C]."""
    k = start.numel()
    run = lloyd(ws, start[None], max_iter=100, tol=tol)[0]
    assert run.iters == want_iters, what
    torch.testing.assert_close(run.centroids(ws).double(), want_c, rtol=1e-4, atol=atol)
    members, point, _, iters = kmeans_batched._gram_lloyd(ws, torch.tensor([k]), start[None], 100, tol)
    assert int(iters[0]) == want_iters, what
    got = kmeans_batched.run_centroids(ws, members, point, k)[0]
    torch.testing.assert_close(got.double(), want_c, rtol=1e-4, atol=atol)


def test_the_centroid_shift_stops_lloyd_where_feature_space_lloyd_stops(monkeypatch):
    """The tol rule (scikit-learn's: the centroids' squared shift, summed) against the shift computed
    in feature space, refilled clusters included, for the one-k Gram-space Lloyd and the batched one
    (kmeans_batched, what a GPU runs): a tol just above the shift of each iteration in turn stops both
    exactly where the reference stops, with its centroids. (Comparing the two implementations with
    each other, or a tol too small to decide, cannot see a wrong shift: both stop on unchanged labels.)
    A tol just below the first iteration's shift of a start with empty clusters stops the reference one
    iteration later only because the refilled centroids' move counts."""
    monkeypatch.setattr(wsm, "RTOL", 0.0)  # only the labels and the shift stop a run
    X, _ = blobs(n=240, C=10, k=4, spread=1.5, seed=0)  # overlapping: several iterations
    ws = WorkingSet.from_features(X)
    starts = list(kmeans_pp(ws, 5, 3, torch.Generator().manual_seed(0)))  # [5] each
    starts += [torch.tensor([0, 0, 1, 2, 5]), torch.tensor([3, 3, 3, 4, 6])]  # one and two clusters empty and refilled
    decided = 0
    for start in starts:
        _, _, shifts = feature_space_lloyd_with_tol(X, X[start], 0.0)
        for tol in deciding_tols(shifts, lambda tol: feature_space_lloyd_with_tol(X, X[start], tol)[1]):
            want_c, want_iters, _ = feature_space_lloyd_with_tol(X, X[start], tol)
            assert_both_lloyds_stop_at(ws, start, tol, want_c, want_iters, what=(start.tolist(), tol))
            decided += 1
    assert decided >= 20


def test_an_iteration_that_refills_a_cluster_never_stops_on_a_small_gain(monkeypatch):
    """The inertia-gain rule skips iterations that refilled an empty cluster (the refilled centroid has
    not been a mean yet): with RTOL so large that any gain is small, a start without empty clusters stops
    after its first iteration, and one with an empty cluster after its second, with feature-space
    Lloyd's centroids after two iterations (the refill of the first included); one k and batched alike."""
    monkeypatch.setattr(wsm, "RTOL", 1e9)
    X, _ = blobs(n=240, C=10, k=4, spread=1.5, seed=0)
    ws = WorkingSet.from_features(X)
    plain = kmeans_pp(ws, 5, 1, torch.Generator().manual_seed(0))[0]  # [5] distinct points
    empty = torch.tensor([0, 0, 1, 2, 5])  # clusters 0 and 1 on one point: 1 gets nothing and is refilled
    for start, want_iters in ((plain, 1), (empty, 2)):
        want_c, _, _ = feature_space_lloyd_with_tol(X, X[start], 0.0, max_iter=want_iters)
        assert_both_lloyds_stop_at(ws, start, 0.0, want_c, want_iters, what=start.tolist())


def blobs_beside_a_far_outlier():
    """Four overlapping blobs and a far outlier (its squared norm 4e8 times the others'), their working set,
    and picks [5] with clusters 1 and 2 on one point (2 gets nothing and is refilled) -> (X, ws, start)."""
    X, _ = blobs(n=240, C=10, k=4, spread=1.5, seed=0)
    X[-1] = 3e4  # the outlier
    return X, WorkingSet.from_features(X), torch.tensor([239, 0, 0, 1, 2])


def test_a_refill_beside_a_far_outlier_counts_in_the_shift(monkeypatch):
    """A refilled centroid's move counts unless the point it takes sits on its centroid within rounding of
    that point's own norm: a far outlier (its squared norm 4e8 times the others') made a margin of 16 eps of
    the working set's largest ||x||^2 swallow the refill's whole move (about 600 of the first iteration's
    653), and a tol just below the first shift stopped the start an iteration before feature-space Lloyd;
    one k and batched alike."""
    monkeypatch.setattr(wsm, "RTOL", 0.0)  # only the labels and the shift stop a run
    X, ws, start = blobs_beside_a_far_outlier()
    _, _, shifts = feature_space_lloyd_with_tol(X, X[start], 0.0)
    tol = 0.95 * shifts[0]
    want_c, want_iters, _ = feature_space_lloyd_with_tol(X, X[start], tol)
    assert want_iters == 2
    assert_both_lloyds_stop_at(ws, start, tol, want_c, want_iters, atol=1e-3)


def test_a_refill_beside_a_far_outlier_does_not_stop_the_start(monkeypatch):
    """A start stops on a refill only when every point sits on its centroid, each within rounding of its
    own norm: a far outlier (its squared norm 4e8 times the others') on a centroid of its own, and an
    empty cluster refilled onto the blobs' farthest point, within 16 eps of the outlier's ||x||^2 but
    nowhere near its centroid; the start goes on to feature-space Lloyd's centroids, one k and batched."""
    monkeypatch.setattr(wsm, "RTOL", 0.0)  # only the labels and the shift stop a run
    X, ws, start = blobs_beside_a_far_outlier()
    want_c, want_iters, _ = feature_space_lloyd_with_tol(X, X[start], 0.0)
    assert want_iters > 2
    assert_both_lloyds_stop_at(ws, start, 0.0, want_c, want_iters, atol=1e-3)


@pytest.mark.parametrize("N, n, name", [(5, 6, "n"), (5, -1, "n"), (5, 2.0, "n"), (5, True, "n"), (-1, 0, "N"), (5.0, 2, "N")])
def test_sample_pixels_names_a_bad_count(N, n, name):
    with pytest.raises(ValueError, match=rf"^{name} must be an int"):
        sample_pixels(N, n, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("distinct, k, channels", [(90, 100, 3), (30, 31, 3), (90, 100, 512), (30, 31, 512)])
def test_more_clusters_than_distinct_points_stop_within_a_few_iterations(distinct, k, channels):
    """With fewer distinct points than clusters, every point soon sits on a centroid and the farthest
    point an empty cluster is refilled onto is one of them: the refill gains nothing and its move must
    not count in the centroids' shift. Counted, two clusters traded a group of equal points back and
    forth (the first of equal centroids takes them, the other empties and is refilled), above tol at
    every iteration, until max_iter; one k and batched alike. The clusters are the groups of equal points.
    With hundreds of channels the other centroids' shifts, read off the Gram matrix, are rounding of
    about eps * ||c||^2 each, above tol in sum: the start has converged all the same."""
    gen = torch.Generator().manual_seed(distinct)
    values = torch.randn(distinct, channels, generator=gen)
    group = torch.randint(0, distinct, (1024,), generator=gen)  # [n] which value each point repeats
    ws = WorkingSet.from_features(values[group])
    runs = starts(ws, k, 4, torch.Generator().manual_seed(0), 100, 1e-4)
    assert max(run.iters for run in runs) < 10, [run.iters for run in runs]
    members, _, _, iters = kmeans_batched.working_set_runs(ws, [k], [4], 0, 100, 1e-4)
    assert int(iters.max()) < 10, iters.tolist()
    for labels in [run.members for run in runs] + list(members):
        pairs = torch.unique(torch.stack([group, labels]), dim=1)  # [2, pairs] (group, cluster) in use
        assert pairs.shape[1] == group.unique().numel()  # each group in one cluster, no two in one
