"""Mask metrics on planted masks with hand-computed answers (eq. 3, eq. 4, section 5)."""

import pytest
import torch

from headseg.nodes.core.metrics import average_class_iou, best_match_iou, class_ious, iou, pairwise_iou, top_n


def box(r0, r1, c0, c1, size=(8, 8)):
    m = torch.zeros(size, dtype=torch.bool)
    m[r0:r1, c0:c1] = True
    return m


# Planted 8x8 masks and their areas:
LEFT = box(0, 8, 0, 4)  # 32 px, left half
TOP = box(0, 4, 0, 8)  # 32 px, top half
TL = box(0, 4, 0, 4)  # 16 px, top-left quarter
DOT = box(7, 8, 7, 8)  # 1 px, bottom-right corner
EMPTY = torch.zeros(8, 8, dtype=torch.bool)


@pytest.mark.parametrize(
    "a,b,expected",
    [
        (LEFT, LEFT, 1.0),
        (LEFT, TOP, 16 / 48),  # overlap = TL (16), union = 32 + 32 - 16
        (TL, LEFT, 16 / 32),
        (DOT, LEFT, 0.0),
        (EMPTY, EMPTY, 1.0),
        (EMPTY, DOT, 0.0),
    ],
)
def test_iou_hand_computed(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)
    assert iou(b, a) == pytest.approx(expected)


def test_iou_accepts_float_and_int_masks():
    assert iou(LEFT.float() * 0.9, TOP.to(torch.uint8)) == pytest.approx(16 / 48)
    assert iou(LEFT.float() * 0.4, EMPTY) == 1.0  # 0.4 is below the 0.5 threshold: empty


