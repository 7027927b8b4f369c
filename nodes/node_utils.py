"""Small adapters shared by HeadSeg's node classes: ComfyUI values <-> core values, previews.

Nothing here computes a stage of the pipeline; that is ``nodes/core``.
"""

from __future__ import annotations

import collections
import errno
import gc
import hashlib
import json
import logging
import math
import os
import secrets
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from comfy_api.latest import io, ui

from . import output_links
from .core.numerics import all_finite
from .core.recording import Recording
from .core.values import integer_index, shown_text
from .portable_names import portable_prefix, windows_name_problem

log = logging.getLogger("HeadSeg")

CATEGORY = "HeadSeg"


def expect(value, cls, name: str, what: str):
    """value -> value when it is a cls, else TypeError naming the input ``name`` and ``what`` it expects."""
    if not isinstance(value, cls):
        raise TypeError(f"{name}: expected {what}, got {type(value).__name__}")
    return value


def integer_input(value, name: str, what: str) -> int:
    """An INT input as given -> int; ValueError naming the input ``name`` (expected ``what``) when it is no
    integer: ComfyUI makes a widget's value an int, but hands a linked one over as it comes (None, a float)."""
    i = integer_index(value)
    if i is None:
        raise ValueError(f"{name}: expected {what}, got {value!r}")
    return i


POSITION_CHOICES = ["down+up", "down", "up", "middle", "down+middle", "middle+up", "down+middle+up"]


def as_recording(value, latent=None, name: str = "recording") -> Recording:
    """A core Recording from a Recording or a live recording handle (the run that produced ``latent``).

    A live recording must come with the sampler's LATENT: that link makes the node run after the
    sampler, re-run (not come from ComfyUI's cache) whenever a new image is sampled, and picks that
    image's run even when other samplers used the recorded MODEL afterwards.
    """
    if hasattr(value, "snapshot"):
        if latent is None:
            raise ValueError(
                "latent: connect the sampler's LATENT output here when the recording comes from Record "
                "Self-Attention, so that this node runs after sampling and again for every new image"
            )
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if not isinstance(samples, torch.Tensor):
            raise ValueError(f"latent: expected a LATENT (a dict with 'samples'), got {type(latent).__name__}")
        value = value.snapshot(samples)  # the run that produced this LATENT
    elif latent is not None:  # a recording from a file: the LATENT only orders the nodes, so it must be of that image
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if isinstance(value, Recording) and not (isinstance(samples, torch.Tensor) and samples.dim() >= 4):
            shape = f"samples of shape {tuple(samples.shape)}" if isinstance(samples, torch.Tensor) else type(latent).__name__
            raise ValueError(
                f"latent: expected a LATENT (a dict with 'samples' of shape [B, C, h, w]), got {shape}"
            )
        if isinstance(value, Recording) and value.layers:
            B, (h, w) = int(samples.shape[0]), tuple(int(n) for n in samples.shape[-2:])
            if (h, w) != value.latent_size or B != value.batch_size:
                H, W = value.image_size
                raise ValueError(
                    f"latent: the recording (from a file) is of {value.batch_size} image(s) of {W}x{H} pixels, but the "
                    f"LATENT is of {B} image(s) of {w * 8}x{h * 8}: the masks would be the file's, not this LATENT's "
                    "image. Disconnect latent, or load the recording of this image"
                )
    if not isinstance(value, Recording):
        raise TypeError(
            f"{name}: expected a HeadSeg recording (from Record Self-Attention or Load Recording), "
            f"got {type(value).__name__}"
        )
    return value


# Choices of a node's `device` input: where its stage computes (inputs and outputs stay on the CPU).
DEVICE_CHOICES = ["auto", "gpu", "cpu"]
def device_input(tooltip: str):
    """The `device` combo of a node whose stage runs through run_on_device: DEVICE_CHOICES, 'auto' by
    default, optional so that workflows saved before the input existed still run (as 'auto')."""
    return io.Combo.Input("device", options=DEVICE_CHOICES, default="auto", optional=True, tooltip=tooltip)


# Errors of a GPU that is out of memory but not raised as torch.cuda.OutOfMemoryError: a library
# handle that cannot be created (cuBLAS in a thread's first GPU product, cuSOLVER) when the driver is full.
_OUT_OF_MEMORY_TEXTS = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUSOLVER_STATUS_ALLOC_FAILED")


