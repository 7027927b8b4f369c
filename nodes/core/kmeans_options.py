"""k-means' options, checked: cluster counts (the string a node takes, or a list), each k against the
limits and a stack's grids, seed, max_iter and tol, progress and check callbacks.

kmeans.py checks its arguments here before it clusters; the Multi K-Means node checks its options here
before there is a stack (check_sweep_options). Every error names the argument and says what was expected.
"""

from __future__ import annotations

import re

from .upsample import FeatureStack
from .values import ascii_int, is_int, shown_text
from .working_set import check_tol

# The most clusters one k may ask for: every cluster becomes a mask at the output size (256 masks of
# 512x512 are 256 MB as a float MASK batch), and the working set grows with k (16 points per cluster).
MAX_CLUSTERS = 256
# The most clusters all k of one sweep may add up to: every cluster becomes a mask, and merging
# compares every pair of masks (1024 masks of 512x512 are 1 GB as a float MASK batch).
MAX_TOTAL_CLUSTERS = 1024


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


def _max_clusters(stack: FeatureStack) -> int:
    """Cells of the finest grid (capped by the output pixels): the most distinct clusters possible."""
    H, W = stack.size
    cells = max(int(g.shape[2]) * int(g.shape[3]) for g in stack.grids)
    return min(cells, H * W)


def _finest(stack: FeatureStack) -> str:
    """What bounds k: the cells of the finest grid, or the output pixels when there are fewer."""
    H, W = stack.size
    g = max(stack.grids, key=lambda t: int(t.shape[2]) * int(t.shape[3]))
    if H * W < int(g.shape[2]) * int(g.shape[3]):
        return f"the pixels of the {H}x{W} output"
    return f"the cells of the finest grid {int(g.shape[2])}x{int(g.shape[3])}"


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


def check_k(stack: FeatureStack, k) -> int:
    """kmeans' k for a checked stack -> k, at most MAX_CLUSTERS and the stack's distinct clusters (the
    cells of its finest grid, or its output pixels when there are fewer)."""
    return _check_k(k, _max_clusters(stack), _finest(stack))


def check_cluster_counts(stack: FeatureStack, cluster_counts) -> list[int]:
    """multi_kmeans' cluster_counts (list or "2,5,6,10,20") for a checked stack -> sorted unique ks,
    each as check_k allows, adding up to at most MAX_TOTAL_CLUSTERS."""
    ks = _cluster_count_list(cluster_counts)
    limit, finest = _max_clusters(stack), _finest(stack)
    return _check_total(sorted({_check_k(k, limit, finest, "cluster_counts") for k in ks}), cluster_counts)


def check_iter_tol(max_iter, tol) -> tuple[int, float]:
    """(max_iter, tol) -> (int >= 1, float >= 0), or a ValueError naming the one that is neither."""
    if not is_int(max_iter) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    return int(max_iter), check_tol(tol)


def check_seed(seed) -> int:
    """seed (any int) -> the seed of the generators, in 0 .. 2**63 - 1."""
    if not is_int(seed):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(seed) % (1 << 63)


def check_callbacks(progress, check) -> None:
    """multi_kmeans' progress(done, total) and check(): each callable or None, else a ValueError naming it."""
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be callable(done, total) or None, got {type(progress).__name__}")
    if check is not None and not callable(check):
        raise ValueError(f"check must be callable() or None, got {type(check).__name__}")


def check_sweep_options(cluster_counts, seed) -> tuple[list[int], int]:
    """multi_kmeans' options checked before there is a stack (k up to MAX_CLUSTERS; multi_kmeans
    also checks them against the stack's grids) -> (sorted unique ks, seed)."""
    ks = sorted({_check_k(k, MAX_CLUSTERS, "", "cluster_counts") for k in _cluster_count_list(cluster_counts)})
    return _check_total(ks, cluster_counts), check_seed(seed)
