"""Mask Merge: a cluster sweep -> every image's merged masks (one per cluster, those of IoU at or above a
threshold merged, small ones dropped; paper section 4.1), and all merged masks of one image, or of all, as a
MASK batch.

The node converts ComfyUI values, calls nodes/core/masks.py and returns; its inputs are never modified
(ComfyUI shares cached outputs between nodes and prompts by reference).
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from . import types as hs
from .core import kmeans as core_kmeans
from .core import masks as core_masks
from .core.values import integer_index
from .memory_checks import check_memory as _check_memory
from .node_utils import CATEGORY, expect as _expect, mask_bytes, outputs_to_make


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
            # ComfyUI's prompt: which outputs it links (node_utils.outputs_to_make)
            hidden=[io.Hidden.prompt],
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
        make = outputs_to_make(cls, "HeadSeg_MaskMerge")
        if "all_masks" not in make:  # no node reads it: not built, nothing kept
            all_masks = None
        elif M == 0:
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