def compute_device(choice, name: str = "device") -> torch.device:
    """A `device` input -> the torch.device to compute on.

    'cpu': the CPU. 'gpu': ComfyUI's device when it is a CUDA GPU (ROCm GPUs present themselves to
    torch as CUDA), else ValueError naming the input. 'auto': that GPU when ComfyUI runs on one, the
    CPU otherwise (--cpu, Apple MPS, DirectML, Intel XPU: untested there, so HeadSeg stays on the CPU).
    """
    if choice not in DEVICE_CHOICES:
        raise ValueError(f"{name}: expected one of {DEVICE_CHOICES}, got {choice!r}")
    if choice == "cpu":
        return torch.device("cpu")
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    kind = getattr(device, "type", str(device))
    if kind == "cuda":
        return device
    if choice == "auto":
        return torch.device("cpu")
    why = " (started with --cpu, or no GPU found)" if kind == "cpu" else ""
    raise ValueError(
        f"{name}: 'gpu' runs HeadSeg on CUDA or ROCm GPUs only, but ComfyUI computes on {kind} here{why}; "
        "choose 'auto' or 'cpu'"
    )


def _release_workspaces() -> None:
    """Frees the cuBLAS workspaces torch keeps for every thread that multiplied on a GPU (32 MiB each
    on an H200): those of the thread that ran the node's GPU work, and of every other thread of the
    process too (ComfyUI runs nodes one at a time, so none is multiplying now), each made again at
    that thread's next GPU product."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # private: absent in some builds
    if clear is not None:
        clear()


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _OUT_OF_MEMORY_TEXTS)


def run_on_device(choice, work, what: str, name: str = "device"):
    """work(device) on the device that `choice` picks (see compute_device) -> its result.

    With 'auto', a GPU that runs out of memory hands the work to the CPU (a warning is logged), so
    a busy GPU costs time, never the result. With 'gpu' the error stays a torch.cuda.OutOfMemoryError
    (ComfyUI then unloads its models, so a second try can fit), its message naming the input.
    """
    device = compute_device(choice, name)
    if device.type == "cpu":
        return work(device)
    try:
        return work(device)
    except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        # torch's message is a paragraph: its first two sentences say what did not fit
        reason = ". ".join(str(exc).strip().split(". ")[:2]).rstrip(".") or "out of memory"
        # the failed attempt's tensors are held by its frames, which the traceback keeps (and any
        # cycle through thread pools' futures): let them go before anything else runs
        traceback.clear_frames(exc.__traceback__)
        if choice != "auto":
            raise torch.cuda.OutOfMemoryError(
                f"{name}: the GPU ({device}) ran out of memory in {what} ({reason}); choose 'auto' to fall "
                "back to the CPU, or 'cpu'"
            ) from exc
    finally:
        _release_workspaces()
    import comfy.model_management

    gc.collect()  # anything else of the failed attempt caught in a reference cycle
    comfy.model_management.soft_empty_cache()
    log.warning("HeadSeg: %s ran out of GPU memory on %s (%s); running it on the CPU instead", what, device, reason)
    return work(torch.device("cpu"))


def parse_positions(text: str) -> tuple[str, ...]:
    """"down+up" -> ("down", "up"); ValueError naming `positions`."""
    parts = tuple(dict.fromkeys(p for p in str(text).replace(",", "+").replace(" ", "").split("+") if p))  # unique
    bad = [p for p in parts if p not in ("down", "middle", "up")]
    if not parts or bad:
        raise ValueError(f"positions: expected UNet positions joined by '+' such as 'down+up', got {shown_text(text, 80)}")
    return parts


def combo_error(name: str, value, choices) -> str | None:
    """For validate_inputs: ComfyUI 0.3.75 checks no V3 combo's value itself (its input type is the
    string 'COMBO'), so an API prompt could carry any string into the run. A message, or None."""
    if isinstance(value, str) and value not in choices:
        return f"{name}: expected one of {list(choices)}, got {value!r}"
    return None


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


def mask_bytes(masks: torch.Tensor) -> torch.Tensor:
    """[..., H, W] bool masks -> the same 0/1 values as uint8 (a view; a mask of another dtype as it is), to
    copy into float32 MASKs: torch converts uint8 to float32 about 1.3 - 1.4 times as fast as bool (a bool is
    stored as one byte, 0 or 1), which is most of Mask Merge's time after the merge (all_masks)."""
    return masks.view(torch.uint8) if masks.dtype == torch.bool else masks


