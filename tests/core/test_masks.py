"""Masks: labels -> masks partition, sweep order, greedy merge (threshold, min area, stable,
idempotent), masks at a pixel (finest first), bad input."""

import pytest
import torch

from headseg.nodes.core.kmeans import ClusterSweep, KMeansResult
from headseg.nodes.core.masks import (MAX_POINTS, MaskSet, labels_to_masks, masks_at_pixel, merge_masks, merge_sweep,
                                      merge_sweep_bytes, parse_points, sweep_to_masks)
from headseg.nodes.core.metrics import pairwise_iou


def random_labels(k, H=20, W=30, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, k, (H, W), generator=gen)


def blocky_labels(k, H=32, W=48, seed=0):
    """Labels constant on 8x8 blocks (so masks of different k can coincide)."""
    gen = torch.Generator().manual_seed(seed)
    small = torch.randint(0, k, (H // 8, W // 8), generator=gen)
    return small.repeat_interleave(8, 0).repeat_interleave(8, 1)


def make_sweep(label_maps: dict[int, torch.Tensor]) -> ClusterSweep:
    """label_maps[k]: [B, H, W] -> ClusterSweep (centroids and inertia are not used by masks)."""
    results = {
        k: KMeansResult(k, labels, torch.zeros(labels.shape[0], k, 1), torch.zeros(labels.shape[0], dtype=torch.float64), 1)
        for k, labels in sorted(label_maps.items())
    }
    H, W = next(iter(label_maps.values())).shape[1:]
    return ClusterSweep(results, (H, W))


def maskset(masks):
    masks = torch.stack(list(masks)).bool()  # [M, H, W]
    M = masks.shape[0]
    return MaskSet(masks, torch.full((M,), 1, dtype=torch.int64), torch.arange(M))


# ----------------------------------------------------------------------------- labels -> masks
@pytest.mark.parametrize("k", [1, 2, 7])
def test_labels_to_masks_partition(k):
    labels = random_labels(k, seed=k)
    masks = labels_to_masks(labels, k)
    assert masks.shape == (k, 20, 30) and masks.dtype == torch.bool
    assert torch.equal(masks.sum(0), torch.ones(20, 30, dtype=torch.int64))  # every pixel in exactly one mask
    for j in range(k):
        assert torch.equal(masks[j], labels == j)


@pytest.mark.parametrize("labels, k", [(torch.zeros(4), 2), (torch.zeros(2, 2), 0), (torch.full((2, 2), 3), 3),
                                       (torch.full((2, 2), -1), 2), (torch.zeros(2, 2, dtype=torch.float32), 2)])
def test_labels_to_masks_bad_input(labels, k):
    with pytest.raises(ValueError, match="labels|k must"):
        labels_to_masks(labels, k)


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_label_maps_of_other_dtypes_are_named(dtype):
    """uint16 .. uint64 label maps failed inside torch ('"min_all" not implemented for UInt16'); every stage
    that reads a label map names the dtypes it reads."""
    labels = torch.zeros(1, 4, 4, dtype=torch.int64).to(dtype)
    words = r"^labels must be an integer tensor \[H, W\] of uint8, int8, int16, int32 or int64, got torch\."
    with pytest.raises(ValueError, match=words):
        labels_to_masks(labels[0], 2)
    with pytest.raises(ValueError, match=words):
        merge_sweep(make_sweep({2: labels}), 0)
    with pytest.raises(ValueError, match=words):
        sweep_to_masks(make_sweep({2: labels}), 0)


def test_label_maps_on_the_meta_device_are_named():
    labels = torch.zeros(1, 4, 4, dtype=torch.uint8, device="meta")
    for stage in (lambda: merge_sweep(make_sweep({2: labels}), 0), lambda: labels_to_masks(labels[0], 2)):
        with pytest.raises(ValueError, match="^labels is on the meta device: it holds no values$"):
            stage()


def test_sweep_to_masks_order_and_partition():
    maps = {5: torch.stack([random_labels(5, seed=1), random_labels(5, seed=2)]),
            2: torch.stack([random_labels(2, seed=3), random_labels(2, seed=4)])}
    sweep = make_sweep(maps)
    for b in range(2):
        ms = sweep_to_masks(sweep, b)
        assert ms.k.tolist() == [2, 2, 5, 5, 5, 5, 5] and ms.cluster.tolist() == [0, 1, 0, 1, 2, 3, 4]
        assert torch.equal(ms.masks[:2].sum(0), torch.ones(20, 30, dtype=torch.int64))
        assert torch.equal(ms.masks[2:].sum(0), torch.ones(20, 30, dtype=torch.int64))
        assert torch.equal(ms.masks[2 + 3], maps[5][b] == 3)
        assert ms.area.tolist() == ms.masks.flatten(1).sum(1).tolist()
    with pytest.raises(ValueError, match="batch_index"):
        sweep_to_masks(sweep, 2)


def test_sweep_stored_in_any_order_gives_its_masks_k_ascending():
    """A ClusterSweep built by hand with its k out of order: the masks still come k ascending, and merging
    them as masks or from the label maps (merge_sweep, which sorts the k) keeps the same masks."""
    maps = {k: torch.stack([blocky_labels(k, seed=k)]) for k in (8, 2, 5)}
    ordered = make_sweep(maps)
    unordered = ClusterSweep({k: ordered.results[k] for k in (8, 2, 5)}, ordered.size)
    ms = sweep_to_masks(unordered, 0)
    assert ms.k.tolist() == [2] * 2 + [5] * 5 + [8] * 8
    assert torch.equal(ms.masks, sweep_to_masks(ordered, 0).masks)
    want = merge_sweep(unordered, 0, iou_threshold=0.5)
    got = merge_masks(ms, iou_threshold=0.5)
    assert torch.equal(got.masks, want.masks) and torch.equal(got.k, want.k) and torch.equal(got.cluster, want.cluster)


# ----------------------------------------------------------------------------- merge
def test_merge_keeps_first_of_identical_masks():
    a = torch.zeros(10, 10, dtype=torch.bool)
    a[:5] = True
    b = ~a
    ms = MaskSet(torch.stack([a, b, a, b, a]), torch.tensor([2, 2, 3, 3, 4]), torch.tensor([0, 1, 0, 1, 0]))
    merged = merge_masks(ms)
    assert merged.k.tolist() == [2, 2] and merged.cluster.tolist() == [0, 1]
    assert torch.equal(merged.masks, torch.stack([a, b]))


def test_merge_threshold_is_inclusive():
    a = torch.zeros(1, 100, dtype=torch.bool)
    a[0, :90] = True
    b = torch.ones(1, 100, dtype=torch.bool)  # IoU(a, b) = 0.9 exactly
    assert len(merge_masks(maskset([a, b]), iou_threshold=0.9)) == 1
    assert len(merge_masks(maskset([a, b]), iou_threshold=0.91)) == 2


def test_merge_min_area_and_empty_masks():
    big = torch.zeros(10, 10, dtype=torch.bool)
    big[:6] = True
    small = torch.zeros(10, 10, dtype=torch.bool)
    small[9, :4] = True  # 4 % of the image
    empty = torch.zeros(10, 10, dtype=torch.bool)
    ms = maskset([empty, small, big])
    assert merge_masks(ms).cluster.tolist() == [1, 2]  # empty masks always go
    assert merge_masks(ms, min_area=0.04).cluster.tolist() == [1, 2]
    assert merge_masks(ms, min_area=0.05).cluster.tolist() == [2]
    assert len(merge_masks(ms, min_area=1.0)) == 0


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.5, 0.9])
def test_merge_properties(seed, threshold):
    maps = {k: blocky_labels(k, seed=seed * 10 + k)[None] for k in (2, 3, 5, 8)}
    ms = sweep_to_masks(make_sweep(maps), 0)
    ms = MaskSet(torch.cat([ms.masks, ms.masks[:3]]), torch.cat([ms.k, ms.k[:3]]), torch.cat([ms.cluster, ms.cluster[:3]]))
    merged = merge_masks(ms, iou_threshold=threshold)
    iou = pairwise_iou(ms.masks, ms.masks)  # independent IoU (metrics)
    # stable: the kept masks are a subsequence; each dropped mask matches an earlier kept one
    kept = [int(((ms.k == k) & (ms.cluster == c)).nonzero()[0]) for k, c in zip(merged.k, merged.cluster)]
    assert kept == sorted(kept) and kept[0] == 0
    for i in range(len(ms)):
        earlier = [j for j in kept if j < i]
        if int(ms.area[i]) == 0:  # empty clusters are dropped, not merged
            assert i not in kept
        elif i in kept:
            assert all(float(iou[i, j]) < threshold for j in earlier)
        else:
            assert any(float(iou[i, j]) >= threshold for j in earlier)
    again = merge_masks(merged, iou_threshold=threshold)  # idempotent
    assert torch.equal(again.masks, merged.masks) and torch.equal(again.k, merged.k)


