"""The core runs on the device of its input (a GPU when the recording is there): every tensor it
makes is made on that device, or deliberately on the CPU and moved.

Checked without a GPU: with torch's default device set to meta, a tensor made without naming its
device lands on meta, which holds no values, and the first operation that mixes it with the
input's CPU tensors (or reads it) fails. Every result must equal the one of a normal run.
"""

from contextlib import contextmanager

import pytest
import torch

from headseg.nodes.core import kmeans as km
from headseg.nodes.core import metrics, pca, preview
from headseg.nodes.core.masks import masks_at_pixel, merge_masks, sweep_to_masks
from headseg.nodes.core.pipeline import segment
from headseg.nodes.core.upsample import upsampling_error, upsampling_error_at
from headseg.nodes.core.working_set import WorkingSet, lloyd

from .planted import nested_scene, planted_recording, small_layout, split_scene


@contextmanager
def factories_default_to_meta():
    """Tensors made without a device land on meta inside the block."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def twice(fn):
    """fn() normally and with factories defaulting to meta -> both results."""
    expected = fn()
    with factories_default_to_meta():
        got = fn()
    return expected, got


def assert_same_segmentation(a, b):
    for k in a.sweep.results:
        ra, rb = a.sweep.results[k], b.sweep.results[k]
        assert torch.equal(ra.labels, rb.labels), k
        assert torch.equal(ra.centroids, rb.centroids), k
        assert torch.equal(ra.inertia, rb.inertia), k
    for ma, mb in zip(a.masks, b.masks):
        assert torch.equal(ma.masks, mb.masks) and torch.equal(ma.k, mb.k) and torch.equal(ma.cluster, mb.cluster)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(mode="nearest", reweight=True, cluster_counts=(1, 3, 40), min_area=0.01, iou_threshold=0.5),
        dict(positions=("down", "middle", "up"), levels=(0, 1), components=3, seed=7),
    ],
    ids=["defaults", "nearest-reweight-k1-k40", "levels-components"],
)
def test_segment_makes_no_tensor_off_the_inputs_device(options):
    rec = planted_recording([nested_scene(64, 96), split_scene(64, 96, seed=1)], small_layout(), d=16, noise=0.5)
    expected, got = twice(lambda: segment(rec, **options))
    assert_same_segmentation(expected, got)
    assert got.sweep.results[min(got.sweep.results)].labels.device.type == "cpu"


def test_mask_selection_metrics_and_previews_make_no_tensor_off_the_inputs_device():
    scene = nested_scene(64, 64)
    rec = planted_recording([scene], small_layout(), d=16, noise=0.5)
    result = segment(rec, cluster_counts=(2, 5))
    ms = sweep_to_masks(result.sweep, 0)
    labels = result.sweep.results[5].labels[0]
    gt = labels.clone()
    gt[:4] = 255  # ignored pixels
    image = torch.rand(1, 64, 64, 3)
    rows, cols = torch.tensor([0, 5, 63]), torch.tensor([1, 2])

    def run():
        merged = merge_masks(ms, iou_threshold=0.8, min_area=0.02)
        picked = masks_at_pixel(merged, x=10, y=20)
        return [
            merged.masks, merged.k, picked.masks, picked.cluster,
            upsampling_error(result.stack), upsampling_error_at(result.stack, rows, cols),
            preview.label_colours(labels[None], 5), preview.overlay_masks(image, picked.masks),
            preview.overlay_masks(None, merged.masks), preview.pca_rgb_grid(result.features, cell=16),
            preview.error_map_image(upsampling_error(result.stack)),
        ], [
            metrics.best_match_iou(ms.masks, merged.masks), metrics.top_n(ms.masks, merged.masks, 2),
            metrics.average_class_iou(gt, ms.masks),
        ]

    (expected, scores), (got, got_scores) = twice(run)
    assert scores == got_scores
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_refilling_empty_clusters_makes_no_tensor_off_the_inputs_device():
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(90, 6, generator=gen)
    X[-1] = 50.0  # one far outlier
    ws = WorkingSet.from_features(X)
    picks = torch.tensor([[0, 0, 1], [1, 2, 3]])  # start 0: clusters 0 and 1 on one point, 1 gets nothing
    centroids = torch.randn(4, 6, generator=gen)
    counts = torch.tensor([5, 0, 3, 0])

    def run():
        runs = lloyd(ws, picks, max_iter=50, tol=0.0)
        filled = centroids.clone()
        km._fill_empty(filled, counts, ws.X, ws.xx)
        return [r.centroids(ws) for r in runs] + [filled]

    expected, got = twice(run)
    assert not torch.equal(expected[-1], centroids)  # the empty clusters moved
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.parametrize("eigh_on", ["device", "cpu"])
def test_the_gpu_pca_path_makes_no_tensor_off_the_inputs_device(eigh_on, monkeypatch):
    rec = planted_recording([nested_scene(64, 96)], small_layout(), d=16, noise=0.5)
    monkeypatch.setattr(pca, "_on_cpu", lambda rec: False)  # the path a GPU recording takes
    monkeypatch.setattr(pca, "_GPU_EIGH", eigh_on)
    expected, got = twice(lambda: pca.recording_pca(rec, 4))
    for key in rec.layers:
        assert torch.equal(expected.layers[key], got.layers[key])
