"""The batched k-means (kmeans_batched.py, every k of an image at once; what a GPU runs), here on
the CPU: the same clusters as the one-k-at-a-time code, each piece against an independent
reference (explicit upsampled features, working_set's own Lloyd and k-means++), empty clusters,
the shared k-means++ draws."""

import pytest
import torch

from headseg.nodes.core import kmeans as km
from headseg.nodes.core import lattice
from headseg.nodes.core import kmeans_batched as batched
from headseg.nodes.core import kmeans_image
from headseg.nodes.core import working_set
from headseg.nodes.core.kmeans import kmeans, multi_kmeans
from headseg.nodes.core.working_set import WorkingSet, pp_candidates

from .planted import nested_scene, split_scene
from .test_working_set import deciding_tols, feature_space_lloyd_with_tol
from .test_kmeans import THREE_GRIDS, UNEVEN_CORNERS, as_held, best_iou_per_region, explicit, planted_stack, random_stack


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def batched_on_cpu(monkeypatch):
    monkeypatch.setattr(km, "_BATCHED_DEVICES", ("cuda", "cpu"))


def both(stack, ks, seed=0, monkeypatch=None):
    """(one k at a time, every k at once) sweeps of the same stack on the CPU."""
    one = multi_kmeans(stack, ks, seed=seed)
    monkeypatch.setattr(km, "_BATCHED_DEVICES", ("cuda", "cpu"))
    many = multi_kmeans(stack, ks, seed=seed)
    monkeypatch.setattr(km, "_BATCHED_DEVICES", ("cuda",))
    return one, many


@pytest.mark.parametrize(
    "size, batch, mode",
    [((96, 96), 1, "bilinear"), ((64, 120), 2, "bilinear"), ((80, 80), 1, "nearest")],
)
def test_batched_sweep_gives_the_same_clusters(size, batch, mode, monkeypatch):
    scenes = [split_scene(*size, cut_sizes=(2, 5, 8), seed=s) for s in range(batch)]
    stack = planted_stack(scenes=scenes, seed=4, mode=mode)
    ks = [1, 2, 3, 5, 8]
    one, many = both(stack, ks, seed=3, monkeypatch=monkeypatch)
    for k in ks:
        a, b = one.results[k], many.results[k]
        assert b.labels.shape == a.labels.shape and b.labels.dtype == a.labels.dtype == torch.uint8
        assert float((a.labels == b.labels).float().mean()) >= 0.999  # near-ties may go the other way
        torch.testing.assert_close(b.inertia, a.inertia, rtol=1e-6, atol=0)
        torch.testing.assert_close(b.centroids, a.centroids, rtol=1e-4, atol=1e-4)


def test_batched_sweep_with_two_working_sets(monkeypatch):
    """k above 32 draws a larger working set (16 points per cluster): its k run in a group of their own."""
    stack = random_stack((40, 48), shapes=((3, 10, 12), (2, 5, 6)), seed=2)
    one, many = both(stack, [3, 40], seed=1, monkeypatch=monkeypatch)
    for k in (3, 40):
        assert float((one.results[k].labels == many.results[k].labels).float().mean()) >= 0.99
        torch.testing.assert_close(many.results[k].inertia, one.results[k].inertia, rtol=1e-4, atol=0)
    assert sorted(torch.unique(many.results[40].labels).tolist()) == list(range(40))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("k", [1, 4])
def test_batched_result_is_a_lloyd_fixed_point_of_the_explicit_features(mode, k, batched_on_cpu, monkeypatch):
    monkeypatch.setattr(km, "_RTOL", 0.0)  # no early stop: Lloyd runs until no label moves
    monkeypatch.setattr(lattice, "_RTOL", 0.0)
    monkeypatch.setattr(working_set, "RTOL", 0.0)
    stack = random_stack((30, 21), mode, seed=k)
    X = explicit(stack)
    result = kmeans(stack, k, seed=0, tol=0.0)
    labels, centroids = result.labels[0].reshape(-1), result.centroids[0].double()
    d = torch.cdist(X, centroids) ** 2  # [N, k]
    assert torch.equal(labels, d.argmin(1))
    assert float(result.inertia[0]) == pytest.approx(float(d.min(1).values.sum()), rel=1e-6)
    means = torch.stack([X[labels == j].mean(0) for j in range(k)])
    torch.testing.assert_close(centroids, means, atol=1e-4, rtol=1e-4)


