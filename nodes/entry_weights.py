"""How much each conditioning entry of a branch counts in ComfyUI's prediction, for the recorder.

With several entries in one branch (ConditioningCombine, ConditioningSetMask, ConditioningSetAreaStrength,
ConditioningSetTimestepRange), ComfyUI runs the model once per entry and mixes the predictions per
latent cell: sum_j mult_j * pred_j / sum_j mult_j, with mult_j = strength_j * mask_j * mask_strength_j
(1 where no mask) over the entries active at the step's sigma. The recorder mixes each entry's
head outputs with the same shares, pooled (averaged) over the latent cells each token of a coarser
grid covers. Entries limited to an area are not recorded (their calls run on a crop) and do not count.

Plain torch on ComfyUI's condition dicts (keys 'uuid', 'strength', 'mask', 'mask_strength', 'area',
'timestep_start', 'timestep_end', as ComfyUI's samplers read them); nothing here imports ComfyUI.
"""

from __future__ import annotations

import torch


def _active(entry: dict, sigma: float) -> bool:
    """Whether ComfyUI runs ``entry`` at ``sigma`` (its timestep range holds it)."""
    start, end = entry.get("timestep_start"), entry.get("timestep_end")
    return not ((start is not None and sigma > start) or (end is not None and sigma < end))


def _covers_latent(entry: dict, H: int, W: int) -> bool:
    """Whether the entry's calls run on the whole [H, W] latent (no area, or an area equal to it)."""
    area = entry.get("area")
    if area is None:
        return True
    try:
        h, w, y, x = (int(v) for v in area[:4])
    except (TypeError, ValueError):  # a form this module does not know: treat it as a crop
        return False
    return (h, w, y, x) == (H, W, 0, 0) or (min(h, H), min(w, W), y, x) == (H, W, 0, 0)


def _mask_of(entry: dict, B: int, H: int, W: int) -> torch.Tensor:
    """[B, H, W] float32: the entry's mask times its mask_strength, batch as ComfyUI repeats it."""
    mask = entry["mask"]
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or 0 in mask.shape:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"a conditioning mask of shape {shape} (expected [H, W] or [B, H, W])")
    mask = mask.detach().to(torch.float32)
    if mask.dim() == 2:
        mask = mask.unsqueeze(0)  # [1, H', W']
    if tuple(mask.shape[-2:]) != (H, W):  # normally resized to the latent when sampling starts
        mask = torch.nn.functional.interpolate(mask.unsqueeze(1), size=(H, W), mode="bilinear").squeeze(1)
    mask = mask[:B]  # [Bm, H, W]
    mask = mask.repeat(-(-B // mask.shape[0]), 1, 1)[:B]  # [B, H, W]
    return mask * float(entry.get("mask_strength", 1.0))


class EntryShares:
    """Shares of the recorded branch's entries at one model evaluation: share(uuid, (h, w)) is a float
    or [B, h, w] float32, and the shares of all entries sum to 1 at every token of a grid."""

    def __init__(self, shares: dict):
        self._shares = shares  # uuid -> float, or [B, H, W] float32 on the latent grid
        self._pooled: dict = {}  # (uuid, h, w, device) -> [B, h, w]

    def __contains__(self, uuid) -> bool:
        return uuid in self._shares

    def __len__(self) -> int:
        return len(self._shares)

    def share(self, uuid, grid: tuple[int, int], device) -> float | torch.Tensor:
        """float, or [B, h, w] float32 on ``device``: the share of entry ``uuid`` at each token of ``grid``."""
        s = self._shares[uuid]
        if not isinstance(s, torch.Tensor):
            return s
        h, w = grid
        key = (uuid, h, w, str(device))
        if key not in self._pooled:
            # each token of an h x w grid covers the latent cells of its ceil-halved block: their mean share
            pooled = torch.nn.functional.adaptive_avg_pool2d(s.unsqueeze(1), (h, w)).squeeze(1)  # [B, h, w]
            self._pooled[key] = pooled.to(device)
        return self._pooled[key]


def entry_shares(entries, latent_shape, sigma: float) -> EntryShares | None:
    """ComfyUI condition dicts of one branch, latent [B, C, H, W], sigma -> EntryShares of the entries
    active at sigma that run on the whole latent, or None when none does (nothing to record).
    ValueError for a mask of a form ComfyUI's SD samplers do not make (the caller counts entries alike)."""
    B, H, W = int(latent_shape[0]), int(latent_shape[-2]), int(latent_shape[-1])
    mults = {}
    for entry in entries or ():
        if not isinstance(entry, dict) or "uuid" not in entry:
            continue
        if not _active(entry, sigma) or not _covers_latent(entry, H, W):
            continue
        strength = float(entry.get("strength", 1.0))
        mults[entry["uuid"]] = strength * _mask_of(entry, B, H, W) if entry.get("mask") is not None else strength
    if not mults:
        return None
    n = len(mults)
    if not any(isinstance(m, torch.Tensor) for m in mults.values()):
        total = sum(mults.values())
        if total > 0:
            return EntryShares({u: m / total for u, m in mults.items()})
        return EntryShares({u: 1.0 / n for u in mults})  # ComfyUI's prediction is 0 there: count alike
    device = next(m.device for m in mults.values() if isinstance(m, torch.Tensor))
    full = {u: m if isinstance(m, torch.Tensor) else torch.full((B, H, W), m, device=device) for u, m in mults.items()}
    total = sum(full.values())  # [B, H, W]
    covered = total > 0  # cells no entry weighs: count every entry alike there
    safe = torch.where(covered, total, torch.ones_like(total))
    return EntryShares({u: torch.where(covered, m / safe, torch.full_like(m, 1.0 / n)) for u, m in full.items()})
