"""Mask Select At Pixel: the merged masks that contain a pixel, finest first, with the picture to click on.

The node behind the click-to-pick picker and mask browser of js/picker.js (its UI payload is
described in the class docstring); the pixel maps between the picture and the masks' grid as VAE
Encode crops a picture or, for other sizes, through a stretch.
"""

from __future__ import annotations

import uuid

import torch
from comfy_api.latest import io

from . import types as hs
from .core import masks as core_masks
from .core import pixels as core_pixels
from .core import preview as core_preview
from .core.values import integer_index
from .memory_checks import check_memory
from .node_utils import (
    CATEGORY,
    image_batch,
    log,
    mask_bytes,
    mask_to_comfy,
    outputs_to_make,
)
from .previews import preview_refs


# The largest x / y the prompt check lets through: a pixel of the picture, which may be larger than any masks'
# grid (a picture picked on before the first run is mapped onto the grid, e.g. a 20 000 px wide scan scaled
# down before VAE Encode); the coordinates more_points reads as they are, too.
MAX_PIXEL = core_masks.POINT_BEYOND - 1


def _point_text(point: tuple[int, int, bool]) -> str:
    """(x, y, kept in) -> 'x,y', or '-x,y' for a pixel left out, as more_points writes them."""
    x, y, kept = point
    return f"{'' if kept else '-'}{x},{y}"


def _pixel_input(v, name: str, what: str) -> int:
    """x or y as given -> int; ValueError for a negative value (a linked one skips the widget's min) or a
    non-integer (floats, bools, text): those are no pixel to move to the grid."""
    i = integer_index(v)
    if i is None or i < 0:
        raise ValueError(f"{name}: expected a pixel {what}, an integer >= 0, got {v!r}")
    return i


