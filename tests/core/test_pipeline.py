"""segment(): the whole core on planted recordings: the nesting chain at a pixel, batch, non-square,
dtypes, cluster counts as text, bad input."""

import pytest
import torch

from headseg.nodes.core.kmeans import multi_kmeans
from headseg.nodes.core.masks import MaskSet, masks_at_pixel, merge_sweep
from headseg.nodes.core.metrics import iou
from headseg.nodes.core.pipeline import SegmentationResult, segment
from headseg.nodes.core.recording import LayerKey, Recording

from .planted import Scene, nested_scene, planted_recording, small_layout


def recording(scenes, seed=0, dtype=torch.float16):
    return planted_recording(scenes, small_layout(), d=16, noise=0.5, seed=seed, dtype=dtype)


# k = size of each planted partition: 2 (fg / bg), 3 (cat / ball / bg), 4 (head / body / ball / bg)
COUNTS = (2, 3, 4)


@pytest.mark.parametrize("x, y", [(100, 100), (60, 200), (180, 150), (10, 10)])
def test_chain_at_pixel_is_the_planted_nesting_finest_first(x, y):
    scene = nested_scene(256, 256)
    result = segment(recording([scene], seed=1), components=4, cluster_counts=COUNTS)
    assert isinstance(result, SegmentationResult) and isinstance(result.masks[0], MaskSet)
    chain = scene.chain(x, y)  # planted regions under the pixel, leaf first
    got = masks_at_pixel(result.masks[0], x, y)
    assert len(got) == len(chain), ([scene.names[i] for i in chain], got.area.tolist())
    for mask, node in zip(got.masks, chain):
        assert iou(mask, scene.masks[node]) >= 0.9, scene.names[node]


@pytest.mark.parametrize("first, second", [((100, 100), (60, 200)), ((60, 200), (180, 150)), ((100, 100), (10, 10))])
def test_more_pixels_keep_the_planted_regions_holding_both_or_only_the_first(first, second):
    """include: the planted regions over both pixels (their common ancestors, finest first); exclude:
    those over the first pixel and not the second (a click on the other object stops the chain below it)."""
    scene = nested_scene(256, 256)
    masks = segment(recording([scene], seed=1), components=4, cluster_counts=COUNTS).masks[0]
    chain, other = scene.chain(*first), scene.chain(*second)
    for got, want in (
        (masks_at_pixel(masks, *first, include=[second]), [n for n in chain if n in other]),
        (masks_at_pixel(masks, *first, exclude=[second]), [n for n in chain if n not in other]),
    ):
        assert len(got) == len(want), ([scene.names[i] for i in want], got.area.tolist())
        for mask, node in zip(got.masks, want):
            assert iou(mask, scene.masks[node]) >= 0.9, scene.names[node]


def test_batch_and_merged_masks():
    scene = nested_scene(128, 128)
    flipped = Scene(scene.masks.flip(1), scene.parent, scene.names)
    result = segment(recording([scene, flipped]), components=4, cluster_counts="4,2,3")
    assert list(result.sweep.results) == [2, 3, 4]
    assert result.sweep.results[4].labels.shape == (2, 128, 128)
    assert len(result.masks) == 2
    for ms in result.masks:
        # merged: fewer masks than clusters (a leaf that is also a parent is one mask), none repeated
        assert 0 < len(ms) < sum(COUNTS)
        assert ms.masks.shape[1:] == (128, 128) and ms.masks.dtype == torch.bool
        assert bool((ms.area > 0).all())


def test_non_square_8x12_latent():
    scene = nested_scene(64, 96)
    result = segment(recording([scene]), components=4, cluster_counts=(2,))
    assert result.stack.size == (64, 96)
    labels = result.sweep.results[2].labels[0]
    fg = scene.masks[scene.names.index("foreground")]
    assert max(iou(labels == 0, fg), iou(labels == 1, fg)) >= 0.9


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_recording_dtypes(dtype):
    result = segment(recording([nested_scene(64, 64)], dtype=dtype), components=4, cluster_counts=(2, 3))
    assert result.features.layers[next(iter(result.features.layers))].dtype == torch.float32
    assert result.sweep.results[3].labels.dtype == torch.uint8
    assert torch.isfinite(result.sweep.results[3].centroids).all()
    assert all(len(ms) > 0 for ms in result.masks)


def test_selection_and_options_reach_the_stages():
    rec = recording([nested_scene(64, 64)])
    result = segment(rec, positions=("up",), levels=[0, 1], components=3, mode="nearest", reweight=True,
                     cluster_counts=(2,), min_area=0.05)
    assert all(k.position == "up" for k in result.features.layers)
    assert result.features.components == 3 and result.stack.mode == "nearest"
    assert result.stack.num_channels == 2 * 2 * 3  # two up layers (levels 0 and 1), two heads, three components
    assert all(int(a) >= 0.05 * 64 * 64 for a in result.masks[0].area)


def test_same_seed_same_masks():
    rec = recording([nested_scene(64, 64)])
    a = segment(rec, components=4, cluster_counts=(2, 5), seed=3)
    b = segment(rec, components=4, cluster_counts=(2, 5), seed=3)
    assert torch.equal(a.masks[0].masks, b.masks[0].masks)


