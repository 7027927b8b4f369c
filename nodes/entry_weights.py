"""How much each conditioning entry of a branch counts in ComfyUI's prediction, for the recorder.

With several entries in one branch (ConditioningCombine, ConditioningSetMask, ConditioningSetAreaStrength,
ConditioningSetTimestepRange, ConditioningSetDefaultCombine), ComfyUI runs the model once per
entry and mixes the predictions per latent cell: sum_j mult_j * pred_j / sum_j mult_j. Each
entry's mult (strength * mask * mask_strength, 1 where no mask, only while its timestep range is
active) is ComfyUI's own, from ``comfy.samplers.get_area_and_mult`` (the recorder asks it); a
"default" entry gets what the others leave, relu(1 - sum of their mults), and does not run where
that is 0 everywhere (``comfy.samplers.finalize_default_conds``).

The recorder mixes the entries' head outputs with the same shares: mult_j / sum over the recorded
entries, per latent cell (alike where none weighs), then averaged over the latent cells of each
token of a coarser grid: token i of level l stands for cells [i 2^l, (i + 1) 2^l), the ceil-halved
blocks of the UNet's stride-2 downsampling (approximately: its 3x3 convolutions also see the
neighbours). Entries limited to an area run on a crop, which is not
recorded: they take their area from a default entry but are left out of the shares.

Plain torch; nothing here imports ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class EntryMult:
    """One active entry of a branch at one model evaluation, as ComfyUI weighs it."""

    uuid: object
    mult: torch.Tensor | None  # [B, h', w'] on the entry's area (the whole latent without one); None: a default entry
    area: tuple | None  # (h', w', y, x) in latent cells, or None
    default: bool = False


def _token_means(cells: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, H, W] per latent cell -> [B, h, w]: the mean over each token's block of cells (its level's
    2^l x 2^l ceil-halved block; an adaptive average where (h, w) is no ceil-halving of (H, W))."""
    B, H, W = cells.shape
    h, w = grid
    level, (hh, ww) = 0, (H, W)
    while (hh, ww) != (h, w) and (hh > h or ww > w):
        hh, ww, level = math.ceil(hh / 2), math.ceil(ww / 2), level + 1
    if (hh, ww) != (h, w):
        return torch.nn.functional.adaptive_avg_pool2d(cells.unsqueeze(1), grid).squeeze(1)  # [B, h, w]
    f = 1 << level
    pad = (0, w * f - W, 0, h * f - H)  # zeros right and below: the last blocks hold fewer cells
    sums = torch.nn.functional.pad(cells, pad).reshape(B, h, f, w, f).sum((2, 4))  # [B, h, w]
    counts = torch.nn.functional.pad(torch.ones_like(cells[:1]), pad).reshape(1, h, f, w, f).sum((2, 4))  # [1, h, w]
    return sums / counts


class EntryShares:
    """Shares of the recorded branch's entries at one model evaluation: share(uuid, (h, w), device) is
    a float (the same at every token) or [B, h, w] float32; over all entries they sum to 1 at every token."""

    def __init__(self, shares: dict):
        self._shares = shares  # uuid -> float, or [B, H, W] float32 on the latent grid
        self._pooled: dict = {}  # (uuid, h, w, device) -> [B, h, w]

    def __contains__(self, uuid) -> bool:
        return uuid in self._shares

    def __len__(self) -> int:
        return len(self._shares)

    def share(self, uuid, grid: tuple[int, int], device) -> float | torch.Tensor:
        s = self._shares[uuid]
        if not isinstance(s, torch.Tensor):
            return s
        key = (uuid, *grid, str(device))
        if key not in self._pooled:
            self._pooled[key] = _token_means(s, grid).to(device)  # [B, h, w]
        return self._pooled[key]


def _covers(e: EntryMult, H: int, W: int) -> bool:
    return e.area is None or tuple(e.mult.shape[-2:] if e.mult is not None else e.area[:2]) == (H, W)


def entry_shares(entries: list[EntryMult], latent_shape) -> EntryShares | None:
    """The active entries of one branch at one evaluation, latent [B, C, H, W] -> EntryShares of the
    entries that run on the whole latent, or None when none does (nothing to record)."""
    B, H, W = int(latent_shape[0]), int(latent_shape[-2]), int(latent_shape[-1])
    mults = {}
    plain = [e for e in entries if not e.default]
    for e in plain:
        if e.mult.dim() != 3 or e.mult.shape[0] != B:
            raise ValueError(f"a conditioning weight of shape {tuple(e.mult.shape)} (expected [{B}, h, w])")
        if _covers(e, H, W):
            mults[e.uuid] = e.mult.to(torch.float32)  # [B, H, W]
    defaults = [e for e in entries if e.default and _covers(e, H, W)]
    if defaults:
        device = next((e.mult.device for e in plain), torch.device("cpu"))
        rest = torch.ones(B, H, W, device=device)  # what the other entries leave, each in its area
        for e in plain:
            h, w, y, x = (int(v) for v in e.area[:4]) if e.area is not None else (H, W, 0, 0)
            rest[:, y : y + h, x : x + w] -= e.mult.to(device=device, dtype=torch.float32)
        rest.clamp_(min=0.0)
        if float(rest.max()) > 0.0:  # else ComfyUI does not run them
            for e in defaults:
                mults[e.uuid] = rest
    if not mults:
        return None
    n = len(mults)
    if n == 1:
        return EntryShares({u: 1.0 for u in mults})  # the one entry, wherever it weighs or not
    bounds = torch.stack([torch.stack([m.amin(), m.amax()]) for m in mults.values()]).tolist()  # one sync
    if all(lo == hi for lo, hi in bounds):  # every weight the same at every cell
        total = sum(lo for lo, _ in bounds)
        return EntryShares({u: lo / total if total > 0 else 1.0 / n for u, (lo, _) in zip(mults, bounds)})
    total = sum(mults.values())  # [B, H, W]
    covered = total > 0  # cells no entry weighs: count every entry alike there (ComfyUI's prediction is 0)
    safe = torch.where(covered, total, torch.ones_like(total))
    return EntryShares({u: torch.where(covered, m / safe, torch.full_like(m, 1.0 / n)) for u, m in mults.items()})
