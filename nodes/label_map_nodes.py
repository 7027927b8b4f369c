"""Save Label Maps: Multi K-Means' clusters as index PNGs in the output folder, for segmentation datasets.

Per image of the batch, one 8-bit greyscale PNG per cluster count k whose pixel values are the
cluster indices 0 .. k-1 (0 = the largest cluster, as Multi K-Means orders them), named
``<prefix>_<counter>_k<k>.png``, and optionally the picture itself as ``<prefix>_<counter>_image.png``,
cropped to the label maps' pixels. Each PNG carries a ``headseg`` text entry (JSON) that says what it
holds and what sampled the heads (``recording``: a loaded recording's file and its own prompt), and ComfyUI's prompt (every node's inputs, so the seeds, layers and k a file came from); the
picture also carries ComfyUI's workflow, as Save Image's pictures do.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from . import types as hs
from .core import kmeans as core_kmeans
from .core import masks as core_masks
from .core import pixels as core_pixels
from .core.masks import check_label_map
from .core.numerics import all_finite
from .node_utils import CATEGORY, expect as _expect, image_batch, list_index
from .output_files import (
    PREFIX_RULES_TOOLTIP, comfy_metadata, output_error, output_place, prefix_error, writable_entries,
)
from .previews import on_png_threads

log = logging.getLogger("HeadSeg")

LABELS_FORMAT = "headseg-labels/1"
_EXAMPLE_PREFIX = "headseg/labels"


def _label_png(labels: torch.Tensor) -> Image.Image:
    """labels [H, W] integers in 0 .. 255 (_check_clusters checks every k's before the first file is
    written) -> an 8-bit greyscale PIL image of the same values."""
    pixels = labels.detach().to("cpu", torch.uint8).numpy()  # [H, W] uint8, values unchanged (< 256)
    return Image.fromarray(np.ascontiguousarray(pixels), mode="L")


def _check_clusters(clusters) -> None:
    """ValueError naming ``clusters`` unless every k's labels [B, H, W] (one shape, clusters.size) lie in
    0 .. k-1 with k <= 256: checked before the first file is written, so a bad k leaves no file behind."""
    if not clusters.results:
        raise ValueError("clusters: expected label maps of at least one k, got none")
    shapes = {tuple(r.labels.shape) for r in clusters.results.values()}
    B = clusters.batch_size
    if shapes != {(B, *clusters.size)}:
        raise ValueError(
            f"clusters: expected the label maps of every k as one shape [B, H, W] = [{B}, {clusters.size[0]}, "
            f"{clusters.size[1]}], got {sorted(shapes)}"
        )
    for k, result in clusters.results.items():
        try:
            if check_label_map(result.labels.flatten(0, 1), k, "B*H, W") > 256:  # [B*H, W]: every image
                raise ValueError(f"k must be at most 256 for an 8-bit label map, got {k}")
        except ValueError as exc:
            raise ValueError(f"clusters: {exc}") from exc


def _mask_entries(masks, clusters) -> list[list[list[int]]]:
    """Mask Merge's masks (list of MaskSet, one per image) -> per image its merged masks as [k, cluster] pairs, in
    their order; ValueError naming ``masks`` unless they are the merged masks of ``clusters``' images: one MaskSet
    per image, each mask exactly the pixels of the k label map whose value is that cluster (as Mask Merge builds
    them), so that the pairs rebuild the masks from the saved label maps."""
    B, (H, W) = clusters.batch_size, clusters.size
    expected = f"Mask Merge's masks of these clusters ({B} image(s) of {W}x{H} pixels): connect the Multi K-Means that feeds clusters to Mask Merge"
    if not isinstance(masks, (list, tuple)) or not all(isinstance(m, core_masks.MaskSet) for m in masks):
        raise ValueError(f"masks: expected {expected}, got {type(masks).__name__}")
    if len(masks) != B:
        raise ValueError(f"masks: expected {expected}, got the masks of {len(masks)} image(s)")
    entries = []
    for b, ms in enumerate(masks):
        pairs = list(zip(ms.k.tolist(), ms.cluster.tolist()))
        if ms.size != (H, W) or len(pairs) != len(ms):
            raise ValueError(f"masks: expected {expected}, got masks of {ms.size[1]}x{ms.size[0]} pixels for image {b}")
        if ms.masks.dtype != torch.bool:
            raise ValueError(f"masks: expected {expected}; the masks of image {b} are {str(ms.masks.dtype).removeprefix('torch.')}, not bool")
        j = _first_mask_not_its_cluster(ms, pairs, clusters, b)
        if j is not None:
            k, cluster = pairs[j]
            raise ValueError(
                f"masks: expected {expected}; mask {j} of image {b} is not cluster {cluster} of the k = {k} label map"
            )
        entries.append([[int(k), int(cluster)] for k, cluster in pairs])
    return entries


def _first_mask_not_its_cluster(ms, pairs: list[tuple[int, int]], clusters, b: int) -> int | None:
    """ms.masks [M, H, W] bool (compared as bytes) with its [(k, cluster)] pairs, image b of ``clusters`` -> the index of the first
    mask that is not exactly the pixels of the k label map [H, W] equal to its cluster (or whose k the clusters
    lack, or whose cluster is not in 0 .. k-1); None when every mask is. Every pixel of every mask is compared,
    in numpy and 8 pixels at a time: about a tenth of the time of a torch compare and torch.equal per mask
    (683 masks of four 1024x1024 images: 0.48 s against 5.1 s, tests/bench/bench_save_label_maps.py)."""
    H, W = ms.size
    rows = ms.masks.detach().to("cpu").contiguous().reshape(len(ms), H * W).numpy()  # [M, H*W] bool, no copy on the CPU
    labels = {
        k: result.labels[b].detach().to("cpu").contiguous().reshape(H * W).numpy() for k, result in clusters.results.items()
    }  # k -> [H*W] the k label map of image b
    cluster_pixels = np.empty(H * W, dtype=np.bool_)  # [H*W], one buffer for every mask
    for j, (k, cluster) in enumerate(pairs):
        if k not in labels or not 0 <= cluster < k:
            return j
        np.equal(labels[k], cluster, out=cluster_pixels)
        if not _same_bytes(rows[j], cluster_pixels):
            return j
    return None


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    """a, b [N] contiguous arrays of 1-byte items -> whether they hold the same bytes (compared 8 at a time)."""
    words = a.size - a.size % 8
    return bool((a[:words].view(np.uint64) == b[:words].view(np.uint64)).all() and (a[words:] == b[words:]).all())


def _fit_pictures(image, B: int, H: int, W: int) -> torch.Tensor:
    """The optional ``image`` input [B, h, w, C] -> [B, H, W, C'] pictures aligned with the label maps: the
    same size, or VAE Encode's centred crop of a picture whose sides only lack a multiple of 8; any other
    size or batch is refused (a stretched picture would not line up with its labels). C' = 4 keeps an
    alpha channel and C' = 3 otherwise (grey drawn as RGB); float16 / float32 / float64 keep their dtype,
    so that _picture_pixels rounds as Save Image does."""
    checked = image_batch(image)  # [b, h, w, 3] float32 on the CPU, NaN and inf drawn: refuses a non-IMAGE
    b, h, w = checked.shape[:3]
    if b != B:
        raise ValueError(
            f"image: expected {B} picture(s), one per image of the clusters, got a batch of {b}: connect the "
            "decoded image of the same sampler"
        )
    if not core_pixels.is_vae_window(h, w, H, W):
        # VAE Encode's crop leaves multiples of 8: label maps of other sides (a recording file's) take
        # pictures of their own size only
        crop = " (or up to 7 more per side, as VAE Encode crops them)" if H % 8 == 0 and W % 8 == 0 else ""
        raise ValueError(
            f"image: expected pictures of the label maps' {W}x{H} pixels{crop}, got {w}x{h}: connect the "
            "decoded image or the picture that was encoded, not one of another size"
        )
    pictures = checked  # [B, h, w, 3] float32
    if image.shape[-1] in (3, 4) and image.dtype in (torch.float16, torch.float32, torch.float64):
        pictures = image.to("cpu")  # [B, h, w, C]: only read, so no copy of a batch already on the CPU
        if not all_finite(pictures):
            pictures = torch.nan_to_num(pictures, nan=0.0, posinf=1.0, neginf=0.0)  # as drawn
    return core_pixels.vae_crop(pictures, H, W)  # [B, H, W, C'] (the same size, or a photo whose sides are not multiples of 8)


def _picture_pixels(picture: torch.Tensor) -> np.ndarray:
    """picture [H, W, C] floats in 0 .. 1 (C = 3 or 4) -> [H, W, C] uint8, by Save Image's own expression,
    so the saved picture has the bytes Save Image would give the same tensor (float16 rounds in float16)."""
    return np.clip(255.0 * picture.numpy(), 0, 255).astype(np.uint8)


def _batch_places(filename_prefix: str, B: int, W: int, H: int) -> list[tuple[str, str, int, str]]:
    """filename_prefix, B images -> [(folder, name, counter, subfolder)] per image of the batch, the folders made.

    Without ``%batch_num%`` every image takes the next counter of one name. With it, as in Save Image,
    ``%batch_num%`` becomes the image's index (0 .. B-1) and the images share one counter: one past the
    highest of every image's name, so a second run never overwrites the first (Save Image's does). When
    the path drops ``%batch_num%`` (``a/%batch_num%/../x``), so that the images share a name, they take
    successive counters instead, as without it."""
    if not isinstance(filename_prefix, str) or "%batch_num%" not in filename_prefix:  # output_place names a non-text one
        folder, name, counter, subfolder = output_place(filename_prefix, _EXAMPLE_PREFIX, W, H)
        return [(folder, name, counter + b, subfolder) for b in range(B)]
    places = [output_place(filename_prefix.replace("%batch_num%", str(b)), _EXAMPLE_PREFIX, W, H) for b in range(B)]
    shared = max(counter for _, _, counter, _ in places)
    if len({(folder, name) for folder, name, _, _ in places}) < B:  # the path drops it ('a/%batch_num%/../x')
        return [(folder, name, shared + b, subfolder) for b, (folder, name, _, subfolder) in enumerate(places)]
    return [(folder, name, shared, subfolder) for folder, name, _, subfolder in places]


def _claim_places(places: list[tuple[str, str, int, str]], suffixes: list[str], filename_prefix) -> list[tuple[str, str, int, str]]:
    """_batch_places' [(folder, name, counter, subfolder)] per image -> the same with counters whose files
    ('<name>_<counter>_<suffix>' for every suffix: 'k2.png', ..., 'image.png') this run now holds, each made
    as an empty file in one step (exclusive create). A counter any of whose files is taken is skipped, so no
    earlier file is ever written over: ComfyUI's counter is always 1 for a prefix that ends in '/'
    ('dataset/'), and another ComfyUI saving into the same folder at the same moment finds the files taken
    and moves on. Images that share one counter (%batch_num%: one name each) move on together; the others
    take successive counters. OSError -> ValueError naming filename_prefix, none of this run's files left."""
    held: list[str] = []  # the files made so far

    def claim(folder: str, name: str, n: int) -> bool:
        made = []
        for suffix in suffixes:
            full = os.path.join(folder, f"{name}_{n:05}_{suffix}")
            try:
                with open(full, "xb"):
                    pass
            except FileExistsError:
                for path in made:
                    _remove(path)
                return False
            except OSError as exc:
                for path in made + held:
                    _remove(path)
                raise output_error(exc, filename_prefix, full, _EXAMPLE_PREFIX) from exc
            made.append(full)
        held.extend(made)
        return True

    names = {(folder, name) for folder, name, _, _ in places}
    if len(names) == len(places) and len({n for _, _, n, _ in places}) == 1:  # one shared counter
        n = places[0][2]
        while not all(claim(folder, name, n) for folder, name, _, _ in places):
            for path in held:  # an image further on found its files taken: every image moves on
                _remove(path)
            held.clear()
            n = max([n + 1] + [_past_highest(folder, name) for folder, name, _, _ in places])
        return [(folder, name, n, subfolder) for folder, name, _, subfolder in places]
    claimed, n = [], 0
    for folder, name, counter, subfolder in places:
        n = max(n, counter)
        while not claim(folder, name, n):
            n = max(n + 1, _past_highest(folder, name))
        claimed.append((folder, name, n, subfolder))
        n += 1
    return claimed


