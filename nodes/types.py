"""ComfyUI socket types that carry HeadSeg's stage results between nodes.

Each value is a plain Python object from ``nodes/core`` (or the live recording handle);
ComfyUI shares cached outputs by reference, so no node may mutate a value it receives.
"""

from comfy_api.latest import io

# core.recording.Recording, or recorder.LiveRecording (filled while the sampler runs).
Recording = io.Custom("HEADSEG_RECORDING")
# core.pca.HeadFeatures: per-layer principal-component scores of every head.
HeadFeatures = io.Custom("HEADSEG_FEATURES")
# core.upsample.FeatureStack: all heads on one output grid (lazy, never materialised).
FeatureStack = io.Custom("HEADSEG_FEATURE_STACK")
# core.kmeans.ClusterSweep: label maps for every cluster count k.
Clusters = io.Custom("HEADSEG_CLUSTERS")
# list[core.masks.MaskSet], one per image of the batch.
Masks = io.Custom("HEADSEG_MASKS")
