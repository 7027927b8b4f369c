"""tests/bench/bench_core.py's own arithmetic, which README's quality table comes from."""

import pathlib
import runpy

import numpy as np
import torch

BENCH = runpy.run_path(str(pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_core.py"))


def test_inertia_of_uint8_label_maps_as_multi_kmeans_returns_them():
    """The quality comparison scores HeadSeg's label maps on scikit-learn's features; Multi K-Means' label maps
    are uint8 since 0.5.0 (scikit-learn's int64): both give the float64 inertia of the clusters they name."""
    rng = np.random.default_rng(0)
    k, (H, W) = 5, (6, 7)
    X = rng.normal(size=(H * W, 3)).astype(np.float32)  # [N, C], as the reference's upsampled features
    labels = torch.from_numpy(rng.integers(0, k, size=(H, W))).to(torch.uint8)  # [H, W], every cluster used
    flat = labels.reshape(-1).numpy()
    X64 = X.astype(np.float64)
    want = sum(float(((X64[flat == j] - X64[flat == j].mean(0)) ** 2).sum()) for j in range(k))
    assert abs(BENCH["inertia_of_labels"](X, labels, k) - want) <= 1e-9 * want
    assert abs(BENCH["inertia_of_labels"](X, labels.long(), k) - want) <= 1e-9 * want
