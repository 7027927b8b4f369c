"""k-means on a working set: n sampled pixels with explicit features X [n, C], in Gram space.

The working set seeds the exact k-means of ``kmeans.py``: greedy k-means++ and Lloyd iterations on
512 to 4096 uniformly random output pixels (an unbiased sample of the full problem). Every
distance these need is between points of X or between a point and a mean of points, so one Gram
matrix G = X X^T [n, n] per image serves every k and every start:

- a centroid is either a point p (a k-means++ pick or a refilled empty cluster) or the mean of a
  cluster; it is held as its inner products with all points, S_j = <c_j, X> [n], and ||c_j||^2;
- a point: S_j = G[p], ||c_j||^2 = G[p, p]; a mean of cluster M_j: S_j = mean of G's rows over M_j
  (sums of G's rows per cluster, updated by the points that change cluster), ||c_j||^2 = mean of
  S_j over M_j.

An iteration then costs O(k n) plus O(n) per point that changes cluster, instead of O(k n C);
centroids are formed in feature space only for the starts asked for (Run.centroids). All starts
run at once, batched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .values import is_int, is_real

# Lloyd also stops when an iteration lowers the inertia by less than this fraction of itself.
RTOL = 1e-3
# Row blocks of the Gram matrix (computed on as many threads as are given, up to this many).
GRAM_BLOCKS = 4
# REFILL_NOTE (every Lloyd here, in lattice.py and kmeans_batched.py): an empty cluster moves onto the point
# farthest from its centroid; when that point sits on its centroid (squared distance within rounding:
# at most ON_CENTROID times the point's own ||x||^2, on_centroid), as with more clusters than distinct
# points, the move does not count in the centroids' shift. Counted, two clusters could trade a group of
# equal points back and forth (the first of equal centroids takes them, the other empties and is
# refilled), a shift far above tol each time, until max_iter. (A margin from the working set's largest
# ||x||^2 instead let a far outlier make real refills near it count as none.) In the Lloyd on a working
# set's Gram matrix (here and kmeans_batched._gram_lloyd) a start whose every point sits on its centroid
# (all_on_centroids) has converged: the other centroids' shifts read off the Gram matrix are rounding of
# about eps * ||c||^2 each, whose sum passes tol with a few hundred channels; its shift counts as 0.
ON_CENTROID = 16 * torch.finfo(torch.float32).eps


def on_centroid(far: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """far [...] squared distances of working-set points to their nearest centroid, xx [...] those points'
    own squared norms -> [...] bool: the points that sit on their centroid, within rounding of their own
    norm (REFILL_NOTE; a point far larger than the others widens no one else's margin)."""
    return far <= ON_CENTROID * xx


def all_on_centroids(far: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """far [..., n] squared distances of the working set's n points to their nearest centroid, xx [n] their
    squared norms -> [...] bool: every point sits on its centroid (on_centroid, REFILL_NOTE)."""
    return on_centroid(far, xx).all(-1)


_INDEX: dict[tuple, torch.Tensor] = {}  # (k, trailing dims, dtype, device) -> [k, 1, ...] cluster numbers


def first_at_minimum(d: torch.Tensor, low: torch.Tensor, dim: int) -> torch.Tensor:
    """d [..., k, ...] and its minimum low over dim (kept as size 1) -> int64 index of the first
    minimum along dim, as torch.min's indices. Overwrites d.

    d becomes j where it equals the minimum and k + j elsewhere, and the least of these is taken:
    float ops only, several times faster than min with indices or comparisons to bool on CPU.
    """
    k = d.shape[dim]
    key = (k, d.dim() - dim % d.dim() - 1, d.dtype, d.device)
    index = _INDEX.get(key)
    if index is None:  # cluster j (exact below 2**24), shaped to broadcast along dim
        index = _INDEX[key] = torch.arange(k, dtype=d.dtype, device=d.device).view(k, *[1] * key[1])  # [k, 1, ...]
    d = d.sub_(low).sign_()  # 0 at the minimum, 1 elsewhere
    return torch.add(index, d, alpha=k, out=d).amin(dim).long()  # in place: j or k + j


@dataclass
class WorkingSet:
    """Sampled pixels: X [n, C] float32 features, xx [n] squared norms, G [n, n] = X X^T, var."""

    X: torch.Tensor  # [n, C]
    xx: torch.Tensor  # [n] float32, ||x_i||^2 (the diagonal of G)
    G: torch.Tensor  # [n, n] float32 Gram matrix
    var: float  # mean over channels of the variance of X (scikit-learn's tolerance scale)

    @classmethod
    def from_features(cls, X: torch.Tensor, map_fn=map) -> "WorkingSet":
        """X [n, C] -> WorkingSet. G is computed in GRAM_BLOCKS row blocks, mapped with ``map_fn``
        (e.g. a thread pool's map): the same blocks whatever runs them, so the same bits."""
        if not isinstance(X, torch.Tensor) or X.dim() != 2 or X.dtype != torch.float32 or 0 in X.shape:
            what = f"{X.dtype} {tuple(X.shape)}" if isinstance(X, torch.Tensor) else type(X).__name__
            raise ValueError(f"X must be a float32 tensor [n, C] with n, C >= 1, got {what}")
        n, C = X.shape
        blocks = X.tensor_split(GRAM_BLOCKS)  # GRAM_BLOCKS x [n_b, C]
        G = torch.cat(list(map_fn(lambda rows: rows @ X.t(), blocks)))  # [n, n]
        xx = G.diagonal().clone()  # [n]
        mean = X.mean(0).double()  # [C] (a tolerance scale: float32 is plenty, and no float64 copy of X)
        var = max(0.0, float(xx.sum(dtype=torch.float64) / n - (mean * mean).sum()) / C) if n > 1 else 0.0
        return cls(X, xx, G, var)

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    def sq_dist(self, rows: torch.Tensor) -> torch.Tensor:
        """Points rows [m] -> [m, n] float64 squared distances to every point (>= 0)."""
        d = self.xx[rows][:, None] + self.xx[None] - 2.0 * self.G[rows]  # [m, n]
        return d.clamp_min_(0.0).double()


def sample_pixels(N: int, n: int, gen: torch.Generator) -> torch.Tensor:
    """-> [n] int64 on the CPU: n distinct indices of 0..N-1, a uniformly random subset in random
    order, drawn with the CPU generator gen. For n much smaller than N, integers are drawn and repeats
    skipped (sequential sampling without replacement: ~0.1 ms, where a permutation of a 1024 x 1024
    image's pixels took 11 ms); otherwise the first n of a random permutation."""
    if not is_int(N) or N < 0:
        raise ValueError(f"N must be an int >= 0 (the number of pixels), got {N!r}")
    if not is_int(n) or not 0 <= n <= N:  # more than N would come back short, without a word
        raise ValueError(f"n must be an int in [0, N = {N}] (distinct pixels to draw), got {n!r}")
    if n * 4 >= N:
        return torch.randperm(N, generator=gen, device="cpu")[:n]
    picked: list[int] = []
    seen: set[int] = set()
    while len(picked) < n:
        for value in torch.randint(N, (2 * (n - len(picked)),), generator=gen, device="cpu").tolist():
            if value not in seen:
                seen.add(value)
                picked.append(value)
                if len(picked) == n:
                    break
    return torch.tensor(picked, dtype=torch.int64, device="cpu")


def pp_trials(k: int) -> int:
    """Candidates per step of greedy k-means++: 2 + ln k, as scikit-learn."""
    return 2 + int(math.log(k))


def pp_draws(k: int, starts: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (first picks [starts] int64 in 0..n-1, uniforms [k-1, starts, trials] float64 in [0, 1)
    that choose the candidates of steps 1..k-1 (``pp_candidates``)): every random number greedy
    k-means++ uses, drawn up front with the CPU generator gen (the same draws on every device)."""
    first = torch.randint(n, (starts,), generator=gen, device="cpu")  # [starts]
    u = torch.rand(max(k - 1, 0), starts, pp_trials(k), generator=gen, dtype=torch.float64, device="cpu")
    return first, u  # [starts], [k-1, starts, trials]


def pp_candidates(closest: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """closest [I, n] float64 squared distances to the nearest pick so far, u [I, T] uniforms ->
    [I, T] candidates drawn with probability proportional to closest (inverse of the cumulative
    sum; points on a pick are never drawn), or uniformly where every point sits on a pick."""
    I, n = closest.shape
    flat = closest.sum(1) <= 0.0  # [I] every point sits on a centre: any point will do
    weights = torch.where(flat[:, None], torch.ones_like(closest), closest)  # [I, n]
    cdf = weights.cumsum(1)  # [I, n]
    target = u * cdf[:, -1:]  # [I, T] in [0, total)
    return torch.searchsorted(cdf, target, right=True).clamp_max_(n - 1)  # [I, T] first cdf entry above target


def no_check() -> None:
    """The default ``check`` of the k-means loops: never stops them."""


def kmeans_pp(ws: WorkingSet, k: int, starts: int, gen: torch.Generator, check=no_check) -> torch.Tensor:
    """-> [starts, k] indices of points: greedy k-means++ (2 + ln k candidates per step, as
    scikit-learn), ``starts`` independent runs at once."""
    n, I = ws.n, starts
    trials = pp_trials(k)
    device = ws.G.device
    rows = torch.arange(I, device=device)
    first, draws = pp_draws(k, I, n, gen)  # [I], [k-1, I, trials]
    draws = draws.to(device)
    picks = [first.to(device)]  # [I]
    closest = ws.sq_dist(picks[0])  # [I, n]
    for step in range(1, k):
        check()
        cand = pp_candidates(closest, draws[step - 1])  # [I, trials]
        new = torch.minimum(closest[:, None], ws.sq_dist(cand.flatten()).view(I, trials, n))  # [I, trials, n]
        best = new.sum(2).argmin(1)  # [I]
        picks.append(cand[rows, best])
        closest = new[rows, best]  # [I, n]
    return torch.stack(picks, 1)  # [I, k]


class _Starts:
    """Lloyd runs from several starts at once, in Gram space.

    Centroid j of start i is the point point[i, j] when that is >= 0, else the mean of cluster j of
    means_of[i]. S [I, k, n] holds <c_ij, x_p>, cc [I, k] holds ||c_ij||^2, and T [I, k, n] the sums
    of G's rows over the clusters of means_of, updated by the points that change cluster.
    """

    def __init__(self, ws: WorkingSet, picks: torch.Tensor):
        I, k = picks.shape
        self.ws, self.k = ws, k
        device = ws.G.device
        self.point = picks.clone()  # [I, k]
        self.means_of = torch.zeros(I, ws.n, dtype=torch.int64, device=device)  # [I, n]
        self.S = ws.G[picks.flatten()].view(I, k, ws.n).clone()  # [I, k, n]
        self.cc = ws.xx[picks].clone()  # [I, k]
        self.T = None  # [I, k, n] sums of G's rows per cluster, after the first update
        self.rows_of = None  # [I*n] row (start, cluster) of T that each point's sum went to
        self.offset = k * torch.arange(I, device=device)[:, None]  # [I, 1] first row of each start in T.view(I*k, n)
        self.total_sq = float(ws.xx.sum(dtype=torch.float64))

    def keep(self, mask: torch.Tensor) -> None:
        """Keeps the starts where mask [I] is True."""
        self.point, self.means_of = self.point[mask], self.means_of[mask]
        self.S, self.cc, self.T = self.S[mask], self.cc[mask], self.T[mask]
        self.offset = self.offset[: self.point.shape[0]]
        self.rows_of = (self.means_of + self.offset).view(-1)  # [I*n]

    def _sums(self, labels: torch.Tensor, rows_of: torch.Tensor) -> torch.Tensor:
        """T [I, k, n] for labels [I, n] (rows_of [I*n]: their rows of T.view(I*k, n))."""
        G, k = self.ws.G, self.k
        I, n = labels.shape
        moved = None if self.T is None else (labels != self.means_of).view(-1).nonzero().squeeze(1)  # [P] in I*n
        if moved is None or moved.numel() * 2 > I * n:
            T = torch.zeros(I, k, n, device=G.device)
            for i in range(I):  # start by start: no [I*n, n] copy of G
                T[i].index_add_(0, labels[i], G)
            return T
        rows = G.index_select(0, moved.remainder(n))  # [P, n] G's rows of the points that moved
        T = self.T.view(I * k, n)  # [I*k, n], a view: the updates land in self.T
        T.index_add_(0, self.rows_of[moved], rows, alpha=-1.0)
        T.index_add_(0, rows_of[moved], rows)
        return self.T

    def assign(self) -> tuple[torch.Tensor, list[float]]:
        """-> labels [I, n] of the nearest centroids, inertia per start (float64 sums)."""
        d = self.S.mul(-2.0).add_(self.cc[:, :, None])  # [I, k, n] squared distances less ||x_p||^2
        best = d.amin(1, keepdim=True)  # [I, 1, n]
        labels = first_at_minimum(d, best, 1)  # [I, n]
        return labels, (self.total_sq + best[:, 0].sum(1, dtype=torch.float64)).tolist()

    def update(self, labels: torch.Tensor) -> tuple[list[float], list[bool]]:
        """labels [I, n] -> per start (squared shift of the centroids summed, whether any was empty):
        centroids move to the means of their clusters; empty clusters onto the points farthest from
        their centroid (a move onto a point that sits on its centroid does not count, and a start whose
        every point sits on its centroid shifts 0: REFILL_NOTE)."""
        ws, k = self.ws, self.k
        I, n = labels.shape
        rows_of = (labels + self.offset).view(-1)  # [I*n] row (start, cluster) of each point
        counts = torch.bincount(rows_of, minlength=I * k).view(I, k)  # [I, k]
        inv = counts.clamp_min(1).to(torch.float32).reciprocal_()  # [I, k]
        self.T = self._sums(labels, rows_of)  # [I, k, n]
        S = self.T * inv[:, :, None]  # [I, k, n] <mean_j, x_p>
        own = labels[:, None, :]  # [I, 1, n] each point's cluster
        cc = torch.zeros(I, k, device=S.device).scatter_add_(1, labels, S.gather(1, own)[:, 0])
        cc *= inv  # [I, k] ||mean_j||^2
        cross = torch.zeros(I, k, device=S.device).scatter_add_(1, labels, self.S.gather(1, own)[:, 0])
        cross *= inv  # [I, k] <mean_j, c_j>
        shift = (cc + self.cc - 2.0 * cross).clamp_min_(0.0)  # [I, k] squared move of each centroid
        empty = counts == 0  # [I, k]
        any_empty = bool(empty.any())
        if any_empty:  # empty clusters keep their centroid until refilled below
            S[empty], cc[empty], shift[empty] = self.S[empty], self.cc[empty], 0.0
        self.S, self.cc, self.means_of, self.rows_of = S, cc, labels, rows_of
        if not any_empty:  # the common case: every centroid is now a mean
            self.point.fill_(-1)
            return shift.double().sum(1).tolist(), [False] * I
        self.point = torch.where(empty, self.point, -1)
        for i in empty.any(1).nonzero().flatten().tolist():  # rare: refill start i's empty clusters
            far = (ws.xx[None] + self.cc[i, :, None] - 2.0 * self.S[i]).min(0).values  # [n]
            order = far.argsort(descending=True, stable=True)  # [n]
            for r, j in enumerate(empty[i].nonzero().flatten().tolist()):
                q = int(order[r % n])
                if not bool(on_centroid(far[q], ws.xx[q])):  # REFILL_NOTE: else the move does not count
                    shift[i, j] = (self.cc[i, j] + ws.xx[q] - 2.0 * self.S[i, j, q]).clamp_min(0.0)
                self.S[i, j], self.cc[i, j], self.point[i, j] = ws.G[q], ws.xx[q], q
            if bool(all_on_centroids(far, ws.xx)):  # REFILL_NOTE: every point sits on its centroid
                shift[i] = 0.0
        return shift.double().sum(1).tolist(), empty.any(1).tolist()

    def result(self, i: int, inertia: float, iters: int) -> "Run":
        return Run(self.means_of[i].clone(), self.point[i].clone(), inertia, iters)


@dataclass(eq=False)
class Run:
    """Where one start ended: centroid j is the point point[j] when that is >= 0, else the mean of
    the points with members == j (members [n]: the clusters the means were taken over, one step
    behind the final assignment); its inertia on the working set (float64 sum) and its iterations.
    Centroids are formed in feature space only on request."""

    members: torch.Tensor  # [n] int64
    point: torch.Tensor  # [k] int64
    inertia: float
    iters: int

    def centroids(self, ws: WorkingSet) -> torch.Tensor:
        """-> [k, C] centroids in feature space."""
        X, k = ws.X, int(self.point.shape[0])
        counts = torch.bincount(self.members, minlength=k).clamp_min(1)  # [k]
        out = torch.zeros(k, X.shape[1], device=X.device).index_add_(0, self.members, X)  # [k, C] sums
        out.div_(counts[:, None].to(X.dtype))  # [k, C] means
        points = self.point >= 0  # [k]
        out[points] = X[self.point[points]]
        return out  # [k, C]


def lloyd(ws: WorkingSet, picks: torch.Tensor, max_iter: int, tol: float, check=no_check) -> list[Run]:
    """Lloyd from centroids at the points picks [I, k], every start at once -> a Run per start.

    Each start stops when no label changes, when its centroids moved less than tol (squared,
    summed; scikit-learn's rule), or when an iteration lowered its inertia by less than RTOL of
    itself, exactly as it would alone. A Run's inertia is that of its centroids. check() runs before
    every iteration: it raises to stop.
    """
    run = _Starts(ws, picks)
    labels, inertia = run.assign()
    ids = list(range(picks.shape[0]))  # the starts still running, in run's order
    out: list = [None] * len(ids)
    for it in range(1, max_iter + 1):
        check()
        shift, refilled = run.update(labels)
        new_labels, new_inertia = run.assign()
        same = (new_labels == labels).all(1).tolist()
        going = []
        for r, i in enumerate(ids):
            gain = inertia[r] - new_inertia[r]
            stop = same[r] or shift[r] <= tol or (not refilled[r] and gain <= RTOL * abs(new_inertia[r]))
            if stop or it == max_iter:
                out[i] = run.result(r, new_inertia[r], it)
            going.append(not (stop or it == max_iter))
        labels, inertia = new_labels, new_inertia
        if all(going):
            continue
        if not any(going):
            break
        mask = torch.tensor(going, device=labels.device)
        run.keep(mask)
        labels = labels[mask]
        inertia = [v for v, g in zip(inertia, going) if g]
        ids = [i for i, g in zip(ids, going) if g]
    return out


def check_tol(tol) -> float:
    """tol -> float, or a ValueError: a finite number >= 0."""
    if not is_real(tol) or not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    return float(tol)


def starts(
    ws: WorkingSet, k: int, count: int, gen: torch.Generator, max_iter: int, tol: float, check=no_check
) -> list[Run]:
    """k-means++ ``count`` times, Lloyd from each, all at once -> a Run per start. tol is relative to
    the working set's mean channel variance; check() runs at every step and raises to stop."""
    check_tol(tol)
    for name, value, low, high in (("k", k, 1, ws.n), ("count", count, 1, None), ("max_iter", max_iter, 1, None)):
        if not is_int(value) or value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ValueError(f"{name} must be an int {bound}, got {value!r}")
    return lloyd(ws, kmeans_pp(ws, k, count, gen, check), max_iter, tol * ws.var, check)
