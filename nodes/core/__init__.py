"""Pure torch core of HeadSeg: no ComfyUI import anywhere below this package.

One module per stage: ``recording`` (layers, validation, layer selection), ``recording_file`` (the file
format and its I/O), ``pca``, ``upsample``, ``kmeans`` (with ``working_set``, ``lattice`` and, for GPUs,
``kmeans_batched``), ``masks``, ``metrics``, ``pixels`` (a picture's pixels on the masks' grid), ``preview``
(pictures), ``pipeline`` (all stages in one call); ``values`` (checks of input values) and ``numerics``
(float limits and helpers) serve them all.
"""