def mask_to_comfy(masks: torch.Tensor) -> torch.Tensor:
    """[M, H, W] bool -> MASK [M, H, W] float32 0..1 on the CPU (a fresh tensor), from the masks' bytes."""
    return mask_bytes(masks.detach()).to("cpu", torch.float32)


def image_batch(image, name: str = "image", first_only: bool = False) -> torch.Tensor:
    """Checks an IMAGE input [B, H, W, C] (C = 1, 3 or 4; B, H, W >= 1; floats, 0..1) -> [B, H, W, 3] float32
    on the CPU ([1, H, W, 3] with first_only), NaN drawn as black and +-inf clamped to white / black."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (1, 3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name}: expected an IMAGE [B, H, W, 3], got {shape}")
    if not image.dtype.is_floating_point:  # e.g. 0..255 bytes from another pack: drawn, they would be white
        raise ValueError(
            f"{name}: expected an IMAGE of floats from 0 to 1 (ComfyUI's IMAGE), got {image.dtype} values; "
            "convert the picture to a float IMAGE first"
        )
    if 0 in image.shape[:3]:
        raise ValueError(f"{name}: expected at least one image of at least 1x1 pixels, got {tuple(image.shape)}")
    if image.is_meta:
        raise ValueError(f"{name}: expected an IMAGE holding pixels, got a tensor on the meta device (no values)")
    if first_only:
        image = image[:1]  # [1, H, W, C]: only this one is moved and checked
    image = image[..., :3].to("cpu", torch.float32)  # [B, H, W, 3] (a view or a copy; never written to)
    if image.shape[-1] == 1:
        image = image.expand(-1, -1, -1, 3)
    if not all_finite(image):  # e.g. a half-precision VAE that overflowed: still show it
        log.warning("HeadSeg: %s holds NaN or inf values; drawn as black (NaN, -inf) and white (+inf)", name)
        image = torch.nan_to_num(image, nan=0.0, posinf=1.0, neginf=0.0)
    return image


# The rules of a Save node's filename_prefix (prefix_error, output_place), for its tooltip.
PREFIX_RULES_TOOLTIP = (
    "'\\' separates folders, as on Windows. A blank prefix, one leading outside the output folder ('../x'), one "
    "holding a character no file name can (a lone surrogate, from an API client), or a name Windows cannot save "
    "under (a device name as a folder or before a dot, such as 'CON/x' or 'nul.x', a character such as ':' or '?', "
    "a folder of dots and spaces only) is refused when the prompt is queued; a folder's trailing dots and spaces "
    "are dropped, as on Windows."
)


def _blank_prefix_error(filename_prefix, example: str) -> str | None:
    """The message for a filename_prefix that is no text, blank, holds a NUL or a character no file name can (a
    lone surrogate such as '\\ud800', from an API client that cut a UTF-16 text: open() raised an unnamed
    UnicodeEncodeError after sampling); None for any other. UTF-8 is asked, not os.fsencode: that takes
    '\\udc80' to '\\udcff' as the bytes 0x80 to 0xff, a name that is no UTF-8, whose recording file Load Recording
    refuses (a workflow keeps file names as UTF-8 text) and does not list."""
    if not isinstance(filename_prefix, str) or not filename_prefix.strip() or "\x00" in filename_prefix:
        return f"filename_prefix: expected a file name prefix such as {example!r}, got {filename_prefix!r}"
    try:
        filename_prefix.encode("utf-8")
    except UnicodeError:
        return (
            f"filename_prefix: expected a file name prefix such as {example!r}, got {filename_prefix!r}, which holds "
            "a character no file name can (a lone surrogate)"
        )
    return None


def _prefix_error(filename_prefix, example: str) -> str | None:
    """_blank_prefix_error's message, or one for a prefix that names no file Windows can hold (workflows are
    shared between systems: see portable_names), or None."""
    blank = _blank_prefix_error(filename_prefix, example)
    if blank:
        return blank
    problem = windows_name_problem(filename_prefix)
    if problem:
        return (
            f"filename_prefix {filename_prefix!r}: {problem}; workflows are shared between Windows, Linux and macOS, "
            f"so expected folder and file names every system can save, such as {example!r}"
        )
    return None


def comfy_metadata(hidden, workflow: bool = True) -> dict[str, str]:
    """A node's hidden inputs -> ComfyUI's prompt and (with ``workflow``) the extra PNG info (the workflow) as
    JSON texts, as Save Image and Save Latent write them into their files; none with --disable-metadata."""
    from comfy.cli_args import args

    if args.disable_metadata or hidden is None:
        return {}
    found = {} if hidden.prompt is None else {"prompt": hidden.prompt}
    if workflow:
        found.update(hidden.extra_pnginfo or {})
    return {key: json.dumps(value) for key, value in found.items()}


def writable_entries(texts: dict[str, str], encoding: str, node: str, why: str) -> dict[str, str]:
    """{key: JSON text} (comfy_metadata) -> the entries whose key ``encoding`` can write, the others left out with
    a log line naming ``node`` and ``why``. ComfyUI hands over every key of a prompt's extra_pnginfo, which
    whoever queues the prompt chooses: a PNG keyword holds Latin-1 only (an API client's '工作流': PIL raised
    UnicodeEncodeError), a safetensors header UTF-8 (a lone surrogate '\\ud800', from a client that cut a UTF-16
    string: safetensors raised UnicodeEncodeError), and either error named nothing."""
    kept = {}
    for key, text in texts.items():
        try:
            key.encode(encoding)
        except UnicodeError:
            log.warning("HeadSeg %s: %r left out: %s", node, key, why)
            continue
        kept[key] = text
    return kept


def list_index() -> int:
    """The item of a list input the running node is at (ComfyUI runs a node once per item of a list, e.g. of
    latents from Rebatch Latents, each item a batch of its own): ComfyUI's executing context; 0 outside a list."""
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    return int(getattr(context, "list_index", None) or 0)