def _past_highest(folder: str, name: str) -> int:
    """One past the highest counter of the files '<name>_<counter>_...' in ``folder`` (1 when none): where
    _claim_places goes on after a counter it found taken, so that a prefix ComfyUI counts from 1 at every
    run ('dataset/') costs one look at the folder per image, not one try per earlier image. Case is ignored, as
    the file systems of Windows and macOS ignore it: there 'Dataset_00007_k2.png' takes the name
    'dataset_00007_k2.png', and a case-sensitive count stopped short of it, one try per such file following."""
    pattern = re.compile(re.escape(name) + r"_([0-9]+)_", re.IGNORECASE)
    try:
        entries = os.listdir(folder)
    except OSError:
        return 1
    return 1 + max((int(m.group(1)) for entry in entries if (m := pattern.match(entry))), default=0)


def _png_texts(texts: dict[str, str]) -> dict[str, str]:
    """{key: JSON text} -> the entries whose key can be a PNG text keyword (Latin-1, as PIL writes it)."""
    return writable_entries(texts, "latin-1", "Save Label Maps: PNG text entry", "a PNG keyword holds Latin-1 characters only")


def _recording_entry(source: dict[str, str] | None) -> dict[str, str] | None:
    """ClusterSweep.source (Recording.source(): model, steps, branch; for a recording read from a file, its name
    and metadata, its prompt among them) -> the headseg entry's "recording": what sampled the heads, which for
    a loaded file is not the prompt that made the label maps. With --disable-metadata its prompt and any other
    metadata of the file are left out (model, steps, branch, file and list_index kept); None: not known."""
    from comfy.cli_args import args

    if source is None:
        return None
    if not args.disable_metadata:
        return dict(source)
    return {key: text for key, text in source.items() if key in ("model", "steps", "branch", "file", "list_index")}


