"""Masks from cluster label maps: labels [H, W] -> masks [k, H, W]; merge near-duplicates; masks at a pixel.

A MaskSet holds the masks of ONE image, with the cluster count k and the cluster index that made
each mask. sweep_to_masks stacks the clusters of every k of a sweep (k ascending, then cluster),
merge_masks folds masks whose IoU reaches a threshold into the first of them (paper section 4.1;
merge_sweep does the same for a sweep, counting overlaps from its label maps),
masks_at_pixel lists the masks under a pixel from finest to coarsest (paper figure 1), optionally
only those that also contain, or do not contain, more pixels (parse_points reads them from text).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .kmeans import ClusterSweep
from .values import DIGITS_BEYOND, ascii_int, check_batch_index, integer_index, is_int, is_real

# Pixels per chunk when counting intersections of masks.
_CHUNK_PIXELS = 1 << 16
# Mask Merge counts the overlaps of the clusters of every pair of k over the distinct tuples of labels of
# the pixels (one label per k) from this many k on (below it, e.g. the default five, both take about the same
# time), when there are at most N / _FEW_TUPLES tuples and their labels take at most _TUPLE_BYTES_PER_PIXEL
# bytes per pixel; else over the pixels (_label_intersections).
_TUPLES_FROM_G = 6
_FEW_TUPLES = 8
_TUPLE_BYTES_PER_PIXEL = 2
# labels_to_masks refuses to build more than this many bytes of bool masks.
_MAX_MASK_BYTES = 4 << 30
# The dtypes a label map may have (Multi K-Means makes uint8 ones).
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass
class MaskSet:
    """Masks of one image: masks [M, H, W] bool, k [M] and cluster [M] int64 (which k-means made each)."""

    masks: torch.Tensor  # [M, H, W] bool
    k: torch.Tensor  # [M] int64: cluster count that produced each mask
    cluster: torch.Tensor  # [M] int64: cluster index within that k

    @property
    def area(self) -> torch.Tensor:
        """[M] int64 pixel count of each mask."""
        M, H, W = self.masks.shape
        flat = self.masks.reshape(M, H * W).view(torch.uint8)  # [M, H*W]
        area = torch.empty(M, dtype=torch.int64, device=flat.device)
        step = max(1, _CHUNK_PIXELS * 16 // max(1, H * W))  # masks per chunk: the int32 sum's copy stays small
        for i in range(0, M, step):
            area[i : i + step] = flat[i : i + step].sum(1, dtype=torch.int32)
        return area

    @property
    def size(self) -> tuple[int, int]:
        return (int(self.masks.shape[1]), int(self.masks.shape[2]))

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    def subset(self, index: torch.Tensor) -> MaskSet:
        """MaskSet of the masks at ``index`` [M'] (int64 positions), in that order."""
        return MaskSet(self.masks[index], self.k[index], self.cluster[index])


def _check_maskset(ms) -> MaskSet:
    if not isinstance(ms, MaskSet):
        raise TypeError(f"ms must be a MaskSet, got {type(ms).__name__}")
    for name in ("masks", "k", "cluster"):
        if not isinstance(getattr(ms, name), torch.Tensor):
            raise ValueError(f"ms.{name} must be a torch.Tensor, got {type(getattr(ms, name)).__name__}")
    if ms.masks.dim() != 3 or ms.masks.dtype != torch.bool:
        raise ValueError(f"ms.masks must be a bool tensor [M, H, W], got {ms.masks.dtype} {tuple(ms.masks.shape)}")
    if ms.masks.is_meta:
        raise ValueError("ms.masks is on the meta device: it holds no values")
    M = ms.masks.shape[0]
    if tuple(ms.k.shape) != (M,) or tuple(ms.cluster.shape) != (M,):
        raise ValueError(f"ms.k and ms.cluster must have shape [{M}], got {tuple(ms.k.shape)} and {tuple(ms.cluster.shape)}")
    return ms


def check_label_map(labels, k, dims: str) -> int:
    """Checks ``labels`` is an integer tensor of the named ``dims`` (e.g. "H, W") with every label in
    0..k-1 -> int(k); ValueError naming ``labels`` or ``k`` otherwise."""
    if not isinstance(labels, torch.Tensor) or labels.dim() != len(dims.split(",")):
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer tensor [{dims}], got {shape}")
    if labels.dtype not in _LABEL_DTYPES:  # floats, bools; uint16 .. uint64 have no min / max kernels
        raise ValueError(f"labels must be an integer tensor [{dims}] of uint8, int8, int16, int32 or int64, got {labels.dtype}")
    if labels.is_meta:
        raise ValueError("labels is on the meta device: it holds no values")
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    k = int(k)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"labels must lie in 0..{k - 1} for k={k}, got {int(labels.min())}..{int(labels.max())}")
    return k