@pytest.mark.parametrize("side, fraction", [(3840, 0.54), (1000, 0.3), (7, 3 / 49)])
def test_a_mask_of_exactly_min_area_is_kept(side, fraction):
    """fraction * side**2 pixels exactly (0.54 * 3840**2 rounds to just above 7962624 in float64)."""
    need = round(fraction * side * side)
    flat = torch.zeros(side * side, dtype=torch.bool)
    flat[:need] = True
    ms = MaskSet(flat.reshape(1, side, side), torch.tensor([2]), torch.tensor([0]))
    assert len(merge_masks(ms, min_area=fraction)) == 1
    flat[need - 1] = False  # one pixel less: dropped
    assert len(merge_masks(ms, min_area=fraction)) == 0


@pytest.mark.parametrize("kwargs", [{"iou_threshold": 0.0}, {"iou_threshold": 1.5}, {"min_area": -0.1},
                                    {"min_area": 2}, {"iou_threshold": "0.9"}])
def test_merge_bad_arguments(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        merge_masks(maskset(torch.ones(1, 3, 3)), **kwargs)
    with pytest.raises(ValueError, match=name):
        merge_sweep(make_sweep({2: blocky_labels(2)[None]}), 0, **kwargs)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_merge_sweep_of_narrow_label_maps_at_the_largest_k(dtype):
    """k-means gives uint8 label maps (k <= 256): the contingency codes la * kb + lb of two large k must not
    wrap around in that dtype. Against the masks' products, and against the same maps as int64."""
    maps = {k: torch.stack([random_labels(k, H=24, W=40, seed=k + b) for b in range(2)]) for k in (3, 200, 256)}
    wide, narrow = make_sweep(maps), make_sweep({k: m.to(dtype) for k, m in maps.items()})
    for b in range(2):
        want = merge_masks(sweep_to_masks(wide, b), iou_threshold=0.5, min_area=0.0)
        got = merge_sweep(narrow, b, iou_threshold=0.5, min_area=0.0)
        assert torch.equal(got.masks, want.masks)
        assert torch.equal(got.k, want.k) and torch.equal(got.cluster, want.cluster)
        assert torch.equal(sweep_to_masks(narrow, b).masks, sweep_to_masks(wide, b).masks)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("labels", [blocky_labels, random_labels])
@pytest.mark.parametrize("threshold, min_area", [(0.9, 0.0), (0.5, 0.0), (0.9, 0.05), (1.0, 0.0)])
def test_merge_sweep_equals_merge_of_the_sweeps_masks(seed, labels, threshold, min_area):
    """Overlaps counted from the label maps (contingency tables) against products of the masks."""
    maps = {k: torch.stack([labels(k, seed=seed * 10 + k + b) for b in range(2)]) for k in (1, 2, 3, 5, 8)}
    sweep = make_sweep(maps)
    for b in range(2):
        want = merge_masks(sweep_to_masks(sweep, b), iou_threshold=threshold, min_area=min_area)
        got = merge_sweep(sweep, b, iou_threshold=threshold, min_area=min_area)
        assert torch.equal(got.masks, want.masks)
        assert torch.equal(got.k, want.k) and torch.equal(got.cluster, want.cluster)


# ----------------------------------------------------------------------------- masks at a pixel
def nested_masks():
    """Masks of a 16x16 image: whole, left half, top-left quarter, a 2x2 square, a disjoint block."""
    m = torch.zeros(5, 16, 16, dtype=torch.bool)
    m[0] = True
    m[1, :, :8] = True
    m[2, :8, :8] = True
    m[3, 2:4, 2:4] = True
    m[4, 10:, 10:] = True
    return MaskSet(m[[1, 4, 0, 3, 2]], torch.tensor([2, 5, 1, 20, 6]), torch.tensor([0, 3, 0, 7, 1]))


def test_masks_at_pixel_finest_first():
    ms = nested_masks()
    at = masks_at_pixel(ms, x=3, y=2)
    assert at.k.tolist() == [20, 6, 2, 1]  # square, quarter, half, whole
    assert bool(at.masks[:, 2, 3].all())
    assert at.area.tolist() == sorted(at.area.tolist())
    assert masks_at_pixel(ms, x=12, y=12).k.tolist() == [5, 1]
    assert masks_at_pixel(ms, x=8, y=0).k.tolist() == [1]  # x is the column


@pytest.mark.parametrize("seed", range(3))
def test_masks_at_pixel_matches_brute_force(seed):
    maps = {k: random_labels(k, seed=seed + k)[None] for k in (2, 4, 9)}
    ms = merge_masks(sweep_to_masks(make_sweep(maps), 0))
    for x, y in [(0, 0), (29, 19), (7, 11)]:
        at = masks_at_pixel(ms, x, y)
        expected = sorted(int(ms.area[i]) for i in range(len(ms)) if bool(ms.masks[i, y, x]))
        assert at.area.tolist() == expected
        assert bool(at.masks[:, y, x].all())


def test_masks_at_pixel_with_more_pixels_in_or_out():
    ms = nested_masks()  # whole (k 1) > left half (k 2) > top-left quarter (k 6) > square (k 20); corner (k 5)
    before = ms.masks.clone()
    assert masks_at_pixel(ms, 3, 2, include=[(6, 6)]).k.tolist() == [6, 2, 1]  # the square lacks (6, 6)
    assert masks_at_pixel(ms, 3, 2, include=[(6, 6), (3, 12)]).k.tolist() == [2, 1]  # (3, 12): half, not quarter
    assert masks_at_pixel(ms, 3, 2, exclude=[(3, 12)]).k.tolist() == [20, 6]
    assert masks_at_pixel(ms, 3, 2, include=[(6, 6)], exclude=[(3, 12)]).k.tolist() == [6]
    assert masks_at_pixel(ms, 3, 2, include=[(12, 2)]).k.tolist() == [1]  # x is the column
    assert masks_at_pixel(ms, 3, 2, include=[(12, 12)], exclude=[(12, 12)]).k.tolist() == []
    assert masks_at_pixel(ms, 3, 2, include=[(3, 2)], exclude=[]).k.tolist() == [20, 6, 2, 1]
    assert torch.equal(ms.masks, before)  # the input is left as it was
    assert masks_at_pixel(ms, 3, 2).k.tolist() == [20, 6, 2, 1]


@pytest.mark.parametrize("seed", range(3))
def test_masks_at_pixel_with_more_pixels_matches_brute_force(seed):
    maps = {k: random_labels(k, seed=seed + k)[None] for k in (2, 4, 9)}
    ms = merge_masks(sweep_to_masks(make_sweep(maps), 0))
    g = torch.Generator().manual_seed(seed)
    H, W = ms.size
    for _ in range(5):
        pts = [(int(torch.randint(W, (), generator=g)), int(torch.randint(H, (), generator=g))) for _ in range(4)]
        (x, y), inc, exc = pts[0], pts[1:2], pts[2:]
        at = masks_at_pixel(ms, x, y, include=inc, exclude=exc)
        expected = sorted(
            int(ms.area[i]) for i in range(len(ms))
            if bool(ms.masks[i, y, x]) and all(bool(ms.masks[i, b, a]) for a, b in inc)
            and not any(bool(ms.masks[i, b, a]) for a, b in exc)
        )
        assert at.area.tolist() == expected


@pytest.mark.parametrize("include, exclude, words", [
    ([(16, 0)], [], r"^include\[0\] x must"), ([], [(0, 0), (0, 16)], r"^exclude\[1\] y must"),
    ([(1,)], [], r"^include\[0\] must be an \(x, y\) pair"), ([], ["3,4"], r"^exclude\[0\] must be an \(x, y\) pair"),
])
def test_masks_at_pixel_with_bad_more_pixels(include, exclude, words):
    with pytest.raises(ValueError, match=words):
        masks_at_pixel(nested_masks(), 3, 2, include=include, exclude=exclude)


def test_more_pixels_that_are_no_list_and_masks_on_the_meta_device_are_named():
    """include=None failed with "'NoneType' object is not iterable"; a string was read character by
    character; masks on the meta device failed inside torch."""
    for include, shown in ((None, "None"), (5, "5"), ("3,4", "'3,4'")):
        with pytest.raises(ValueError, match=rf"^include must be a list of \(x, y\) pixels, got {shown}$"):
            masks_at_pixel(nested_masks(), 3, 2, include=include)
    with pytest.raises(ValueError, match=r"^exclude must be a list of \(x, y\) pixels, got None$"):
        masks_at_pixel(nested_masks(), 3, 2, exclude=None)
    ms = nested_masks()
    meta = MaskSet(ms.masks.to("meta"), ms.k, ms.cluster)
    for stage in (lambda: masks_at_pixel(meta, 3, 2), lambda: merge_masks(meta)):
        with pytest.raises(ValueError, match="^ms.masks is on the meta device: it holds no values$"):
            stage()


@pytest.mark.parametrize("text, include, exclude", [
    ("", [], []), ("  ;\n ", [], []), ("12,40", [(12, 40)], []), ("12,40; -300,200", [(12, 40)], [(300, 200)]),
    (" 1 , 2 ;\n- 3,4;5,6; ", [(1, 2), (5, 6)], [(3, 4)]),
])
def test_parse_points(text, include, exclude):
    assert parse_points(text) == (include, exclude)


@pytest.mark.parametrize("text", ["12", "12,40,3", "a,b", "1.5,2", "12 40", "--1,2", "+1,2", "1,-2"])
def test_parse_points_refuses_what_is_not_pixels(text):
    with pytest.raises(ValueError, match="^more_points: expected 'x,y' pixels .* entry 1 is"):
        parse_points(text)
    with pytest.raises(ValueError, match="^more_points: expected text"):
        parse_points(None)


@pytest.mark.parametrize("text", ["\uff11\uff12,3", "\u00b2,3", "1,\u0663", "\x1c5,3", "5,3\x85"])
def test_parse_points_takes_ascii_digits_and_javascripts_blanks_as_the_picker_does(text):
    """Digits other than 0-9 (full-width, superscript, Arabic-Indic) and blanks that JavaScript's \\s is not
    are refused naming the input, as the picker's parsePoints skips them (not read as 12 or failing in int())."""
    with pytest.raises(ValueError, match="^more_points: expected 'x,y' pixels .* entry 1 is"):
        parse_points(text)


def test_parse_points_takes_time_in_proportion_to_the_text():
    """Blanks on both sides of the optional '-' in one regular expression took time in the square of a run of
    blanks before a typo (the message's trimming too): 40 000 blanks took about 25 s, during which the server's
    check of a queued prompt (Mask Select's validate_inputs) stalled. Now milliseconds."""
    import time

    blanks = " \u3000\t" * 15000  # 45 000 of JavaScript's blanks
    for text in (blanks + "x", "1" + blanks + "x", "-" + blanks + "1" + blanks + ",x", "1,1" + blanks + "x"):
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"^more_points: expected 'x,y' pixels .* entry 1 is '"):
            parse_points(text)
        assert time.perf_counter() - start < 1.0
    start = time.perf_counter()
    assert parse_points(blanks + "-" + blanks + "3" + blanks + "," + blanks + "4" + blanks) == ([], [(3, 4)])
    assert time.perf_counter() - start < 1.0


