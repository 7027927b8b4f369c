"""k-means on a working set: n sampled pixels with explicit features X [n, C], in Gram space.

The working set seeds the exact k-means of ``kmeans.py``: greedy k-means++ and Lloyd iterations on
a few hundred uniformly random output pixels (an unbiased sample of the full problem). Every
distance these need is between points of X or between a point and a mean of points, so one Gram
matrix G = X X^T [n, n] per image serves every k and every start:

- a centroid is either a point p (a k-means++ pick or a refilled empty cluster) or the mean of a
  cluster; it is held as its inner products with all points, S_j = <c_j, X> [n], and ||c_j||^2;
- a point: S_j = G[p], ||c_j||^2 = G[p, p]; a mean of cluster M_j: S_j = mean of G's rows over M_j
  (one index_add of G's rows), ||c_j||^2 = mean of S_j over M_j.

An iteration then costs O(n^2) instead of O(k n C); only the starts' final centroids are formed
in feature space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Lloyd also stops when an iteration lowers the inertia by less than this fraction of itself.
RTOL = 1e-3
# Row blocks of the Gram matrix (computed on as many threads as are given, up to this many).
GRAM_BLOCKS = 4


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
        n, C = X.shape
        blocks = X.tensor_split(GRAM_BLOCKS)  # GRAM_BLOCKS x [n_b, C]
        G = torch.cat(list(map_fn(lambda rows: rows @ X.t(), blocks)))  # [n, n]
        xx = G.diagonal().clone()  # [n]
        mean = X.mean(0, dtype=torch.float64)  # [C]
        var = max(0.0, float(xx.sum(dtype=torch.float64) / n - (mean * mean).sum()) / C) if n > 1 else 0.0
        return cls(X, xx, G, var)

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    def sq_dist(self, rows: torch.Tensor) -> torch.Tensor:
        """Points rows [m] -> [m, n] float64 squared distances to every point (>= 0)."""
        d = self.xx[rows][:, None] + self.xx[None] - 2.0 * self.G[rows]  # [m, n]
        return d.clamp_min_(0.0).double()


def kmeans_pp(ws: WorkingSet, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (2 + ln k candidates per step, as scikit-learn) -> [k] indices of points."""
    n = ws.n
    trials = 2 + int(math.log(k))
    first = int(torch.randint(n, (1,), generator=gen))
    picks = [first]
    closest = ws.sq_dist(torch.tensor([first]))[0]  # [n]
    for _ in range(1, k):
        if float(closest.sum()) > 0.0:
            cand = torch.multinomial(closest, trials, replacement=True, generator=gen)  # [trials]
        else:  # every point sits on a centre: any point will do
            cand = torch.randint(n, (trials,), generator=gen)
        new = torch.minimum(closest[None], ws.sq_dist(cand))  # [trials, n]
        best = int(new.sum(1).argmin())
        picks.append(int(cand[best]))
        closest = new[best]
    return torch.tensor(picks, dtype=torch.int64)  # [k]


class _Start:
    """One Lloyd run. Centroid j is point[j] when point[j] >= 0, else the mean of cluster j of ``means_of``."""

    def __init__(self, ws: WorkingSet, picks: torch.Tensor):
        self.ws = ws
        self.point = picks.clone()  # [k]
        self.means_of = None  # [n] labels whose cluster means are the non-point centroids
        self.S = ws.G[picks].clone()  # [k, n] <c_j, x_i>
        self.cc = ws.xx[picks].clone()  # [k] ||c_j||^2

    def assign(self) -> tuple[torch.Tensor, float]:
        """-> labels [n] of the nearest centroids, inertia (float64 sum)."""
        best, labels = (self.cc[:, None] - 2.0 * self.S).min(0)  # [n], [n]
        return labels, float(self.ws.xx.sum(dtype=torch.float64) + best.sum(dtype=torch.float64))

    def update(self, labels: torch.Tensor) -> tuple[float, bool]:
        """Centroids -> means of their clusters; empty clusters move onto the points farthest from
        their centroid -> (squared shift of the centroids summed, whether any cluster was empty)."""
        ws, n = self.ws, self.ws.n
        k = self.S.shape[0]
        counts = torch.bincount(labels, minlength=k)  # [k]
        inv = 1.0 / counts.clamp_min(1).to(torch.float32)  # [k]
        S = torch.zeros_like(self.S).index_add_(0, labels, ws.G) * inv[:, None]  # [k, n] means' products
        idx = torch.arange(n)
        cc = torch.zeros(k).index_add_(0, labels, S[labels, idx]) * inv  # [k] ||mean_j||^2
        cross = torch.zeros(k).index_add_(0, labels, self.S[labels, idx]) * inv  # [k] <mean_j, c_j>
        shift = (cc + self.cc - 2.0 * cross).clamp_min(0.0)  # [k]
        empty = counts == 0  # [k]
        S[empty], cc[empty], shift[empty] = self.S[empty], self.cc[empty], 0.0
        self.S, self.cc, self.means_of = S, cc, labels
        self.point = torch.where(empty, self.point, -1)
        if bool(empty.any()):
            far = (ws.xx[None] + self.cc[:, None] - 2.0 * self.S).min(0).values  # [n] distance to the nearest centroid
            order = far.argsort(descending=True, stable=True)  # [n]
            for i, j in enumerate(empty.nonzero().flatten().tolist()):
                p = int(order[i % n])
                shift[j] = (self.cc[j] + ws.xx[p] - 2.0 * self.S[j, p]).clamp_min(0.0)
                self.S[j], self.cc[j], self.point[j] = ws.G[p], ws.xx[p], p
        return float(shift.double().sum()), bool(empty.any())

    def centroids(self) -> torch.Tensor:
        """The current centroids in feature space [k, C]."""
        X = self.ws.X
        k = self.S.shape[0]
        out = torch.zeros(k, X.shape[1])  # [k, C]
        if self.means_of is not None:
            counts = torch.bincount(self.means_of, minlength=k).clamp_min(1)  # [k]
            out.index_add_(0, self.means_of, X).div_(counts[:, None].to(X.dtype))
        points = self.point >= 0  # [k]
        out[points] = X[self.point[points]]
        return out


def lloyd(ws: WorkingSet, picks: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, float, int]:
    """Lloyd from centroids at the points picks [k] -> (centroids [k, C], inertia, iterations).

    Stops when no label changes, when the centroids moved less than tol (squared, summed;
    scikit-learn's rule), or when an iteration lowered the inertia by less than RTOL of itself.
    The inertia returned is that of the centroids returned.
    """
    run = _Start(ws, picks)
    labels, inertia = run.assign()
    it = 0
    for it in range(1, max_iter + 1):
        shift, refilled = run.update(labels)
        new_labels, new_inertia = run.assign()
        stop = torch.equal(new_labels, labels)
        gain = inertia - new_inertia
        labels, inertia = new_labels, new_inertia
        if stop or shift <= tol or (not refilled and gain <= RTOL * abs(new_inertia)):
            break
    return run.centroids(), inertia, it


def best_start(ws: WorkingSet, k: int, starts: int, gen: torch.Generator, max_iter: int, tol: float):
    """k-means++ ``starts`` times, Lloyd from each -> (centroids [k, C], iterations) of the lowest inertia
    (the first such start). tol is relative to the working set's mean channel variance."""
    runs = [lloyd(ws, kmeans_pp(ws, k, gen), max_iter, tol * ws.var) for _ in range(starts)]
    centroids, _, iters = min(runs, key=lambda run: run[1])
    return centroids, iters