def outputs_to_make(node_class, class_type: str) -> set[str]:
    """The names of the outputs the running node must make: output_links.outputs_to_keep on ComfyUI's hidden
    PROMPT (declared in the node's schema: io.Hidden.prompt) and the executing node's id, all of the node's
    outputs where that says None (as outside ComfyUI's executor: no hidden PROMPT, no executing node)."""
    from comfy_execution.utils import get_executing_context

    context = get_executing_context()
    hidden = getattr(node_class, "hidden", None)
    prompt = None if hidden is None else hidden.prompt
    keep = output_links.outputs_to_keep(prompt, None if context is None else context.node_id, class_type)
    return set(output_links.OUTPUT_NAMES[class_type]) if keep is None else keep


def prefix_error(filename_prefix, example: str) -> str | None:
    """For validate_inputs: output_place's refusal of a filename_prefix that is blank, holds a NUL, names no
    file Windows can hold or leads outside ComfyUI's output folder (ComfyUI's own rule, as
    get_save_image_path applies it, with '\\' a separator as on Windows), found when the prompt is queued
    rather than after sampling; None for any other prefix, and for a linked one (None here, checked at run
    time). Makes no folder."""
    import folder_paths

    if filename_prefix is None:
        return None
    refused = _prefix_error(filename_prefix, example)
    if refused:
        return refused
    out = os.path.abspath(folder_paths.get_output_directory())
    written = portable_prefix(filename_prefix)
    folder = os.path.abspath(os.path.join(out, os.path.dirname(os.path.normpath(written))))
    try:
        inside = os.path.commonpath((out, folder)) == out
    except ValueError:  # another drive (Windows)
        inside = False
    if not inside:
        return (
            f"filename_prefix {filename_prefix!r}: leads outside ComfyUI's output folder; expected folder and "
            f"file names inside it, such as {example!r}"
        )
    return None


