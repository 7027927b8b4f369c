"""Every k of one image at once, for GPUs: kmeans.py's k-means with all k and all starts batched.

The algorithm, the random draws and each run's stopping rules are those of kmeans.py (which runs
one k at a time, shaped for CPUs); only the execution differs, so both give the same clusters up
to rounding (a near-tie may go the other way):

- working set: greedy k-means++ and Lloyd in Gram space for every (k, start) at once, clusters
  padded to the largest k (a padded cluster has ||c||^2 = inf and is never nearest);
- finalists: every k's candidates scored at once on the scoring lattice;
- polish: exact Lloyd on each polish lattice for every k at once, the k's centroids packed one
  after the other into [K, C] (K = the sum of the k). Score upsampling and the adjoint are dense
  products with the interpolation matrices, row chunk by row chunk.

A run that stops keeps the state it stopped with; the others go on (a stopped run's work goes on
too, unused: the shapes stay fixed). The host reads two flags per iteration (whether any run goes
on, whether a cluster is empty) instead of several per run and iteration, and the launches do not
multiply with the number of k: about 50 kernels per iteration for every k that shares a working
set (each k above 32 has its own working set, so its own working-set stage; the polish takes
every k together; only the minimum over each run's clusters is one launch per k). Float sums are
reductions, not atomic additions (the counts are integer atomics, exact): a GPU gives the same
bits from run to run.
"""

from __future__ import annotations

import torch

from . import working_set as _working_set
from .lattice import sq_dist
from .working_set import WorkingSet, all_on_centroids, no_check, on_centroid, pp_candidates, pp_draws, pp_trials

# Score maps (or cluster indicators) held at once by a row chunk of a lattice: K * rows * nx floats.
_CHUNK_FLOATS = 1 << 24


def _segment_ids(sizes: list[int], device) -> torch.Tensor:
    """[sum sizes] int64: the segment of each packed row (0 for the first sizes[0] rows, ...)."""
    return torch.tensor([r for r, size in enumerate(sizes) for _ in range(size)], device="cpu").to(device)


# ----------------------------------------------------------------------------- working set
def working_set_runs(
    ws: WorkingSet, ks: list[int], counts: list[int], seed: int, max_iter: int, tol: float, check=no_check
):
    """k-means++ and Lloyd on the working set for counts[i] starts of each k of ks, all at once ->
    (members [R, n] int64, point [R, kmax] int64, inertia [R] float64, iters [R] int64), runs
    k by k and start by start (R = sum of counts); the same as ``working_set.starts`` per k with a
    generator seeded with ``seed``. Padded clusters (j >= k) have no members; their point is unused.
    tol: relative to the working set's mean channel variance. check() runs at every k-means++ step and
    Lloyd iteration: it raises to stop."""
    device = ws.G.device
    run_k, first, u = batch_draws(ks, counts, ws.n, seed)  # [R], [R], [kmax-1, R, T]
    run_k = run_k.to(device)
    picks = _kmeans_pp(ws, run_k, first.to(device), u.to(device), check)  # [R, kmax]
    return _gram_lloyd(ws, run_k, picks, max_iter, tol * ws.var, check)


def batch_draws(ks: list[int], counts: list[int], n: int, seed: int):
    """working_set.pp_draws of counts[i] starts of each k of ks (a generator seeded with seed per k),
    stacked run after run -> (k of each run [R], first picks [R], uniforms [kmax-1, R, T]), on the
    CPU. A run of a smaller k has zeros after its k-1 steps, and its candidates are padded to the
    largest number of trials T with copies of its first (argmin keeps the first of equal sums)."""
    kmax = max(ks)
    run_k = torch.tensor([k for k, c in zip(ks, counts) for _ in range(c)], device="cpu")  # [R]
    R = int(run_k.shape[0])
    T = max(pp_trials(k) for k in ks)
    first = torch.empty(R, dtype=torch.int64, device="cpu")
    u = torch.zeros(max(kmax - 1, 0), R, T, dtype=torch.float64, device="cpu")  # [kmax-1, R, T]
    r = 0
    for k, c in zip(ks, counts):
        f, draws = pp_draws(k, c, n, torch.Generator().manual_seed(seed))  # [c], [k-1, c, trials]
        first[r : r + c] = f
        t = draws.shape[2]
        u[: k - 1, r : r + c, :t] = draws
        u[: k - 1, r : r + c, t:] = draws[:, :, :1]
        r += c
    return run_k, first, u