def test_batched_planted_regions_come_back(batched_on_cpu):
    scene = nested_scene(128, 128)
    result = multi_kmeans(planted_stack(scenes=[scene], seed=1), [len(scene.leaf_masks)], seed=0)
    labels = next(iter(result.results.values())).labels[0]
    ious = best_iou_per_region(scene.leaf_masks, labels, len(scene.leaf_masks))
    assert float(ious.min()) >= 0.95, ious.tolist()


def test_batched_is_deterministic(batched_on_cpu):
    stack = random_stack((24, 24), seed=5)
    a, b = multi_kmeans(stack, [2, 5], seed=9), multi_kmeans(stack, [2, 5], seed=9)
    for k in (2, 5):
        assert torch.equal(a.results[k].labels, b.results[k].labels)


def test_batched_progress_counts_every_image_and_k(batched_on_cpu):
    stack = random_stack((16, 16), batch=2)
    calls = []
    multi_kmeans(stack, [2, 3], progress=lambda done, total: calls.append((done, total)))
    # all k of an image advance together: stage 1 of both k, then stages 2 and 3 of both (16 x 16 has
    # no polish lattice below the full image)
    assert calls == [(2, 12), (6, 12), (8, 12), (12, 12)]


# ----------------------------------------------------------------------------- pieces
def random_ws(n=64, C=5, seed=0, duplicates=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, C, generator=gen)
    if duplicates:
        X[-duplicates:] = X[0]
    return WorkingSet.from_features(X)


def test_candidates_follow_the_weights():
    gen = torch.Generator().manual_seed(0)
    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0, 4.0]], dtype=torch.float64)
    u = torch.rand(1, 40000, generator=gen, dtype=torch.float64)
    drawn = pp_candidates(weights, u)[0]
    freq = torch.bincount(drawn, minlength=5).double() / drawn.numel()
    assert freq[0] == 0 and freq[3] == 0  # points on a pick are never drawn
    torch.testing.assert_close(freq, weights[0] / weights.sum(), atol=0.01, rtol=0)
    edges = pp_candidates(weights, torch.tensor([[0.0, 1.0 - 2**-53]], dtype=torch.float64))[0]
    assert edges.tolist() == [1, 4]  # the ends of [0, 1) land on the first and last weighted points
    flat = pp_candidates(torch.zeros(1, 4, dtype=torch.float64), torch.tensor([[0.1, 0.6, 0.99]], dtype=torch.float64))
    assert flat[0].tolist() == [0, 2, 3]  # nothing to weigh: uniform