def test_parse_points_takes_at_most_max_points_pixels():
    """A more_points of hundreds of thousands of pixels (a damaged or crafted shared workflow) ran for seconds per
    image and sent the browser a ring to draw for each, freezing its tab: more than MAX_POINTS are refused by
    name, with the limit and the count; MAX_POINTS are read (blank entries do not count)."""
    text = "; ".join(f"{i % 50},{i // 50}" for i in range(MAX_POINTS)) + ";;\n ; "
    include, exclude = parse_points(text)
    assert len(include) == MAX_POINTS and exclude == []
    with pytest.raises(ValueError, match=rf"^more_points: expected at most {MAX_POINTS} 'x,y' pixels .* got {MAX_POINTS + 1} pixels"):
        parse_points(text + "; -3,4")
    with pytest.raises(ValueError, match="^links: expected at most .* got 200000 pixels"):
        parse_points("1,2;" * 200000, name="links")


def test_more_points_with_a_typo_name_the_typo_and_the_limit_counts_pixels_as_the_picker_does():
    """The picker counts the pixels of more_points (it skips an entry that is none, for the node to name), but
    parse_points counted every entry before reading any: MAX_POINTS pixels and a typo were refused as too many
    (MAX_POINTS + 1 entries) while the picker drew every ring and said nothing of a limit, and the typo went
    unnamed until the count was cut. A typo is named first, wherever it stands; the limit counts pixels."""
    pixels = "; ".join(f"{i % 50},{i // 50}" for i in range(MAX_POINTS))
    for text, n in ((pixels + "; 3.4", MAX_POINTS + 1), ("x; " + pixels, 1), (pixels + "; 1,2; 7", MAX_POINTS + 2)):
        with pytest.raises(ValueError, match=rf"^more_points: expected 'x,y' pixels .*; entry {n} is "):
            parse_points(text)
    with pytest.raises(ValueError, match=rf"^more_points: expected at most {MAX_POINTS} 'x,y' pixels .* got {MAX_POINTS + 1} pixels"):
        parse_points(pixels + "; ; -1,1;\n")