def _kmeans_pp(ws: WorkingSet, run_k: torch.Tensor, first: torch.Tensor, u: torch.Tensor, check=no_check) -> torch.Tensor:
    """Greedy k-means++ for every run at once -> picks [R, kmax] (padded steps pick point 0)."""
    R, n = int(run_k.shape[0]), ws.n
    kmax, T = u.shape[0] + 1, u.shape[2]
    rows = torch.arange(R, device=run_k.device)
    picks = torch.zeros(R, kmax, dtype=torch.int64, device=run_k.device)  # [R, kmax]
    picks[:, 0] = first
    closest = ws.sq_dist(first)  # [R, n] float64, as working_set.kmeans_pp
    for step in range(1, kmax):
        check()
        cand = pp_candidates(closest, u[step - 1])  # [R, T]
        new = torch.minimum(closest[:, None], ws.sq_dist(cand.flatten()).view(R, T, n))  # [R, T, n]
        best = new.sum(2).argmin(1)  # [R]
        live = run_k > step  # [R] runs that still pick
        picks[:, step] = torch.where(live, cand[rows, best], 0)
        closest = torch.where(live[:, None], new[rows, best], closest)  # [R, n]
    return picks


def _gram_lloyd(ws: WorkingSet, run_k: torch.Tensor, picks: torch.Tensor, max_iter: int, tol: float, check=no_check):
    """working_set.lloyd for every run at once (see working_set._Starts for the Gram-space
    centroids) -> (members [R, n], point [R, kmax], inertia [R] float64, iters [R])."""
    G, xx = ws.G, ws.xx
    R, kmax = picks.shape
    n = ws.n
    device = G.device
    real = torch.arange(kmax, device=device)[None] < run_k[:, None]  # [R, kmax] clusters that exist
    inf = torch.tensor(float("inf"), device=device)
    point = picks.clone()  # [R, kmax]: centroid j is point[j] when >= 0, else a mean
    S = torch.where(real[:, :, None], G[picks], 0.0)  # [R, kmax, n] <c_j, x_p>
    cc = torch.where(real, xx[picks], inf)  # [R, kmax] ||c_j||^2 (inf: padded, never nearest)
    total_sq = xx.sum(dtype=torch.float64)

    def assign():
        d = cc[:, :, None] - 2.0 * S  # [R, kmax, n]
        best, labels = d.min(1)  # [R, n] each: the first nearest cluster
        return labels, total_sq + best.sum(1, dtype=torch.float64)  # [R, n], [R]

    labels, inertia = assign()
    members = torch.zeros(R, n, dtype=torch.int64, device=device)
    done_members, done_point = members.clone(), point.clone()
    done_inertia = inertia.clone()
    done_iters = torch.zeros(R, dtype=torch.int64, device=device)
    active = torch.ones(R, dtype=torch.bool, device=device)

    def some_empty(labels):  # [] bool: a real cluster without a point
        used = torch.zeros(R, kmax, dtype=torch.bool, device=device).scatter_(1, labels, True)  # [R, kmax]
        return (real & ~used).any()

    any_empty = bool(some_empty(labels))  # then read with the stop flags, one round trip per iteration
    for it in range(1, max_iter + 1):
        check()
        # update: every centroid moves to the mean of its cluster
        onehot = torch.zeros(R, kmax, n, device=device).scatter_(1, labels[:, None], 1.0)  # [R, kmax, n]
        counts = onehot.sum(2)  # [R, kmax]
        inv = counts.clamp_min(1.0).reciprocal()  # [R, kmax]
        S_new = torch.matmul(onehot, G) * inv[:, :, None]  # [R, kmax, n] <mean_j, x_p>
        cc_new = (onehot * S_new).sum(2) * inv  # [R, kmax] ||mean_j||^2 (sums, not atomics: the same bits each run)
        cross = (onehot * S).sum(2) * inv  # [R, kmax] <mean_j, c_j>
        shift = (cc_new + cc - 2.0 * cross).clamp_min(0.0)  # [R, kmax] squared move of each centroid
        cc_new = torch.where(real, cc_new, inf)
        shift = torch.where(real, shift, 0.0)
        point = point.new_full(point.shape, -1)  # every centroid is now a mean ...
        refilled = torch.zeros(R, dtype=torch.bool, device=device)
        if any_empty:  # ... except empty clusters: they keep theirs, then move onto far points
            empty = real & (counts == 0)  # [R, kmax]
            S_new = torch.where(empty[:, :, None], S, S_new)
            cc_new = torch.where(empty, cc, cc_new)
            # the r-th empty cluster takes the point r-th farthest from its nearest centroid
            far = (xx[None, None] + cc_new[:, :, None] - 2.0 * S_new).amin(1)  # [R, n]
            order = far.sort(dim=1, descending=True, stable=True).indices  # [R, n]
            rank = (empty.cumsum(1) - 1).clamp_min(0) % n  # [R, kmax]
            q = order.gather(1, rank)  # [R, kmax]
            refill_shift = (cc_new + xx[q] - 2.0 * S_new.gather(2, q[:, :, None])[:, :, 0]).clamp_min(0.0)
            refill_shift = torch.where(on_centroid(far.gather(1, q), xx[q]), 0.0, refill_shift)  # REFILL_NOTE (working_set.py)
            shift = torch.where(empty, refill_shift, shift)
            settled = empty.any(1) & all_on_centroids(far, xx)  # [R] every point on its centroid: REFILL_NOTE
            shift = torch.where(settled[:, None], 0.0, shift)
            S_new = torch.where(empty[:, :, None], G[q], S_new)
            cc_new = torch.where(empty, xx[q], cc_new)
            point = torch.where(empty, q, point)
            refilled = empty.any(1)  # [R]
        S, cc = S_new, cc_new
        shift = shift.double().sum(1)  # [R]
        members = labels
        # assign to the moved centroids, then each run's stopping rules
        new_labels, new_inertia = assign()
        same = (new_labels == labels).all(1)  # [R]
        gain = inertia - new_inertia
        stop = same | (shift <= tol) | (~refilled & (gain <= _working_set.RTOL * new_inertia.abs()))
        if it == max_iter:
            stop = torch.ones_like(stop)
        now = active & stop  # [R] runs that stop at this iteration
        done_members = torch.where(now[:, None], members, done_members)
        done_point = torch.where(now[:, None], point, done_point)
        done_inertia = torch.where(now, new_inertia, done_inertia)
        done_iters = torch.where(now, it, done_iters)
        active = active & ~stop
        labels, inertia = new_labels, new_inertia
        going, any_empty = torch.stack([active.any(), some_empty(labels)]).tolist()  # one host round trip
        if not going:
            break
    return done_members, done_point, done_inertia, done_iters