def _png_info(texts: dict[str, str], headseg: dict) -> PngInfo:
    """{key: JSON text} (ComfyUI's prompt / workflow, as Save Image writes them) and the headseg entry (a
    JSON-able dict) -> the PNG text entries."""
    info = PngInfo()
    for key, text in {**texts, "headseg": json.dumps(headseg)}.items():
        info.add_text(key, text)
    return info


class SaveLabelMaps(io.ComfyNode):
    """Clusters (+ the picture) -> index PNGs in the output folder, one per image and k.

    UI payload: ``images`` (the saved pictures, when given), ``text`` [one line: the files written],
    ``headseg_label_maps`` [{filename, subfolder, type, k, list_index, batch_index}].
    """

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadSeg_SaveLabelMaps",
            display_name="HeadSeg Save Label Maps",
            category=CATEGORY,
            description=(
                "Saves the label map of every k as an 8-bit greyscale PNG whose pixel values are the cluster "
                "indices (0 = the largest cluster), one file per image and k, for segmentation datasets; "
                "optionally the picture next to them under the same counter. Every file carries ComfyUI's prompt "
                "(the seeds, layers and k it came from) and names what sampled the heads (for a recording from Load "
                "Recording: its file, and the prompt in the file)."
            ),
            is_output_node=True,
            inputs=[
                hs.Clusters.Input("clusters", tooltip="Label maps of every k, from Multi K-Means."),
                io.String.Input(
                    "filename_prefix",
                    default=_EXAMPLE_PREFIX,
                    tooltip=(
                        "File name prefix inside the output folder (subfolders allowed, e.g. 'dataset/cats'). "
                        "Each image gets the next counter: <prefix>_00001_k2.png, <prefix>_00001_k5.png, ... "
                        "and <prefix>_00001_image.png; no earlier file is written over. As in Save Image, %date:yyyy-MM-dd%, %Node name.widget%, "
                        "%width% and %height% are filled in, and %batch_num% becomes the image's index in the batch "
                        "(0, 1, ...), its images then sharing one counter. " + PREFIX_RULES_TOOLTIP
                    ),
                ),
                io.Image.Input(
                    "image",
                    optional=True,
                    tooltip=(
                        "The picture the labels belong to (the decoded image, or the photo that was encoded), "
                        "saved as <prefix>_<counter>_image.png with the workflow in it, as Save Image would save "
                        "it (an alpha channel kept). It must have the label maps' size (a photo up to 7 px larger "
                        "per side is centre-cropped as VAE Encode crops it) and one picture per image of the "
                        "clusters; other sizes are refused."
                    ),
                ),
                hs.Masks.Input(
                    "masks",
                    optional=True,
                    tooltip=(
                        "Optional: Mask Merge's masks of these clusters. Each image's files then list its merged "
                        "masks in Mask Merge's order (the order of all_masks) as [k, cluster] pairs in the headseg "
                        "entry's 'masks': a mask is the pixels of the k label map whose value is that cluster. "
                        "Masks of other clusters are refused."
                    ),
                ),
            ],
            outputs=[],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=_EXAMPLE_PREFIX) -> bool | str:
        # a prefix outside the output folder is refused when queued, not after sampling and clustering
        return prefix_error(filename_prefix, _EXAMPLE_PREFIX) or True

    @classmethod
    def execute(cls, clusters, filename_prefix=_EXAMPLE_PREFIX, image=None, masks=None) -> io.NodeOutput:
        _expect(clusters, core_kmeans.ClusterSweep, "clusters", "HEADSEG_CLUSTERS from Multi K-Means")
        _check_clusters(clusters)
        B = clusters.batch_size
        H, W = clusters.size
        pictures = None if image is None else _fit_pictures(image, B, H, W)  # [B, H, W, 3 or 4]
        merged = None if masks is None else _mask_entries(masks, clusters)  # per image [[k, cluster], ...]
        ks = clusters.cluster_counts
        # ComfyUI's prompt (every node's inputs: the seeds, layers, k, ...) for every file, so that a label map
        # alone says how it was made; the workflow once per image, in its picture (unless --disable-metadata).
        # As JSON before any file is claimed: a value json.dumps refuses leaves no empty file behind, and a key PNG
        # cannot hold (the extra_pnginfo of whoever queued the prompt names any) is left out before it too
        prompt, workflow = _png_texts(comfy_metadata(cls.hidden, workflow=False)), _png_texts(comfy_metadata(cls.hidden))
        suffixes = [f"k{k}.png" for k in ks] + (["image.png"] if pictures is not None else [])
        # [(folder, name, counter, subfolder)] per image, its files made (empty) so that no other run takes them
        places = _claim_places(_batch_places(filename_prefix, B, W, H), suffixes, filename_prefix)
        item = list_index()
        source = _recording_entry(clusters.source)
        saved, shown, files = [], [], []  # files: (picture(), path, PNG text) of every file, in order
        for b, (folder, name, n, subfolder) in enumerate(places):
            about = {"format": LABELS_FORMAT, "list_index": item, "batch_index": b, "cluster_counts": ks, "size": [H, W]}
            if source is not None:
                about["recording"] = source
            if merged is not None:
                about["masks"] = merged[b]
            for k in ks:
                filename = f"{name}_{n:05}_k{k}.png"
                picture = functools.partial(_label_png, clusters.results[k].labels[b])
                files.append((picture, os.path.join(folder, filename), _png_info(prompt, {**about, "k": k})))
                saved.append(
                    {"filename": filename, "subfolder": subfolder, "type": "output", "k": k, "list_index": item, "batch_index": b}
                )
            if pictures is not None:
                filename = f"{name}_{n:05}_image.png"
                picture = functools.partial(_picture_png, pictures[b])
                files.append((picture, os.path.join(folder, filename), _png_info(workflow, {**about, "k": None})))
                shown.append({"filename": filename, "subfolder": subfolder, "type": "output"})
        _write_all(files, filename_prefix)
        names = [os.path.join(sub, f"{name}_{n:05}_*").replace(os.sep, "/") for _, name, n, sub in (places[0], places[-1])]
        what = f"{len(ks)} label map{'s' if len(ks) > 1 else ''} (k = {', '.join(map(str, ks))})"
        what += " + the picture" if pictures is not None else ""
        text = f"{names[0]}: {what}" if B == 1 else f"{names[0]} ... {names[1]}: {B} images, {what} each"
        log.info("HeadSeg Save Label Maps: %s", text)
        return io.NodeOutput(ui={"images": shown, "text": [text], "headseg_label_maps": saved})


