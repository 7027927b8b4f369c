"""The paper's mask metrics: IoU (eq. 3), best-match IoU, Top-n (eq. 4), average class IoU (section 5).

Masks are bool tensors; float masks count as True above 0.5, integer masks where non-zero.
Two empty masks have IoU 1.0 (they agree perfectly), one empty against a non-empty one 0.0.
Inputs on different devices are compared on the device of the first (the reference).
"""

from __future__ import annotations

import torch

from .values import is_int


def _as_bool(x, name: str, dims: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception:
            raise ValueError(f"{name} must be a tensor of masks, got {type(x).__name__}") from None
    if x.dim() != dims:
        want = "[H, W]" if dims == 2 else "[M, H, W]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.is_meta:
        raise ValueError(f"{name} is on the meta device: it holds no values")
    if x.dtype == torch.bool:
        return x
    if x.is_floating_point():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf")
        return x > 0.5
    if x.is_complex():
        raise ValueError(f"{name} must be bool, integer or float masks, got {x.dtype}")
    return x != 0


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Eq. 3: |a and b| / |a or b| of two [H, W] masks; both empty -> 1.0."""
    a = _as_bool(a, "a", 2)
    b = _as_bool(b, "b", 2).to(a.device)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    union = int((a | b).sum())
    if union == 0:
        return 1.0
    return int((a & b).sum()) / union


def pairwise_iou(A: torch.Tensor, B: torch.Tensor, names: tuple[str, str] = ("A", "B")) -> torch.Tensor:
    """[M, H, W], [N, H, W] -> [M, N] float64 IoU of every pair (two empty masks -> 1.0).

    names: what the errors call A and B (a caller passes the names of its own arguments)."""
    A = _as_bool(A, names[0], 3)
    B = _as_bool(B, names[1], 3).to(A.device)
    if A.shape[1:] != B.shape[1:]:
        raise ValueError(
            f"{names[0]} and {names[1]} must share (H, W), got {tuple(A.shape[1:])} and {tuple(B.shape[1:])}"
        )
    M, H, W = A.shape
    N = B.shape[0]
    # 0/1 products summed: exact in float32 below 2**24 pixels, else count in float64
    count = torch.float32 if H * W < 2**24 else torch.float64
    a = A.reshape(M, H * W).to(count)  # [M, HW]
    b = B.reshape(N, H * W).to(count)  # [N, HW]
    inter = (a @ b.T).to(torch.float64)  # [M, N] intersection counts
    union = a.sum(1, dtype=torch.float64)[:, None] + b.sum(1, dtype=torch.float64)[None, :] - inter  # [M, N]
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.ones_like(union))


def _best_per_reference(reference: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """[M] best IoU of each reference mask over the predicted masks (0 when there are none); errors
    name the two ``reference`` and ``predicted``, the arguments of the metrics that call this."""
    scores = pairwise_iou(reference, predicted, ("reference", "predicted"))  # [M, N]
    if scores.shape[1] == 0:
        return torch.zeros(scores.shape[0], dtype=torch.float64, device=scores.device)
    return scores.amax(dim=1)


def best_match_iou(reference: torch.Tensor, predicted: torch.Tensor) -> float:
    """Mean over reference masks [M, H, W] of the best IoU with any predicted mask [N, H, W]."""
    reference = _as_bool(reference, "reference", 3)
    if reference.shape[0] == 0:
        raise ValueError("reference must hold at least one mask, got 0")
    return float(_best_per_reference(reference, predicted).mean())


def top_n(reference: torch.Tensor, predicted: torch.Tensor, n: int) -> float:
    """Eq. 4: mean best IoU of the n largest reference masks [M, H, W] with predicted [N, H, W] (all M if M < n).

    Reference masks of equal area keep their given order.
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    n = int(n)
    reference = _as_bool(reference, "reference", 3)
    if reference.shape[0] == 0:
        raise ValueError("reference must hold at least one mask, got 0")
    area = reference.flatten(1).sum(1)  # [M]
    order = torch.sort(area, descending=True, stable=True).indices[:n]  # [min(n, M)]
    return float(_best_per_reference(reference[order], predicted).mean())


def class_ious(gt_labels: torch.Tensor, predicted: torch.Tensor, ignore_index: int | None = 255) -> dict[int, float]:
    """{class: best IoU of any predicted mask with that class's region} for each class in gt_labels [H, W].

    Pixels labelled ``ignore_index`` are left out of every IoU (they count for neither mask).
    """
    if not isinstance(gt_labels, torch.Tensor) or gt_labels.dim() != 2:
        shape = tuple(gt_labels.shape) if isinstance(gt_labels, torch.Tensor) else type(gt_labels).__name__
        raise ValueError(f"gt_labels must be an integer tensor [H, W], got {shape}")
    if gt_labels.is_floating_point() or gt_labels.is_complex() or gt_labels.dtype == torch.bool:
        raise ValueError(f"gt_labels must hold integer class ids, got {gt_labels.dtype}")
    if gt_labels.is_meta:
        raise ValueError("gt_labels is on the meta device: it holds no values")
    predicted = _as_bool(predicted, "predicted", 3).to(gt_labels.device)
    if predicted.shape[1:] != gt_labels.shape:
        raise ValueError(
            f"predicted masks {tuple(predicted.shape[1:])} and gt_labels {tuple(gt_labels.shape)} must have the same (H, W)"
        )
    if ignore_index is not None and not is_int(ignore_index):
        raise ValueError(f"ignore_index must be an int class id or None, got {ignore_index!r}")
    # int64: an ignore_index outside a small label dtype's range must not wrap around onto a class; one
    # outside int64's range is no label at all (and no int64 to compare with)
    ignored = None if ignore_index is None or not -(2**63) <= ignore_index < 2**63 else int(ignore_index)
    valid = torch.ones_like(gt_labels, dtype=torch.bool) if ignored is None else gt_labels.long() != ignored  # [H, W]
    classes = torch.unique(gt_labels[valid]).tolist()
    if not classes:
        return {}
    gt = torch.stack([(gt_labels == c) for c in classes])  # [K, H, W]
    best = _best_per_reference(gt, predicted & valid)  # [K]
    return {int(c): float(v) for c, v in zip(classes, best)}


def average_class_iou(gt_labels: torch.Tensor, predicted: torch.Tensor, ignore_index: int | None = 255) -> float:
    """Section 5: mean over the classes present in gt_labels [H, W] of the best IoU of a predicted mask."""
    per_class = class_ious(gt_labels, predicted, ignore_index)
    if not per_class:
        raise ValueError(f"gt_labels has no class other than ignore_index={ignore_index}")
    return sum(per_class.values()) / len(per_class)
