"""The core runs on the device of its input (a GPU when the recording is there): every tensor it
makes is made on that device, or deliberately on the CPU and moved.

Checked without a GPU: with torch's default device set to meta, a tensor made without naming its
device lands on meta, which holds no values, and the first operation that mixes it with the
input's CPU tensors (or reads it) fails. Every result must equal the one of a normal run. This
proves that factory calls name their device; that tensors built on the CPU are moved is checked
where a GPU is present (the last test, skipped without one) and by bench_core.py --compare-cpu.
"""

from contextlib import contextmanager

import pytest
import torch

from headseg.nodes.core import lattice
from headseg.nodes.core import metrics, pca, preview
from headseg.nodes.core.masks import masks_at_pixel, merge_masks, sweep_to_masks
from headseg.nodes.core.kmeans import multi_kmeans
from headseg.nodes.core.pca import HeadFeatures
from headseg.nodes.core.pipeline import segment
from headseg.nodes.core.recording import LayerKey, Recording
from headseg.nodes.core.error_map import upsampling_error, upsampling_error_at
from headseg.nodes.core.upsample import FeatureStack, make_feature_stack
from headseg.nodes.core.working_set import WorkingSet, lloyd

from .planted import nested_scene, planted_recording, small_layout, split_scene


@contextmanager
def factories_default_to_meta():
    """Tensors made without a device land on meta inside the block, in this thread only: the core's
    worker threads would make theirs on the CPU, so the block runs on one thread (conftest)."""
    assert torch.get_num_threads() == 1, "the default device is per thread: run the core on one thread"
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
        lattice.fill_empty(filled, counts, ws.X, ws.xx)
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


# ----------------------------------------------------------------------------- inputs on two devices
def test_a_recording_on_two_devices_is_refused_naming_both_layers():
    layers = {LayerKey("input", 1, 0): torch.randn(1, 2, 8, 8, 4), LayerKey("output", 9, 0): torch.randn(1, 2, 8, 8, 4)}
    layers[LayerKey("output", 9, 0)] = layers[LayerKey("output", 9, 0)].to("meta")  # the one other device here
    with pytest.raises(ValueError, match=r"^Recording: layer output\.9\.0 is on meta but layer input\.1\.0 is "
                                         r"on cpu: put all layers on one device"):
        segment(Recording(layers, (64, 64)))


def test_features_on_two_devices_are_refused_naming_both_layers():
    layers = {LayerKey("input", 1, 0): torch.randn(1, 2, 8, 8, 3), LayerKey("output", 9, 0): torch.randn(1, 2, 8, 8, 3)}
    layers[LayerKey("input", 1, 0)] = layers[LayerKey("input", 1, 0)].to("meta")
    with pytest.raises(ValueError, match=r"^features: layer output\.9\.0 is on cpu but layer input\.1\.0 is on meta"):
        make_feature_stack(HeadFeatures(layers, (64, 64), 3))


def test_a_stack_on_two_devices_is_refused_naming_both_grids():
    grids = [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4).to("meta")]
    stack = FeatureStack(grids, [1.0, 1.0], [[LayerKey("input", 1, 0)], [LayerKey("output", 4, 0)]], (64, 64), "bilinear")
    with pytest.raises(ValueError, match=r"^stack: grid 1 \(4x4: layers output\.4\.0\) is on meta but grid 0 "
                                         r"\(8x8: layers input\.1\.0\) is on cpu: put all grids on one device"):
        multi_kmeans(stack, [2, 3])