class MaskSelectAtPixel(io.ComfyNode):
    """Masks + pixel (x, y) -> the mask containing it at a chosen granularity, ready for inpainting.

    UI payload (read by js/picker.js, the click-to-pick picker and mask browser):

    - ``headseg_image``: [ref] the picture to click on: ``image`` 0 when connected, else a colour
      map of the merged masks (coarse painted first, finer on top); W x H = the masks' size.
    - ``headseg_size``: [W, H] pixel grid that x and y refer to (the masks' resolution).
    - ``headseg_picture_size``: [w, h] of ``image`` 0 as connected (only with ``image``). The picker keeps it
      with ``headseg_size`` in the node's properties: when the run is gone (a page reload) and it shows the
      connected picture again, a picture of this size is shown as this run placed it on the masks' grid.
    - ``headseg_pixel``: [x, y] the pixel these masks were computed for.
    - ``headseg_pixel_asked``: [x, y] the x and y inputs as given. When they lie outside the masks' grid
      (a pixel of a larger picture picked before the first run, mapped onto the grid; any other pixel
      past the right or bottom edge, moved to the nearest pixel of the grid) it differs from
      ``headseg_pixel``, and the picker sets the widgets to the pixel used.
    - ``headseg_index``: [i] index of the mask the first MASK output carries for image 0 (the
      ``index`` widget clamped to the masks found; -1 when the pixel is in no mask).
    - ``headseg_masks``: [ref, ...] one picture per mask containing the pixel (image 0), finest
      first: the mask overlaid on the picture, the same aspect ratio as ``headseg_image`` and its
      size up to 512 x 512 pixels' worth (larger ones are shrunk to that many pixels).
    - ``headseg_mask_info``: [{"area": pixels, "k": cluster count, "cluster": index}, ...] same order.
    - ``headseg_points``: [[x, y, 1 or 0], ...] the pixels of ``more_points`` on the masks' grid (mapped
      and moved as x and y are), 1 = the masks contain it, 0 = they do not.
    - ``headseg_points_asked``: [text] the ``more_points`` input as given.
    - ``headseg_item``: [{"masks": len(headseg_masks), "points": len(headseg_points)}]. ComfyUI runs the
      node once per item of a list input (e.g. latents from Rebatch Latents) and joins the payloads of
      the runs key by key, so that every list above then holds every item's entries one item after the
      other; the picker shows the first item's (the first entry of each one-entry key, and these
      counts' share of the others).
    - ``headseg_run``: [id] a new random id at each run of the node (a run served from ComfyUI's cache comes
      with its id again): the picker knows a run by it, also in the copies of a payload newer frontends
      (1.58) hand it, where the content can be the same for two runs (the same picture, pixel and masks).

    ``ref`` = {"filename", "subfolder", "type": "temp"}, served by GET /view.
    """

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadSeg_MaskSelectAtPixel",
            is_output_node=True,  # runs (and shows the picker) even when its MASK is not wired yet
            display_name="HeadSeg Mask Select At Pixel",
            category=CATEGORY,
            description=(
                "Finds every mask that contains the pixel (x, y), finest first (e.g. eye -> eyes -> "
                "face -> cat -> foreground, paper figure 1), and outputs the one at 'index' as a MASK "
                "at image resolution for inpainting (SetLatentNoiseMask, VAEEncodeForInpaint, "
                "InpaintModelConditioning, GrowMask). More pixels can narrow the list: masks that also "
                "contain them, or that do not. In the web UI, click the picture to pick the pixel "
                "(shift-click: a pixel the masks must also contain; alt-click: one they must not), and "
                "click a thumbnail to choose the mask."
            ),
            inputs=[
                hs.Masks.Input("masks", tooltip="Merged masks from Mask Merge."),
                io.Int.Input(
                    "x",
                    default=0,
                    min=0,
                    max=MAX_PIXEL,
                    tooltip=(
                        "Pixel column on the masks' grid, i.e. of the sampled image (latent width x 8); 0 = left "
                        "edge. A pixel of a larger 'image' picked before the first run is mapped onto the grid; "
                        "any other x past the right edge is read as the last column (both with a log line)."
                    ),
                ),
                io.Int.Input(
                    "y",
                    default=0,
                    min=0,
                    max=MAX_PIXEL,
                    tooltip=(
                        "Pixel row on the masks' grid, i.e. of the sampled image (latent height x 8); 0 = top "
                        "edge. A pixel of a larger 'image' picked before the first run is mapped onto the grid; "
                        "any other y past the bottom edge is read as the last row (both with a log line)."
                    ),
                ),
                io.Int.Input(
                    "index",
                    default=0,
                    min=0,
                    max=1024,
                    tooltip=(
                        "Which of the masks containing the pixel to output: 0 = finest (smallest); higher = "
                        "coarser. Values past the last mask give the coarsest one."
                    ),
                ),
                io.Image.Input(
                    "image",
                    optional=True,
                    tooltip=(
                        "Optional picture (e.g. the decoded image; of a batch, the first) for the overlays and the click picker; "
                        "a photo up to 7 px larger is cropped to its centre as VAE Encode does, other sizes "
                        "are stretched to the masks' size. Without it the masks are drawn on a "
                        "colour map of all masks."
                    ),
                ),
                io.String.Input(
                    "more_points",
                    default="",
                    optional=True,
                    tooltip=(
                        "More pixels that narrow the masks at (x, y): 'x,y' pairs on the same grid, separated by "
                        "';'. The masks must contain each of them; a leading '-' marks a pixel they must not "
                        "contain (e.g. '120,80; -300,200': both eyes, but not the other cat). Empty = (x, y) "
                        "alone. In the picker, shift-click adds a pixel to contain and alt-click one to leave "
                        "out; shift-click on a green ring turns it red, any other click on a ring removes it; a "
                        f"plain click starts over. At most {core_masks.MAX_POINTS} pixels."
                    ),
                ),
            ],
            outputs=[
                io.Mask.Output(
                    display_name="mask",
                    tooltip=(
                        "The chosen mask for every image of the batch, [B, H, W] 0/1 at image resolution; "
                        "all zeros for an image where the pixel lies in no mask (Mask Merge's min_area dropped "
                        "them) or none of its masks there fits more_points."
                    ),
                ),
                io.Mask.Output(
                    display_name="masks_at_pixel",
                    tooltip=(
                        "Every mask containing the pixel (and fitting more_points) of image 0, finest first, "
                        "[count, H, W]; one all-zero mask when count is 0 (a MASK batch cannot be empty)."
                    ),
                ),
                io.Image.Output(
                    display_name="overlay",
                    tooltip="Each mask at the pixel overlaid on the picture (image 0), finest first.",
                ),
                io.Int.Output(
                    display_name="count", tooltip="How many masks contain the pixel and fit more_points (image 0)."
                ),
            ],
            # ComfyUI's prompt: which outputs it links (node_utils.outputs_to_make)
            hidden=[io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, more_points="") -> bool | str:
        # a malformed more_points is refused when queued, not after sampling and clustering
        if isinstance(more_points, str):  # else linked: checked at run time
            try:
                core_masks.parse_points(more_points)
            except ValueError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, masks, x=0, y=0, index=0, image=None, more_points="") -> io.NodeOutput:
        if not isinstance(masks, list) or not masks or not all(isinstance(m, core_masks.MaskSet) for m in masks):
            raise TypeError(f"masks: expected HEADSEG_MASKS from Mask Merge, got {type(masks).__name__}")
        sizes = sorted({tuple(ms.masks.shape[-2:]) for ms in masks})
        if len(sizes) > 1:  # one Mask Merge gives every image the size of its label maps
            raise ValueError(f"masks: expected the masks of every image at one size (from one Mask Merge), got {sizes}")
        x, y = _pixel_input(x, "x", "column"), _pixel_input(y, "y", "row")
        include, exclude = core_masks.parse_points(more_points)  # [(x, y)] each, as given
        asked = [x, y]
        index_given, index = index, integer_index(index)
        if index is None or index < 0:
            raise ValueError(f"index: expected an integer >= 0 (0 = finest mask), got {index_given!r}")
        H, W = masks[0].masks.shape[-2:]
        picture = None if image is None else image_batch(image, first_only=True)  # [1, h, w, 3]
        picture_hw = None if picture is None else tuple(picture.shape[1:3])
        x, y = core_pixels.grid_pixel((x, y), picture_hw, (H, W))
        if core_pixels.of_the_picture(asked, picture_hw, (H, W)):
            # a pixel of the picture, picked before the first run showed the masks' grid
            log.warning(
                "HeadSeg Mask Select: x, y = %d, %d lie outside the masks' %dx%d grid but inside the %dx%d "
                "image, so they are read as a pixel of the image: %d, %d on the masks' grid. x and y are "
                "pixels of the masks' grid; scale a pixel of a larger picture to it first.",
                *asked, W, H, picture_hw[1], picture_hw[0], x, y,
            )
        elif [x, y] != asked:
            # e.g. the examples' 256, 256 on a smaller image, or a pixel kept from a larger one: failing
            # would fail again on every queue (a failed run sends the picker no picture to click on), so
            # the nearest pixel of the grid is used and the picker adopts it
            log.warning(
                "HeadSeg Mask Select: x, y = %d, %d lie outside the masks' %dx%d grid (x from 0 to %d, y from 0 "
                "to %d: pixels of the sampled image), so the nearest pixel of the grid is used: %d, %d. The "
                "picker shows it; click the picture to pick another pixel.",
                *asked, W, H, W - 1, H - 1, x, y,
            )
        if picture is not None:
            h, w = picture_hw
            if core_pixels.aspect_differs(picture_hw, (H, W)) and _first_time((w, h, W, H)):  # once per pair of sizes
                log.warning(
                    "HeadSeg Mask Select: the %dx%d image has another aspect ratio than the masks' %dx%d grid, so "
                    "the picture and the overlays are stretched to the grid; the image is probably the picture "
                    "before it was scaled to the sampled size: connect the scaled one (or the decoded image).",
                    w, h, W, H,
                )
            # a photo whose sides are not multiples of 8: VAE Encode's centred window, which the masks cover
            # exactly; any other size: shown stretched to the masks' size
            picture = core_pixels.fit_picture(picture, H, W)  # [1, H, W, 3]
        asked_points = [(*p, True) for p in include] + [(*p, False) for p in exclude]  # (x, y, kept in)
        include, exclude = ([core_pixels.grid_pixel(p, picture_hw, (H, W)) for p in ps] for ps in (include, exclude))
        used_points = [(*p, True) for p in include] + [(*p, False) for p in exclude]
        moved = [(a, b) for a, b in zip(asked_points, used_points) if a != b]
        if moved:  # as for x and y: mapped from the picture, or moved onto the grid
            log.warning(
                "HeadSeg Mask Select: more_points %s lie outside the masks' %dx%d grid, so they are read as %s "
                "(a pixel of the larger image mapped onto the grid, any other moved to the nearest pixel of it).",
                "; ".join(_point_text(a) for a, _ in moved), W, H, "; ".join(_point_text(b) for _, b in moved),
            )

        make = outputs_to_make(cls, "HeadSeg_MaskSelectAtPixel")
        held = _check_outputs(masks, x, y, "mask" in make)  # per image, the masks holding (x, y)
        chosen = torch.zeros(len(masks), H, W) if "mask" in make else None  # [B, H, W]
        first, found = None, []  # the masks at the pixel of image 0 (the outputs show them); counts of all
        for b, ms in enumerate(masks):
            here = core_masks.masks_at_pixel(ms, x, y, include, exclude)  # finest first
            n = int(here.masks.shape[0])
            found.append(n)
            if n and chosen is not None:
                chosen[b] = mask_bytes(here.masks[min(index, n - 1)])  # 0/1 into float32, no float copy first
            if b == 0:
                first = here
        empty = [b for b, n in enumerate(found) if n == 0]
        # an image with no mask at (x, y) itself is not more_points' doing: min_area dropped its masks there
        no_mask = [b for b in empty if held[b] == 0]
        no_fit = [b for b in empty if b not in no_mask]  # masks at (x, y), none fitting more_points
        # what that leaves them: the MASK output all zeros there, or, when no node reads it (none is made), no mask
        outcome = "the mask output is all zeros" if chosen is not None else "no mask is chosen"
        if no_fit:
            log.warning(
                "HeadSeg Mask Select: no mask of image(s) %s contains the pixel %d, %d and fits more_points "
                "(%s on the masks' grid), so %s for them: remove a point.",
                ", ".join(map(str, no_fit)), x, y, "; ".join(map(_point_text, used_points)), outcome,
            )
        if no_mask:  # with the mask read: an inpainting pass would change nothing
            log.warning(
                "HeadSeg Mask Select: the pixel %d, %d lies in no mask of image(s) %s (Mask Merge's min_area "
                "dropped the masks there), so %s for them: lower min_area or pick another pixel.",
                x, y, ", ".join(map(str, no_mask)), outcome,
            )
        here = first
        count = int(here.masks.shape[0])
        if count:
            stack = mask_to_comfy(here.masks)  # [count, H, W]
        else:
            stack = torch.zeros(1, H, W)  # [1, H, W]: MASK batches cannot be empty
        base = picture if picture is not None else core_preview.mask_partition_picture(masks[0])  # [1, H, W, 3]
        overlay = core_preview.overlay_masks(base, stack)  # [count or 1, H, W, 3]

        # a thumbnail stays the same when only the index changes, or at a pixel of the same masks; the picture
        # click after click (saved last, so that the thumbnails of this run never push it out of the saved ones)
        thumbnails = preview_refs(core_preview.fit_to_pixels(overlay, _MASK_PREVIEW_PIXELS), reuse=True) if count else []
        ui = {
            "headseg_image": preview_refs(base, reuse=True),
            "headseg_size": [int(W), int(H)],
            "headseg_pixel": [x, y],
            "headseg_pixel_asked": asked,
            "headseg_index": [min(index, count - 1) if count else -1],
            "headseg_masks": thumbnails,
            "headseg_mask_info": [
                {"area": int(a), "k": int(k), "cluster": int(c)}
                for a, k, c in zip(here.area.tolist(), here.k.tolist(), here.cluster.tolist())
            ],
            "headseg_points": [[px, py, 1] for px, py in include] + [[px, py, 0] for px, py in exclude],
            "headseg_points_asked": [more_points],
            **({"headseg_picture_size": [int(picture_hw[1]), int(picture_hw[0])]} if picture_hw else {}),
            # ComfyUI runs the node once per item of a list (latents from Rebatch Latents) and joins the
            # runs' payloads key by key: the picker takes the first item's share of the joined lists
            "headseg_item": [{"masks": len(thumbnails), "points": len(include) + len(exclude)}],
            "headseg_run": [uuid.uuid4().hex],
        }
        # masks_at_pixel and overlay are drawn for the thumbnails either way; kept only when a node reads them
        return io.NodeOutput(
            chosen, stack if "masks_at_pixel" in make else None, overlay if "overlay" in make else None, count, ui=ui
        )


