"""Synthetic planted recordings: a known hierarchy of regions -> per-head features on every grid level.

A Scene is a tree of regions of an image (node 0 = the whole image; the children of a node partition
it). Every node below the root gets a random code vector whose length shrinks with its level; a pixel's
code is the sum of the codes of its ancestors, so siblings differ less than their parents do. Each
head maps the code map, area-averaged onto its layer's grid, through its own random linear embedding
and adds noise: [B, heads, h, w, d] like a real recording, with answers known at every level.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from headseg.nodes.core.recording import LayerKey, Recording


@dataclass
class Scene:
    """A hierarchy of regions of an H x W image: masks [n, H, W] bool, parent[i] (-1 for node 0 = root)."""

    masks: torch.Tensor  # [n, H, W] bool; children of a node partition it
    parent: list[int]
    names: list[str]
    levels: list[int] | None = None  # partition level where each node appears (None: its depth)

    @property
    def size(self) -> tuple[int, int]:
        return (int(self.masks.shape[1]), int(self.masks.shape[2]))

    @property
    def depth(self) -> list[int]:
        out = []
        for i, p in enumerate(self.parent):
            out.append(0 if p < 0 else out[p] + 1)
        return out

    def children(self, i: int) -> list[int]:
        return [j for j, p in enumerate(self.parent) if p == i]

    @property
    def leaves(self) -> list[int]:
        return [i for i in range(len(self.parent)) if not self.children(i)]

    @property
    def level(self) -> list[int]:
        return list(self.levels) if self.levels is not None else self.depth

    @property
    def max_level(self) -> int:
        return max(self.level)

    def cut(self, level: int) -> list[int]:
        """Nodes of the partition at ``level`` (1 = the root's children, max_level = the leaves)."""
        lev = self.level
        out = []
        for i in range(1, len(self.parent)):
            kids = self.children(i)
            if lev[i] <= level and (not kids or lev[kids[0]] > level):
                out.append(i)
        return out

    def cut_masks(self, level: int) -> torch.Tensor:
        """[R, H, W] bool masks of the partition at ``level``."""
        return self.masks[self.cut(level)]

    @property
    def leaf_masks(self) -> torch.Tensor:
        """[L, H, W] bool masks of the leaves (the finest planted partition)."""
        return self.masks[self.leaves]

    def chain(self, x: int, y: int) -> list[int]:
        """Nodes containing pixel (x = column, y = row), from the leaf up to the root's child (root excluded)."""
        node = next(i for i in self.leaves if bool(self.masks[i, y, x]))
        out = []
        while self.parent[node] >= 0:
            out.append(node)
            node = self.parent[node]
        return out


def _snap(frac: float, n: int, cell: int = 8) -> int:
    """Fraction of n pixels -> pixel index on the latent-cell lattice (multiples of ``cell``)."""
    return int(round(frac * n / cell)) * cell


def _rect(H: int, W: int, y0, x0, y1, x1) -> torch.Tensor:
    m = torch.zeros(H, W, dtype=torch.bool)
    m[_snap(y0, H) : _snap(y1, H), _snap(x0, W) : _snap(x1, W)] = True
    return m


def nested_scene(H: int = 256, W: int = 256) -> Scene:
    """Background / foreground; the foreground holds a cat and a ball; the cat has a head and a body.

    Leaves: background, head, body, ball. Partitions: level 1 = {fg, bg}, level 2 = {cat, ball, bg},
    level 3 = {head, body, ball, bg}. Region edges lie on the 8-pixel latent lattice.
    """
    full = torch.ones(H, W, dtype=torch.bool)
    fg = _rect(H, W, 0.25, 0.125, 0.875, 0.875)
    cat = fg & _rect(H, W, 0.0, 0.0, 1.0, 0.5625)
    head = cat & _rect(H, W, 0.0, 0.0, 0.5, 1.0)
    masks = [full, ~fg, fg, cat, fg & ~cat, head, cat & ~head]
    return Scene(torch.stack(masks), [-1, 0, 0, 2, 2, 3, 3], ["image", "background", "foreground", "cat", "ball", "head", "body"])


def split_scene(H: int, W: int, cut_sizes=(2, 5, 6, 10, 20), seed: int = 0) -> Scene:
    """Random nested regions whose partition at level i has cut_sizes[i-1] regions.

    Each step gives the largest current regions (area per piece) more pieces; a region is cut into
    its pieces by repeated binary splits of its largest piece: along the longer side, or (one time
    in three) into an inner block and the frame around it. Edges lie on the 8-pixel latent lattice.
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    def halve(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = m.any(1).nonzero().flatten()
        cols = m.any(0).nonzero().flatten()
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        hh, ww = y1 - y0, x1 - x0
        part = torch.zeros(H, W, dtype=torch.bool)
        if float(torch.rand((), generator=gen)) < 1 / 3 and min(hh, ww) >= 48:
            my, mx = _snap(rand(0.2, 0.3), hh), _snap(rand(0.2, 0.3), ww)
            part[y0 + my : y1 - my, x0 + mx : x1 - mx] = True
        elif hh >= ww:
            part[: y0 + max(8, min(hh - 8, _snap(rand(0.35, 0.65), hh)))] = True
        else:
            part[:, : x0 + max(8, min(ww - 8, _snap(rand(0.35, 0.65), ww)))] = True
        a, b = m & part, m & ~part
        if not a.any() or not b.any():  # too thin to split on the lattice: split off its first row
            a = m & (torch.arange(H)[:, None] == y0)
            b = m & ~a
        return a, b

    masks = [torch.ones(H, W, dtype=torch.bool)]
    parent, levels = [-1], [0]
    frontier = [0]  # regions of the current partition
    for level, target in enumerate(cut_sizes, start=1):
        if target < len(frontier) or target > 4 * len(frontier):
            raise ValueError(f"cut_sizes must grow by at most 4x per level, got {list(cut_sizes)}")
        pieces = {i: 1 for i in frontier}
        area = {i: int(masks[i].sum()) for i in frontier}
        for _ in range(target - len(frontier)):
            i = max(frontier, key=lambda j: (area[j] / pieces[j], -j))
            pieces[i] += 1
        new_frontier = []
        for i in frontier:
            if pieces[i] == 1:
                new_frontier.append(i)
                continue
            parts = [masks[i]]
            while len(parts) < pieces[i]:
                parts.sort(key=lambda m: -int(m.sum()))
                parts = list(halve(parts[0])) + parts[1:]
            for m in parts:
                masks.append(m)
                parent.append(i)
                levels.append(level)
                new_frontier.append(len(masks) - 1)
        frontier = new_frontier
    names = ["image"] + [f"region{i}" for i in range(1, len(masks))]
    return Scene(torch.stack(masks), parent, names, levels)


def sd21_layout() -> list[tuple[LayerKey, int, int]]:
    """SD2.1 self-attention layers: (key, heads, grid level); 5/10/20 heads at levels 0/1/2, middle at 3."""
    out = []
    for number, heads, level in [(1, 5, 0), (2, 5, 0), (4, 10, 1), (5, 10, 1), (7, 20, 2), (8, 20, 2)]:
        out.append((LayerKey("input", number, 0), heads, level))
    out.append((LayerKey("middle", 0, 0), 20, 3))
    for number, heads, level in [(3, 20, 2), (4, 20, 2), (5, 20, 2), (6, 10, 1), (7, 10, 1), (8, 10, 1),
                                 (9, 5, 0), (10, 5, 0), (11, 5, 0)]:
        out.append((LayerKey("output", number, 0), heads, level))
    return out


def sdxl_layout() -> list[tuple[LayerKey, int, int]]:
    """SDXL base self-attention layers: (key, heads, grid level); no attention on the latent grid,
    10 heads at level 1 (2 transformers per block), 20 heads at level 2 (10 per block, middle too):
    70 layers, 1300 heads."""
    out = []
    for number, heads, level, depth in [(4, 10, 1, 2), (5, 10, 1, 2), (7, 20, 2, 10), (8, 20, 2, 10)]:
        out += [(LayerKey("input", number, i), heads, level) for i in range(depth)]
    out += [(LayerKey("middle", 0, i), 20, 2) for i in range(10)]
    for number, heads, level, depth in [(0, 20, 2, 10), (1, 20, 2, 10), (2, 20, 2, 10),
                                        (3, 10, 1, 2), (4, 10, 1, 2), (5, 10, 1, 2)]:
        out += [(LayerKey("output", number, i), heads, level) for i in range(depth)]
    return out


def small_layout(heads: int = 2) -> list[tuple[LayerKey, int, int]]:
    """One layer per (position, level) of an SD-like UNet, ``heads`` heads each (tests)."""
    blocks = [("input", 1, 0), ("input", 4, 1), ("input", 7, 2), ("middle", 0, 3),
              ("output", 3, 2), ("output", 6, 1), ("output", 9, 0)]
    return [(LayerKey(block, number, 0), heads, level) for block, number, level in blocks]


def grid_of(image_size: tuple[int, int], level: int) -> tuple[int, int]:
    """Token grid of a level: the latent (image // 8) halved ``level`` times with ceil."""
    h, w = max(1, image_size[0] // 8), max(1, image_size[1] // 8)
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def planted_recording(
    scenes,
    layout=None,
    d: int = 16,
    noise: float = 0.5,
    scales=(4.0, 3.0, 2.5, 2.0, 1.6),
    code_dim: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> Recording:
    """Scenes (one per image, same size) -> Recording with layers [B, heads, h, w, d] of planted features.

    scales[i]: length of the code vector of a node at level i + 1 (deeper levels reuse the last scale).
    Each head: features = area_average(code map) @ W_head + noise * N(0, 1), W_head [code_dim, d].
    """
    if isinstance(scenes, Scene):
        scenes = [scenes]
    size = scenes[0].size
    if any(s.size != size for s in scenes):
        raise ValueError("scenes must all have the same image size")
    layout = small_layout() if layout is None else layout
    H, W = size
    gen = torch.Generator().manual_seed(seed)
    codes = []  # per image: code map [code_dim, H, W]
    for b, scene in enumerate(scenes):
        lev = scene.level
        vec = torch.zeros(len(scene.parent), code_dim)  # sum of the codes of a node's ancestors
        for i in range(1, len(scene.parent)):
            v = torch.randn(code_dim, generator=gen)
            vec[i] = v / v.norm() * scales[min(lev[i], len(scales)) - 1] + vec[scene.parent[i]]
        leaves = scene.leaves
        labels = torch.zeros(H, W, dtype=torch.int64)
        for j, leaf in enumerate(leaves):
            labels[scene.masks[leaf]] = j
        codes.append(vec[leaves][labels].permute(2, 0, 1))  # [code_dim, H, W]
    code = torch.stack(codes)  # [B, code_dim, H, W]
    layers = {}
    for key, heads, level in layout:
        h, w = grid_of(size, level)
        grid = F.adaptive_avg_pool2d(code, (h, w))  # [B, code_dim, h, w] area average
        emb = torch.randn(heads, code_dim, d, generator=gen) / math.sqrt(code_dim)  # [heads, code_dim, d]
        x = torch.einsum("bchw,ncd->bnhwd", grid, emb)  # [B, heads, h, w, d]
        x = x + noise * torch.randn(x.shape, generator=gen) + torch.randn(heads, 1, 1, d, generator=gen)
        layers[key] = x.to(dtype)
    return Recording(layers, size, model="planted")
