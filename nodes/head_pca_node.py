"""Head PCA: a recording's selected UNet layers -> every head's top principal components (paper section 4.1),
and the PCA->RGB picture of every head (section 3, figure 3).

The node converts ComfyUI values, calls nodes/core (pca.py; preview.py for the picture) and returns; its
inputs are never modified (ComfyUI shares cached outputs between nodes and prompts by reference). Here too:
the memory its picture takes (pca_rgb_bytes) and the smaller picture the node shows.
"""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io

from . import types as hs
from .core import pca as core_pca
from .core import preview as core_preview
from .core.pca import HeadFeatures
from .core.recording import NonFiniteLayerError, parse_levels
from .device_choice import DEVICE_CHOICES, device_input, run_on_device
from .memory_checks import check_memory as _check_memory
from .node_utils import (
    CATEGORY,
    POSITION_CHOICES,
    as_recording,
    combo_error,
    integer_input,
    log,
    outputs_to_make,
    parse_positions,
)
from .previews import preview_refs


class HeadPCA(io.ComfyNode):
    """Recording -> per-head PCA features (+ PCA->RGB picture of every head).

    UI payload: ``images`` (the PCA->RGB grid of image 0, every f-th pixel of a grid longer than
    _PCA_PREVIEW_SIDE), ``text`` (one summary line) and
    ``headseg_summary`` [{recorded_heads, recorded_layers, selected_heads, selected_layers,
    image_size [H, W], components, model}].
    """

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadSeg_HeadPCA",
            display_name="HeadSeg Head PCA",
            category=CATEGORY,
            description=(
                "Reduces every recorded self-attention head to its top principal components "
                "(per head, centred, deterministic signs). Selects the UNet layers first: by default "
                "the down and up blocks at all grid levels (in the paper's table 2 down+up scores within 0.01 IoU "
                "of up alone, its best). Also draws the first three components of every head as RGB tiles (paper "
                "figure 3)."
            ),
            inputs=[
                hs.Recording.Input(
                    "recording",
                    tooltip="Recorded heads: from Record Self-Attention (after sampling) or Load Recording.",
                ),
                io.Combo.Input(
                    "positions",
                    options=POSITION_CHOICES,
                    default="down+up",
                    tooltip=(
                        "UNet blocks whose heads are used. 'down+up' (default) scores within 0.01 IoU of 'up' "
                        "alone, the paper's best (its table 2); adding 'middle' (the coarsest grid: 1/8 of the "
                        "latent on SD1.x/SD2.x, 8x8 at 512 px; 1/4 on SDXL, 32x32 at 1024 px) adds coarse, blurry "
                        "heads."
                    ),
                ),
                io.String.Input(
                    "levels",
                    default="all",
                    tooltip=(
                        "Token-grid levels to keep: 'all', or comma-separated levels where 0 = latent grid "
                        "(64x64 at 512 px), 1 = 1/2, 2 = 1/4, 3 = 1/8. Only coarse levels give blobby masks; "
                        "only level 0 gives fine, noisier masks."
                    ),
                ),
                io.Int.Input(
                    "components",
                    default=8,
                    min=1,
                    max=1024,
                    tooltip=(
                        "Principal components kept per head (1 .. head dimension, 64 on SD2.1). More keeps "
                        "finer detail and costs more k-means time; 1 keeps only each head's dominant contrast."
                    ),
                ),
                device_input(
                    tooltip=(
                        "Where the PCA runs; the features come back to the CPU either way. 'auto' (default): "
                        "ComfyUI's GPU when it has a CUDA or ROCm one (the selected layers are copied there: 23 MB "
                        "for SD2.1 at 512x512, 184 MB for SDXL at 1024x1024), else the CPU; a GPU that runs out of "
                        "memory falls back to the CPU. "
                        "'gpu': the GPU, or an error. 'cpu': the CPU, no GPU memory used. A GPU's features differ "
                        "from the CPU's by rounding."
                    ),
                ),
                io.Latent.Input(
                    "latent",
                    optional=True,
                    tooltip=(
                        "The sampler's LATENT: required with a recording from Record Self-Attention. This node "
                        "then runs after sampling and again for every new image, and reads the sampling run "
                        "that produced this LATENT (one of the last keep_runs runs of the recorded MODEL, a run of the prompt that sampled "
                        "last, the run read last, or the run read for this very LATENT while ComfyUI's cache keeps "
                        "it, as --cache-lru does, if it is among the 64 runs read last). Connect it "
                        "straight from the sampler. Leave it empty for a recording loaded from a file."
                    ),
                ),
            ],
            outputs=[
                hs.HeadFeatures.Output(
                    display_name="features",
                    tooltip="Per-head principal-component scores of the selected layers, on their own token grids.",
                ),
                io.Image.Output(
                    display_name="pca_rgb",
                    tooltip=(
                        "First three components of every selected head as RGB, one tile per head (the "
                        "image's shape, 64 px on its longer side), one row per layer in UNet order (image 0 "
                        f"of the batch). Every pixel; the node itself shows a grid longer than {_PCA_PREVIEW_SIDE} px "
                        "(SDXL's) at every 2nd (or n-th) pixel, and draws only those pixels while no node reads "
                        "this output."
                    ),
                ),
            ],
            # ComfyUI's prompt: which outputs it links (node_utils.outputs_to_make)
            hidden=[io.Hidden.prompt],
        )

    @classmethod
    def validate_inputs(cls, positions="down+up", levels="all", device="auto") -> bool | str:
        # checked again at execution; values linked from other nodes are not known yet here. ComfyUI
        # 0.3.75 checks no V3 combo value itself (see combo_error), so positions and device are checked
        # here too (ComfyUI then marks every input; the message names the one at fault).
        try:
            if isinstance(positions, str):
                parse_positions(positions)
            if isinstance(levels, str):
                parse_levels(levels)
        except ValueError as exc:
            return str(exc)
        return combo_error("device", device, DEVICE_CHOICES) or True

    @classmethod
    def execute(
        cls, recording, positions="down+up", levels="all", components=8, latent=None, device="auto"
    ) -> io.NodeOutput:
        rec = as_recording(recording, latent)
        components = integer_input(components, "components", "an integer from 1 to the head width")
        pos = parse_positions(positions)
        lv = parse_levels(levels)
        skipped = [  # layers the record node was set to record that this run lacks (the log says why)
            key.name for key, level in (recording.unrecorded(rec) if hasattr(recording, "unrecorded") else [])
            if key.position in pos and (lv is None or level in lv)
        ]
        try:
            selected = rec.select(positions=pos, levels=lv)
        except ValueError as exc:
            if not skipped:
                raise
            raise ValueError(f"{exc}; layer(s) {', '.join(skipped)} were not recorded in this run: see the log") from None
        have = _recorded_levels(rec, pos)
        missing = [] if lv is None else sorted(set(lv) - set(have))  # e.g. '0,1' on SDXL: level 0 has none
        make = outputs_to_make(cls, "HeadSeg_HeadPCA")  # the picture is shown either way; made whole only when read
        height, width = core_preview.pca_rgb_grid_size(selected.layers, selected.image_size)
        # pca_rgb unread: only the picture the node shows is drawn (every step-th pixel of a long one)
        step = 1 if "pca_rgb" in make else _preview_step(height, width)
        drawn_height, drawn_width = core_preview.pca_rgb_grid_size(selected.layers, selected.image_size, step=step)
        picture = (
            f"pca_rgb, their picture ({width}x{height} pixels)" if "pca_rgb" in make
            else f"the picture of them the node shows ({drawn_width}x{drawn_height} pixels; no node reads pca_rgb)"
        )
        _check_memory(  # before the PCA: a recording file can hold any number of heads (a model's: 1300 at most)
            core_pca.recording_pca_bytes(selected, components) + pca_rgb_bytes(selected, step),
            "recording",
            f"the {components} principal components of the {selected.num_heads} selected heads in "
            f"{len(selected.layers)} layer(s) and {picture},",
            "Select fewer layers with positions / levels, or check the recording file: a model's have at most a "
            "few dozen heads per layer",
        )

        def pca_on(dev: torch.device) -> HeadFeatures:
            # the selected layers go to the device; ComfyUI caches the features, so they live on the CPU
            return core_pca.recording_pca(selected.to(dev), components).to("cpu")

        try:
            features = run_on_device(device, pca_on, "Head PCA")
        except NonFiniteLayerError as exc:
            key = exc.layer
            raise ValueError(
                f"{exc} (usually a float16 overflow while sampling): leave the layer out with positions / "
                f"levels (it is a '{key.position}' layer at level {rec.grid_level(key)}), or sample with ComfyUI's "
                "--force-upcast-attention or a bfloat16 / float32 UNet"
            ) from None
        grid = core_preview.pca_rgb_grid(features, batch_index=0, step=step)  # [1, rows*th, cols*tw, 3] (/ step)
        summary = {
            "recorded_heads": rec.num_heads,
            "recorded_layers": len(rec.layers),
            "selected_heads": selected.num_heads,
            "selected_layers": len(selected.layers),
            "image_size": list(rec.image_size),
            "components": components,
            "model": rec.model,
        }
        text = (
            f"{rec.num_heads} heads recorded in {len(rec.layers)} layers; {selected.num_heads} heads in "
            f"{len(selected.layers)} layers selected ({'+'.join(pos)}, levels {'all' if lv is None else ','.join(map(str, lv))}); "
            f"{components} components each"
        )
        if missing:
            listed = lambda levels: ", ".join(map(str, levels))  # noqa: E731
            note = f"level(s) {listed(missing)} not in the recording (it has {listed(have)} at {'+'.join(pos)})"
            text += "; " + note
            log.warning("HeadSeg Head PCA: levels %r: %s", levels, note)
        if skipped:
            note = f"layer(s) {', '.join(skipped)} not recorded in this run (see the log): their heads are left out"
            text += "; " + note
            log.warning("HeadSeg Head PCA: %s", note)
        shown = _pca_preview(grid) if "pca_rgb" in make else grid  # unread: drawn as it is shown
        ui = {"images": preview_refs(shown), "text": [text], "headseg_summary": [summary]}
        return io.NodeOutput(features, grid if "pca_rgb" in make else None, ui=ui)


