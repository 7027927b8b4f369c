"""Pure torch core of HeadSeg: no ComfyUI import anywhere below this package.

One module per stage: ``recording`` (format, layer selection, file I/O), ``pca``, ``upsample``,
``kmeans``, ``masks``, ``metrics``, ``preview`` (pictures), ``pipeline`` (all stages in one call).
"""