def test_iou_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        iou(LEFT, torch.zeros(8, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"a must have shape \[H, W\]"):
        iou(LEFT[None], LEFT)


def test_pairwise_iou_hand_matrix():
    A = torch.stack([LEFT, TOP, EMPTY])
    B = torch.stack([TL, DOT, EMPTY, LEFT])
    expected = torch.tensor(
        [
            [16 / 32, 0.0, 0.0, 1.0],
            [16 / 32, 0.0, 0.0, 16 / 48],
            [0.0, 0.0, 1.0, 0.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(pairwise_iou(A, B), expected)


def test_pairwise_iou_equals_single_iou_on_random_masks():
    g = torch.Generator().manual_seed(0)
    A = torch.rand(5, 13, 17, generator=g) > 0.6
    B = torch.rand(4, 13, 17, generator=g) > 0.3
    P = pairwise_iou(A, B)
    assert P.shape == (5, 4)
    for i in range(5):
        for j in range(4):
            assert P[i, j].item() == pytest.approx(iou(A[i], B[j]))


def test_pairwise_iou_empty_sets_and_mismatch():
    assert pairwise_iou(torch.zeros(0, 8, 8, dtype=torch.bool), torch.stack([LEFT])).shape == (0, 1)
    with pytest.raises(ValueError, match="share"):
        pairwise_iou(torch.stack([LEFT]), torch.zeros(1, 8, 4, dtype=torch.bool))


def test_best_match_iou_hand_computed():
    reference = torch.stack([LEFT, TOP, DOT])
    predicted = torch.stack([TL, LEFT, box(6, 8, 6, 8)])  # the last is 4 px containing DOT
    # LEFT -> LEFT 1.0; TOP -> best of TL (16/32), LEFT (16/48) = 0.5; DOT -> 1/4
    assert best_match_iou(reference, predicted) == pytest.approx((1.0 + 0.5 + 0.25) / 3)
    # order-invariant in both arguments
    assert best_match_iou(reference[[2, 0, 1]], predicted[[1, 2, 0]]) == pytest.approx((1.0 + 0.5 + 0.25) / 3)


def test_best_match_iou_edge_cases():
    assert best_match_iou(torch.stack([LEFT]), torch.zeros(0, 8, 8, dtype=torch.bool)) == 0.0
    with pytest.raises(ValueError, match="reference"):
        best_match_iou(torch.zeros(0, 8, 8, dtype=torch.bool), torch.stack([LEFT]))


def test_top_n_takes_the_largest_reference_masks():
    reference = torch.stack([DOT, TL, LEFT])  # areas 1, 16, 32
    predicted = torch.stack([LEFT, box(0, 4, 0, 2)])  # LEFT exact; an 8 px half of TL
    assert top_n(reference, predicted, 1) == pytest.approx(1.0)  # LEFT
    assert top_n(reference, predicted, 2) == pytest.approx((1.0 + 0.5) / 2)  # TL: 16/32 with LEFT and 8/16 with half
    assert top_n(reference, predicted, 3) == pytest.approx((1.0 + 0.5 + 0.0) / 3)  # DOT (bottom-right) meets nothing
    assert top_n(reference, predicted, 10) == top_n(reference, predicted, 3)  # fewer masks than n: all of them
    assert top_n(reference[[2, 0, 1]], predicted.flip(0), 2) == pytest.approx(0.75)


def test_top_n_ties_keep_given_order():
    reference = torch.stack([TOP, LEFT])  # both 32 px
    predicted = torch.stack([LEFT])
    assert top_n(reference, predicted, 1) == pytest.approx(16 / 48)  # TOP comes first
    assert top_n(reference.flip(0), predicted, 1) == pytest.approx(1.0)


@pytest.mark.parametrize("n", [0, -2, 1.5, True])
def test_top_n_bad_n(n):
    with pytest.raises(ValueError, match="n must"):
        top_n(torch.stack([LEFT]), torch.stack([LEFT]), n)


def test_average_class_iou_hand_computed():
    gt = torch.zeros(8, 8, dtype=torch.int64)  # class 0: background
    gt[:, 4:] = 7  # class 7: right half (32 px)
    gt[0, :] = 255  # void row: ignored
    predicted = torch.stack([box(0, 8, 4, 8), box(0, 8, 0, 3)])
    # class 7 (rows 1-7, cols 4-7: 28 px) vs mask 0 restricted to valid pixels: identical -> 1.0
    # class 0 (rows 1-7, cols 0-3: 28 px) vs mask 1 on valid pixels (rows 1-7, cols 0-2: 21 px) -> 21/28
    assert class_ious(gt, predicted) == {0: pytest.approx(1.0 * 21 / 28), 7: pytest.approx(1.0)}
    assert average_class_iou(gt, predicted) == pytest.approx((1.0 + 0.75) / 2)
    # without an ignore label the void row (255) is a class of its own and counts in every mask
    assert set(class_ious(gt, predicted, ignore_index=None)) == {0, 7, 255}
    assert class_ious(gt, predicted, ignore_index=None)[7] == pytest.approx(28 / 32)


def test_masks_on_the_meta_device_are_named():
    """They failed inside torch ('Tensor.item() cannot be called on meta tensors'), or pairwise_iou returned
    a meta tensor of no values."""
    meta = LEFT.to("meta")
    for call, name in ((lambda: iou(meta, LEFT), "a"), (lambda: iou(LEFT, meta), "b"),
                       (lambda: pairwise_iou(meta[None], LEFT[None]), "A"), (lambda: top_n(meta[None], LEFT[None], 1), "reference"),
                       (lambda: best_match_iou(LEFT[None], meta[None]), "predicted"),
                       (lambda: class_ious(torch.zeros(8, 8, dtype=torch.int64, device="meta"), LEFT[None]), "gt_labels")):
        with pytest.raises(ValueError, match=f"^{name} is on the meta device: it holds no values$"):
            call()


def test_average_class_iou_of_a_single_class_is_its_iou():
    """One class besides the void label: the mean over the classes present is that class's best IoU."""
    gt = torch.full((8, 8), 3, dtype=torch.int64)
    gt[0, :] = 255  # void row: ignored
    predicted = torch.stack([box(0, 8, 0, 4), box(0, 8, 0, 6)])  # on the valid rows 1-7: 28 and 42 of 56 px
    assert class_ious(gt, predicted) == {3: pytest.approx(42 / 56)}
    assert average_class_iou(gt, predicted) == pytest.approx(42 / 56)


def test_average_class_iou_bad_input():
    predicted = torch.stack([LEFT])
    with pytest.raises(ValueError, match="gt_labels"):
        average_class_iou(torch.full((8, 8), 255), predicted)
    with pytest.raises(ValueError, match="gt_labels"):
        average_class_iou(torch.zeros(8, 8), predicted)  # float labels
    with pytest.raises(ValueError, match="same"):
        average_class_iou(torch.zeros(8, 9, dtype=torch.int64), predicted)


@pytest.mark.parametrize("ignore_index", ["255", 255.5, True, torch.tensor(255)])
def test_ignore_index_must_be_an_int_or_none(ignore_index):
    gt = torch.tensor([[0, 1], [255, 1]])
    with pytest.raises(ValueError, match="ignore_index"):
        class_ious(gt, gt[None] == 1, ignore_index=ignore_index)


def test_ignore_index_accepts_numpy_ints():
    import numpy as np

    gt = torch.tensor([[0, 1], [255, 1]])
    assert class_ious(gt, gt[None] == 1, ignore_index=np.int64(255)) == class_ious(gt, gt[None] == 1, ignore_index=255)


@pytest.mark.parametrize(
    "dtype, ignore_index", [(torch.uint8, -1), (torch.uint8, 511), (torch.int8, 200), (torch.int8, -200), (torch.int16, 70000)]
)
def test_ignore_index_outside_the_label_dtype_ignores_nothing(dtype, ignore_index):
    """An ignore_index the labels' dtype cannot hold ignores no class, not the one it wraps onto."""
    wrapped = int(torch.tensor(ignore_index).to(dtype))  # e.g. uint8: -1 -> 255, 511 -> 255
    gt = torch.tensor([[0, 1], [wrapped, 1]], dtype=dtype)
    pred = torch.ones(1, 2, 2, dtype=torch.bool)
    assert class_ious(gt, pred, ignore_index=ignore_index) == {0: 0.25, 1: 0.5, wrapped: 0.25}


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1, 10**30])
def test_ignore_index_beyond_int64_ignores_nothing(ignore_index):
    """An ignore_index no int64 holds failed with 'OverflowError: int too big to convert'."""
    gt = torch.tensor([[0, 1], [255, 1]])
    pred = torch.ones(1, 2, 2, dtype=torch.bool)
    assert class_ious(gt, pred, ignore_index=ignore_index) == class_ious(gt, pred, ignore_index=None)


def test_average_class_iou_passes_ignore_index_on():
    gt = torch.tensor([[0, 0], [255, 1]])
    pred = torch.stack([gt == 0, gt == 1])  # class 255 is predicted by no mask
    per_class = class_ious(gt, pred, ignore_index=None)
    assert average_class_iou(gt, pred, ignore_index=None) == pytest.approx(sum(per_class.values()) / 3)
    assert average_class_iou(gt, pred, ignore_index=None) < 1.0
    assert average_class_iou(gt, pred) == 1.0  # the default ignores label 255


def test_float_masks_count_above_one_half_and_nan_is_refused():
    assert iou(torch.full((2, 2), 0.5), torch.zeros(2, 2, dtype=torch.bool)) == 1.0  # both empty
    assert iou(torch.full((2, 2), 0.51), torch.ones(2, 2, dtype=torch.bool)) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        iou(torch.full((2, 2), float("nan")), torch.zeros(2, 2, dtype=torch.bool))


def test_top_n_ties_go_to_the_first_reference_mask():
    M = 25  # more than a handful: an unstable sort reorders ties
    ref = torch.zeros(M, 5, 5, dtype=torch.bool)
    for i in range(M):
        ref[i].view(-1)[i] = True
    for j in range(M):
        assert top_n(ref, ref[j : j + 1], 1) == (1.0 if j == 0 else 0.0)


def test_pairwise_iou_of_masks_beyond_float32_counts_is_exact():
    """Above 2**24 pixels float32 sums of 0/1 products stop being exact: counted in float64 there."""
    side = 4200  # 17.6 M pixels
    a = torch.ones(1, side, side, dtype=torch.bool)
    b = a.clone()
    b[0, :, 0] = False  # one column short
    got = float(pairwise_iou(a, b)[0, 0])
    assert got == (side * side - side) / (side * side)


@pytest.mark.parametrize("metric", [best_match_iou, lambda reference, predicted: top_n(reference, predicted, 2)])
@pytest.mark.parametrize(
    "predicted, match",
    [
        (LEFT, r"^predicted must have shape \[M, H, W\]"),  # one mask without its M axis
        (torch.zeros(1, 8, 9, dtype=torch.bool), r"^reference and predicted must share \(H, W\)"),
        (torch.full((1, 8, 8), float("nan")), "^predicted contains NaN"),
    ],
)
def test_best_match_and_top_n_name_their_own_arguments(metric, predicted, match):
    """Errors about the masks compared name the metric's arguments, not pairwise_iou's A and B."""
    with pytest.raises(ValueError, match=match):
        metric(torch.stack([LEFT, TOP]), predicted)