def labels_to_masks(labels: torch.Tensor, k: int) -> torch.Tensor:
    """[H, W] integer labels in 0..k-1 -> [k, H, W] bool masks (mask j = pixels labelled j)."""
    k = check_label_map(labels, k, "H, W")
    if k * labels.numel() > _MAX_MASK_BYTES:
        raise ValueError(
            f"k = {k} masks of {labels.shape[0]}x{labels.shape[1]} would take {k * labels.numel() / 2**30:.1f} GiB "
            f"(at most {_MAX_MASK_BYTES / 2**30:.0f} GiB): use fewer clusters or a smaller image"
        )
    return labels[None] == torch.arange(k, device=labels.device)[:, None, None]  # [k, H, W]


def _check_sweep(sweep, batch_index) -> None:
    """ValueError (TypeError for a non-sweep) unless ``sweep`` holds label maps of one shape [B, H, W]
    and ``batch_index`` is an image of it."""
    if not isinstance(sweep, ClusterSweep):
        raise TypeError(f"sweep must be a ClusterSweep, got {type(sweep).__name__}")
    if not sweep.results:
        raise ValueError("sweep holds no cluster count: expected results for at least one k")
    for k, r in sweep.results.items():
        labels = getattr(r, "labels", None)
        if not isinstance(labels, torch.Tensor):
            raise ValueError(f"sweep: the labels of k = {k!r} must be a tensor [B, H, W], got {type(labels).__name__}")
    shapes = {tuple(r.labels.shape) for r in sweep.results.values()}
    if len(shapes) > 1:
        raise ValueError(f"sweep: the label maps of all k must have one shape [B, H, W], got {sorted(shapes)}")
    check_batch_index(batch_index, sweep.batch_size)


def sweep_to_masks(sweep: ClusterSweep, batch_index: int) -> MaskSet:
    """Sweep labels [B, H, W] per k -> MaskSet [M = sum of k, H, W] of image ``batch_index``: every cluster of
    every k, k ascending, then cluster."""
    _check_sweep(sweep, batch_index)
    masks, ks, clusters = [], [], []
    for k in sorted(sweep.results):
        masks.append(labels_to_masks(sweep.results[k].labels[batch_index], k))  # [k, H, W]
        device = sweep.results[k].labels.device
        ks.append(torch.full((k,), k, dtype=torch.int64, device=device))
        clusters.append(torch.arange(k, dtype=torch.int64, device=device))
    return MaskSet(torch.cat(masks), torch.cat(ks), torch.cat(clusters))


def _intersections(masks: torch.Tensor) -> torch.Tensor:
    """[M, H, W] bool -> [M, M] int64 pixel counts of every pairwise intersection (chunks of pixels)."""
    M, H, W = masks.shape
    flat = masks.reshape(M, H * W)  # [M, HW]
    # 0/1 products summed in float32 are exact below 2**24 per chunk
    out = torch.zeros(M, M, dtype=torch.float64, device=masks.device)
    for p0 in range(0, flat.shape[1], _CHUNK_PIXELS):
        part = flat[:, p0 : p0 + _CHUNK_PIXELS].to(torch.float32)  # [M, P]
        out += (part @ part.t()).double()  # [M, M]
    return out.round().long()