def output_place(filename_prefix, example: str, width: int = 0, height: int = 0) -> tuple[str, str, int, str]:
    """filename_prefix -> (folder, name, counter, subfolder) in ComfyUI's output folder, the folder made:
    ComfyUI's own rule (get_save_image_path: subfolders allowed, nothing outside the output folder, the
    counter one past the highest of the files named '<name>_<counter>_...', %width%, %height%, %year% ... %second%
    replaced as in Save Image's prefixes), '\\' a folder separator on every system, as on Windows. ValueError
    naming filename_prefix (with ``example``, a prefix to suggest) when it is empty, names no file Windows
    can hold (portable_names) or cannot be a name there."""
    import folder_paths

    refused = _prefix_error(filename_prefix, example)
    if refused:
        raise ValueError(refused)
    try:
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
            portable_prefix(filename_prefix), folder_paths.get_output_directory(), width, height
        )
        os.makedirs(folder, exist_ok=True)
    except Exception as exc:  # ComfyUI's refusal (a prefix leaving the folder), a name too long, a file in the way
        raise output_error(exc, filename_prefix, None, example) from exc
    return folder, name, counter, subfolder


# Windows' MAX_PATH: a path of 260 characters or more (a folder's: 248, room for a file name of 8.3) fails where
# long paths are not enabled (the default), with an error that says no such file or folder.
_WINDOWS_MAX_PATH = 260


def _past_windows_path_limit(exc: BaseException, full: str | None) -> str | None:
    """On Windows, a phrase naming the length of the path that failed (``full``, else the error's own
    ``filename``: the folder being made) and the limit it is past, when it is past MAX_PATH (a folder's: 12
    less), the likely cause whatever the error says; None otherwise."""
    if os.name != "nt":
        return None
    path = full or getattr(exc, "filename", None)
    if not isinstance(path, str):
        return None
    length = len(os.path.abspath(path))
    limit = _WINDOWS_MAX_PATH if full else _WINDOWS_MAX_PATH - 12
    if length < limit:
        return None
    if full:
        return f"the path has {length} characters, past the {limit - 1} Windows takes"
    return f"the folder's path has {length} characters, past the {limit - 1} Windows takes for a folder"


def output_error(exc: BaseException, filename_prefix, full: str | None, example: str) -> ValueError:
    """A failure to make or write a file of the output folder -> ValueError naming filename_prefix, the
    file (``full``, None when no name was made yet), the reason and what to do."""
    code = getattr(exc, "errno", None)
    too_long = code == errno.ENAMETOOLONG or "too long" in str(exc).lower()
    refused = code in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, getattr(errno, "EDQUOT", -1))
    past_limit = _past_windows_path_limit(exc, full)
    if past_limit:
        hint = f"{past_limit} unless long paths are enabled: choose a shorter prefix, or enable long paths in Windows"
    elif too_long:
        hint = "choose a shorter prefix of plain folder and file names"
    elif full is None and not refused:  # ComfyUI refused the prefix, or a name in it is a file
        hint = f"expected folder and file names inside ComfyUI's output folder, such as {example!r}"
    else:
        hint = "check that ComfyUI's output folder is writable and has free space"
    where = f"cannot write {full}" if full else "cannot make the file's folder or name"
    reason = (str(exc).strip().splitlines() or [""])[0].strip(" *")  # ComfyUI's refusal spans lines
    return ValueError(f"filename_prefix {filename_prefix!r}: {where} ({type(exc).__name__}: {reason}); {hint}")


# Without psutil (ComfyUI ships it), the nodes allow this many bytes for each of their large allocations.
FALLBACK_MEMORY_BYTES = 4 << 30


def available_memory() -> int | None:
    """Bytes of memory free for new allocations (psutil's 'available'), or None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # no psutil, or a platform where it cannot tell
        return None


def check_memory(need: int, name: str, what: str, advice: str) -> None:
    """ValueError naming the input ``name`` when allocating ``need`` bytes for ``what`` would take more
    than 80 % of the free memory (or FALLBACK_MEMORY_BYTES when that is unknown): a clear refusal
    before the work instead of ComfyUI running out of memory part-way."""
    available = available_memory()
    limit = 0.8 * available if available else FALLBACK_MEMORY_BYTES
    if need > limit:
        room = f"80 % of the {available / 2**30:.1f} GiB free" if available else f"{limit / 2**30:.1f} GiB"
        raise ValueError(f"{name}: {what} would take {need / 2**30:.1f} GiB, more than {room}. {advice}")