def pca_rgb_bytes(rec, step: int = 1) -> int:
    """Bytes Head PCA allocates for its pca_rgb picture of the layers of ``rec`` (a Recording or HeadFeatures),
    drawn at every ``step``-th pixel (pca_rgb_grid's step; 1: all of it), an upper estimate: the picture
    [1, height, width, 3] float32 (12 bytes per pixel drawn), six times the largest layer drawn, as the RGB
    float32 pixels of its row of tiles drawn or on its token grid, whichever is larger (its components as
    float32, their normalisation's temporaries; the tiles and their copy into the row), and 1 MiB (indices).
    Against every tensor allocated (tests/support/peak_memory.py): 1.19 x the picture for 16 SD2.1-like layers
    at 512x512 (estimate 1.46 x), 1.13 x for 60 SDXL-like layers at 1024x1024 (1.22 x), 3.0 x for one layer of
    3000 heads (7.0 x); at every 2nd pixel, as the node shows SDXL's grid, 1.10 x the pixels drawn (1.27 x)."""
    height, width = core_preview.pca_rgb_grid_size(rec.layers, rec.image_size)
    th, tw = height // len(rec.layers), width // max(int(t.shape[1]) for t in rec.layers.values())  # a tile
    drawn_height, drawn_width = core_preview.pca_rgb_grid_size(rec.layers, rec.image_size, step=step)

    def layer(t) -> int:  # pixels of the layer's row of tiles drawn, or its heads' tokens
        heads, h, w = (int(n) for n in t.shape[1:4])
        return max(math.ceil(th / step) * math.ceil(heads * tw / step), heads * h * w)

    row = max(layer(t) for t in rec.layers.values())
    return 12 * drawn_height * drawn_width + 6 * 12 * row + 2**20


