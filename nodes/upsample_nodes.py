"""Upsample and Upsampling Error Map: head features -> one lazy feature stack at image resolution (paper
section 4.1; the reweighting of eq. 5, section 4.2), and that stack -> the upsampling-error map (eq. 6, the
paper's appendix) as an IMAGE.

Each node converts ComfyUI values, calls nodes/core (upsample.py, error_map.py; preview.py for the picture)
and returns; inputs are never modified (ComfyUI shares cached outputs between nodes and prompts by
reference). Here too: the memory the error map takes (error_map_bytes).
"""

from __future__ import annotations

from comfy_api.latest import io

from . import types as hs
from .core import error_map as core_error_map
from .core import preview as core_preview
from .core import upsample as core_upsample
from .core.pca import HeadFeatures
from .memory_checks import check_memory as _check_memory
from .node_utils import CATEGORY, combo_error, expect as _expect
from .previews import preview_refs


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
        small, by_row, by_col = core_error_map.upsampling_error_blocks(stack)  # [B, ny, nx], [H], [W]
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
    of channels eq. 6 works through (core_error_map._CHUNK_BYTES), and the preview PNG of the first image,
    which ComfyUI's writer converts beside the picture through two float32 numpy copies (255 x, clipped: 24
    bytes per pixel). Against every tensor allocated (tests/support/peak_memory.py), 80 channels on 32x32
    and 8x8 grids: four images at 256x256, 60 bytes per pixel and image (estimate 146); three at 1000x760,
    16 (estimate 34). SD2.1's grids, one image at 2048x2048: 152 MB of RSS at the peak (58 MB of tensors
    and the preview's conversion; estimate 178 MB, 78 MB without the preview)."""
    B, (H, W) = stack.batch_size, stack.size
    f = core_error_map.error_lattice_step(H, W)
    ny, nx = len(range(f // 2, H, f)), len(range(f // 2, W, f))
    spread = 12 * B * H * nx if f > 1 else 0
    preview = 24 * H * W
    return 12 * B * H * W + spread + 64 * B * ny * nx + core_error_map._CHUNK_BYTES + preview
