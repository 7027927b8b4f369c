"""One image's feature stack at a lattice of output pixels, for exact Lloyd iterations at output resolution.

A Lattice holds the native grids f_g [C_g, h_g, w_g] of one image and the interpolation rows of the
output pixels it stands for (rows ys x cols xs of the H x W output); it never builds the upsampled
features. kmeans.py explains the two exact Lloyd steps it runs: score maps on the native grids,
upsampled (assignment), and the adjoint of the upsampling applied to the cluster indicators (update).
"""

from __future__ import annotations

import torch

from .working_set import RTOL as _RTOL
from .working_set import first_at_minimum, no_check, on_centroid

# Row chunks of the full-resolution assignment hold at most this many scores (k * rows * W).
_CHUNK_SCORES = 1 << 20
# Output columns per block of the x-upsampling of the scores.
_BLOCK_COLS = 64
# Pixels moved between clusters at once in the adjoint weights.
_CHUNK_PIXELS = 1 << 14


def sample_positions(n_out: int, n_keep: int, device: torch.device | str) -> torch.Tensor:
    """[n_keep] int64 output positions at the centres of n_keep equal bins of 0..n_out-1."""
    centres = (torch.arange(n_keep, dtype=torch.float64, device=device) + 0.5) * (n_out / n_keep)  # [n_keep]
    return centres.floor().long().clamp_(0, n_out - 1)


class Axis:
    """Interpolation along one axis at chosen output samples: dense [n, m] and sparse idx/wts [n, t]."""

    def __init__(self, dense: torch.Tensor):
        self.dense = dense.contiguous()  # [n, m]
        t = max(1, int((dense != 0).sum(1).max()))
        _, self.idx = dense.abs().topk(t, dim=1)  # [n, t] source index of each non-zero weight
        self.wts = dense.gather(1, self.idx)  # [n, t]


