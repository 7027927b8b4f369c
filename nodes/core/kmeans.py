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
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch

from . import kmeans_batched as batched
from .numerics import full_float32_matmul, power_of_two_scale
from .upsample import MAX_OFFSET, FeatureStack, channel_means, check_stack, interpolation_matrix, peak_abs
from .values import ascii_int, is_int, shown_text
from .working_set import RTOL as _RTOL
from .lattice import Lattice, sample_positions
from .working_set import WorkingSet, check_tol, no_check, sample_pixels, starts

# The most clusters one k may ask for: every cluster becomes a mask at the output size (256 masks of
# 512x512 are 256 MB as a float MASK batch), and the working set grows with k (16 points per cluster).
MAX_CLUSTERS = 256
# The most clusters all k of one sweep may add up to: every cluster becomes a mask, and merging
# compares every pair of masks (1024 masks of 512x512 are 1 GB as a float MASK batch).
MAX_TOTAL_CLUSTERS = 1024
# Working set: this many random pixels (at least _WS_POINTS_PER_K * k).
_WS_MIN_POINTS = 512
_WS_POINTS_PER_K = 16
# Exact Lloyd runs on the pixel lattice this many rungs below the full image (each rung has 4x the
# pixels of the one below: 2 = 1/16 of the pixels), or the first above it with at least
# _POLISH_MIN_POINTS pixels, then on the full image. (A third lattice of 1/4 of the pixels between
# them cost 7-10 % more time; without it Lloyd often stops in a slightly different optimum, a few
# 1e-4 higher in inertia on the benchmark input.)
_POLISH_SKIP = 2
_POLISH_MIN_POINTS = 1 << 12
# k-means++ starts on the working set, each followed by Lloyd there; of the _WS_FINALISTS of lowest
# inertia on the working set, one per optimum (_finalists: within _WS_SAME_OPTIMUM relative inertia
# counts as the same), the one of lowest inertia on the scoring lattice (the first with at
# least _POLISH_MIN_POINTS pixels, the full image if none has) is polished. The starts run at once
# with [starts, k, points] tensors: for large k fewer starts keep those at most _WS_START_FLOATS.
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
# Progress units of one (image, k): the working set and its finalists, the polish on the coarser
# lattice, the polish on the full image (the last two together when the image is small).
STAGES = 3


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


def parse_cluster_counts(text: str) -> list[int]:
    """"2,5,6,10,20" -> [2, 5, 6, 10, 20]: sorted, unique; commas or spaces separate; each in 1..MAX_CLUSTERS."""
    if not isinstance(text, str):
        raise ValueError(
            f"cluster_counts must be a string of integers such as '2,5,6,10,20', got {type(text).__name__}"
        )
    tokens = [t for t in re.split(r"[,\s;]+", text.strip()) if t]
    if not tokens:
        raise ValueError(f"cluster_counts must list at least one integer such as '2,5,6,10,20', got {shown_text(text, 80)}")
    counts = []
    for token in tokens:
        if not re.fullmatch(r"[+-]?[0-9]+", token):  # ASCII digits only
            raise ValueError(f"cluster_counts must hold integers such as '2,5,6,10,20'; {shown_text(token, 80)} is not one")
        value = -ascii_int(token[1:]) if token[0] == "-" else ascii_int(token.lstrip("+"))
        if not 1 <= value <= MAX_CLUSTERS:
            raise ValueError(f"cluster_counts must hold integers from 1 to {MAX_CLUSTERS}, got {value} in {shown_text(text, 80)}")
        counts.append(value)
    return _check_total(sorted(set(counts)), text)


def _check_total(ks: list[int], given) -> list[int]:
    """ks -> ks, or a ValueError when they add up to more than MAX_TOTAL_CLUSTERS."""
    if sum(ks) > MAX_TOTAL_CLUSTERS:
        raise ValueError(
            f"cluster_counts must add up to at most {MAX_TOTAL_CLUSTERS} clusters (each becomes a mask at the "
            f"output size, and merging compares every pair), got {sum(ks)} from {given!r}"
        )
    return ks


# ----------------------------------------------------------------------------- validation
def _max_clusters(stack: FeatureStack) -> int:
    """Cells of the finest grid (capped by the output pixels): the most distinct clusters possible."""
    H, W = stack.size
    cells = max(int(g.shape[2]) * int(g.shape[3]) for g in stack.grids)
    return min(cells, H * W)


