"""Preview pictures of the nodes: IMAGEs and label maps written as temporary PNGs for ComfyUI's /view (the same
files ComfyUI's own writer makes), pictures seen recently not written again, several PNGs at once on threads
(on_png_threads, which Save Label Maps' files use too)."""

from __future__ import annotations

import collections
import hashlib
import math
import os
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from comfy_api.latest import ui


def preview_refs(images: torch.Tensor, reuse: bool = False) -> list[dict]:
    """Saves IMAGE [B, H, W, 3] as temporary PNGs; returns [{filename, subfolder, type}] for /view.

    reuse: a picture whose 8-bit pixels were saved by a recent call that also asked for reuse, and whose
    file is still there, gets that file's ref instead of being written again; the others of the batch are
    written (pictures that stay the same from one run to the next, e.g. Mask Select's picture while the
    user clicks around and its mask thumbnails when only the index changes: ~0.03 s per 512 x 512 PNG,
    ~0.1 s per 1024 x 1024 one).
    """
    images = images.detach().float().cpu()
    lo, hi = (float(images.amin()), float(images.amax())) if images.numel() else (0.0, 0.0)  # NaN if any is
    if not (lo >= 0.0 and hi <= 1.0):
        images = images.clamp(0, 1)  # a copy only when needed: large batches of previews are big
    if not reuse or math.isnan(lo):  # NaN: ComfyUI's writer makes what it makes of it, and no key is made
        return _write_previews(images)
    from PIL import Image

    prefix = f"ComfyUI_temp_headseg_{secrets.token_hex(4)}"  # as _write_each names a batch's pictures

    def saved_or_written(b: int) -> dict:
        # the bytes ComfyUI's writer makes of a picture in 0..1: clip(255 * x, 0, 255) cut to uint8 [H, W, 3]
        pixels = (images[b] * 255.0).clamp_(0.0, 255.0).to(torch.uint8).contiguous().numpy()  # rows of a picture
        key = (pixels.shape, hashlib.blake2b(pixels, digest_size=16).digest())
        with _saved_lock:
            ref = _saved_previews.get(key)
            if ref is not None and _temp_file_exists(ref):
                _saved_previews.move_to_end(key)
                return dict(ref)
        # the file ComfyUI's writer would write (the same PNG bytes), from the pixels already made
        ref = _save_temp_png(Image.fromarray(pixels), f"{prefix}_{b}")
        with _saved_lock:
            _saved_previews[key] = ref
            _saved_previews.move_to_end(key)
            while len(_saved_previews) > _SAVED_PREVIEWS_KEPT:
                _saved_previews.popitem(last=False)
        return dict(ref)

    # each picture hashed, and written when no recent file holds it, on the PNG threads: hashing releases
    # Python's lock too
    return on_png_threads(saved_or_written, list(range(images.shape[0])))


def _write_previews(images: torch.Tensor) -> list[dict]:
    """IMAGE [B, H, W, 3] in 0..1 -> new temporary PNGs written by ComfyUI -> their refs, in order.

    Several pictures are written at once on up to _PNG_THREADS threads (PNG compression releases
    Python's lock, so on two cores a click in Mask Select's picker takes about half as long), each
    by _write_preview, under one random prefix per batch with the picture's index appended: no two
    threads count up the same name.
    """
    return _write_each(images.shape[0], lambda b, prefix: _write_preview(images[b : b + 1], prefix))


def _write_preview(image: torch.Tensor, prefix: str) -> list[dict]:
    """IMAGE [1, H, W, 3] in 0..1 -> [ref] of a new temporary PNG, written by ComfyUI's own writer as its
    previews are (temp folder, compress level 1)."""
    return ui.ImageSaveHelper.save_images(
        image, filename_prefix=prefix, folder_type=ui.FolderType.temp, cls=None, compress_level=1
    )


def label_previews(maps: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """[(labels [H, W] ints in 0 .. c-1, colours [c, 3] floats in 0..1, c <= 256)] -> temporary PNGs of the
    colour maps colours[labels] for /view, in order: as preview_refs writes those IMAGEs (the same temp folder,
    names, compress level 1 and, read back, the same pixels: each colour cut to 8 bits as ComfyUI's writer
    cuts the picture's), but as palette PNGs of the labels, one byte per pixel to compress instead of three
    and no float picture to convert (a 1024 x 1024 colour map: ~0.01 s instead of ~0.03 s)."""
    from PIL import Image

    def write(b: int, prefix: str) -> list:
        labels, colours = maps[b]
        table = np.clip(255.0 * colours.detach().to("cpu", torch.float32).numpy(), 0, 255).astype(np.uint8)  # [c, 3]
        picture = Image.fromarray(labels.detach().to("cpu", torch.uint8).numpy())  # [H, W] "L": the label of each pixel
        picture.putpalette(table.tobytes())  # "P": label j drawn in colour j
        return [_save_temp_png(picture, prefix)]

    return _write_each(len(maps), write)


def _save_temp_png(picture, prefix: str) -> dict:
    """A PIL picture -> the ref of a new PNG of it in ComfyUI's temp folder, written as ComfyUI's writer
    writes a preview (save_images with cls=None: named '<prefix>_<counter>_.png', no text entries,
    compress level 1)."""
    import folder_paths

    W, H = picture.size
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(prefix, folder_paths.get_temp_directory(), W, H)
    filename = f"{name}_{counter:05}_.png"  # as ComfyUI's writer names a picture
    picture.save(os.path.join(folder, filename), pnginfo=None, compress_level=1)
    return {"filename": filename, "subfolder": subfolder, "type": "temp"}


def _write_each(count: int, write) -> list[dict]:
    """write(b, prefix) -> [ref] for b in 0 .. count-1, on up to _PNG_THREADS threads -> the refs in order.
    Each picture gets its own prefix (one random prefix per batch with the picture's index appended):
    no two threads count up the same name."""
    prefix = f"ComfyUI_temp_headseg_{secrets.token_hex(4)}"
    parts = on_png_threads(lambda b: write(b, f"{prefix}_{b}"), list(range(count)))
    return [dict(r) for part in parts for r in part]


def on_png_threads(fn, items: list) -> list:
    """[fn(item) for item in items], in order, several at once on up to _PNG_THREADS threads (one per core):
    for writing PNGs, whose compression releases Python's lock."""
    workers = min(len(items), _PNG_THREADS, os.cpu_count() or 1)
    if workers <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers, thread_name_prefix="headseg-png") as pool:
        return list(pool.map(fn, items))


# Threads that write a batch of PNGs at once (on_png_threads: previews, Save Label Maps' files).
_PNG_THREADS = 8


# preview_refs(reuse=True): (shape [H, W, 3], digest of one picture's 8-bit pixels) -> its ref, the most
# recent last. A few hundred bytes each; 64 hold a few runs of Mask Select (its picture and a thumbnail per
# mask at the pixel, one per cluster count at most).
_saved_previews: collections.OrderedDict[tuple, dict] = collections.OrderedDict()
_saved_lock = threading.Lock()
_SAVED_PREVIEWS_KEPT = 64


def _temp_file_exists(ref: dict) -> bool:
    """True when a preview ref still names a regular file in ComfyUI's temp folder."""
    import folder_paths

    folder = folder_paths.get_temp_directory()
    return os.path.isfile(os.path.join(folder, ref.get("subfolder", ""), ref.get("filename", "")))
