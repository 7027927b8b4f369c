"""Exact k-means of a FeatureStack at output resolution: virtual [B, C, H, W] -> labels [B, H, W].

The stack is never materialised at output resolution. Per image it is F(p) = concat_g up_g(f_g)(p),
each grid f_g [C_g, h_g, w_g] upsampled separably (F_g = Ry_g f_g Rx_g^T, with Ry_g [H, h_g] and
Rx_g [W, w_g] from ``upsample.interpolation_matrix``). Upsampling is linear, so both Lloyd steps are
exact on the native grids:

- assignment: ||F(p) - c_j||^2 = ||F(p)||^2 + ||c_j||^2 - 2 sum_g up_g(<f_g, c_j,g>)(p): k score maps
  are computed on the native grids and upsampled (k channels instead of C);
- update: the sum of F_g over cluster j is f_g contracted with Ry_g^T M_j Rx_g, the adjoint of the
  upsampling applied to the cluster indicator M_j (all k at once).

For speed, k-means++ (greedy, 20 starts; fewer above k = 160, see _WS_START_FLOATS) and the first
Lloyd iterations run on a working set: 512 uniformly random output pixels, or 16 per cluster for
k > 32 (up to 4096 at k = MAX_CLUSTERS), with their explicit features (an unbiased sample of the
full problem), in Gram space (``working_set.py``). Of the starts of lowest inertia there, up to 3
and one per optimum (_finalists), the one of lowest inertia on the first pixel lattice with at least
4096 pixels (the full image if none has) is kept. Exact Lloyd iterations then polish on a pixel
lattice of 1/16 of the output (from 256 x 256 up; smaller images on the first lattice with at least
4096 pixels, or on the full output alone) and on the full output, each until the labels stop
changing, the centroids move less than ``tol`` (scikit-learn's rule) or an iteration lowers the
inertia by less than _RTOL of itself; the final labels and the inertia are exact at full resolution.
Clusters are renumbered by decreasing area (ties: the cluster whose first pixel in raster order
comes first), so labels are canonical.

Threads: on the CPU the k of a sweep run at once on worker threads (as many as torch has intra-op
threads), each on one intra-op thread, where waking a second thread for each small product would
cost more than it saves, or on an equal share of the threads for large images. A single k runs
alone and gives its large lattices all of the caller's threads.

CUDA GPUs: every k of an image runs at once on the calling thread (kmeans_batched.py): the same
algorithm, draws and stopping rules in a few large launches per iteration, where one k at a time
was thousands of small launches and host round trips (an H200 at 512 x 512: 0.035 s for all five k
with 16 CPU threads, 0.049 s with 2, against 0.108 s one k at a time).

The arguments are checked by kmeans_options.py; each image's grids, interpolation matrices, lattices
and working sets, shared by every k of a sweep, are kmeans_image.py's PreparedImage.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from . import kmeans_batched as batched
from .kmeans_image import STAGES, PreparedImage
from .kmeans_options import (
    MAX_CLUSTERS,
    MAX_TOTAL_CLUSTERS,
    check_callbacks,
    check_cluster_counts,
    check_iter_tol,
    check_k,
    check_seed,
    check_sweep_options,
    parse_cluster_counts,
)
from .numerics import full_float32_matmul
from .upsample import FeatureStack, check_stack
from .working_set import RTOL as _RTOL
from .working_set import WorkingSet, no_check, starts

# The public names, with those kmeans_options.py and kmeans_image.py hold (importable from here too).
__all__ = [
    "MAX_CLUSTERS", "MAX_TOTAL_CLUSTERS", "STAGES", "KMeansResult", "ClusterSweep", "parse_cluster_counts",
    "check_sweep_options", "kmeans", "multi_kmeans",
]

# k-means++ starts on the working set, each followed by Lloyd there; of the _WS_FINALISTS of lowest
# inertia on the working set, one per optimum (_finalists: within _WS_SAME_OPTIMUM relative inertia
# counts as the same), the one of lowest inertia on the scoring lattice (the first with at least
# _POLISH_MIN_POINTS pixels, kmeans_image.py; the full image if none has) is polished. The starts run
# at once with [starts, k, points] tensors: for large k fewer starts keep those at most _WS_START_FLOATS.
_WS_INITS = 20
_WS_START_FLOATS = 1 << 23
_WS_FINALISTS = 3
_WS_SAME_OPTIMUM = 1e-3
# Devices whose sweeps run every k of an image at once (kmeans_batched.py): few large launches and
# one host round trip per iteration suit GPUs; CPUs run one k at a time on worker threads.
_BATCHED_DEVICES = ("cuda",)
# Lattices of at least this many pixels use all intra-op threads; everything smaller runs on one
# (waking a second thread for each small product costs more than it saves).
_PARALLEL_MIN_POINTS = 1 << 17


@contextmanager
def _threads(n: int):
    """Runs the block on n intra-op threads, then restores the number it had."""
    before = torch.get_num_threads()
    n = max(1, n)
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n != before:
            torch.set_num_threads(before)


def _lattice_threads(lat, threads: int | None):
    """Threads for a lattice's products: ``threads`` for large lattices, one for small ones;
    None leaves the current count (set by the caller for every worker at once)."""
    if threads is None:
        return _threads(torch.get_num_threads())
    return _threads(threads if lat.num_pixels >= _PARALLEL_MIN_POINTS else 1)


# ----------------------------------------------------------------------------- public types
@dataclass
class KMeansResult:
    """k-means of every image of a stack: labels [B, H, W], centroids [B, k, C], inertia [B]."""

    k: int
    labels: torch.Tensor  # [B, H, W] uint8 (k <= MAX_CLUSTERS = 256), clusters renumbered by decreasing area (ties: first pixel)
    centroids: torch.Tensor  # [B, k, C] float32, same order as the labels
    inertia: torch.Tensor  # [B] float64: sum over output pixels of the squared distance to the centroid
    n_iter: int  # most Lloyd iterations any image used (working set + pixel lattices)

    def to(self, device) -> KMeansResult:
        """The same result with labels, centroids and inertia on ``device``."""
        return dataclasses.replace(
            self, labels=self.labels.to(device), centroids=self.centroids.to(device), inertia=self.inertia.to(device)
        )


@dataclass
class ClusterSweep:
    """k-means results for several cluster counts: results[k] for k ascending."""

    results: dict[int, KMeansResult]
    size: tuple[int, int]  # (H, W) of the label maps
    source: dict[str, str] | None = dataclasses.field(default=None, repr=False)  # FeatureStack.source

    @property
    def cluster_counts(self) -> list[int]:
        return list(self.results)

    @property
    def batch_size(self) -> int:
        if not self.results:
            raise ValueError("ClusterSweep holds no cluster count: expected results for at least one k")
        return int(next(iter(self.results.values())).labels.shape[0])

    def to(self, device) -> ClusterSweep:
        """The same sweep with every result on ``device`` (e.g. back to the CPU after a GPU sweep)."""
        return dataclasses.replace(self, results={k: r.to(device) for k, r in self.results.items()})


# ----------------------------------------------------------------------------- one image, every k
def _canonical(labels: torch.Tensor, centroids: torch.Tensor, k: int):
    """labels [...] in 0..k-1, centroids [k, C] -> (labels, centroids) renumbered by decreasing area, ties by
    first pixel in raster order."""
    flat = labels.reshape(-1)  # [N]
    N = flat.numel()
    counts = torch.bincount(flat, minlength=k)  # [k]
    device = labels.device
    first = torch.full((k,), N, dtype=torch.int64, device=device)  # [k]
    first.scatter_reduce_(0, flat, torch.arange(N, device=device), "amin")  # [k] first pixel of each cluster
    order = torch.argsort((N - counts) * (N + 1) + first, stable=True)  # [k] old index of new cluster i
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k, device=device)  # [k] new index of old cluster j
    return rank[labels], centroids[order]


def _kmeans_image(img: PreparedImage, k: int, seed: int, max_iter: int, tol: float, threads: int | None):
    """One image, one k -> _finish's (labels [H, W] uint8 canonical, centroids [k, C], inertia float, iterations).

    Runs on one thread except the Lloyd iterations of large lattices, which use ``threads``;
    threads=None leaves torch's thread count as it is (the caller has set it).
    """
    gen = torch.Generator().manual_seed(seed)
    full = img.rung(img.last)
    ws = img.working_set(k, seed)
    runs = starts(ws, k, _ws_starts(k, ws.n), gen, max_iter, tol, img.check)
    finalists = [runs[r] for r in _finalists([run.inertia for run in runs])]
    cands = [r.centroids(ws) for r in finalists]  # [k, C] each
    pick, assigned = 0, None
    if len(cands) > 1:  # the finalist of lowest inertia on the scoring lattice, first of ties
        lat = img.rung(img.scoring_rung())
        with _lattice_threads(lat, threads):
            labels, best = lat.assign(torch.stack(cands))  # [finalists, N] each, all at once
        scores = best.sum(1, dtype=torch.float64).tolist()
        pick = scores.index(min(scores))
        assigned = labels[pick], best[pick]  # the first assignment of the polish when it starts on the scoring lattice
    img.advance(1)  # stage 1 of STAGES: the working set and its finalists
    centroids, iters = cands[pick], finalists[pick].iters
    X, xx = ws.X, ws.xx
    total_sq, full_var = full.moments()  # float64 products over the native grids, once per image
    for i in img.polish_rungs():  # exact Lloyd on finer lattices, the last = full
        lat = img.rung(i)
        # the sum of ||F(p)||^2 over this lattice (estimated on a sub-lattice; only the _RTOL test reads it)
        lattice_sq = total_sq * lat.num_pixels / full.num_pixels
        with _lattice_threads(lat, threads):
            first = assigned if i == img.scoring_rung() else None
            labels, centroids, score, it = lat.lloyd(
                centroids, max_iter, tol * full_var, X, xx, lattice_sq, first, img.check
            )
        iters += it
        img.advance(img.stages_after(i))  # stages 2 and 3: the polish
    return _finish(img, k, labels, centroids, max(0.0, total_sq + float(score.double().sum())), iters)


def _finish(img: PreparedImage, k: int, labels: torch.Tensor, centroids: torch.Tensor, inertia: float, iters: int):
    """One k's polished result -> (labels [H, W] uint8 canonical, centroids [k, C] in the stack's units,
    inertia float in the stack's units, iterations). uint8: k <= MAX_CLUSTERS = 256, and a label map of
    one byte per pixel is an eighth of int64's (they stay in ComfyUI's cache for every k and image)."""
    labels, centroids = _canonical(labels, centroids, k)
    labels = labels.to(torch.uint8)  # [H, W]: values 0 .. k-1 <= 255
    if img.scale != 1.0:  # back to the stack's units (exact: a power of two)
        inertia = inertia / img.scale / img.scale
    if img.scale != 1.0 or img.offset is not None:  # float64: the scale may exceed float32
        centroids = centroids.double() / img.scale
        if img.offset is not None:
            centroids = centroids + img.offset  # [k, C] + [C]: back where the features were
        centroids = centroids.to(torch.float32)
    return labels, centroids, inertia, iters


def _sweep_image_batched(img: PreparedImage, ks: list[int], seed: int, max_iter: int, tol: float) -> dict:
    """One image, every k at once (kmeans_batched.py, for GPUs) -> {k: _kmeans_image's result},
    the same up to rounding."""
    H, W = img.size
    full = img.rung(img.last)
    dense: dict[int, batched.DenseLattice] = {}  # rung -> its lattice, built once

    def rung(i: int) -> batched.DenseLattice:
        if i not in dense:
            dense[i] = img.dense_rung(i)
        return dense[i]

    cands, ws_iters, ws_of = {}, {}, {}
    for ws, group, counts in _working_set_batches(img, ks, seed):
        members, point, inertia, iters = batched.working_set_runs(ws, group, counts, seed, max_iter, tol, img.check)
        inertia, iters = inertia.tolist(), iters.tolist()
        first = 0
        for k, count in zip(group, counts):
            finalists = [first + r for r in _finalists(inertia[first : first + count])]
            index = torch.tensor(finalists, device=img.device)
            cands[k] = batched.run_centroids(ws, members[index], point[index], k)  # [finalists, k, C]
            ws_iters[k] = [iters[r] for r in finalists]
            ws_of[k] = ws
            first += count
    pick = {k: 0 for k in ks}
    several = [k for k in ks if cands[k].shape[0] > 1]
    if several:  # each k's finalist of lowest inertia on the scoring lattice, first of ties
        sizes = [k for k in several for _ in range(cands[k].shape[0])]
        packed = torch.cat([cands[k].reshape(-1, cands[k].shape[2]) for k in several])  # [sum sizes, C]
        _, best = rung(img.scoring_rung()).assign(packed, sizes)
        scores = best.sum(1, dtype=torch.float64).tolist()
        first = 0
        for k in several:
            mine = scores[first : first + cands[k].shape[0]]
            pick[k] = mine.index(min(mine))
            first += len(mine)
    img.advance(len(ks))  # stage 1 of every k
    centroids = torch.cat([cands[k][pick[k]] for k in ks])  # [K, C] packed
    iters = torch.tensor([ws_iters[k][pick[k]] for k in ks], device=img.device)  # [R], R = len(ks): one run per k
    refill = [(ws_of[k].X, ws_of[k].xx) for k in ks]
    total_sq, full_var = full.moments()
    for i in img.polish_rungs():  # exact Lloyd on finer lattices, the last = full
        lat = rung(i)
        # the sum of ||F(p)||^2 over this lattice (estimated on a sub-lattice; only the _RTOL test reads it)
        lattice_sq = total_sq * lat.num_pixels / full.num_pixels
        labels, centroids, best, it = lat.lloyd(
            centroids, ks, max_iter, tol * full_var, _RTOL, lattice_sq, refill, img.check
        )
        iters = iters + it
        img.advance(len(ks) * img.stages_after(i))
    inertia = (total_sq + best.sum(1, dtype=torch.float64)).clamp_min(0.0).tolist()  # [R]
    iters = iters.tolist()
    return {
        k: _finish(img, k, labels[r].view(H, W), c, inertia[r], iters[r])
        for r, (k, c) in enumerate(zip(ks, centroids.split(ks)))
    }


def _working_set_batches(img: PreparedImage, ks: list[int], seed: int):
    """-> [(working set, ks, starts per k)]: the k that share a working set (the same number of
    points n), in batches whose [starts, k, n] tensors, padded to the batch's largest k, hold at
    most about _WS_START_FLOATS floats in all (the bound one k alone keeps); at least one k each."""
    groups: dict[int, tuple[WorkingSet, list[int]]] = {}  # n -> (working set, the k that share it)
    for k in ks:
        ws = img.working_set(k, seed)
        groups.setdefault(ws.n, (ws, []))[1].append(k)
    batches = []
    for ws, group in groups.values():
        batch, counts = [], []
        for k in group:  # ascending: the batch's largest k is the one added last
            count = _ws_starts(k, ws.n)
            if batch and (sum(counts) + count) * k * ws.n > _WS_START_FLOATS:
                batches.append((ws, batch, counts))
                batch, counts = [], []
            batch.append(k)
            counts.append(count)
        batches.append((ws, batch, counts))
    return batches


def _finalists(inertia: list[float]) -> list[int]:
    """Working-set inertia of each start -> the starts to score on the scoring lattice, best first: up
    to _WS_FINALISTS of lowest inertia, one per optimum. Starts that end within _WS_SAME_OPTIMUM
    (relative) of a lower one are taken as the same optimum (many starts land in the best one found,
    and scoring copies of it would leave a close second optimum, which the full image may prefer,
    unscored)."""
    order = sorted(range(len(inertia)), key=lambda r: inertia[r])  # stable: ties keep start order
    picked = order[:1]
    for r in order[1:]:
        if len(picked) == _WS_FINALISTS:
            break
        if inertia[r] > inertia[picked[-1]] * (1.0 + _WS_SAME_OPTIMUM):
            picked.append(r)
    return picked


def _ws_starts(k: int, n: int) -> int:
    """k-means++ starts on a working set of n points for k clusters (fewer for large k)."""
    return max(1, min(_WS_INITS, _WS_START_FLOATS // (k * n))) if k > 1 else 1


# ----------------------------------------------------------------------------- sweeps
class _Stopped(Exception):
    """Raised by _StopCheck on the threads that did not see the caller's check raise."""


class _StopCheck:
    """The caller's check() for every thread of a sweep: once it, or a call made through ``run`` (the
    progress callback: ComfyUI's progress hook checks the interrupt flag too), has raised, every later
    call raises _Stopped, so that every k stops at its next step even when the flag was cleared as it
    raised (ComfyUI's interrupt check clears it); ``error`` keeps what was raised."""

    def __init__(self, check):
        self.check, self.error = check, None

    def __call__(self) -> None:
        self.run(self.check)

    def run(self, fn, *args) -> None:
        """fn(*args), or _Stopped once the sweep is stopped; what fn raises stops the sweep."""
        if self.error is not None:
            raise _Stopped()
        try:
            fn(*args)
        except BaseException as exc:
            self.error = exc
            raise


def _sweep(stack: FeatureStack, ks: list[int], seed: int, max_iter: int, tol: float, progress=None, check=no_check):
    """Every image, every k -> {k: KMeansResult}. On a device of _BATCHED_DEVICES all k of an image
    run at once (_sweep_image_batched); elsewhere one k at a time on worker threads (_sweep_threads).
    progress(done, total) as each of the STAGES of each (image, k) ends. check() at every k-means++ step
    and Lloyd iteration of every k: what it or progress raises stops the sweep and comes out of it (ComfyUI's progress
    hook checks its interrupt flag too, and clears it as it raises)."""
    stop = _StopCheck(check)
    try:
        return _sweep_all(stack, ks, seed, max_iter, tol, progress, stop)
    except _Stopped:
        raise stop.error from None  # the caller's own exception, whichever thread saw it first
    finally:
        stop.error = None  # it holds a traceback that holds this frame: no cycle keeps the tensors


def _sweep_all(stack: FeatureStack, ks: list[int], seed: int, max_iter: int, tol: float, progress, stop: _StopCheck):
    B = stack.batch_size
    device = stack.grids[0].device
    out = {k: ([], [], []) for k in ks}
    iters = {k: 0 for k in ks}
    done, total, lock = 0, B * len(ks) * STAGES, threading.Lock()

    def advance(units: int) -> None:  # from the workers too: one progress call at a time
        nonlocal done
        stop()  # a stage's end is a check point too: nothing is reported once the sweep is stopped
        if progress is not None:
            with lock:
                done += units
                stop.run(progress, done, total)  # what progress raises stops every k too

    def collect(k, result):
        labels, centroids, inertia, it = result
        out[k][0].append(labels)
        out[k][1].append(centroids)
        out[k][2].append(inertia)
        iters[k] = max(iters[k], it)

    with full_float32_matmul():
        if device.type in _BATCHED_DEVICES:
            for b in range(B):
                for k, result in _sweep_image_batched(PreparedImage(stack, b, stop, advance), ks, seed, max_iter, tol).items():
                    collect(k, result)
        else:
            _sweep_threads(stack, ks, seed, max_iter, tol, collect, advance, stop)
    return {
        k: KMeansResult(
            k=k,
            labels=torch.stack(out[k][0]),  # [B, H, W]
            centroids=torch.stack(out[k][1]),  # [B, k, C]
            inertia=torch.tensor(out[k][2], dtype=torch.float64, device=out[k][0][0].device),  # [B]
            n_iter=iters[k],
        )
        for k in ks
    }


def _sweep_threads(
    stack: FeatureStack, ks: list[int], seed: int, max_iter: int, tol: float, collect, advance=None, check=no_check
) -> None:
    """Every image, every k, one k at a time: advance(units) as the stages of each (image, k) end
    (on the worker threads), collect(k, result) image by image, k ascending within an image. With
    several intra-op threads and several k, the k of an image run at once on worker threads
    (largest k first), each on one intra-op thread, or on an equal share of them for images of
    at least _PARALLEL_MIN_POINTS pixels. Results depend on the number of threads only for such
    large images when their k get several threads each (a single k, or more threads than k):
    their lattice products may round differently, and a near-tie may then go the other way."""
    H, W = stack.size
    threads = torch.get_num_threads()
    workers = min(threads, len(ks))
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    share = max(1, threads // workers) if H * W >= _PARALLEL_MIN_POINTS else 1  # intra-op threads per worker
    try:
        for b in range(stack.batch_size):
            img = PreparedImage(stack, b, check, advance)  # grids and interpolation matrices
            with _threads(1):
                img.prepare(ks, seed, pool)  # the shared parts: working set, lattices, moments
            with _threads(1 if pool is None else share):
                if pool is None:
                    results = ((k, _kmeans_image(img, k, seed, max_iter, tol, threads)) for k in ks)
                else:  # workers leave the thread count alone (threads=None): it is shared by all
                    futures = {
                        pool.submit(_kmeans_image, img, k, seed, max_iter, tol, None): k
                        for k in sorted(ks, reverse=True)
                    }
                    results = ((futures[f], f.result()) for f in as_completed(futures))
                got = dict(results)
            for k in ks:
                collect(k, got[k])
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def kmeans(stack: FeatureStack, k: int, seed: int = 0, max_iter: int = 100, tol: float = 1e-4) -> KMeansResult:
    """FeatureStack (virtual [B, C, H, W]) -> KMeansResult with labels [B, H, W] for k clusters.

    k-means++ start and Lloyd iterations, exact at output resolution, each image independently,
    deterministic for a seed (and independent of the other images of the batch): bit for bit on the
    CPU, and on a GPU in every run measured (its k-means sums with reductions, not float atomics).
    max_iter: most Lloyd iterations of each stage (working set, 1/16 lattice, full image).
    tol: centroid shift (squared, summed) relative to the mean feature variance, as in scikit-learn.
    """
    check_stack(stack)
    k = check_k(stack, k)
    max_iter, tol = check_iter_tol(max_iter, tol)
    seed = check_seed(seed)
    return _sweep(stack, [k], seed, max_iter, tol)[k]


def multi_kmeans(
    stack: FeatureStack,
    cluster_counts,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    check: Callable[[], None] | None = None,
) -> ClusterSweep:
    """FeatureStack -> ClusterSweep: k-means for every k of ``cluster_counts`` (list or "2,5,6,10,20").

    progress(done, total) is called as each of the STAGES (3) of each (image, k) ends, one call at a time
    (from worker threads on a CPU): the working set, the polish on a coarser lattice, the polish on the
    full image; ``total`` = images x cluster counts x 3. check() is called at every k-means++ step
    and Lloyd iteration of every k, on the sweep's threads: an exception it raises (e.g. ComfyUI's
    interrupt) stops every k at its next step and comes out of multi_kmeans.
    """
    check_stack(stack)
    ks = check_cluster_counts(stack, cluster_counts)
    seed = check_seed(seed)
    check_callbacks(progress, check)
    results = _sweep(stack, ks, seed, 100, 1e-4, progress, check or no_check)
    return ClusterSweep(results=results, size=tuple(stack.size), source=stack.source)
