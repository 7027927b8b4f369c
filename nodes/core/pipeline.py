"""All core stages in one call: Recording [B, heads, h, w, d] layers -> merged masks per image.

select layers -> per-head PCA -> FeatureStack (virtual upsampling) -> k-means for every k -> masks
of every cluster -> merge near-duplicates. Every intermediate result is returned, so callers
(nodes, benchmarks, tests) can reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kmeans import ClusterSweep, check_sweep_options, multi_kmeans
from .masks import MaskSet, check_merge_options, merge_sweep
from .pca import HeadFeatures, recording_pca
from .recording import Recording
from .upsample import FeatureStack, check_mode, check_reweight, make_feature_stack


@dataclass
class SegmentationResult:
    """Every stage of segment(): features, stack, sweep and merged masks (one MaskSet per image)."""

    features: HeadFeatures
    stack: FeatureStack
    sweep: ClusterSweep
    masks: list[MaskSet]


def segment(
    recording: Recording,
    positions=("down", "up"),
    levels=None,
    components: int = 8,
    mode: str = "bilinear",
    reweight: bool = False,
    cluster_counts=(2, 5, 6, 10, 20),
    seed: int = 0,
    iou_threshold: float = 0.9,
    min_area: float = 0.0,
    progress=None,
) -> SegmentationResult:
    """Recording -> SegmentationResult with label maps at the image size and merged masks per image.

    recording: a Recording of [B, heads, h, w, d] layers, or an object whose snapshot() gives one.
    cluster_counts: list of ints or a string such as "2,5,6,10,20". progress(done, total) is called
    as each of the STAGES (3) of each k-means run (image, k) ends, as multi_kmeans calls it.
    """
    if hasattr(recording, "snapshot") and not isinstance(recording, Recording):
        recording = recording.snapshot()
    if not isinstance(recording, Recording):
        raise TypeError(f"recording must be a Recording, got {type(recording).__name__}")
    # argument checks that would otherwise fail only after the expensive stages
    cluster_counts, seed = check_sweep_options(cluster_counts, seed)
    check_mode(mode)
    check_reweight(reweight)
    check_merge_options(iou_threshold, min_area)
    recording.validate(check_finite=False)  # layer keys, shapes, grids; NaN / inf are named per layer by the PCA
    selected = recording.select(positions, levels)
    features = recording_pca(selected, components)
    stack = make_feature_stack(features, mode=mode, reweight=reweight)
    sweep = multi_kmeans(stack, cluster_counts, seed=seed, progress=progress)
    masks = [
        merge_sweep(sweep, b, iou_threshold=iou_threshold, min_area=min_area)
        for b in range(stack.batch_size)
    ]
    return SegmentationResult(features, stack, sweep, masks)
