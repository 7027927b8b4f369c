"""Pure torch core of HeadSeg: no ComfyUI import anywhere below this package.

One module per stage: ``recording`` (format, layer selection, file I/O), ``pca``, ``upsample``,
``kmeans`` (with ``working_set``, ``lattice`` and, for GPUs, ``kmeans_batched``), ``masks``,
``metrics``, ``preview`` (pictures), ``pipeline`` (all stages in one call).
"""