def test_a_long_typo_is_quoted_by_its_start():
    """An entry that is no pixel was quoted whole: pixels pasted with no ';' between them (a damaged or crafted
    shared workflow), one entry of 130 000 characters, made an error message as long, shown in the browser's
    error dialog and written to the server's log. The message now quotes the entry's start and its length."""
    entry = " ".join(f"{i % 50} {i // 50}" for i in range(20000))
    with pytest.raises(ValueError) as error:
        parse_points("3,4; " + entry + "; 5,6")
    message = str(error.value)
    assert message.startswith("more_points: expected 'x,y' pixels") and len(message) < 400, len(message)
    assert f"entry 2 is {entry[:40]!r}" in message and f"({len(entry)} characters)" in message
    with pytest.raises(ValueError, match=r"; entry 1 is '12 40'$"):  # a short one still quoted whole
        parse_points("12 40")

def test_parse_points_reads_blanks_and_huge_numbers_as_the_picker_does():
    assert parse_points("\ufeff5,3;\u00a0-6,\u30007\u2028") == ([(5, 3)], [(6, 7)])
    # more than 9 digits: 10**9, past any grid, so moved to the last column / row (no int() of 5000 digits)
    assert parse_points("1" + "0" * 20 + ",5; -" + "9" * 5000 + ",0007") == ([(10**9, 5)], [(10**9, 7)])
    assert parse_points("000000000000123,999999999") == ([(123, 999999999)], [])