def _label_tuples(labels: list[torch.Tensor], ks: list[int], ids: torch.Tensor):
    """The distinct tuples of labels (one label per k) of the N pixels of G >= 2 label maps -> (tuples
    G x [U] in the maps' dtype: each tuple's label at each k; count [U] int64: its pixels), or None as soon
    as there are more than N / _FEW_TUPLES of them, or their labels would take more than
    _TUPLE_BYTES_PER_PIXEL * N bytes, or a step more than N / 2 slots (below; 8 bytes each).

    Refined one k at a time, largest k first (the slots of the last, most refined steps are then those of
    the smallest k), with no sort: a pixel's tuple id so far times k_j plus its label at k_j is one of
    U * k_j slots; the slots in use (a bincount), numbered in order (a cumulative sum), are the new ids.
    ids [N] int32 is the working buffer (each pixel's tuple id, then slot), left holding anything."""
    N, G = ids.numel(), len(ks)
    most = min(N // _FEW_TUPLES, _TUPLE_BYTES_PER_PIXEL * N // (G * labels[0].element_size()))
    order = sorted(range(G), key=lambda j: -ks[j])  # largest k first
    ids.copy_(labels[order[0]])
    U = ks[order[0]]
    for n, j in enumerate(order[1:], start=2):
        k = ks[j]
        if U * k > N // 2:  # the slots' int64 counts: at most 4 bytes per pixel, as ids
            return None
        ids.mul_(k).add_(labels[j])  # [N] slot < U * k <= N / 2: int32
        count = torch.bincount(ids, minlength=U * k)  # [U * k] pixels per slot
        used = count.nonzero().flatten()  # [U] the slots in use, ascending
        U = used.numel()
        if U > most:
            return None
        if n < G:  # ids <- the new id of each pixel's slot, a chunk at a time (no second [N] buffer)
            count.clamp_(max=1).cumsum_(0)  # [U * k] slot in use -> its new id + 1
            for p in range(0, N, _CHUNK_PIXELS):
                ids[p : p + _CHUNK_PIXELS] = torch.index_select(count, 0, ids[p : p + _CHUNK_PIXELS]).sub_(1)
    slots, count = count.numel(), count[used]  # [U] pixels per tuple
    # a pixel of each last slot in use (any one: its labels are the tuple's) gives the tuple's labels
    pixel = torch.empty(slots, dtype=torch.int64, device=ids.device)  # [U * k] by slot
    for p in range(0, N, _CHUNK_PIXELS):
        chunk = ids[p : p + _CHUNK_PIXELS].to(torch.int64)
        pixel.scatter_(0, chunk, torch.arange(p, p + chunk.numel(), device=ids.device))
    pixel = pixel[used]  # [U]
    return [label[pixel] for label in labels], count


def _label_intersections(sweep: ClusterSweep, batch_index: int) -> torch.Tensor:
    """[M, M] int64 pairwise intersections of the masks of sweep_to_masks(sweep, batch_index), counted
    from the label maps: one contingency table per pair of cluster counts, no mask products.

    The tables are counted over the distinct tuples of labels of the pixels (_label_tuples: each pixel's
    cluster at every k, with its pixel count), read once per k; only when there are too many of them
    (labels at random), over the pixels, one bincount of all of them per pair. The same counts either way."""
    ks = sorted(sweep.results)
    labels = [sweep.results[k].labels[batch_index].reshape(-1) for k in ks]  # G x [N], as stored (uint8 from Multi K-Means)
    starts = [0]
    for k in ks:
        starts.append(starts[-1] + k)
    out = torch.zeros(starts[-1], starts[-1], dtype=torch.int64, device=labels[0].device)  # [M, M]
    for a, (ka, la) in enumerate(zip(ks, labels)):
        sa = slice(starts[a], starts[a + 1])
        out[sa, sa] = torch.diag(torch.bincount(la, minlength=ka))  # clusters of one k are disjoint
    # la * kb + lb < MAX_CLUSTERS**2 fits int32: one [N] int32 buffer, for the tuples' ids or for every
    # pair's codes, not an int64 copy of every k's label map and two int64 temporaries per pair
    buf = torch.empty(labels[0].shape, dtype=torch.int32, device=labels[0].device)  # [N]
    tuples = _label_tuples(labels, ks, buf) if len(ks) >= _TUPLES_FROM_G and buf.numel() < 2**31 else None
    count = None  # [U] pixels of each tuple, when the tables are counted over the tuples
    if tuples is not None:  # one code per tuple, counted with its pixels
        labels, count = tuples  # G x [U], [U]
        del buf
    for a in range(len(ks)):
        ka, sa = ks[a], slice(starts[a], starts[a + 1])
        for b in range(a + 1, len(ks)):
            kb, sb = ks[b], slice(starts[b], starts[b + 1])
            if count is None:
                buf.copy_(labels[a]).mul_(kb).add_(labels[b])  # [N] int32
                table = torch.bincount(buf, minlength=ka * kb)  # [ka * kb]
            else:
                code = labels[a].to(torch.int64) * kb + labels[b]  # [U] int64 (not in place: int64 maps give int64 tuples)
                table = torch.zeros(ka * kb, dtype=torch.int64, device=count.device).index_add_(0, code, count)
            table = table.view(ka, kb)  # [ka, kb]
            out[sa, sb] = table
            out[sb, sa] = table.t()  # [kb, ka]
    return out


def check_merge_options(iou_threshold, min_area) -> None:
    """iou_threshold in (0, 1] and min_area in [0, 1], or a ValueError naming the one that is not."""
    if not is_real(iou_threshold) or not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be a number in (0, 1], got {iou_threshold!r}")
    if not is_real(min_area) or not 0.0 <= min_area <= 1.0:
        raise ValueError(f"min_area must be a fraction of the image in [0, 1], got {min_area!r}")


def _kept(inter: torch.Tensor, size: tuple[int, int], iou_threshold: float, min_area: float) -> torch.Tensor:
    """The greedy merge of merge_masks, given the [M, M] intersections of M masks of an image of
    ``size`` -> [M'] int64 positions (on the CPU) of the masks kept, in stored order."""
    H, W = size
    inter = inter.cpu()  # [M, M]: the greedy loop reads it entry by entry
    area = inter.diagonal()  # [M]
    need = max(1, math.ceil(min_area * H * W * (1 - 1e-12)))  # 0.54 * 3840**2 rounds above the count it means
    big = (area >= need).nonzero().flatten()  # [M'] stable order
    if big.numel() == 0:
        return big
    inter = inter[big][:, big]  # [M', M']
    a = area[big]  # [M']
    union = a[:, None] + a[None, :] - inter  # [M', M'] > 0 (no empty masks)
    iou = inter.double() / union.double()  # [M', M']
    kept: list[int] = []
    for i in range(big.numel()):
        if not kept or not bool((iou[i, kept] >= iou_threshold).any()):
            kept.append(i)
    return big[torch.tensor(kept, dtype=torch.int64, device="cpu")]


def merge_masks(ms: MaskSet, iou_threshold: float = 0.9, min_area: float = 0.0) -> MaskSet:
    """MaskSet [M, H, W] -> MaskSet [M' <= M, H, W]: drops empty masks and masks smaller than min_area
    (fraction of the image, 0..1), then merges.

    Greedy in the given (stable) order: a mask joins the first kept mask whose IoU with it is
    >= iou_threshold (the kept mask stays the representative, unchanged), else it is kept. Kept
    masks are pairwise below the threshold, so merging again changes nothing (idempotent).
    """
    _check_maskset(ms)
    check_merge_options(iou_threshold, min_area)
    return ms.subset(_kept(_intersections(ms.masks), ms.size, iou_threshold, min_area))


def merge_sweep_bytes(cluster_counts, size: tuple[int, int]) -> int:
    """Upper bound of merge_sweep's peak memory for one image, in bytes: a bool mask per cluster (where none
    merge or is dropped), the overlap counting's per-pixel buffers (an int32 code per pixel, plus the slots
    and tuples of _label_tuples: at most about 12 bytes per pixel in all) and the greedy merge's [M, M]
    tables of the M clusters (intersections, unions, IoU: 48 bytes per pair at most)."""
    H, W = size
    M = sum(int(k) for k in cluster_counts)
    return (M + 12) * H * W + 48 * M * M


def merge_sweep(sweep: ClusterSweep, batch_index: int, iou_threshold: float = 0.9, min_area: float = 0.0) -> MaskSet:
    """merge_masks(sweep_to_masks(sweep, batch_index), ...), with the intersections counted from the
    label maps (contingency tables) instead of mask products: the same result, several times faster.
    Only the masks kept are built (the label maps say which pixels each holds): memory for them alone,
    not for one mask per cluster of every k."""
    check_merge_options(iou_threshold, min_area)
    _check_sweep(sweep, batch_index)
    ks = sorted(sweep.results)
    for k in ks:
        check_label_map(sweep.results[k].labels[batch_index], k, "H, W")
    kept = _kept(_label_intersections(sweep, batch_index), sweep.results[ks[0]].labels.shape[1:], iou_threshold, min_area)
    # on the CPU, like the positions kept: they pick the masks to build
    all_k = torch.cat([torch.full((k,), k, dtype=torch.int64, device="cpu") for k in ks])  # [M] k of each mask
    all_cluster = torch.cat([torch.arange(k, dtype=torch.int64, device="cpu") for k in ks])  # [M]
    k_kept, cluster_kept = all_k[kept], all_cluster[kept]  # [M'] each, in stored order
    labels0 = sweep.results[ks[0]].labels[batch_index]  # [H, W]
    device = labels0.device
    masks = torch.empty(kept.numel(), *labels0.shape, dtype=torch.bool, device=device)  # [M', H, W]
    for k in ks:
        rows = (k_kept == k).nonzero().flatten()  # positions of this k's kept masks, ascending
        if rows.numel():
            labels = sweep.results[k].labels[batch_index]  # [H, W]
            wanted = cluster_kept[rows].to(device)  # [m]
            torch.eq(labels[None], wanted[:, None, None], out=masks[rows[0] : rows[-1] + 1])  # [m, H, W]: contiguous rows
    return MaskSet(masks, k_kept.to(device), cluster_kept.to(device))


def _pixel_index(v, n: int, name: str, what: str, side: str) -> int:
    i = integer_index(v)
    if i is None or not 0 <= i < n:
        raise ValueError(f"{name} must be {what} in [0, {n - 1}] (image {side} {n}), got {v!r}")
    return i


def masks_at_pixel(ms: MaskSet, x: int, y: int, include=(), exclude=()) -> MaskSet:
    """MaskSet [M, H, W] -> MaskSet [M' <= M, H, W]: all masks containing pixel (x = column, y = row),
    finest (smallest area) first; ties keep order.

    include / exclude: more (x, y) pixels that every mask returned must contain / must not contain, e.g.
    a click on each eye gives the masks of both eyes, and one on the other cat keeps the masks of this one.
    """
    _check_maskset(ms)
    H, W = ms.size
    x = _pixel_index(x, W, "x", "a column index", "width")
    y = _pixel_index(y, H, "y", "a row index", "height")
    keep = ms.masks[:, y, x].clone()  # [M] bool: the masks with the pixel
    for pixels, wanted, name in ((include, True, "include"), (exclude, False, "exclude")):
        if isinstance(pixels, str) or not isinstance(pixels, Iterable):
            raise ValueError(f"{name} must be a list of (x, y) pixels, got {pixels!r}")
        for i, point in enumerate(pixels):
            if not isinstance(point, (tuple, list)) or len(point) != 2:
                raise ValueError(f"{name}[{i}] must be an (x, y) pair, got {point!r}")
            px = _pixel_index(point[0], W, f"{name}[{i}] x", "a column index", "width")
            py = _pixel_index(point[1], H, f"{name}[{i}] y", "a row index", "height")
            keep &= ms.masks[:, py, px] == wanted  # [M]
    hit = ms.subset(keep.nonzero().flatten())  # the M' masks kept, stored order
    order = torch.argsort(hit.area, stable=True)  # [M'] smallest first
    return hit.subset(order)


# The grammar of more_points, shared with the picker (js/picker_pixels.js parsePoints): JavaScript's \s
# as the blanks and ASCII digits only, so that both read the same text the same way.
_BLANK_CHARS = "\t\n\v\f\r \u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000\ufeff"
_BLANK = re.escape(_BLANK_CHARS)  # as a character class
# An entry with its blanks at both ends stripped first (str.strip): blanks on both sides of an optional '-'
# in one expression ('[ ]*(-?)[ ]*') took time in the square of a run of blanks before a typo (12 s for
# 32 000 characters, the server's prompt check stalled meanwhile); each quantifier here meets a class it
# does not share, so a match takes time in proportion to the entry.
_POINT = re.compile(f"(-?)[{_BLANK}]*([0-9]+)[{_BLANK}]*,[{_BLANK}]*([0-9]+)")
# A coordinate of 10**9 or more is read as POINT_BEYOND (ascii_int): past any grid or picture, so moved to
# the last column or row as any such pixel (and no int() of thousands of digits).
POINT_BEYOND = DIGITS_BEYOND
# The most pixels more_points may list (the picker draws at most as many rings, js/picker_pixels.js MAX_POINTS):
# a few narrow the masks at a pixel; a text of hundreds of thousands (a damaged or crafted shared workflow)
# took seconds of the run per image and sent the browser as many pixels, one ring each, which froze its tab.
MAX_POINTS = 1024


# The most characters of an entry that is no pixel quoted in the error (pixels pasted with no ';' between them
# are one entry as long as the text: a message as long reached the browser's error dialog and the log).
_QUOTED_CHARS = 40


def _entry_quote(entry: str) -> str:
    """'12 40' -> "'12 40'"; an entry longer than _QUOTED_CHARS -> its start quoted, then its length."""
    if len(entry) <= _QUOTED_CHARS:
        return repr(entry)
    return f"{entry[:_QUOTED_CHARS]!r}... ({len(entry)} characters)"


def parse_points(text, name: str = "more_points") -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """"12,40; -300,200" -> (include [(12, 40)], exclude [(300, 200)]): 'x,y' pairs of pixels (ASCII digits)
    separated by ';' or new lines, a leading '-' marking a pixel the masks must not contain; "" -> ([], []);
    a coordinate of more than 9 digits is read as 10**9. ValueError naming ``name`` for anything else (the
    first entry that is no pixel, wherever it stands), then for more than MAX_POINTS pixels (blank entries do
    not count; the picker, js/picker_pixels.js, counts the same pixels)."""
    if not isinstance(text, str):
        raise ValueError(f"{name}: expected text such as '12,40; -300,200', got {type(text).__name__}")
    include, exclude = [], []
    entries = [e for e in (e.strip(_BLANK_CHARS) for e in text.replace("\n", ";").split(";")) if e]
    for n, entry in enumerate(entries, start=1):
        m = _POINT.fullmatch(entry)
        if m is None:
            raise ValueError(
                f"{name}: expected 'x,y' pixels (whole numbers >= 0) separated by ';', with a leading '-' for a "
                f"pixel the masks must not contain, e.g. '12,40; -300,200'; entry {n} is {_entry_quote(entry)}"
            )
        if n <= MAX_POINTS:  # past it, only read for a typo: more are refused below
            (exclude if m[1] else include).append((ascii_int(m[2]), ascii_int(m[3])))
    if len(entries) > MAX_POINTS:  # every entry is a pixel
        raise ValueError(
            f"{name}: expected at most {MAX_POINTS} 'x,y' pixels separated by ';', got {len(entries)} pixels: a few "
            f"pixels narrow the masks at (x, y), e.g. '12,40; -300,200'"
        )
    return include, exclude
