"""HeadSeg's pipeline stages as ComfyUI V3 nodes (paper sections 3-4).

recording -> HeadPCA -> Upsample -> MultiKMeans -> MaskMerge -> MaskSelectAtPixel -> MASK.
Each node converts ComfyUI values, calls one stage of ``nodes/core`` and returns; inputs are
never modified (ComfyUI shares cached outputs between nodes and prompts by reference).
"""

from __future__ import annotations

import math

import torch
from comfy_api.latest import io

from . import types as hs
from .core import kmeans as core_kmeans
from .core import masks as core_masks
from .core import pca as core_pca
from .core import preview as core_preview
from .core import upsample as core_upsample
from .core.pca import HeadFeatures
from .core.recording import NonFiniteLayerError, integer_index, parse_levels
from .mask_select_node import MaskSelectAtPixel
from .node_utils import (
    CATEGORY,
    DEVICE_CHOICES,
    POSITION_CHOICES,
    as_recording,
    check_memory as _check_memory,
    combo_error,
    device_input,
    expect as _expect,
    integer_input,
    label_previews,
    log,
    mask_bytes,
    parse_positions,
    preview_refs,
    run_on_device,
)



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
                        "(SDXL's) at every 2nd (or n-th) pixel."
                    ),
                ),
            ],
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
        height, width = core_preview.pca_rgb_grid_size(selected.layers, selected.image_size)
        _check_memory(  # before the PCA: a recording file can hold any number of heads (a model's: 1300 at most)
            core_pca.recording_pca_bytes(selected, components) + pca_rgb_bytes(selected),
            "recording",
            f"the {components} principal components of the {selected.num_heads} selected heads in "
            f"{len(selected.layers)} layer(s) and pca_rgb, their picture ({width}x{height} pixels),",
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
        grid = core_preview.pca_rgb_grid(features, batch_index=0)  # [1, rows*th, cols*tw, 3]
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
        ui = {"images": preview_refs(_pca_preview(grid)), "text": [text], "headseg_summary": [summary]}
        return io.NodeOutput(features, grid, ui=ui)


def pca_rgb_bytes(rec) -> int:
    """Bytes Head PCA allocates for its pca_rgb picture of the layers of ``rec`` (a Recording or HeadFeatures),
    an upper estimate: the picture [1, height, width, 3] float32 (12 bytes per pixel), six times the largest
    layer drawn, as RGB float32 tiles or on its token grid, whichever is larger (its components as float32,
    their normalisation's temporaries; the tiles and their copy into the row), and 1 MiB (indices). Against
    every tensor allocated (tests/support/peak_memory.py): 1.19 x the picture for 16 SD2.1-like layers at
    512x512 (estimate 1.46 x), 1.13 x for 60 SDXL-like layers at 1024x1024 (1.22 x), 3.0 x for one layer of
    3000 heads (7.0 x)."""
    height, width = core_preview.pca_rgb_grid_size(rec.layers, rec.image_size)
    tile = (height // len(rec.layers)) * (width // max(int(t.shape[1]) for t in rec.layers.values()))  # th * tw
    row = max(int(t.shape[1]) * max(tile, int(t.shape[2]) * int(t.shape[3])) for t in rec.layers.values())
    return 12 * height * width + 6 * 12 * row + 2**20


# Head PCA's preview PNG has at most this many pixels on its longer side; the pca_rgb output keeps every
# pixel. SDXL's grid of 60 layers is 3840 x 1280 (a PNG of several MB, ~0.26 s on a 2-core CPU); SD2.1's
# 960 x 1280 fits.
_PCA_PREVIEW_SIDE = 2048


def _pca_preview(grid: torch.Tensor) -> torch.Tensor:
    """pca_rgb [1, H, W, 3] -> the picture the node shows, [1, ceil(H / f), ceil(W / f), 3]: every f-th row and
    column from the first (nearest, so token cells stay sharp), f the smallest integer that brings the longer
    side to at most _PCA_PREVIEW_SIDE; the grid itself (f = 1) when it fits."""
    f = math.ceil(max(grid.shape[1:3]) / _PCA_PREVIEW_SIDE)
    return grid if f == 1 else grid[:, ::f, ::f]  # a view


def _recorded_levels(rec, positions) -> list[int]:
    """The grid levels that have layers at the chosen positions of the recording, ascending."""
    return sorted({rec.grid_level(key) for key in rec.layers if key.position in positions})


class Upsample(io.ComfyNode):
    """Head features -> one virtual stack at image resolution.

    UI payload: ``text`` (one summary line: channels, grids, output size, mode).
    """

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadSeg_Upsample",
            display_name="HeadSeg Upsample",
            category=CATEGORY,
            description=(
                "Brings the PCA features of all layers onto the image's pixel grid (bilinear or "
                "nearest), optionally weighting each layer by its resolution (paper eq. 5). The stack "
                "is never materialised, so 512x512 with 175 heads stays small and this node takes "
                "milliseconds. The upsampling-error map (eq. 6) is its own node, Upsampling Error Map."
            ),
            inputs=[
                hs.HeadFeatures.Input("features", tooltip="Per-head PCA features from Head PCA."),
                io.Combo.Input(
                    "mode",
                    options=["bilinear", "nearest"],
                    default="bilinear",
                    tooltip=(
                        "Interpolation of coarse grids to pixels. 'bilinear' (default, the paper's choice) "
                        "gives smooth boundaries; 'nearest' gives blocky masks aligned to the token grid."
                    ),
                ),
                io.Boolean.Input(
                    "reweight",
                    default=False,
                    tooltip=(
                        "Eq. 5: scale each layer by its grid's resolution / the finest grid's (a grid at 1/2, "
                        "1/4, 1/8 of the latent: 0.5, 0.25, 0.125), so fine layers dominate the clustering. Off "
                        "(default): all heads count equally."
                    ),
                ),
            ],
            outputs=[
                hs.FeatureStack.Output(
                    display_name="stack",
                    tooltip="All selected heads' features on the image pixel grid (lazy; at image resolution).",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, mode="bilinear") -> bool | str:
        return combo_error("mode", mode, core_upsample.MODES) or True

    @classmethod
    def execute(cls, features, mode="bilinear", reweight=False) -> io.NodeOutput:
        _expect(features, HeadFeatures, "features", "HEADSEG_FEATURES from Head PCA")
        stack = core_upsample.make_feature_stack(features, mode=mode, reweight=bool(reweight))
        H, W = stack.size
        grids = ", ".join(f"{h}x{w}" for h, w in stack.grid_sizes)
        text = f"{stack.num_channels} channels on {len(stack.grids)} grids ({grids}) -> {W}x{H} px, {mode}" + (
            ", reweighted (eq. 5)" if reweight else ""
        )
        return io.NodeOutput(stack, ui={"text": [text]})


class UpsamplingErrorMap(io.ComfyNode):
    """Feature stack -> eq. 6 upsampling-error map as an IMAGE (a picture to look at; masks do not need it)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadSeg_UpsamplingError",
            display_name="HeadSeg Upsampling Error Map",
            category=CATEGORY,
            description=(
                "Paper eq. 6: per pixel, the mean |bilinear - nearest| upsampling of every channel of the "
                "stack, normalised to 0..1 per image. Bright pixels lie where the token grids disagree, i.e. "
                "on boundaries between regions. Only for looking: the masks do not need it, and it costs "
                "about as much as the k-means (every channel at every pixel)."
            ),
            inputs=[
                hs.FeatureStack.Input("stack", tooltip="The feature stack from Upsample."),
            ],
            outputs=[
                io.Image.Output(
                    display_name="error_map",
                    tooltip=(
                        "Eq. 6 upsampling error per pixel, normalised to 0..1 per image: bright = boundaries "
                        "between regions. Images of more than 256x256 = 65536 pixels get it at every f-th pixel, each value "
                        "filling its f x f block."
                    ),
                ),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, stack) -> io.NodeOutput:
        _expect(stack, core_upsample.FeatureStack, "stack", "HEADSEG_FEATURE_STACK from Upsample")
        H, W = core_upsample.check_stack(stack)
        _check_memory(
            error_map_bytes(stack),
            "stack",
            f"the upsampling-error map of {stack.batch_size} image(s) at {W}x{H} pixels",
            "Leave Upsampling Error Map out (the masks do not need it), or use fewer or smaller images",
        )
        small, by_row, by_col = core_upsample.upsampling_error_blocks(stack)  # [B, ny, nx], [H], [W]
        # coloured where it is computed, then spread over the blocks: the same pixels as colouring the
        # [B, H, W] map (each image's maximum is one of its lattice values), without a batch of full-size
        # float temporaries (about five times the picture)
        err_img = core_preview.error_map_image(small)  # [B, ny, nx, 3]
        if by_row is not None:
            err_img = err_img.index_select(1, by_row).index_select(2, by_col)  # [B, H, W, 3]
        return io.NodeOutput(err_img, ui={"images": preview_refs(err_img[:1])})


def error_map_bytes(stack) -> int:
    """Bytes Upsampling Error Map allocates, an upper estimate: its picture [B, H, W, 3] float32 (12 per pixel
    and image), on a large image the rows spread first ([B, H, nx, 3], 12 per entry), 64 per pixel of the
    lattice where eq. 6 is computed and coloured (its sums and the colouring's temporaries), and the chunks
    of channels eq. 6 works through (core_upsample._CHUNK_BYTES), and the preview PNG of the first image,
    which ComfyUI's writer converts beside the picture through two float32 numpy copies (255 x, clipped: 24
    bytes per pixel). Against every tensor allocated (tests/support/peak_memory.py), 80 channels on 32x32
    and 8x8 grids: four images at 256x256, 60 bytes per pixel and image (estimate 146); three at 1000x760,
    16 (estimate 34). SD2.1's grids, one image at 2048x2048: 152 MB of RSS at the peak (58 MB of tensors
    and the preview's conversion; estimate 178 MB, 78 MB without the preview)."""
    B, (H, W) = stack.batch_size, stack.size
    f = core_upsample.error_lattice_step(H, W)
    ny, nx = len(range(f // 2, H, f)), len(range(f // 2, W, f))
    spread = 12 * B * H * nx if f > 1 else 0
    preview = 24 * H * W
    return 12 * B * H * W + spread + 64 * B * ny * nx + core_upsample._CHUNK_BYTES + preview


class MultiKMeans(io.ComfyNode):
    """Feature stack -> k-means label maps for several cluster counts (+ colour maps).

    UI payload: ``images`` (one colour map per k and image of the first _PREVIEW_IMAGES, k-major: k0 image0,
    k0 image1, ...; palette PNGs of the label maps, the colour_maps output's pixels), ``headseg_labels``
    (one caption per picture, e.g. "k=5"), ``headseg_k`` (the cluster counts), ``text`` (a note when some
    images' colour maps are not shown; empty otherwise).
    """

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadSeg_MultiKMeans",
            display_name="HeadSeg Multi K-Means",
            category=CATEGORY,
            description=(
                "Clusters every pixel's stacked head features with exact k-means (k-means++ start, "
                "Lloyd iterations until the clusters settle, fixed seed) once per cluster count. Few "
                "clusters give large regions (object vs background), many give parts (eyes, ears). "
                "Shows each k as a colour map."
            ),
            inputs=[
                hs.FeatureStack.Input("stack", tooltip="Upsampled features from Upsample."),
                io.String.Input(
                    "cluster_counts",
                    default="2,5,6,10,20",
                    tooltip=(
                        f"Comma-separated cluster counts k (each from 1 to {core_kmeans.MAX_CLUSTERS}, and at most "
                        "the number of cells of the finest token grid; together at most "
                        f"{core_kmeans.MAX_TOTAL_CLUSTERS}). Small k: coarse regions; large k: small parts, slower "
                        "and one mask per cluster (on a 2-core CPU at 512x512, k = 20 takes 0.14 - 0.24 s and "
                        "k = 256 from about 4 - 5 s to 45 s, as the features need more or fewer iterations; "
                        "Cancel stops it within one iteration)."
                    ),
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**31 - 1,
                    control_after_generate=False,  # fixed: re-queueing must reuse the cached clusters
                    tooltip="Seed of the k-means++ initialisation; the same seed gives the same clusters.",
                ),
                device_input(
                    tooltip=(
                        "Where the clustering runs; the clusters come back to the CPU either way. 'auto' "
                        "(default): ComfyUI's GPU when it has a CUDA or ROCm one, else the CPU; a GPU that runs "
                        "out of memory falls back to the CPU. 'gpu': the GPU, or an error. 'cpu': the CPU. "
                        "A GPU's labels can differ from the CPU's in a few pixels."
                    ),
                ),
            ],
            outputs=[
                hs.Clusters.Output(
                    display_name="clusters",
                    tooltip="Label maps at image resolution for every k (clusters ordered by decreasing area).",
                ),
                io.Image.Output(
                    display_name="colour_maps",
                    tooltip="One colour map per k and image, k ascending then batch index: [len(k) * B, H, W, 3].",
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, cluster_counts="2,5,6,10,20", device="auto") -> bool | str:
        if isinstance(cluster_counts, str):
            try:
                core_kmeans.parse_cluster_counts(cluster_counts)
            except ValueError as exc:
                return str(exc)
        return combo_error("device", device, DEVICE_CHOICES) or True

    @classmethod
    def execute(cls, stack, cluster_counts="2,5,6,10,20", seed=0, device="auto") -> io.NodeOutput:
        import comfy.model_management
        import comfy.utils

        _expect(stack, core_upsample.FeatureStack, "stack", "HEADSEG_FEATURE_STACK from Upsample")
        counts = core_kmeans.parse_cluster_counts(cluster_counts)
        seed = integer_input(seed, "seed", "an integer")
        B, (H, W) = stack.batch_size, stack.size
        _check_memory(
            # uint8 label maps + float32 RGB colour maps, per k and image; label_colours' int64 index of one k's
            # label maps (8 bytes per pixel and image) and 1 MiB (palettes, previews' tables)
            len(counts) * B * H * W * (1 + 12) + 8 * B * H * W + 2**20,
            "cluster_counts",
            f"the label maps and colour maps of {len(counts)} cluster count(s) for {B} image(s) at {W}x{H} pixels",
            "Use fewer cluster counts, or fewer images per batch (e.g. Rebatch Latents before sampling)",
        )
        from comfy_execution.utils import get_executing_context

        # the sweep reports progress from its worker threads, where ComfyUI's executing context (a
        # context variable) is not set: the bar names this node itself. Its steps: the STAGES (3) of every
        # (image, k), the total multi_kmeans reports with every step
        context = get_executing_context()
        total = B * len(counts) * core_kmeans.STAGES
        bar = comfy.utils.ProgressBar(total, node_id=context.node_id if context is not None else None)

        def sweep_on(dev: torch.device) -> core_kmeans.ClusterSweep:
            if dev.type == "cpu":  # the clustering's own working memory, held while it runs (a GPU's is its own)
                workers = min(torch.get_num_threads(), len(counts))  # the k clustered at once, largest first
                busy = sorted(counts, reverse=True)[:workers]
                _check_memory(
                    len(counts) * B * H * W + kmeans_sweep_bytes(stack, counts, busy),
                    "cluster_counts",
                    f"clustering at {W}x{H} pixels on the CPU (k = {', '.join(map(str, busy))} at once, the working "
                    "sets of every k, and the label maps)",
                    "Use fewer or smaller cluster counts, or smaller images, or run Multi K-Means on a GPU (device)",
                )
            # only the small native-grid features go to the GPU; ComfyUI caches the sweep, so it lives on the CPU
            sweep = core_kmeans.multi_kmeans(
                stack.to(dev),
                counts,
                seed=seed,
                progress=lambda done, total: bar.update_absolute(done, total),
                check=comfy.model_management.throw_exception_if_processing_interrupted,  # Cancel in the UI
            )
            return sweep.to("cpu")

        sweep = run_on_device(device, sweep_on, "Multi K-Means")
        images = torch.empty(len(sweep.results) * B, H, W, 3)  # [len(k) * B, H, W, 3], filled k by k
        shown = min(B, _PREVIEW_IMAGES)  # images of the batch whose colour maps the node shows
        labels, maps = [], []  # maps: (labels [H, W], colours [k, 3]) of each colour map shown
        for i, (k, result) in enumerate(sweep.results.items()):
            core_preview.label_colours(result.labels, k, out=images[i * B : (i + 1) * B])  # [B, H, W, 3] in place
            labels += [f"k={k}" if B == 1 else f"k={k} #{b}" for b in range(shown)]
            colours = core_preview.palette(k)  # [k, 3]: one table for the k's colour maps shown
            maps += [(result.labels[b], colours) for b in range(shown)]
        # the colour maps' pixels, written from the label maps (palette PNGs, several times faster)
        # "text" in every run, empty when all are shown: ComfyUI joins the payloads of a list's runs (latents
        # from Rebatch Latents, of unequal batches) by the first run's keys, so a key only some runs had failed the
        # prompt with KeyError: 'text' (a first batch beyond _PREVIEW_IMAGES) or was dropped (a later one)
        note = f"colour maps of the first {shown} of {B} images shown; the colour_maps output holds all {B}"
        ui = {
            "images": label_previews(maps), "headseg_labels": labels, "headseg_k": list(sweep.results),
            "text": [note] if shown < B else [],
        }
        return io.NodeOutput(sweep, images, ui=ui)


def kmeans_work_bytes(stack, k: int) -> int:
    """Bytes one k of Multi K-Means holds while it is clustered alone on the CPU, an upper estimate: its
    working set (_working_set_bytes) and what its phases add (_kmeans_phase_bytes), as kmeans_sweep_bytes
    counts a sweep of that k alone. Against every tensor allocated on one thread (tests/support/peak_memory.py),
    SD2.1's grids (1400 channels): 25, 51 and 169 MB at 512, 1024 and 2048 px for k = 2 (estimate 27, 61 and 198 MB), 71 MB at 1024 px for k = 20 (94),
    139 MB for k = 64 (183), 218 and 442 MB at 512 and 1024 px for k = 256 (256, 633); SDXL's (8800
    channels) at 1024 px: 70 MB for k = 2 (89), 73 MB for k = 20 (103), 134 MB for k = 64 (177); at 512 px,
    156 MB for k = 128 (253) and 338 MB for k = 256 (498)."""
    return kmeans_sweep_bytes(stack, [k], [k])


def kmeans_sweep_bytes(stack, counts, busy) -> int:
    """Bytes Multi K-Means' clustering of the k of ``counts`` holds on the CPU, an upper estimate: the
    working sets of every k (one per number of points: kmeans._prepare makes them all before the first k
    runs, and they are held until the image's last k ends) and the phases of the k of ``busy``, clustered
    at once (one per intra-op thread). Four k from 250 to 256 on one thread held their four working sets,
    about 350 MB on SD2.1's grids at 256x256, where one k's estimate counted one."""
    held = sum(_working_set_bytes(stack, n) for n in {_working_set_points(stack, k) for k in counts})
    return held + sum(_kmeans_phase_bytes(stack, k) for k in busy)


def _working_set_points(stack, k: int) -> int:
    """The pixels n of k's working set: max(512, 16 k), at most the image's (kmeans.working_set)."""
    H, W = stack.size
    return min(H * W, max(core_kmeans._WS_MIN_POINTS, core_kmeans._WS_POINTS_PER_K * k))


def _working_set_bytes(stack, n: int) -> int:
    """A working set of n pixels: 8 * C * n (its C-channel features, and their gathering) plus 4 * n^2
    (their Gram matrix)."""
    return n * (8 * stack.num_channels + 4 * n)


def _kmeans_phase_bytes(stack, k: int) -> int:
    """What one k adds to its working set, the larger of its two phases, and 8 MiB (chunks of scores): the
    k-means++ starts' Lloyd on the working set, up to four [starts, k, n] float32 tensors at once (the
    scores and the cluster sums before and after an update that moves most points: 16 * starts * k * n
    bytes, starts as kmeans._ws_starts), or the polish at full resolution, per pixel 40 (int64 labels and
    their chunks, best scores, the lattices) plus 8 * k * (token-grid columns of all grids) / W (the
    scores upsampled along y)."""
    H, W = stack.size
    columns = sum(w for _, w in stack.grid_sizes)  # token-grid columns of all grids
    n = _working_set_points(stack, k)
    starts = 16 * core_kmeans._ws_starts(k, n) * k * n
    polish = (40 + 8 * k * columns / W) * H * W
    return int(2**23 + max(starts, polish))


# Multi K-Means shows the colour maps of at most this many images of a batch (a PNG per k and image;
# the colour_maps output holds every image's).
_PREVIEW_IMAGES = 8


class MaskMerge(io.ComfyNode):
    """Cluster sweep -> merged masks of every image (+ all merged masks of one image, or of all, as a MASK batch)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HeadSeg_MaskMerge",
            display_name="HeadSeg Mask Merge",
            category=CATEGORY,
            description=(
                "Turns every cluster of every k into a mask, merges masks that are nearly the same "
                "region (IoU at or above the threshold; the first one found is kept) and drops masks "
                "smaller than the minimum area. The result is a hierarchy of masks, from parts to objects."
            ),
            inputs=[
                hs.Clusters.Input("clusters", tooltip="Label maps for every k from Multi K-Means."),
                io.Float.Input(
                    "iou_threshold",
                    default=0.9,
                    min=0.01,
                    max=1.0,
                    step=0.01,
                    tooltip=(
                        "Masks with IoU >= this become one (0.01 .. 1). 1.0 merges only identical masks; "
                        "lower values merge more; at 0.01 masks that share 1 % of their union merge."
                    ),
                ),
                io.Float.Input(
                    "min_area",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                    tooltip=(
                        "Smallest mask kept, as a fraction of the image area (0.01 = 1%). 0 keeps all; "
                        "high values keep only large regions (a pixel may then lie in no mask)."
                    ),
                ),
                io.Int.Input(
                    "batch_index",
                    default=0,
                    min=-1,
                    max=4095,
                    optional=True,  # prompts saved before it existed leave it out: image 0, as then
                    tooltip=(
                        "Which image of the batch all_masks holds: 0 = the first. -1 = every image, its masks "
                        "one image after the other (the node's text gives the count per image; one all-zero "
                        "mask when no image has any; for a dataset, connect masks to Save Label Maps, whose "
                        "files then list each image's masks in this order). An index past "
                        "the last image stops with an error."
                    ),
                ),
            ],
            outputs=[
                hs.Masks.Output(display_name="masks", tooltip="Merged masks of every image of the batch."),
                io.Mask.Output(
                    display_name="all_masks",
                    tooltip=(
                        "All merged masks of the image batch_index picks (or of every image) as a MASK batch "
                        "[M, H, W] (0/1) at image resolution; one all-zero mask when min_area leaves none "
                        "(a MASK batch cannot be empty)."
                    ),
                ),
            ],
        )

    @classmethod
    def execute(cls, clusters, iou_threshold=0.9, min_area=0.0, batch_index=0) -> io.NodeOutput:
        _expect(clusters, core_kmeans.ClusterSweep, "clusters", "HEADSEG_CLUSTERS from Multi K-Means")
        if not clusters.results:
            raise ValueError("clusters: the sweep holds no cluster count; expected the output of Multi K-Means")
        B = next(iter(clusters.results.values())).labels.shape[0]
        index = integer_index(batch_index)
        if index is None or not -1 <= index < B:
            raise ValueError(
                f"batch_index: expected an image of the batch of {B} (0 .. {B - 1}), or -1 for every image, "
                f"got {batch_index!r}"
            )
        core_masks.check_merge_options(iou_threshold, min_area)  # a linked value comes as it is (None, text)
        H, W = clusters.size
        total_k = sum(int(k) for k in clusters.results)
        merged = []
        for b in range(B):
            _check_mask_memory(
                core_masks.merge_sweep_bytes(clusters.results, (H, W)),
                f"up to {total_k} masks of image {b} (one per cluster where none merge) and the overlap counts",
                clusters,
            )
            merged.append(
                core_masks.merge_sweep(clusters, b, iou_threshold=float(iou_threshold), min_area=float(min_area))
            )
        chosen = merged if index == -1 else [merged[index]]
        M = sum(int(m.masks.shape[0]) for m in chosen)
        if M == 0:
            all_masks = torch.zeros(1, H, W)  # [1, H, W]: an empty MASK batch is not valid downstream
        else:
            which = "every image" if index == -1 else f"image {index}"
            _check_mask_memory(4 * M * H * W, f"all_masks, the {M} merged masks of {which} as a MASK batch", clusters)
            # filled image by image: per-image copies joined by torch.cat would hold the batch twice
            all_masks = torch.empty(M, H, W)  # [M, H, W]
            start = 0
            for m in chosen:
                n = int(m.masks.shape[0])
                all_masks[start : start + n] = mask_bytes(m.masks)  # 0/1 float32, from the masks' bytes
                start += n
        counts = ", ".join(str(int(m.masks.shape[0])) for m in merged)
        return io.NodeOutput(merged, all_masks, ui={"text": [f"merged masks per image: {counts}"]})


def _check_mask_memory(need: int, what: str, clusters) -> None:
    """_check_memory for Mask Merge: names `clusters` and Multi K-Means' cluster_counts."""
    ks = ",".join(str(int(k)) for k in clusters.results)
    H, W = clusters.size
    _check_memory(
        need, "clusters", f"{what} at {W}x{H} pixels (cluster_counts {ks})",
        "Use fewer or smaller cluster counts in Multi K-Means, fewer images or smaller ones",
    )


NODES = [HeadPCA, Upsample, UpsamplingErrorMap, MultiKMeans, MaskMerge, MaskSelectAtPixel]
