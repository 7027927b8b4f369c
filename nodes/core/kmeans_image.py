"""One image of a FeatureStack prepared for kmeans.py: what every k of a sweep shares.

Per image: its grids [C_g, h_g, w_g] (less large channel offsets, scaled by an exact power of two so
that float32 distances neither underflow nor overflow), the interpolation matrices Ry_g [H, h_g] and
Rx_g [W, w_g], the pixel lattices from coarse to the full H x W image (``Lattice``; dense ones for the
batched GPU path) and the working sets of random pixels (``WorkingSet``), each built once. Which
lattices the polish and the scoring of finalists use, and how many pixels a working set has, are
decided here; the clustering itself is kmeans.py's.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from . import kmeans_batched as batched
from .lattice import Lattice, sample_positions
from .numerics import power_of_two_scale
from .upsample import MAX_OFFSET, FeatureStack, channel_means, interpolation_matrix, peak_abs
from .working_set import WorkingSet, no_check, sample_pixels

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
# Progress units of one (image, k): the working set and its finalists, the polish on the coarser
# lattice, the polish on the full image (the last two together when the image is small).
STAGES = 3


def working_set_points(k: int, num_pixels: int) -> int:
    """The pixels n of k's working set on an image of num_pixels pixels: max(_WS_MIN_POINTS,
    _WS_POINTS_PER_K * k), all of the image's if it has fewer."""
    return min(num_pixels, max(_WS_MIN_POINTS, _WS_POINTS_PER_K * k))


class PreparedImage:
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

    def dense_rung(self, i: int) -> batched.DenseLattice:
        """Lattice i (as ``rung``) with dense interpolation matrices, for every k at once (kmeans_batched.py)."""
        return batched.DenseLattice(self.feats, *self.rung_rows(i))

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
        """The WorkingSet of n = working_set_points(k, H * W) random pixels (all if fewer); map_fn runs
        the blocks of its Gram matrix (see WorkingSet.from_features)."""
        full = self.rung(self.last)
        N = full.num_pixels
        n = working_set_points(k, N)
        if (n, seed) not in self._ws:
            gen = torch.Generator().manual_seed(seed)
            pix = sample_pixels(N, n, gen) if n < N else torch.arange(N, device="cpu")  # [n]
            pix = pix.to(full.device)  # drawn on the CPU: the same pixels on every device
            self._ws[n, seed] = WorkingSet.from_features(full.features_at(pix), map_fn)  # X [n, C], G [n, n]
        return self._ws[n, seed]

    def prepare(self, ks: list[int], seed: int, pool: ThreadPoolExecutor | None) -> None:
        """Builds everything the k of ``ks`` share (working sets, lattices, moments) before they run,
        on one intra-op thread each; with a pool, the lattices, the moments and the blocks of the Gram
        matrices run on its workers while this thread gathers the working sets' features."""
        full = self.rung(self.last)
        lattices = sorted({*self.polish_rungs(), self.scoring_rung()} - {self.last})  # the full image is `full`
        jobs = [full.moments] + [lambda i=i: self.rung(i) for i in lattices]
        futures = [pool.submit(job) for job in jobs] if pool is not None else []
        for k in ks:
            self.working_set(k, seed, map if pool is None else pool.map)
        if pool is None:
            for job in jobs:
                job()
        for future in futures:
            future.result()


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