class Lattice:
    """The stack of one image at the output pixels rows ys x cols xs (virtual [C, ny, nx]).

    feats: per grid [C_g, h_g, w_g] float32; ry / rx: per grid interpolation rows [ny, h_g] / [nx, w_g].
    Scores: score_j(p) = ||c_j||^2 - 2 <F(p), c_j> (the squared distance less ||F(p)||^2).
    """

    def __init__(self, feats: list[torch.Tensor], ry: list[torch.Tensor], rx: list[torch.Tensor]):
        self.shapes = [tuple(f.shape) for f in feats]  # (C_g, h_g, w_g)
        self.device = device = feats[0].device
        self.flat = [f.reshape(f.shape[0], -1) for f in feats]  # [C_g, h_g*w_g]
        self.splits = [s[0] for s in self.shapes]
        self.ny, self.nx = int(ry[0].shape[0]), int(rx[0].shape[0])
        self.ry = [Axis(r) for r in ry]  # [ny, h_g]
        self.up_y = [(-2.0 * r).t().contiguous() for r in ry]  # [h_g, ny]: -2 in the y-upsampling (exact)
        self.rx = [Axis(r) for r in rx]  # [nx, w_g]
        # All grids' column interpolations stacked, plus a row of ones that adds ||c_j||^2: [m, nx].
        ones = torch.ones(1, self.nx, dtype=torch.float32, device=device)
        rx_cat = torch.cat([r.t() for r in rx] + [ones], 0)  # [m, nx], m = sum w_g + 1
        # Column blocks of TC output columns: only the few rows of rx_cat that are non-zero in a
        # block take part in it: block b multiplies the rows cols[b] [m_b] by RT[b]^T [m_b, TC].
        m = rx_cat.shape[0]
        TC = min(_BLOCK_COLS, self.nx)
        nb = -(-self.nx // TC)
        blocks = torch.nn.functional.pad(rx_cat, (0, nb * TC - self.nx)).view(m, nb, TC)  # [m, nb, TC]
        used = blocks.ne(0).any(2)  # [m, nb]
        m_b = int(used.sum(0).max())
        self.cols = torch.zeros(nb, m_b, dtype=torch.int64, device=device)  # [nb, m_b] rows of rx_cat per block
        self.RT = torch.zeros(nb, TC, m_b, dtype=torch.float32, device=device)  # [nb, TC, m_b]
        for b in range(nb):
            rows = used[:, b].nonzero().flatten()  # [m_b'] rows of rx_cat non-zero in block b
            self.cols[b, : rows.numel()] = rows
            self.RT[b, :, : rows.numel()] = blocks[rows, b].t()  # [m_b', TC] -> [TC, m_b']
        self.nb, self.TC = nb, TC
        self._adjoint_layout()

    def _adjoint_layout(self):
        """Where each grid's cells lie in the adjoint weights A [k, S] (S = the cells of every distinct
        grid size), and the corners of every size at once for ``corners``: cell [n, G, t] and weight
        [n, G, t] per row (y) and column (x) sample; a size with fewer corners is padded with weight 0."""
        first = {}  # (h, w) -> index of the first grid of that size
        for g, (C_g, h, w) in enumerate(self.shapes):
            first.setdefault((h, w), g)
        self.cell_offset, S = {}, 0  # (h, w) -> first column of its cells in A
        for h, w in first:
            self.cell_offset[h, w] = S
            S += h * w
        self.num_cells = S

        def table(axes, scale):
            t = max(a.idx.shape[1] for a in axes)
            n = axes[0].idx.shape[0]
            cell = torch.zeros(n, len(axes), t, dtype=torch.int64, device=self.device)  # [n, G, t]
            wts = torch.zeros(n, len(axes), t, dtype=torch.float32, device=self.device)  # [n, G, t]
            for u, (a, (mul, add)) in enumerate(zip(axes, scale)):
                cell[:, u, : a.idx.shape[1]] = a.idx * mul + add
                cell[:, u, a.idx.shape[1] :] = add  # padding: weight 0 on a cell of this size
                wts[:, u, : a.idx.shape[1]] = a.wts
            return cell, wts

        sizes = list(first)
        self.size_index = [sizes.index((h, w)) for C_g, h, w in self.shapes]  # per grid: its size in the tables
        # per size for ``adjoint``: (h, w, offset, Ry^T [h, ny], column corners [t, 1, nx], their weights [t, 1, nx])
        self.adjoint_parts = [
            (h, w, self.cell_offset[h, w], self.ry[g].dense.t(),
             self.rx[g].idx.t().contiguous()[:, None, :], self.rx[g].wts.t().contiguous()[:, None, :])
            for (h, w), g in first.items()
        ]
        self.row_corners = table([self.ry[first[hw]] for hw in sizes], [(w, self.cell_offset[h, w]) for h, w in sizes])
        self.col_corners = table([self.rx[first[hw]] for hw in sizes], [(1, 0)] * len(sizes))

    @property
    def num_pixels(self) -> int:
        return self.ny * self.nx

    # ------------------------------------------------------------------ scores
    def assign(self, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """centroids [k, C] -> labels [N] int64 of the nearest centroid, best score [N] float32 (score
        upsampling, exact); several sets of centroids [G, k, C] at once -> labels [G, N], best [G, N].

        The native-grid scores <f_g, c_j,g> are upsampled along y on the native grids ([K, ny] per
        column of every grid: K * ny * sum(w_g) floats) and along x by column blocks, row chunk by row
        chunk, so the rest stays near _CHUNK_SCORES floats whatever k and the image size. Scores are
        laid out with k ahead of the rows of a chunk ([.., k, rows]): the minimum over k then runs
        over whole rows at once (torch's min with indices over a short last dimension is several
        times slower).
        """
        G, k = (1, centroids.shape[0]) if centroids.dim() == 2 else centroids.shape[:2]
        K = G * k  # score maps in all
        flat_c = centroids.reshape(K, -1)  # [K, C]
        nb, TC, W, ny = self.nb, self.TC, self.nb * self.TC, self.ny
        nc = -(-(K * W * ny) // _CHUNK_SCORES)  # row chunks of at most about _CHUNK_SCORES scores
        step = -(-ny // nc)  # rows per chunk
        nc = -(-ny // step)  # the last chunk is padded with fewer than nc rows, cut off below
        ups = []
        for f, c, (C_g, h, w), up_y in zip(self.flat, flat_c.split(self.splits, 1), self.shapes, self.up_y):
            s_t = (c @ f).view(K, h, w).permute(2, 0, 1).reshape(w * K, h)  # [w*K, h] native-grid scores
            ups.append(torch.mm(s_t, up_y))  # [w*K, ny]: -2 <F_g, c_j,g> upsampled along y, one plain 2-D product
        cnorm = (flat_c * flat_c).sum(1)  # [K]: the row of ones adds ||c_j||^2
        m_b = self.cols.shape[1]
        cols = self.cols.view(-1)  # [nb*m_b] rows of the chunk's [m, K, step] scores that each block reads
        labels, best = [], []
        for c in range(nc):
            # the chunk's rows of every grid's y-upsampled scores, padded to step rows at the end: [m, K, step]
            # (gathered chunk by chunk: the [m, K, ny] scores and their [nb, m_b, K, ny] block operands of
            # every row at once took several times _CHUNK_SCORES floats, growing with k and the image)
            r0, r1 = c * step, min((c + 1) * step, ny)
            parts = [up[:, r0:r1].reshape(-1, K, r1 - r0) for up in ups]  # [w, K, rows] each
            parts.append(cnorm[None, :, None].expand(1, K, r1 - r0))  # [1, K, rows]
            rows_score = torch.cat(parts, 0)  # [m, K, rows]
            if r1 - r0 < step:
                rows_score = torch.nn.functional.pad(rows_score, (0, step - (r1 - r0)))  # [m, K, step]
            # the block operands contiguous (bmm is several times slower on strided ones)
            t_c = rows_score.index_select(0, cols).view(nb, m_b, K * step)  # [nb, m_b, K*step]
            d = torch.bmm(self.RT, t_c).view(nb, TC, G, k, step)  # [nb, TC, G, k, step] scores
            low = d.amin(3, keepdim=True)  # [nb, TC, G, 1, step]
            first = first_at_minimum(d, low, 3)  # [nb, TC, G, step]
            best.append(low.view(nb, TC, G, step).permute(2, 3, 0, 1).reshape(G, step, W))  # [G, step, W]
            labels.append(first.permute(2, 3, 0, 1).reshape(G, step, W))  # [G, step, W]
        pad = nc * step - ny
        labels = labels[0] if nc == 1 else torch.cat(labels, 1)  # [G, nc*step, W]
        best = best[0] if nc == 1 else torch.cat(best, 1)  # [G, nc*step, W]
        if pad or W != self.nx:
            labels, best = labels[:, :ny, : self.nx], best[:, :ny, : self.nx]  # [G, ny, nx]
        if centroids.dim() == 2:
            return labels.reshape(-1), best.reshape(-1)  # [N], [N]
        return labels.reshape(G, -1), best.reshape(G, -1)  # [G, N], [G, N]

    def corners(self, pix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels pix [P] (flat lattice index) -> the grid cells that make them up, as columns of the
        adjoint weights A [P, G, ty*tx], and their weights [P, G, ty*tx], every distinct grid size at
        once (a size with fewer corners is padded with weight 0)."""
        P, G = pix.shape[0], len(self.cell_offset)
        pr, pc = pix // self.nx, pix % self.nx  # [P]
        (ry_cell, ry_wts), (rx_cell, rx_wts) = self.row_corners, self.col_corners  # [n, G, t]
        cell = (ry_cell[pr][:, :, :, None] + rx_cell[pc][:, :, None, :]).view(P, G, -1)  # [P, G, ty*tx]
        wt = (ry_wts[pr][:, :, :, None] * rx_wts[pc][:, :, None, :]).view(P, G, -1)  # [P, G, ty*tx]
        return cell, wt

    # ------------------------------------------------------------------ adjoint
    def adjoint(self, labels: torch.Tensor, k: int) -> torch.Tensor:
        """labels [N] -> A [k, S] float64: A_j = Ry^T M_j Rx flattened, grid size by grid size (exact
        cluster weights; the cells of size (h, w) at columns cell_offset[h, w] onwards)."""
        ny, nx = self.ny, self.nx
        grid_labels = labels.view(ny, nx)
        A = torch.empty(k, self.num_cells, dtype=torch.float64, device=self.device)  # [k, S]
        # row chunks: the [t, rows, nx] indices and weights of a chunk stay near _CHUNK_SCORES entries (of the
        # whole image at once: 24 bytes per pixel with bilinear's two corners). Each bin is one row's, so it
        # sums the same weights in the same order as one bincount of every row would
        step = max(1, _CHUNK_SCORES // (2 * nx))
        for h, w, o, ry_t, col_idx, col_wts in self.adjoint_parts:
            t = col_idx.shape[0]
            z = None  # [ny*k*w] weights of (row, cluster, column)
            for r0 in range(0, ny, step):
                r1 = min(r0 + step, ny)
                rows = torch.arange(r1 - r0, device=self.device)[:, None] * k + grid_labels[r0:r1]  # [rows, nx] (row, cluster)
                # corner-major ([t, rows, nx], not [rows, nx, t]): the index sums run over whole rows
                idx = col_idx + rows * w  # [t, rows, nx] index into [rows, k, w]
                part = torch.bincount(
                    idx.reshape(-1), col_wts.expand(t, r1 - r0, nx).reshape(-1), minlength=(r1 - r0) * k * w
                )  # [rows*k*w]
                if r0 == 0 and r1 == ny:
                    z = part  # one chunk: every row
                else:
                    if z is None:
                        z = part.new_empty(ny * k * w)
                    z[r0 * k * w : r1 * k * w] = part
            adj = torch.mm(ry_t, z.view(ny, k * w))  # [h, k*w]: sum_p Ry[p, a] z[p, j, b]
            A[:, o : o + h * w].view(k, h, w).copy_(adj.view(h, k, w).permute(1, 0, 2))  # [k, h, w]
        return A

    def move(self, A: torch.Tensor, pix: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> None:
        """Moves pixels pix [P] from clusters old [P] to new [P] in the adjoint weights A [k, S] (in place),
        every grid size at once."""
        P, S = pix.shape[0], A.shape[1]
        cell, wt = self.corners(pix)  # [P, G, ty*tx] each
        cell, wt = cell.view(P, -1), wt.view(-1).double()  # [P, G*ty*tx] columns of A, [P*G*ty*tx]
        flat = A.view(-1)  # [k*S]
        flat.index_add_(0, (old[:, None] * S + cell).view(-1), wt, alpha=-1.0)  # [P*G*ty*tx] entries of A
        flat.index_add_(0, (new[:, None] * S + cell).view(-1), wt)

    def sums(self, A: torch.Tensor) -> torch.Tensor:
        """Adjoint weights A [k, S] -> [k, C] sum of F over each cluster."""
        parts = []
        for f, (C_g, h, w) in zip(self.flat, self.shapes):
            o = self.cell_offset[h, w]
            parts.append(A[:, o : o + h * w].float() @ f.t())  # [k, C_g]
        return torch.cat(parts, 1)

    # ------------------------------------------------------------------ Lloyd
    def lloyd(self, centroids, max_iter: int, tol: float, X, xx, total_sq: float, first=None, check=no_check):
        """Exact Lloyd on this lattice -> (labels [ny, nx], centroids [k, C], score [ny, nx], iterations).

        Each iteration moves the centroids to the means of their clusters (adjoint), then assigns
        every pixel to the nearest moved centroid (score upsampling). Stops when no label changes
        (the centroids are then the means of their clusters), when the centroids moved less than
        tol (squared, summed; scikit-learn's rule), or when the inertia fell by less than
        _RTOL of itself; the labels and scores returned always belong to the centroids returned.
        Empty clusters restart at the working-set points X farthest from their centroid.
        total_sq: sum of ||F(p)||^2 over the lattice (exact, or estimated for the _RTOL test only).
        first: (labels [N], best [N]) of ``assign`` for these centroids when already computed.
        check() runs before every iteration: it raises to stop.
        """
        k = centroids.shape[0]
        N = self.num_pixels
        if first is None:
            first = self.assign(centroids)
        labels, best = first  # [N], [N]
        inertia = total_sq + float(best.sum(dtype=torch.float64))
        A = self.adjoint(labels, k)
        counts = torch.bincount(labels, minlength=k)  # [k]
        it = 0
        for it in range(1, max_iter + 1):
            check()
            new = self.sums(A) / counts.clamp_min(1)[:, None].to(torch.float32)  # [k, C]
            refilled = bool((counts == 0).any())
            moves = new - centroids  # [k, C]
            if refilled:  # rare: empty clusters keep their centroid, then move to far points
                new[counts == 0] = centroids[counts == 0]
                near = fill_empty(new, counts, X, xx)  # [e] REFILL_NOTE (working_set.py)
                moves = new - centroids
                moves[(counts == 0).nonzero().flatten()[near]] = 0.0  # those moves do not count
            shift = float((moves.double() ** 2).sum())
            centroids = new
            new_labels, best = self.assign(new)
            new_inertia = total_sq + float(best.sum(dtype=torch.float64))
            moved = (new_labels != labels).nonzero().flatten()  # [P]
            if moved.numel() == 0:
                break
            if moved.numel() * 8 > N:
                A = self.adjoint(new_labels, k)
            else:
                for p in moved.split(_CHUNK_PIXELS):
                    self.move(A, p, labels[p], new_labels[p])
            labels = new_labels
            counts = torch.bincount(labels, minlength=k)
            gain = inertia - new_inertia
            inertia = new_inertia
            if shift <= tol or (not refilled and gain <= _RTOL * abs(new_inertia)):
                break
        return labels.view(self.ny, self.nx), centroids, best.view(self.ny, self.nx), it  # [ny, nx], [k, C], [ny, nx]

    def features_at(self, pix: torch.Tensor) -> torch.Tensor:
        """Pixels pix [P] (flat lattice index) -> [P, C] float32 explicit features."""
        corner_cells, corner_wts = self.corners(pix)  # [P, G, t] columns of A, weights
        cols = []
        for f, (C_g, h, w), u in zip(self.flat, self.shapes, self.size_index):
            cell = corner_cells[:, u] - self.cell_offset[h, w]  # [P, t] flat h*w index into this grid
            wt = corner_wts[:, u]  # [P, t]
            cells = f.t().contiguous()  # [h*w, C_g]: one row per grid cell, gathered whole
            out = torch.zeros(cell.shape[0], C_g, device=self.device)  # [P, C_g]
            for t in range(cell.shape[1]):  # corner by corner: no [P, t, C_g] temporary
                out.addcmul_(cells.index_select(0, cell[:, t]), wt[:, t : t + 1])
            cols.append(out)
        return torch.cat(cols, 1)  # [P, C]

    # ------------------------------------------------------------------ moments
    def moments(self) -> tuple[float, float]:
        """(sum over pixels of ||F(p)||^2, mean over channels of the variance of F) in float64, analytic."""
        if getattr(self, "_moments", None) is None:
            self._moments = self._compute_moments()
        return self._moments

    def _compute_moments(self) -> tuple[float, float]:
        total, mean_sq, channels = 0.0, 0.0, 0
        n = self.num_pixels
        for f, (C_g, h, w), ry, rx in zip(self.flat, self.shapes, self.ry, self.rx):
            ryd, rxd = ry.dense.double(), rx.dense.double()
            gy, gx = ryd.t() @ ryd, rxd.t() @ rxd  # [h, h], [w, w]
            step = max(1, _CHUNK_SCORES // (h * w))  # channels at once: float64 temporaries stay small
            for c0 in range(0, C_g, step):
                fd = f[c0 : c0 + step].double().view(-1, h, w)  # [c, h, w]
                total += float(((gy @ fd @ gx) * fd).sum())
                mean = torch.einsum("h,chw,w->c", ryd.sum(0), fd, rxd.sum(0)) / n  # [c] channel means of F
                mean_sq += float((mean * mean).sum())
            channels += C_g
        var_mean = max(0.0, (total / n - mean_sq) / max(channels, 1))
        return total, var_mean

    def materialise(self) -> torch.Tensor:
        """[ny*nx, C] float32 explicit features of the lattice pixels (small lattices only)."""
        cols = []
        for f, (C_g, h, w), ry, rx in zip(self.flat, self.shapes, self.ry, self.rx):
            x = torch.matmul(torch.matmul(ry.dense, f.view(C_g, h, w)), rx.dense.t())  # [C_g, ny, nx]
            cols.append(x.reshape(C_g, -1))  # [C_g, ny*nx]
        return torch.cat(cols, 0).t().contiguous()  # [ny*nx, C]


def sq_dist(X: torch.Tensor, xx: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X [n, C], xx [n], C [m, C] -> [m, n] squared distances (>= 0)."""
    cc = (C * C).sum(1)  # [m]
    return (xx[None] + cc[:, None] - 2.0 * (C @ X.t())).clamp_min_(0.0)  # [m, n]


def fill_empty(centroids: torch.Tensor, counts: torch.Tensor, X: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """centroids [k, C] (in place), counts [k], working set X [n, C], xx [n]: the centroids of empty
    clusters move onto the working-set points farthest from their centroid -> [e] bool: each point taken
    sat on its nearest centroid before the move (working_set.on_centroid; e = the empty clusters)."""
    empty = (counts == 0).nonzero().flatten()  # [e] empty clusters
    if empty.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=centroids.device)
    far = sq_dist(X, xx, centroids).min(0).values  # [n]
    order = far.argsort(descending=True, stable=True)  # [n] farthest first
    taken = order[torch.arange(empty.numel(), device=order.device) % order.numel()]  # [e]
    for i, j in enumerate(empty.tolist()):
        centroids[j] = X[taken[i]]
    return on_centroid(far[taken], xx[taken])  # [e]