def test_batched_kmeans_pp_picks_as_working_set():
    ws = random_ws()
    ks, counts = [1, 3, 7], [2, 5, 4]
    picks = []
    for k, c in zip(ks, counts):
        picks.append(working_set.kmeans_pp(ws, k, c, torch.Generator().manual_seed(11)))  # [c, k]
    run_k, first, u = batched.batch_draws(ks, counts, ws.n, 11)  # the draws the sweep uses
    got = batched._kmeans_pp(ws, run_k, first, u)
    r = 0
    for k, c, want in zip(ks, counts, picks):
        assert torch.equal(got[r : r + c, :k], want)
        r += c


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("duplicates", [0, 20])
def test_gram_lloyd_matches_working_set_lloyd(duplicates, device):
    """Starts on the same picks (two picks on one point: a cluster empties and is refilled)."""
    ws = random_ws(duplicates=duplicates)
    picks = torch.tensor([[0, 5, 9], [0, 63, 1], [2, 2, 7], [4, 4, 4]])  # 63 duplicates 0 when duplicated
    want = working_set.lloyd(ws, picks, 100, 1e-6)
    on = WorkingSet(ws.X.to(device), ws.xx.to(device), ws.G.to(device), ws.var)
    got = batched._gram_lloyd(on, torch.tensor([3, 3, 3, 3], device=device), picks.to(device), 100, 1e-6)
    members, point, inertia, iters = (t.cpu() for t in got)
    for i, run in enumerate(want):
        assert torch.equal(members[i], run.members)
        assert torch.equal(point[i], run.point)
        assert float(inertia[i]) == pytest.approx(run.inertia, rel=1e-6)
        assert int(iters[i]) == run.iters
    cents = batched.run_centroids(on, members.to(device), point.to(device), 3).cpu()
    for i, run in enumerate(want):
        torch.testing.assert_close(cents[i], run.centroids(ws), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", [THREE_GRIDS, UNEVEN_CORNERS])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_dense_lattice_against_explicit_features(shapes, mode, device, monkeypatch):
    monkeypatch.setattr(batched, "_CHUNK_FLOATS", 200)  # several row chunks
    stack = random_stack((13, 22), mode, shapes=shapes)
    X = as_held(kmeans_image.PreparedImage(stack, 0), explicit(stack))  # [N, C] float64
    img = kmeans_image.PreparedImage(stack.to(device), 0)
    lat = img.dense_rung(img.last)
    gen = torch.Generator().manual_seed(1)
    sizes = [2, 3]
    cents = torch.randn(5, X.shape[1], generator=gen)
    labels, best = (t.cpu() for t in lat.assign(cents.to(device), sizes))
    for r, c in enumerate(cents.split(sizes)):
        d = torch.cdist(X, c.double()) ** 2  # [N, k]
        assert torch.equal(labels[r], d.argmin(1))
        torch.testing.assert_close(best[r].double() + (X * X).sum(1), d.min(1).values, atol=1e-3, rtol=1e-4)
    sums = lat.adjoint_sums(labels.to(device), sizes).cpu()
    counts = lat.counts(labels.to(device), sizes).cpu()
    want = torch.cat([torch.zeros(k, X.shape[1], dtype=torch.float64).index_add_(0, labels[r], X)
                      for r, k in enumerate(sizes)])
    torch.testing.assert_close(sums.double(), want, atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [int((labels[r] == j).sum()) for r, k in enumerate(sizes) for j in range(k)]


@pytest.mark.parametrize("rtol", [None, 1e9])
def test_dense_lattice_lloyd_matches_lattice_lloyd_with_empty_clusters(rtol, monkeypatch):
    """Three runs at once, each as the one-k Lattice.lloyd gives it alone: two equal centroids (one
    cluster empties), three equal ones (two empty in one run: the farthest and the second farthest
    point refill them), and a plain start; the first two refill from one working set, the third from
    another. rtol = 1e9: every iteration gains less than that, so a run stops at once unless a
    cluster was refilled in it."""
    if rtol is not None:
        monkeypatch.setattr(km, "_RTOL", rtol)
        monkeypatch.setattr(lattice, "_RTOL", rtol)
    stack = random_stack((20, 24), seed=3)
    img = kmeans_image.PreparedImage(stack, 0)
    ws_a, ws_b = img.working_set(3, 0), img.working_set(3, 1)
    gen = torch.Generator().manual_seed(2)
    twins = ws_a.X[[0, 0, 7]].clone()  # [3, C]
    triplets = ws_a.X[[5, 5, 5, 9]].clone()  # [4, C]
    other = ws_b.X[torch.randperm(ws_b.n, generator=gen)[:4]].clone()  # [4, C]
    full = img.rung(img.last)
    total, var = full.moments()
    dense = img.dense_rung(img.last)
    sets = [(twins, ws_a), (triplets, ws_a), (other, ws_b)]
    labels, cents, best, iters = dense.lloyd(
        torch.cat([c for c, _ in sets]), [3, 4, 4], 100, 1e-4 * var, km._RTOL, total, [(w.X, w.xx) for _, w in sets]
    )
    for r, (start, ws) in enumerate(sets):
        want_labels, want_cents, want_best, want_it = full.lloyd(start, 100, 1e-4 * var, ws.X, ws.xx, total)
        assert torch.equal(labels[r].view(img.size), want_labels)
        torch.testing.assert_close(cents.split([3, 4, 4])[r], want_cents, rtol=1e-4, atol=1e-5)
        assert int(iters[r]) == want_it


def test_working_set_runs_equal_working_set_starts_per_k():
    """The entry point the sweep uses: k of several sizes padded into one batch (clusters and
    k-means++ candidates), each run as working_set.starts gives it for its k alone."""
    ws = random_ws(n=80, C=6, seed=4, duplicates=12)
    ks, counts = [1, 2, 4, 9], [1, 3, 5, 4]
    members, point, inertia, iters = batched.working_set_runs(ws, ks, counts, 7, 100, 1e-4)
    r = 0
    for k, c in zip(ks, counts):
        for i, run in enumerate(working_set.starts(ws, k, c, torch.Generator().manual_seed(7), 100, 1e-4)):
            assert torch.equal(members[r + i], run.members), (k, i)
            assert torch.equal(point[r + i, :k], run.point), (k, i)
            assert float(inertia[r + i]) == pytest.approx(run.inertia, rel=1e-6)
            assert int(iters[r + i]) == run.iters
        r += c


def test_refill_moves_each_runs_empty_clusters_onto_its_own_far_points():
    """Against lattice.fill_empty run by run: the r-th empty cluster of a run takes the point of the
    run's own working set r-th farthest from the run's nearest centroid."""
    ws_a, ws_b = random_ws(seed=1), random_ws(n=50, seed=2)
    sizes, owners = [3, 4, 2], [ws_a, ws_a, ws_b]
    gen = torch.Generator().manual_seed(3)
    new = torch.randn(9, 5, generator=gen)
    empty = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool)  # two empties in the second run
    seg = batched._segment_ids(sizes, "cpu")
    starts = torch.tensor([0, 3, 7])
    groups = batched._refill_groups([(w.X, w.xx) for w in owners], seg)
    got, _ = batched._refill(new, empty, seg, starts, 3, groups)
    for r, (part, gone, ws) in enumerate(zip(new.split(sizes), empty.split(sizes), owners)):
        want = part.clone()
        lattice.fill_empty(want, (~gone).long(), ws.X, ws.xx)
        assert torch.equal(got.split(sizes)[r], want), r


@pytest.mark.parametrize("rtol", [None, 1e9])
def test_gram_lloyd_with_runs_of_several_k_and_empty_clusters(rtol, monkeypatch):
    """rtol = 1e9: every iteration gains less, so a run stops at once unless it refilled a cluster."""
    if rtol is not None:
        monkeypatch.setattr(working_set, "RTOL", rtol)
    ws = random_ws(duplicates=10)
    starts = {2: torch.tensor([[0, 0]]), 3: torch.tensor([[1, 1, 1], [2, 40, 3]]), 5: torch.tensor([[6, 6, 7, 8, 9]])}
    run_k = torch.tensor([k for k, p in starts.items() for _ in range(p.shape[0])])
    picks = torch.zeros(len(run_k), 5, dtype=torch.int64)
    r = 0
    for k, p in starts.items():
        picks[r : r + p.shape[0], :k] = p
        r += p.shape[0]
    members, point, inertia, iters = batched._gram_lloyd(ws, run_k, picks, 100, 1e-6)
    r = 0
    for k, p in starts.items():
        for i, run in enumerate(working_set.lloyd(ws, p, 100, 1e-6)):
            assert torch.equal(members[r + i], run.members) and torch.equal(point[r + i, :k], run.point)
            assert int(iters[r + i]) == run.iters
        r += p.shape[0]


def test_working_sets_are_batched_within_the_memory_bound(monkeypatch):
    """Batches of k on one working set keep [starts, k, n] (padded) within _WS_START_FLOATS, and the
    sweep's clusters do not depend on how the k were batched."""
    stack = random_stack((24, 24), seed=6)
    img = kmeans_image.PreparedImage(stack, 0)
    ks = [2, 3, 5, 8]
    whole = km._working_set_batches(img, ks, 0)
    assert [b[1] for b in whole] == [ks]
    monkeypatch.setattr(km, "_WS_START_FLOATS", 40 * 512)
    split = km._working_set_batches(img, ks, 0)
    assert len(split) > 1 and sum((b[1] for b in split), []) == ks
    for ws, group, counts in split:
        assert len(group) == 1 or sum(counts) * max(group) * ws.n <= km._WS_START_FLOATS
    monkeypatch.setattr(km, "_BATCHED_DEVICES", ("cuda", "cpu"))
    got = multi_kmeans(stack, ks, seed=0)
    monkeypatch.setattr(km, "_BATCHED_DEVICES", ("cuda",))
    want = multi_kmeans(stack, ks, seed=0)
    for k in ks:
        assert float((got.results[k].labels == want.results[k].labels).float().mean()) >= 0.999


_TF32_CHECK = """
import runpy, sys, torch
runpy.run_path("tests/support/checkout.py")["import_checkout"]()
from headseg.nodes.core import kmeans as km, pca
from headseg.nodes.core.recording import LayerKey, Recording
from headseg.nodes.core.upsample import FeatureStack
m = torch.backends.cuda.matmul
how = sys.argv[1]
if how == "legacy":
    m.allow_tf32 = True
elif how == "backend":
    m.fp32_precision = "tf32"
elif how == "generic":
    torch.backends.fp32_precision = "tf32"
seen = []
real = km._sweep_image_batched
def spy(*args):
    seen.append(m.fp32_precision)
    return real(*args)
km._sweep_image_batched = spy
km._BATCHED_DEVICES = ("cuda", "cpu")
grid = torch.randn(1, 3, 4, 4)
km.multi_kmeans(FeatureStack([grid], [1.0], [[]], (16, 16), "bilinear"), [2])
pca._on_cpu = lambda rec: False
real_reduce = pca._reduce_on_gpu
pca._reduce_on_gpu = lambda *a: seen.append(m.fp32_precision) or real_reduce(*a)
pca.recording_pca(Recording({LayerKey("input", 1, 0): torch.randn(1, 2, 4, 4, 8)}, (32, 32)), 2)
after = m.allow_tf32 if how in ("none", "legacy") else m.fp32_precision
print(seen, after, torch.backends.mkldnn.matmul.fp32_precision)
"""


@pytest.mark.parametrize(
    "how, after, cpu_after",  # cpu_after: oneDNN's setting, untouched (the global one sets it too)
    [("none", "False", "none"), ("legacy", "True", "none"), ("backend", "tf32", "none"), ("generic", "tf32", "tf32")],
)
def test_the_core_multiplies_in_full_float32_and_restores_tf32_as_it_was_set(how, after, cpu_after):
    """TF32 allowed by someone else (the legacy flag, or torch's per-backend or global precision)
    would move distances by ~1e-3: off while the core runs, then back, through the API it was set
    with (torch refuses to read one after the other). In a subprocess: the flags are global."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TF32_CHECK, how], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    inside = "'none'" if how == "none" else "'ieee'"
    assert done.stdout.split("\n")[0] == f"[{inside}, {inside}] {after} {cpu_after}"


def test_lattice_lloyd_stops_on_the_centroid_shift_where_feature_space_lloyd_stops(monkeypatch):
    """The polish's tol rule (the centroids' squared shift, summed, refilled clusters included) of the
    one-k Lattice.lloyd and the batched DenseLattice.lloyd, against Lloyd on the explicit upsampled
    features: a tol just below or above the shift of each iteration in turn stops both where the
    reference stops, with its centroids. (Comparing the two with each other cannot see a wrong shift.)"""
    monkeypatch.setattr(km, "_RTOL", 0.0)  # only the labels and the shift stop a run
    monkeypatch.setattr(lattice, "_RTOL", 0.0)
    stack = random_stack((20, 24), seed=3)
    img = kmeans_image.PreparedImage(stack, 0)
    X = as_held(img, explicit(stack))  # [N, C] float64
    ws = img.working_set(4, 0)
    full, dense = img.rung(img.last), img.dense_rung(img.last)
    total = full.moments()[0]

    gen = torch.Generator().manual_seed(5)
    starts = [ws.X[torch.randperm(ws.n, generator=gen)[:4]].clone() for _ in range(3)]
    starts.append(ws.X[[0, 0, 7, 9]].clone())  # two equal centroids: one cluster empties and is refilled
    decided = 0
    for start in starts:
        _, _, shifts = feature_space_lloyd_with_tol(X, start, 0.0, ws.X)
        for tol in deciding_tols(shifts, lambda tol: feature_space_lloyd_with_tol(X, start, tol, ws.X)[1]):
            want_c, want_iters, _ = feature_space_lloyd_with_tol(X, start, tol, ws.X)
            _, cents, _, it = full.lloyd(start, 100, tol, ws.X, ws.xx, total)
            assert it == want_iters, tol
            torch.testing.assert_close(cents.double(), want_c, rtol=1e-4, atol=1e-4)
            _, cents, _, iters = dense.lloyd(start, [4], 100, tol, 0.0, total, [(ws.X, ws.xx)])
            assert int(iters[0]) == want_iters, tol
            torch.testing.assert_close(cents.double(), want_c, rtol=1e-4, atol=1e-4)
            decided += 1
    assert decided >= 10


def test_lattice_lloyd_counts_a_refill_beside_a_far_outlier(monkeypatch):
    """The polish counts a refilled centroid's move unless the point it takes sits on its centroid within
    rounding of that point's own norm (working_set.on_centroid): with one far outlier pixel (3e4 in every
    channel among features of about 1), a margin of 16 eps of the working set's largest ||x||^2 took the
    refill's whole move for none, and a tol just below the first iteration's shift stopped Lattice.lloyd and
    DenseLattice.lloyd an iteration before Lloyd on the explicit features."""
    monkeypatch.setattr(km, "_RTOL", 0.0)  # only the labels and the shift stop a run
    monkeypatch.setattr(lattice, "_RTOL", 0.0)
    stack = random_stack((20, 24), mode="nearest", shapes=((10, 20, 24),), seed=3)
    stack.grids[0][0, :, 19, 23] = 3e4  # the last pixel: the outlier
    img = kmeans_image.PreparedImage(stack, 0)
    X = as_held(img, explicit(stack))  # [N, C] float64
    ws = img.working_set(4, 0)  # every pixel, in raster order
    assert ws.n == 480
    full, dense = img.rung(img.last), img.dense_rung(img.last)
    total = full.moments()[0]
    start = ws.X[[479, 0, 0, 7]].clone()  # the outlier, and two equal centroids: one cluster empties and is refilled
    _, _, shifts = feature_space_lloyd_with_tol(X, start, 0.0, ws.X)
    tol = 0.95 * shifts[0]
    want_c, want_iters, _ = feature_space_lloyd_with_tol(X, start, tol, ws.X)
    assert want_iters == 2
    _, cents, _, it = full.lloyd(start, 100, tol, ws.X, ws.xx, total)
    assert it == want_iters
    torch.testing.assert_close(cents.double(), want_c, rtol=1e-4, atol=1e-3)
    _, cents, _, iters = dense.lloyd(start, [4], 100, tol, 0.0, total, [(ws.X, ws.xx)])
    assert int(iters[0]) == want_iters
    torch.testing.assert_close(cents.double(), want_c, rtol=1e-4, atol=1e-3)