def _check_k(k, limit: int, finest: str, name: str = "k") -> int:
    """k -> k, or a ValueError that starts with ``name`` (the argument k came in)."""
    where = "" if name == "k" else f"{name}: "
    if not is_int(k):
        raise ValueError(f"{where}k must be an int >= 1, got {k!r}")
    if k < 1:
        raise ValueError(f"{where}k must be >= 1, got {k}")
    if k > MAX_CLUSTERS:
        raise ValueError(
            f"{where}k must be at most {MAX_CLUSTERS} (each cluster becomes a mask at the output size), got {k}"
        )
    if k > limit:
        raise ValueError(f"{where}k must be at most {limit} ({finest}: no more distinct clusters), got {k}")
    return int(k)


def _finest(stack: FeatureStack) -> str:
    """What bounds k: the cells of the finest grid, or the output pixels when there are fewer."""
    H, W = stack.size
    g = max(stack.grids, key=lambda t: int(t.shape[2]) * int(t.shape[3]))
    if H * W < int(g.shape[2]) * int(g.shape[3]):
        return f"the pixels of the {H}x{W} output"
    return f"the cells of the finest grid {int(g.shape[2])}x{int(g.shape[3])}"


# ----------------------------------------------------------------------------- images
class _Image:
    """Everything k-means needs for one image of a stack, shared by all k of a sweep.

    sides: lattices of output pixels from coarse to fine, each twice the previous per side, the
    last being the full H x W image (rungs, built on first use). The working set is a uniform random
    sample of output pixels with their explicit features (an unbiased sample of the full problem).
    """

    def __init__(self, stack: FeatureStack, b: int, check=no_check, advance=None):
        H, W = stack.size
        self.size = (H, W)
        self.check = check  # called at every k-means++ step and Lloyd iteration; raises to stop
        self.advance = advance or (lambda units: None)  # advance(units): stages done (STAGES per k)
        # Features whose largest |value| lies outside 2**-SCALE_EXP .. 2**SCALE_EXP (numerics.py) are
        # scaled by an exact power of two (in float64, before float32), so that squared distances
        # neither underflow nor overflow float32; centroids and inertia are scaled back, labels unchanged.
        grids = [g[b].detach() for g in stack.grids]  # [C_g, h_g, w_g] each
        grids, self.offset = _centred(grids)
        self.scale = float(power_of_two_scale(torch.stack([peak_abs(g).double() for g in grids]).max()))
        if self.scale != 1.0:
            grids = [g.double() * self.scale for g in grids]
        self.feats = [g.to(torch.float32) for g in grids]  # [C_g, h_g, w_g]
        self.device = device = grids[0].device
        mats = {}  # (n_in, n_out, span) -> [n_out, n_in]; span: the pixels the grid spans (None: the image)
        spans = [stack.span(i) for i in range(len(self.feats))]  # (Hs, Ws) per grid
        axes = [((int(f.shape[1]), H, Hs), (int(f.shape[2]), W, Ws)) for f, (Hs, Ws) in zip(self.feats, spans)]
        for axis in (a for pair in axes for a in pair):
            if axis not in mats:
                n_in, n_out, span = axis
                mats[axis] = interpolation_matrix(n_in, n_out, stack.mode, span=span).to(device, torch.float32)
        self.ry = [mats[rows] for rows, _ in axes]  # [H, h_g]
        self.rx = [mats[cols] for _, cols in axes]  # [W, w_g]
        sides = [(H, W)]
        while sides[-1][0] * sides[-1][1] > 4 and sides[-1] != (1, 1):
            ny, nx = sides[-1]
            sides.append((math.ceil(ny / 2), math.ceil(nx / 2)))
        self.sides = sides[::-1]  # coarse -> fine, last = (H, W)
        self._rungs = {}
        self._ws = {}

    @property
    def last(self) -> int:
        return len(self.sides) - 1

    def rung_rows(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Interpolation rows of lattice i (0 <= i <= last) -> (per grid [ny, h_g], per grid [nx, w_g]):
        the rows of its sampled output pixels, or the full matrices for the full image."""
        ny, nx = self.sides[i]
        H, W = self.size
        if (ny, nx) == (H, W):
            return self.ry, self.rx
        ys, xs = sample_positions(H, ny, self.device), sample_positions(W, nx, self.device)  # [ny], [nx]
        return [r[ys] for r in self.ry], [r[xs] for r in self.rx]

    def rung(self, i: int) -> Lattice:
        """Lattice i of ``sides`` (negative i counts from the full image), built on first use."""
        i = i % len(self.sides)
        if i not in self._rungs:
            self._rungs[i] = Lattice(self.feats, *self.rung_rows(i))
        return self._rungs[i]

    def polish_rungs(self) -> list[int]:
        """Lattices of the exact Lloyd polish, coarse to fine: the one _POLISH_SKIP rungs below the
        full image (1/16 of its pixels) or the first above it with at least _POLISH_MIN_POINTS pixels,
        then the full image (alone when no smaller lattice is that large)."""
        first = max(self.last - _POLISH_SKIP, 0)
        while first < self.last and self.sides[first][0] * self.sides[first][1] < _POLISH_MIN_POINTS:
            first += 1
        return [first, self.last] if first < self.last else [self.last]

    def stages_after(self, i: int) -> int:
        """Progress stages one k completes with the polish on lattice i: 1, and on the full image the
        rest of the STAGES (2 when it is the only polish lattice)."""
        return STAGES - len(self.polish_rungs()) if i == self.last else 1

    def scoring_rung(self) -> int:
        """The first lattice with at least _POLISH_MIN_POINTS pixels (the full image if none)."""
        for i, (ny, nx) in enumerate(self.sides):
            if ny * nx >= _POLISH_MIN_POINTS:
                return i
        return self.last

    def working_set(self, k: int, seed: int, map_fn=map) -> WorkingSet:
        """The WorkingSet of n = max(_WS_MIN_POINTS, _WS_POINTS_PER_K * k) random pixels (all if fewer);
        map_fn runs the blocks of its Gram matrix (see WorkingSet.from_features)."""
        full = self.rung(self.last)
        N = full.num_pixels
        n = min(N, max(_WS_MIN_POINTS, _WS_POINTS_PER_K * k))
        if (n, seed) not in self._ws:
            gen = torch.Generator().manual_seed(seed)
            pix = sample_pixels(N, n, gen) if n < N else torch.arange(N, device="cpu")  # [n]
            pix = pix.to(full.device)  # drawn on the CPU: the same pixels on every device
            self._ws[n, seed] = WorkingSet.from_features(full.features_at(pix), map_fn)  # X [n, C], G [n, n]
        return self._ws[n, seed]


# ----------------------------------------------------------------------------- helpers
def _centred(grids: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """[C_g, h_g, w_g] grids -> (the grids less every channel's native-grid mean, in float64, and the
    means [C] float64 in stack channel order), or (the grids, None) when no channel's mean is more
    than MAX_OFFSET (upsample.py) of its own largest |value| (PCA scores are centred already: used as they are).

    k-means' distances ||c||^2 - 2<F, c> cancel in float32 when the features share a large offset;
    taking it out changes no distance: upsampling keeps constants (interpolation rows sum to 1), so
    up(f - m) = up(f) - m, and k-means is translation invariant. float64, since a difference of two
    float32 values may exceed float32's range (the power-of-two scale then brings it back).
    """
    means = [channel_means(g.reshape(g.shape[0], -1)) for g in grids]  # [C_g] each (no float64 copy of a grid)
    for g, m in zip(grids, means):
        low, high = torch.aminmax(g.reshape(g.shape[0], -1), dim=1)  # [C_g] each
        if bool((m.abs() > MAX_OFFSET * torch.maximum(-low, high).double()).any()):
            break
    else:
        return grids, None
    grids = [g.double() - m[:, None, None] for g, m in zip(grids, means)]  # [C_g, h_g, w_g] float64
    return grids, torch.cat(means)  # [C]


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


def _kmeans_image(img: _Image, k: int, seed: int, max_iter: int, tol: float, threads: int | None):
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


def _finish(img: _Image, k: int, labels: torch.Tensor, centroids: torch.Tensor, inertia: float, iters: int):
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


def _sweep_image_batched(img: _Image, ks: list[int], seed: int, max_iter: int, tol: float) -> dict:
    """One image, every k at once (kmeans_batched.py, for GPUs) -> {k: _kmeans_image's result},
    the same up to rounding."""
    H, W = img.size
    full = img.rung(img.last)
    dense: dict[int, batched.DenseLattice] = {}  # rung -> its lattice, built once

    def rung(i: int) -> batched.DenseLattice:
        if i not in dense:
            dense[i] = _dense_rung(img, i)
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


def _working_set_batches(img: _Image, ks: list[int], seed: int):
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


def _dense_rung(img: _Image, i: int) -> batched.DenseLattice:
    """Lattice i of the image (as _Image.rung) with dense interpolation matrices."""
    return batched.DenseLattice(img.feats, *img.rung_rows(i))


def _prepare(img: _Image, ks: list[int], seed: int, pool: ThreadPoolExecutor | None) -> None:
    """Builds everything the k of ``ks`` share (working sets, lattices, moments) before they run,
    on one intra-op thread each; with a pool, the lattices, the moments and the blocks of the Gram
    matrices run on its workers while this thread gathers the working sets' features."""
    full = img.rung(img.last)
    lattices = sorted({*img.polish_rungs(), img.scoring_rung()} - {img.last})  # the full image is `full`
    jobs = [full.moments] + [lambda i=i: img.rung(i) for i in lattices]
    futures = [pool.submit(job) for job in jobs] if pool is not None else []
    for k in ks:
        img.working_set(k, seed, map if pool is None else pool.map)
    if pool is None:
        for job in jobs:
            job()
    for future in futures:
        future.result()


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
                for k, result in _sweep_image_batched(_Image(stack, b, stop, advance), ks, seed, max_iter, tol).items():
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
            img = _Image(stack, b, check, advance)  # grids and interpolation matrices
            with _threads(1):
                _prepare(img, ks, seed, pool)  # the shared parts: working set, lattices, moments
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


def _check_iter_tol(max_iter, tol) -> tuple[int, float]:
    if not is_int(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    return int(max_iter), check_tol(tol)


def _check_seed(seed):
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(seed) % (1 << 63)


def kmeans(stack: FeatureStack, k: int, seed: int = 0, max_iter: int = 100, tol: float = 1e-4) -> KMeansResult:
    """FeatureStack (virtual [B, C, H, W]) -> KMeansResult with labels [B, H, W] for k clusters.

    k-means++ start and Lloyd iterations, exact at output resolution, each image independently,
    deterministic for a seed (and independent of the other images of the batch): bit for bit on the
    CPU, and on a GPU in every run measured (its k-means sums with reductions, not float atomics).
    max_iter: most Lloyd iterations of each stage (working set, 1/16 lattice, full image).
    tol: centroid shift (squared, summed) relative to the mean feature variance, as in scikit-learn.
    """
    check_stack(stack)
    k = _check_k(k, _max_clusters(stack), _finest(stack))
    max_iter, tol = _check_iter_tol(max_iter, tol)
    seed = _check_seed(seed)
    return _sweep(stack, [k], seed, max_iter, tol)[k]


def _cluster_count_list(cluster_counts) -> list:
    """cluster_counts (a string such as "2,5,6,10,20" or an iterable) -> a non-empty list, unchecked."""
    if isinstance(cluster_counts, str):
        return parse_cluster_counts(cluster_counts)
    try:
        ks = list(cluster_counts)
    except TypeError:
        raise ValueError(
            f"cluster_counts must be a list of ints or a string such as '2,5,6,10,20', got {cluster_counts!r}"
        ) from None
    if not ks:
        raise ValueError("cluster_counts must hold at least one cluster count k")
    return ks


def check_sweep_options(cluster_counts, seed) -> tuple[list[int], int]:
    """multi_kmeans' options checked before there is a stack (k up to MAX_CLUSTERS; multi_kmeans
    also checks them against the stack's grids) -> (sorted unique ks, seed)."""
    ks = sorted({_check_k(k, MAX_CLUSTERS, "", "cluster_counts") for k in _cluster_count_list(cluster_counts)})
    return _check_total(ks, cluster_counts), _check_seed(seed)


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
    ks = _cluster_count_list(cluster_counts)
    limit, finest = _max_clusters(stack), _finest(stack)
    ks = _check_total(sorted({_check_k(k, limit, finest, "cluster_counts") for k in ks}), cluster_counts)
    seed = _check_seed(seed)
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be callable(done, total) or None, got {type(progress).__name__}")
    if check is not None and not callable(check):
        raise ValueError(f"check must be callable() or None, got {type(check).__name__}")
    results = _sweep(stack, ks, seed, 100, 1e-4, progress, check or no_check)
    return ClusterSweep(results=results, size=tuple(stack.size), source=stack.source)