def run_centroids(ws: WorkingSet, members: torch.Tensor, point: torch.Tensor, k: int) -> torch.Tensor:
    """Runs' ends (members [F, n], point [F, kmax]) -> [F, k, C] centroids in feature space, as
    working_set.Run.centroids: the mean of each cluster, or the point it sits on."""
    F, n = members.shape
    X = ws.X
    onehot = torch.zeros(F, k, n, device=X.device).scatter_(1, members[:, None], 1.0)  # [F, k, n]
    counts = onehot.sum(2).clamp_min(1.0)  # [F, k]
    means = torch.matmul(onehot, X) / counts[:, :, None]  # [F, k, C]
    at = point[:, :k]  # [F, k]
    return torch.where((at >= 0)[:, :, None], X[at.clamp_min(0)], means)  # [F, k, C]


# ----------------------------------------------------------------------------- lattices
class DenseLattice:
    """One image's stack at output rows x cols (virtual [C, ny, nx]), with dense interpolation
    matrices, for several runs' centroids packed into [K, C] (run r owns rows offsets[r] ..
    offsets[r] + sizes[r]).

    feats: per grid [C_g, h_g, w_g] float32; ry / rx: per grid [ny, h_g] / [nx, w_g].
    """

    def __init__(self, feats: list[torch.Tensor], ry: list[torch.Tensor], rx: list[torch.Tensor]):
        self.device = device = feats[0].device
        self.shapes = [tuple(int(s) for s in f.shape) for f in feats]  # (C_g, h_g, w_g)
        self.flat = [f.reshape(f.shape[0], -1) for f in feats]  # [C_g, h_g*w_g]
        self.splits = [s[0] for s in self.shapes]
        self.ny, self.nx = int(ry[0].shape[0]), int(rx[0].shape[0])
        self.up_y = [(-2.0 * r).contiguous() for r in ry]  # [ny, h_g]: -2 in the y-upsampling (exact)
        self.ry_t = [r.t().contiguous() for r in ry]  # [h_g, ny]
        self.widths = [s[2] for s in self.shapes]
        ones = torch.ones(1, self.nx, device=device)
        self.rx_up = torch.cat([r.t() for r in rx] + [ones]).contiguous()  # [sum w + 1, nx]: the last adds ||c||^2
        self.rx_adj = torch.cat(rx, 1).contiguous()  # [nx, sum w]
        self._offsets: dict[tuple, torch.Tensor] = {}  # run sizes -> [R] first packed row of each run

    @property
    def num_pixels(self) -> int:
        return self.ny * self.nx

    def _rows(self, K: int):
        """Row chunks (r0, r1) whose [K, rows, nx] scores and [K, rows, sum w + 1] partial products
        hold at most about _CHUNK_FLOATS floats each."""
        width = max(self.nx, self.rx_up.shape[0])
        step = max(1, min(self.ny, _CHUNK_FLOATS // max(1, K * width)))
        return [(r0, min(r0 + step, self.ny)) for r0 in range(0, self.ny, step)]

    def assign(self, centroids: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed centroids [K, C] of runs of sizes[r] clusters -> labels [R, N] int64 (cluster within
        its run, the first of ties) and best scores [R, N] float32 (||c||^2 - 2 <F(p), c>)."""
        K = centroids.shape[0]
        R, N = len(sizes), self.num_pixels
        native = [
            (c @ f).view(K, h, w)  # [K, h_g, w_g] native-grid scores <f_g, c_g>
            for c, f, (_, h, w) in zip(centroids.split(self.splits, 1), self.flat, self.shapes)
        ]
        cnorm = (centroids * centroids).sum(1)  # [K]
        labels = torch.empty(R, self.ny, self.nx, dtype=torch.int64, device=self.device)
        best = torch.empty(R, self.ny, self.nx, device=self.device)
        for r0, r1 in self._rows(K):
            parts = [torch.matmul(up[r0:r1], s) for up, s in zip(self.up_y, native)]  # [K, rows, w_g] each
            parts.append(cnorm[:, None, None].expand(K, r1 - r0, 1))  # [K, rows, 1]
            scores = torch.matmul(torch.cat(parts, 2), self.rx_up)  # [K, rows, nx]
            for r, part in enumerate(scores.split(sizes)):  # run by run: [k_r, rows, nx]
                torch.min(part, 0, out=(best[r, r0:r1], labels[r, r0:r1]))
        return labels.view(R, N), best.view(R, N)  # [R, N] each

    def packed(self, labels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """labels [R, N] (cluster within its run) -> [R, N] packed cluster (row of [K, C])."""
        return labels + self.run_starts(sizes)[:, None]

    def run_starts(self, sizes: list[int]) -> torch.Tensor:
        """[R] first packed row of each run, made once per sizes (each copy to the device costs a transfer)."""
        key = tuple(sizes)
        if key not in self._offsets:
            self._offsets[key] = torch.tensor([0] + sizes[:-1], device="cpu").cumsum(0).to(self.device)
        return self._offsets[key]

    def counts(self, labels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """labels [R, N] (cluster within its run) -> [K] int64 pixels of each packed cluster (added
        up with index_add_: on a GPU bincount reads the labels' range back to the host first)."""
        packed = self.packed(labels, sizes).view(-1)  # [R*N]
        ones = torch.ones((), dtype=torch.int64, device=self.device).expand(packed.shape[0])  # [R*N], no copy
        return torch.zeros(sum(sizes), dtype=torch.int64, device=self.device).index_add_(0, packed, ones)

    def adjoint_sums(self, labels: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """labels [R, N] (cluster within its run) -> [K, C] sum of F over each packed cluster: the
        adjoint of the upsampling applied to the cluster indicators."""
        R, N = labels.shape
        K = sum(sizes)
        packed = self.packed(labels, sizes).view(R, self.ny, self.nx)  # [R, ny, nx] row of K
        adj = [torch.zeros(K, h, w, device=self.device) for _, h, w in self.shapes]  # [K, h_g, w_g]
        for r0, r1 in self._rows(K):
            rows = r1 - r0
            onehot = torch.zeros(K, rows, self.nx, device=self.device)
            onehot.scatter_(0, packed[:, r0:r1], 1.0)  # [K, rows, nx] cluster indicators
            z = (onehot.view(K * rows, self.nx) @ self.rx_adj).view(K, rows, -1)  # [K, rows, sum w]
            for a, part, ry_t in zip(adj, z.split(self.widths, 2), self.ry_t):
                a += torch.matmul(ry_t[:, r0:r1], part)  # [K, h_g, w_g]
        return torch.cat([a.view(K, -1) @ f.t() for a, f in zip(adj, self.flat)], 1)  # [K, C] (a transposed view: no copy)

    def lloyd(self, centroids, sizes, max_iter: int, tol: float, rtol: float, total_sq: float, refill: list, check=no_check):
        """lattice.Lattice.lloyd for every run at once -> (labels [R, N], centroids [K, C], best
        [R, N], iterations [R]); each run stops by its own rules and keeps the state it stopped
        with (stopping rules: no label moves, a centroid shift (squared, summed) <= tol, an inertia
        gain <= rtol of the inertia). refill[r] = (X [n, C], xx [n]): the working set whose far
        points refill run r's empty clusters."""
        R = len(sizes)
        device = self.device
        seg = _segment_ids(sizes, device)  # [K] run of each packed cluster
        starts = self.run_starts(sizes)  # [R]
        within = torch.arange(sum(sizes), device=device) - starts[seg]  # [K] cluster within its run
        groups = _refill_groups(refill, seg)
        labels, best = self.assign(centroids, sizes)
        counts = self.counts(labels, sizes)  # [K]
        inertia = total_sq + best.sum(1, dtype=torch.float64)  # [R]
        done = (labels.clone(), centroids.clone(), best.clone())
        done_iters = torch.zeros(R, dtype=torch.int64, device=device)
        active = torch.ones(R, dtype=torch.bool, device=device)
        any_empty = bool((counts == 0).any())  # then read with the stop flags, one round trip per iteration
        for it in range(1, max_iter + 1):
            check()
            new = self.adjoint_sums(labels, sizes) / counts.clamp_min(1)[:, None].to(torch.float32)  # [K, C]
            refilled = torch.zeros(R, dtype=torch.bool, device=device)
            if any_empty:
                empty = counts == 0  # [K]
                new = torch.where(empty[:, None], centroids, new)  # empty clusters keep their centroid ...
                new, near = _refill(new, empty, seg, starts, R, groups)  # ... then move onto far working-set points
                refilled = torch.zeros(R, dtype=torch.int64, device=device).index_add_(0, seg, empty.long()) > 0
            moved = torch.zeros(R, max(sizes), dtype=torch.float64, device=device)  # [R, kmax] (sums, not
            moved[seg, within] = ((new - centroids).double() ** 2).sum(1)  # atomics: the same bits each run)
            if any_empty:  # REFILL_NOTE (working_set.py): a refill onto a point on its centroid does not count
                moved[seg, within] = torch.where(empty & near, 0.0, moved[seg, within])
            shift = moved.sum(1)  # [R]
            new_labels, best = self.assign(new, sizes)
            new_inertia = total_sq + best.sum(1, dtype=torch.float64)
            same = (new_labels == labels).all(1)
            gain = inertia - new_inertia
            stop = same | (shift <= tol) | (~refilled & (gain <= rtol * new_inertia.abs()))
            if it == max_iter:
                stop = torch.ones_like(stop)
            now = active & stop  # [R]
            now_k = now[seg]  # [K]
            done = (
                torch.where(now[:, None], new_labels, done[0]),
                torch.where(now_k[:, None], new, done[1]),
                torch.where(now[:, None], best, done[2]),
            )
            done_iters = torch.where(now, it, done_iters)
            active = active & ~stop
            centroids, labels, inertia = new, new_labels, new_inertia
            counts = self.counts(labels, sizes)
            going, any_empty = torch.stack([active.any(), (counts == 0).any()]).tolist()  # one host round trip
            if not going:
                break
        return done[0], done[1], done[2], done_iters


def _refill_groups(refill: list, seg: torch.Tensor) -> list:
    """refill[r] = (X [n, C], xx [n]) per run -> [(X, xx, mine)]: each distinct working set with the
    packed clusters [K] bool of the runs it refills (None: every run)."""
    groups: dict[int, list[int]] = {}  # one working set -> the runs it refills
    for r, (X, _) in enumerate(refill):
        groups.setdefault(id(X), []).append(r)
    if len(groups) == 1:
        return [(*refill[0], None)]
    return [(*refill[runs[0]], torch.isin(seg, torch.tensor(runs, device="cpu").to(seg.device))) for runs in groups.values()]


def _refill(new: torch.Tensor, empty: torch.Tensor, seg: torch.Tensor, starts: torch.Tensor, R: int, groups: list):
    """lattice.fill_empty for every run at once: the r-th empty cluster of a run moves onto the
    working-set point r-th farthest from that run's nearest centroid. new [K, C], empty [K];
    groups from _refill_groups -> (centroids [K, C], [K] bool: the empty clusters that took a point
    sitting on its run's nearest centroid, working_set.on_centroid)."""
    K = new.shape[0]
    out = new
    near = torch.zeros(K, dtype=torch.bool, device=new.device)  # [K]
    for X, xx, mine in groups:
        n = X.shape[0]
        d = sq_dist(X, xx, new)  # [K, n]
        far = torch.full((R, n), float("inf"), device=new.device)
        far.scatter_reduce_(0, seg[:, None].expand(K, n), d, "amin")  # [R, n] to the run's nearest centroid
        order = far.sort(dim=1, descending=True, stable=True).indices  # [R, n]
        cum = empty.long().cumsum(0)  # [K]
        before = torch.cat([cum.new_zeros(1), cum])[starts]  # [R] empties of earlier runs
        rank = (cum - 1 - before[seg]).clamp_min(0) % n  # [K] rank among its run's empty clusters
        q = order[seg, rank]  # [K]
        take = empty if mine is None else empty & mine  # [K]
        out = torch.where(take[:, None], X[q], out)
        near = torch.where(take, on_centroid(far[seg, q], xx[q]), near)
    return out, near