# Head PCA's preview PNG has at most this many pixels on its longer side; the pca_rgb output keeps every
# pixel. SDXL's grid of 60 layers is 3840 x 1280 (a PNG of several MB, ~0.26 s on a 2-core CPU); SD2.1's
# 960 x 1280 fits.
_PCA_PREVIEW_SIDE = 2048


def _preview_step(height: int, width: int) -> int:
    """f: the node shows a pca_rgb picture of height x width pixels at every f-th row and column, the smallest
    integer that brings the longer side to at most _PCA_PREVIEW_SIDE (1 when it fits)."""
    return math.ceil(max(height, width) / _PCA_PREVIEW_SIDE)


def _pca_preview(grid: torch.Tensor) -> torch.Tensor:
    """pca_rgb [1, H, W, 3] -> the picture the node shows, [1, ceil(H / f), ceil(W / f), 3]: every f-th row and
    column from the first (nearest, so token cells stay sharp), f = _preview_step(H, W); the grid itself (f = 1)
    when it fits. With pca_rgb unread the node draws only these pixels (pca_rgb_grid's step)."""
    _, H, W, _ = grid.shape
    f = _preview_step(H, W)
    return grid if f == 1 else grid[:, ::f, ::f]  # a view


def _recorded_levels(rec, positions) -> list[int]:
    """The grid levels that have layers at the chosen positions of the recording, ascending."""
    return sorted({rec.grid_level(key) for key in rec.layers if key.position in positions})