def _tensors(value):
    """Every tensor inside a core value (dataclasses, dicts, lists)."""
    import dataclasses

    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def test_to_moves_every_tensor_of_every_stage_value_and_keeps_the_rest():
    rec = planted_recording([nested_scene(32, 48)], small_layout(), d=8, noise=0.3)
    res = segment(rec, cluster_counts=(2, 3))
    for value in (rec, res.features, res.stack, res.sweep):
        moved = value.to("meta")
        assert type(moved) is type(value) and moved is not value
        before, after = _tensors(value), _tensors(moved)
        assert len(after) == len(before) > 0
        assert all(t.device.type == "meta" for t in after)
        assert all(t.device.type == "cpu" for t in before)  # the original is untouched
        assert [(t.shape, t.dtype) for t in after] == [(t.shape, t.dtype) for t in before]
    assert res.stack.to("meta").size == res.stack.size and res.stack.to("meta").keys == res.stack.keys
    assert list(res.sweep.to("meta").results) == [2, 3] and res.sweep.to("meta").size == res.sweep.size
    assert list(rec.to("meta").layers) == list(rec.layers) and rec.to("meta").image_size == rec.image_size
    assert res.features.to("meta").components == res.features.components
    # already there: the same tensors, no copies
    assert all(a is b for a, b in zip(_tensors(res.sweep.to("cpu")), _tensors(res.sweep)))


# ----------------------------------------------------------------------------- on a GPU, where there is one
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("eigh_on", ["cpu", "device"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_segment_on_a_gpu_gives_the_cpus_labels(dtype, eigh_on, monkeypatch):
    monkeypatch.setattr(pca, "_GPU_EIGH", eigh_on)
    scenes = [nested_scene(64, 96), split_scene(64, 96, seed=1)]
    rec = planted_recording(scenes, small_layout(), d=16, noise=0.5)
    rec = Recording({key: x.to(dtype) for key, x in rec.layers.items()}, rec.image_size)
    on_gpu = Recording({key: x.cuda() for key, x in rec.layers.items()}, rec.image_size)
    for options in (dict(), dict(mode="nearest", reweight=True, cluster_counts=(1, 3, 40))):
        cpu, gpu = segment(rec, **options), segment(on_gpu, **options)
        for k, expected in cpu.sweep.results.items():
            got = gpu.sweep.results[k]
            assert got.labels.is_cuda
            assert float((got.labels.cpu() == expected.labels).double().mean()) >= 0.999, k  # near-ties may flip
            torch.testing.assert_close(got.inertia.cpu(), expected.inertia, rtol=1e-4, atol=0.0)
        assert [len(m) for m in gpu.masks] == [len(m) for m in cpu.masks]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cpu_stack_clustered_on_the_gpu_comes_back_with_the_cpus_labels():
    """The Multi K-Means node's path: a CPU stack moved to the GPU, the sweep moved back."""
    rec = planted_recording([nested_scene(64, 96), split_scene(64, 96, seed=1)], small_layout(), d=16, noise=0.5)
    stack = segment(rec, cluster_counts=(2,)).stack
    cpu = multi_kmeans(stack, (2, 4, 7))
    back = multi_kmeans(stack.to("cuda"), (2, 4, 7)).to("cpu")
    assert all(t.device.type == "cpu" for t in _tensors(back)) and back.size == cpu.size
    for k, expected in cpu.results.items():
        got = back.results[k]
        assert got.labels.dtype == expected.labels.dtype and got.labels.shape == expected.labels.shape
        assert float((got.labels == expected.labels).double().mean()) >= 0.999, k
        torch.testing.assert_close(got.inertia, expected.inertia, rtol=1e-4, atol=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_sweep_gives_the_same_labels_every_run():
    """The batched k-means sums with reductions, not atomic additions: the same input, the same labels."""
    rec = planted_recording([nested_scene(64, 96)], small_layout(), d=16, noise=1.0)
    stack = segment(rec, cluster_counts=(2,)).stack.to("cuda")
    first = multi_kmeans(stack, (2, 5, 9), seed=3)
    for _ in range(3):
        again = multi_kmeans(stack, (2, 5, 9), seed=3)
        for k, result in first.results.items():
            assert torch.equal(again.results[k].labels, result.labels)
            assert torch.equal(again.results[k].inertia, result.inertia)