@pytest.mark.parametrize("x, y, name", [(-1, 0, "x"), (16, 0, "x"), (0, 16, "y"), (0, -3, "y"), (1.5, 0, "x"), (0, None, "y"), (True, 0, "x")])
def test_masks_at_pixel_outside(x, y, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        masks_at_pixel(nested_masks(), x, y)


def test_empty_mask_set():
    ms = MaskSet(torch.zeros(0, 4, 5, dtype=torch.bool), torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
    assert len(merge_masks(ms)) == 0 and len(masks_at_pixel(ms, 4, 3)) == 0
    assert ms.area.shape == (0,)


def test_sweep_without_results_or_with_label_maps_of_different_shapes_is_refused():
    with pytest.raises(ValueError, match="no cluster count"):
        merge_sweep(ClusterSweep({}, (4, 4)), 0)
    sweep = make_sweep({2: torch.zeros(1, 4, 4, dtype=torch.int64), 3: torch.zeros(1, 4, 5, dtype=torch.int64)})
    with pytest.raises(ValueError, match=r"one shape \[B, H, W\]"):
        sweep_to_masks(sweep, 0)


def test_sweep_whose_label_maps_are_no_tensors_is_refused():
    """Label maps as lists failed with "'list' object has no attribute 'shape'"."""
    sweep = make_sweep({2: torch.zeros(1, 4, 4, dtype=torch.int64)})
    sweep.results[2].labels = sweep.results[2].labels.tolist()
    for stage in (merge_sweep, sweep_to_masks):
        with pytest.raises(ValueError, match=r"^sweep: the labels of k = 2 must be a tensor \[B, H, W\], got list$"):
            stage(sweep, 0)
    with pytest.raises(ValueError, match=r"^sweep: the labels of k = 3 must be a tensor \[B, H, W\], got NoneType$"):
        merge_sweep(ClusterSweep({3: None}, (4, 4)), 0)


def test_merge_options_take_numpy_numbers():
    import numpy as np

    sweep = make_sweep({2: torch.tensor([[[0, 1], [1, 1]]])})
    a = merge_sweep(sweep, 0, iou_threshold=np.float32(0.9), min_area=np.float64(0.0))
    b = merge_sweep(sweep, 0, iou_threshold=0.9, min_area=0.0)
    assert torch.equal(a.masks, b.masks)


def test_labels_to_masks_refuses_masks_beyond_4_gb():
    labels = torch.zeros(512, 512, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"^k = 20000 masks of 512x512 would take 4.9 GiB"):
        labels_to_masks(labels, 20000)


def test_merge_counts_pixels_beyond_the_first_chunk():
    masks = torch.zeros(2, 2, 65536, dtype=torch.bool)  # 131072 pixels: two chunks of 2**16
    masks[0, 0], masks[1, 1] = True, True  # mask 1 lies wholly in the second chunk
    merged = merge_masks(MaskSet(masks, torch.tensor([2, 2]), torch.tensor([0, 1])))
    assert len(merged) == 2 and merged.area.tolist() == [65536, 65536]


def test_masks_at_pixel_keeps_the_stored_order_of_equal_areas():
    M = 24  # more than a handful: an unstable sort reorders ties
    masks = torch.zeros(M, M + 1, 4, dtype=torch.bool)
    for i in range(M):
        masks[i, 0], masks[i, i + 1] = True, True  # every mask holds (0, 0) and has area 8
    order = torch.randperm(M, generator=torch.Generator().manual_seed(0))
    ms = MaskSet(masks[order], torch.ones(M, dtype=torch.int64), order)
    assert masks_at_pixel(ms, 0, 0).cluster.tolist() == order.tolist()


def test_mask_sets_of_lists_and_empty_sweeps_are_named():
    masks = torch.zeros(2, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^ms\.k must be a torch\.Tensor, got list"):
        merge_masks(MaskSet(masks, [2, 2], torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="holds no cluster count"):
        ClusterSweep({}, (3, 3)).batch_size


def test_min_area_between_two_masks_keeps_only_the_larger():
    masks = torch.zeros(2, 10, 10, dtype=torch.bool)
    masks[0].view(-1)[:5] = True  # 5 % of the image
    masks[1].view(-1)[50:56] = True  # 6 %
    ms = MaskSet(masks, torch.tensor([2, 2]), torch.tensor([0, 1]))
    assert merge_masks(ms, 0.9, min_area=0.055).cluster.tolist() == [1]  # 5.5 %: 5.5 pixels, rounded up


def test_merge_sweep_counts_overlaps_of_byte_label_maps_without_wide_copies():
    """Multi K-Means gives uint8 label maps: counting the overlaps of every pair of k uses one int32 buffer
    of the pixels, not an int64 copy of every k's map (8 bytes per pixel and k: 312 MB for k = 2 .. 40
    at 1024 x 1024, more than all the masks a merge keeps when min_area drops the small ones), and gives
    the same masks as the int64 maps."""
    from headseg.tests.support.peak_memory import PeakBytes

    ks = range(2, 13)
    N = 256 * 256
    wide = {k: blocky_labels(k, H=256, W=256, seed=k)[None] for k in ks}  # int64
    sweep = make_sweep({k: labels.to(torch.uint8) for k, labels in wide.items()})
    with PeakBytes() as mem:
        got = merge_sweep(sweep, 0, iou_threshold=0.9, min_area=0.15)
    want = merge_sweep(make_sweep(wide), 0, iou_threshold=0.9, min_area=0.15)
    assert torch.equal(got.masks, want.masks) and torch.equal(got.k, want.k) and torch.equal(got.cluster, want.cluster)
    assert 0 < got.masks.shape[0] < sum(ks) // 2, got.masks.shape  # min_area drops most clusters
    assert mem.peak <= got.masks.numel() + 4 * N + N // 2, (mem.peak / N, got.masks.numel() / N)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize("ks, labels, H, W, by_tuples", [
    (range(2, 13), blocky_labels, 128, 96, True),  # planted: 8x8 blocks, 192 tuples of labels at most
    ((1, 2, 5, 6, 10, 20), blocky_labels, 128, 96, True),
    ((3, 4, 5, 6, 40, 256), blocky_labels, 160, 128, True),  # codes of the largest k
    ((1, 2, 3, 4, 5, 6), random_labels, 256, 192, True),  # at random, but 720 tuples at most
    ((2, 3, 5, 6, 10, 20), random_labels, 128, 96, False),  # 12 000 tuples of 12 288 pixels: counted per pixel
    (range(2, 13), random_labels, 128, 96, False),
])
def test_overlaps_counted_over_tuples_of_labels_equal_those_counted_per_pixel(monkeypatch, ks, labels, H, W, by_tuples,
                                                                                dtype):
    """Mask Merge counts the overlaps of every pair of k over the distinct tuples of labels of the pixels
    (one label per k), when there are few: the same tables, and the same merged masks, as one bincount of
    the pixels per pair (forced here by asking for more k than there are), and as the masks' products."""
    from headseg.nodes.core import masks

    maps = {k: torch.stack([labels(k, H=H, W=W, seed=k + 7 * b) for b in range(2)]).to(dtype) for k in ks}
    sweep = make_sweep(maps)
    for b in range(2):
        tuples = masks._label_tuples([maps[k][b].reshape(-1) for k in ks], list(ks), torch.empty(H * W, dtype=torch.int32))
        assert (tuples is not None) == by_tuples and len(ks) >= masks._TUPLES_FROM_G
        got = masks._label_intersections(sweep, b)
        merged = [merge_sweep(sweep, b, iou_threshold=t, min_area=a) for t, a in ((0.9, 0.0), (0.5, 0.02))]
        with monkeypatch.context() as m:
            m.setattr(masks, "_TUPLES_FROM_G", 10**9)
            want = masks._label_intersections(sweep, b)
        assert got.dtype == torch.int64 and torch.equal(got, want)
        assert torch.equal(got, masks._intersections(sweep_to_masks(sweep, b).masks))  # the masks' products
        for ms, (t, a) in zip(merged, ((0.9, 0.0), (0.5, 0.02))):
            ref = merge_masks(sweep_to_masks(sweep, b), iou_threshold=t, min_area=a)
            assert torch.equal(ms.masks, ref.masks) and torch.equal(ms.k, ref.k) and torch.equal(ms.cluster, ref.cluster)
        if by_tuples:  # each tuple: its labels and its pixels
            seen = torch.stack([maps[k][b].reshape(-1).long() for k in ks])  # [G, N]
            uniq, count = torch.unique(seen, dim=1, return_counts=True)  # [G, U], [U]
            mine = torch.stack([t.long() for t in tuples[0]])  # [G, U]
            order = torch.unique(mine, dim=1, return_inverse=True)[1]  # [U]: mine's column in sorted order
            assert mine.shape == uniq.shape and torch.equal(uniq[:, order], mine)
            assert torch.equal(count[order], tuples[1])


def test_merge_sweep_reads_the_pixels_once_per_k_not_once_per_pair_of_k():
    """With many k (2 .. 40 at 1024 x 1024: 741 pairs), one bincount of every pixel per pair of k took
    about 2 s; the tuples of labels of the pixels are counted once per k, and the pairs' tables from them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ks = range(2, 21)  # 19 k, 171 pairs
    N = 128 * 96
    sweep = make_sweep({k: blocky_labels(k, H=128, W=96, seed=k)[None].to(torch.uint8) for k in ks})

    class PixelBincounts(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.bincount.default and args[0].numel() == N:
                PixelBincounts.calls += 1
            return func(*args, **(kwargs or {}))

    with PixelBincounts():
        got = merge_sweep(sweep, 0, iou_threshold=0.9, min_area=0.0)
    want = merge_masks(sweep_to_masks(sweep, 0), iou_threshold=0.9, min_area=0.0)
    assert torch.equal(got.masks, want.masks) and torch.equal(got.k, want.k) and torch.equal(got.cluster, want.cluster)
    assert PixelBincounts.calls <= 2 * len(ks), PixelBincounts.calls  # each k's areas, and one step per k


@pytest.mark.parametrize("M, H, W", [(0, 4, 4), (1, 3, 5), (10, 512, 512), (3, 1, 1_500_000)])
def test_area_counts_the_pixels_of_every_mask(M, H, W):
    """Areas are summed a few masks at a time (and one mask at a time above a million pixels)."""
    g = torch.Generator().manual_seed(M)
    masks = torch.rand(M, H, W, generator=g) < torch.linspace(0.05, 0.95, max(M, 1))[:M, None, None]
    ms = MaskSet(masks, torch.ones(M, dtype=torch.long), torch.arange(M))
    assert ms.area.dtype == torch.int64
    assert ms.area.tolist() == [int(m.to(torch.int64).sum()) for m in masks]


@pytest.mark.parametrize("min_area", [0.0, 0.012])
def test_merge_sweep_holds_only_the_masks_it_keeps(min_area):
    """Mask Merge's memory check allows one byte per cluster and pixel: merge_sweep counts overlaps from
    the label maps, so it needs no mask of a cluster it drops, nor a second copy of the ones it keeps."""
    from headseg.tests.support.peak_memory import PeakBytes

    maps = {k: random_labels(k, H=256, W=256, seed=k)[None] for k in (2, 5, 10, 20, 40, 80)}
    sweep = make_sweep(maps)
    with PeakBytes() as mem:
        got = merge_sweep(sweep, 0, iou_threshold=0.9, min_area=min_area)
    want = merge_masks(sweep_to_masks(sweep, 0), iou_threshold=0.9, min_area=min_area)
    assert torch.equal(got.masks, want.masks) and torch.equal(got.k, want.k) and torch.equal(got.cluster, want.cluster)
    every = sum(maps) * 256 * 256  # one byte per cluster mask
    assert (min_area == 0) == (got.masks.numel() == every)  # 0.012: the clusters of k = 80 are dropped
    assert mem.peak <= got.masks.numel() + every // 10, (mem.peak, got.masks.numel(), every)


@pytest.mark.parametrize("maker", [random_labels, blocky_labels])  # blocky: the tuple path from six k
@pytest.mark.parametrize("ks, side", [((2,), 512), ((1, 2), 512), ((2, 5, 6, 10, 20), 384), (tuple(range(2, 41)), 128)])
def test_merge_sweep_bytes_bounds_what_merge_sweep_holds(ks, side, maker):
    """Mask Merge checks merge_sweep_bytes before each image: it counted one byte per cluster and pixel only,
    while the overlap counting holds an int32 code per pixel (and with six k or more the tuples' tables),
    so a single k = 2 took about 6 bytes per pixel against 2 checked."""
    from headseg.tests.support.peak_memory import PeakBytes

    sweep = make_sweep({k: maker(k, H=side, W=side, seed=k).to(torch.uint8)[None] for k in ks})  # as Multi K-Means
    with PeakBytes() as mem:
        got = merge_sweep(sweep, 0, iou_threshold=0.9, min_area=0.0)
    assert got.masks.shape[0] >= 1
    assert mem.peak <= merge_sweep_bytes(ks, (side, side)), (mem.peak / side**2, merge_sweep_bytes(ks, (side, side)) / side**2)
    assert mem.peak > sum(ks) * side * side  # what the check allowed before