def test_bad_input():
    rec = recording([nested_scene(64, 64)])
    with pytest.raises(ValueError, match="iou_threshold"):
        segment(rec, iou_threshold=0)
    with pytest.raises(ValueError, match="min_area"):
        segment(rec, min_area=1.5)
    with pytest.raises(ValueError, match="cluster_counts"):
        segment(rec, cluster_counts="2,x")
    with pytest.raises(ValueError, match="^cluster_counts: k must be at most"):
        segment(rec, cluster_counts=(2, 500))  # the finest grid of a 64x64 image has 8x8 cells
    with pytest.raises(ValueError, match="components"):
        segment(rec, components=17)
    with pytest.raises(ValueError, match="no layer left"):
        segment(rec, positions=("middle",), levels=[0])
    bad = dict(rec.layers)
    key = LayerKey("output", 9, 0)
    bad[key] = bad[key].clone()
    bad[key][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="output.9.0"):
        segment(type(rec)(bad, rec.image_size))
    with pytest.raises(TypeError, match="Recording"):
        segment({"a": 1})
    with pytest.raises(ValueError, match="layer keys must be LayerKey"):  # refused before the selection
        segment(type(rec)({"input.1.0": next(iter(rec.layers.values()))}, rec.image_size))


@pytest.mark.parametrize(
    "option, match",
    [
        ({"mode": "bicubic"}, "^mode must be one of"),
        ({"seed": 1.5}, "^seed must be an int"),
        ({"cluster_counts": [2, "5"]}, "^cluster_counts: k must be an int"),
        ({"cluster_counts": [2, 300]}, "^cluster_counts: k must be at most 256"),
        ({"cluster_counts": 5}, "^cluster_counts must be a list of ints"),
        ({"reweight": "yes"}, "^reweight must be True or False"),
    ],
)
def test_options_are_refused_before_any_stage_runs(option, match, monkeypatch):
    import headseg.nodes.core.pipeline as pipeline

    def never(*args, **kwargs):
        raise AssertionError("a stage ran before the options were checked")

    monkeypatch.setattr(pipeline, "recording_pca", never)
    with pytest.raises(ValueError, match=match):
        segment(recording([nested_scene(64, 64)]), **option)


def test_numpy_numbers_are_taken_as_python_numbers():
    np = pytest.importorskip("numpy")
    rec = recording([nested_scene(64, 64)])
    plain = segment(rec, levels=[0, 1], components=4, cluster_counts=[2, 5], seed=3, iou_threshold=0.8, min_area=0.01)
    numpy = segment(rec, levels=np.array([0, 1]), components=np.int64(4), cluster_counts=np.array([2, 5]),
                    seed=np.int32(3), iou_threshold=np.float32(0.8), min_area=np.float64(0.01))
    assert list(numpy.sweep.results) == [2, 5] and all(type(k) is int for k in numpy.sweep.results)
    assert torch.equal(numpy.masks[0].masks, plain.masks[0].masks)


def test_every_option_reaches_its_stage_for_every_image():
    scene = nested_scene(64, 64)
    flipped = Scene(scene.masks.flip(1), scene.parent, scene.names)
    rec = recording([scene, flipped])
    calls = []
    out = segment(rec, components=4, cluster_counts=(2, 5), seed=3, reweight=True, iou_threshold=0.5,
                  min_area=0.1, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (12, 12) and len(calls) == 8  # 2 images x 2 k x 3 stages, the last two at once at 64 x 64
    assert out.stack.weights != [1.0] * len(out.stack.weights)  # reweight reached the stack
    again = multi_kmeans(out.stack, (2, 5), seed=3)
    assert all(torch.equal(out.sweep.results[k].labels, again.results[k].labels) for k in (2, 5))
    for b in range(2):  # each image merged on its own, with these options
        want = merge_sweep(out.sweep, b, iou_threshold=0.5, min_area=0.1)
        assert torch.equal(out.masks[b].masks, want.masks)
    assert not torch.equal(out.masks[0].masks, out.masks[1].masks)


def test_defaults_and_a_live_recording_with_snapshot():
    rec = recording([nested_scene(64, 64)])

    class Live:  # what the recorder hands on: a snapshot() of what it has so far
        def snapshot(self):
            return rec

    out = segment(Live())
    assert list(out.sweep.results) == [2, 5, 6, 10, 20] and out.features.components == 8
    assert {key.position for key in out.features.layers} == {"down", "up"}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
@pytest.mark.parametrize("edge", [600, 904])
def test_masks_line_up_with_a_photo_whose_sides_are_no_multiples_of_32(edge, device):
    """A 1000x664 photo (latent 125x83): an object from column ``edge`` on, planted in each grid's cells where
    the UNet has them (cells of 8, 16 and 32 px from the left edge; the 1/4 grid's 32 cells span 1024 px).
    The k = 2 mask starts within a few pixels of the object, as it does on a 1024 px wide photo; stretching
    the grids onto the image put it 17 px to the left at 904."""
    from headseg.nodes.core.recording import grid_levels

    H, W = 664, 1000
    g = torch.Generator().manual_seed(0)
    layers = {}
    for level, (block, number) in enumerate([("input", 1), ("input", 4), ("input", 7)]):
        h, w = grid_levels((H // 8, W // 8))[level]
        centre = (torch.arange(w) + 0.5) * 8 * 2**level  # [w] pixel column of each cell's centre
        inside = (centre >= edge).float().view(1, 1, 1, w, 1)
        t = inside * torch.randn(1, 2, 1, 1, 8, generator=g) + 0.01 * torch.randn(1, 2, h, w, 8, generator=g)
        layers[LayerKey(block, number, 0)] = t.half()
    rec = Recording(layers, (H, W), model="SD2").to(device)
    result = segment(rec, positions=("down",), components=2, cluster_counts=(2,))
    labels = result.sweep.results[2].labels[0].cpu()  # [H, W]
    for row in (0, H // 2, H - 1):
        starts = (labels[row] != labels[row, 0]).nonzero()
        assert starts.numel() and abs(int(starts[0]) - edge) <= 4, (row, starts[:1])
        assert bool((labels[row, int(starts[0]):] == labels[row, -1]).all())
