"""Multi K-Means: a feature stack -> k-means label maps for several cluster counts, and their colour maps
(paper section 4.1).

The node converts ComfyUI values, calls nodes/core (kmeans.py; preview.py for the colour maps) and returns;
its inputs are never modified (ComfyUI shares cached outputs between nodes and prompts by reference). Here
too: the memory its clustering holds on the CPU (kmeans_sweep_bytes, kmeans_work_bytes) and how many images'
colour maps it shows.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from . import types as hs
from .core import kmeans as core_kmeans
from .core import kmeans_image as core_kmeans_image
from .core import preview as core_preview
from .core import upsample as core_upsample
from .device_choice import DEVICE_CHOICES, device_input, run_on_device
from .memory_checks import check_memory as _check_memory
from .node_utils import (
    CATEGORY,
    combo_error,
    expect as _expect,
    integer_input,
    outputs_to_make,
)
from .previews import label_previews


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
                "Lloyd iterations until the clusters settle or an iteration lowers the inertia by less than "
                "0.1 %, fixed seed) once per cluster count. Few "
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
            # ComfyUI's prompt: which outputs it links (node_utils.outputs_to_make)
            hidden=[io.Hidden.prompt],
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
        make = outputs_to_make(cls, "HeadSeg_MultiKMeans")
        # the node shows palette PNGs of the label maps: the colour maps are drawn only for a node that reads them
        draw = "colour_maps" in make
        _check_memory(
            # uint8 label maps per k and image, 1 MiB (palettes, previews' tables) and, when drawn, float32 RGB
            # colour maps per k and image and label_colours' int64 index of one k's label maps (8 bytes per pixel
            # and image)
            len(counts) * B * H * W + 2**20 + (len(counts) * B * H * W * 12 + 8 * B * H * W if draw else 0),
            "cluster_counts",
            f"the label maps{' and colour maps' if draw else ''} of {len(counts)} cluster count(s) for {B} image(s) "
            f"at {W}x{H} pixels",
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
        images = torch.empty(len(sweep.results) * B, H, W, 3) if draw else None  # [len(k) * B, H, W, 3], k by k
        shown = min(B, _PREVIEW_IMAGES)  # images of the batch whose colour maps the node shows
        labels, maps = [], []  # maps: (labels [H, W], colours [k, 3]) of each colour map shown
        for i, (k, result) in enumerate(sweep.results.items()):
            if draw:
                core_preview.label_colours(result.labels, k, out=images[i * B : (i + 1) * B])  # [B, H, W, 3] in place
            labels += [f"k={k}" if B == 1 else f"k={k} #{b}" for b in range(shown)]
            colours = core_preview.palette(k)  # [k, 3]: one table for the k's colour maps shown
            maps += [(result.labels[b], colours) for b in range(shown)]
        # the colour maps' pixels, written from the label maps (palette PNGs, several times faster)
        # "text" in every run, empty when all are shown: ComfyUI joins the payloads of a list's runs (latents
        # from Rebatch Latents, of unequal batches) by the first run's keys, so a key only some runs had failed the
        # prompt with KeyError: 'text' (a first batch beyond _PREVIEW_IMAGES) or was dropped (a later one)
        note = f"colour maps of the first {shown} of {B} images shown; " + (
            f"the colour_maps output holds all {B}" if draw else f"link colour_maps to get all {B}"  # none made
        )
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
    working sets of every k (one per number of points: kmeans_image's PreparedImage.prepare makes them all
    before the first k runs, and they are held until the image's last k ends) and the phases of the k of
    ``busy``, clustered at once (one per intra-op thread). Four k from 250 to 256 on one thread held their
    four working sets, about 350 MB on SD2.1's grids at 256x256, where one k's estimate counted one."""
    held = sum(_working_set_bytes(stack, n) for n in {_working_set_points(stack, k) for k in counts})
    return held + sum(_kmeans_phase_bytes(stack, k) for k in busy)


def _working_set_points(stack, k: int) -> int:
    """The pixels n of k's working set: max(512, 16 k), at most the image's (PreparedImage.working_set)."""
    H, W = stack.size
    return core_kmeans_image.working_set_points(k, H * W)


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
# the colour_maps output, when some node reads it, holds every image's).
_PREVIEW_IMAGES = 8