def _picture_png(picture: torch.Tensor) -> Image.Image:
    """picture [H, W, C] (C = 3 or 4) -> a PIL image of _picture_pixels' bytes: RGB or RGBA."""
    return Image.fromarray(_picture_pixels(picture))


def _write_all(files: list, filename_prefix) -> None:
    """Saves every PNG of ``files`` [(picture(): PIL image, path, PngInfo)], several at once (on_png_threads:
    a batch's files take about half as long on two cores), each picture made by its own thread when it
    is written. When any cannot be
    written, removes every file of this run (each one new, made by _claim_places: a dataset gets no image
    with some of its files missing), what a failed one left too (PIL leaves a file cut short when its last
    bytes fail as it closes the file, e.g. on a full disk), then raises for the first file, in order, that failed: ValueError
    naming filename_prefix and that file for an OSError, any other error (e.g. MemoryError) as it is."""

    def write(file) -> Exception | None:
        picture, full, info = file
        try:
            picture().save(full, pnginfo=info, compress_level=4)
        except Exception as exc:  # every error: the run's files are removed before it is raised
            return exc
        return None

    errors = on_png_threads(write, files)
    failed = [(full, exc) for (_, full, _), exc in zip(files, errors) if exc is not None]
    if not failed:
        return
    for _, path, _ in files:  # every one is this run's (_claim_places made them): none was there before
        _remove(path, missing_ok=True)
    full, exc = failed[0]
    if isinstance(exc, OSError):
        raise output_error(exc, filename_prefix, full, _EXAMPLE_PREFIX) from exc
    raise exc


def _remove(path: str, missing_ok: bool = False) -> None:
    """Removes a file of a failed run, with a log line when it cannot (none when it is gone and missing_ok)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        if not missing_ok:
            log.warning("HeadSeg Save Label Maps: could not remove %s after the failed write", path)
    except OSError:
        log.warning("HeadSeg Save Label Maps: could not remove %s after the failed write", path)


NODES = [SaveLabelMaps]