def _check_outputs(masks: list, x: int, y: int, mask_made: bool = True) -> list[int]:
    """Refuses, naming `masks`, outputs that would not fit in memory: the chosen MASK of every image
    (4 bytes per pixel; only when ``mask_made``: some node reads the mask output), image 0's masks at the
    pixel beside those of the image being read (1 byte per pixel each), image 0's masks at the pixel as a
    MASK batch and as overlays (16 bytes per pixel each, and 4 for the overlay's weights), and the picture
    they are drawn on (20 bytes per pixel at most).
    Counted for every mask holding (x, y), before more_points narrows them -> how many hold it, per image."""
    B, (H, W) = len(masks), masks[0].masks.shape[-2:]
    held = [int(ms.masks[:, y, x].sum()) for ms in masks]  # masks holding the pixel, per image
    check_memory(
        (B * H * W * 4 if mask_made else 0) + (held[0] + max(held)) * H * W + held[0] * H * W * 20 + H * W * 20,
        "masks",
        f"the {held[0]} masks at pixel {x}, {y} as a MASK batch and overlays at {W}x{H} pixels"
        + (f", and the chosen mask of {B} image(s)" if mask_made else ""),
        "Use fewer cluster counts in Multi K-Means, a lower iou_threshold or a larger min_area in Mask Merge, or "
        "smaller images",
    )
    return held


# (picture w, h, grid W, H) of the stretched pictures Mask Select has warned about (at most 64 kept)
_stretch_warned: set[tuple] = set()


def _first_time(sizes: tuple) -> bool:
    """True the first time Mask Select stretches a picture of these sizes since the server started."""
    if sizes in _stretch_warned:
        return False
    if len(_stretch_warned) >= 64:
        _stretch_warned.clear()
    _stretch_warned.add(sizes)
    return True


# The browser's mask thumbnails (and the overlay shown on hover) are written at no more than this many
# pixels: they are seen at thumbnail or node size, and each PNG costs ~0.12 s at 1024x1024.
_MASK_PREVIEW_PIXELS = 512 * 512


