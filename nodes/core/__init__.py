"""Pure torch core of HeadSeg: no ComfyUI import anywhere below this package.

One module per stage: ``recording`` (layers, validation, layer selection), ``recording_file`` (the file
format and its I/O), ``pca``, ``upsample``, ``error_map`` (eq. 6), ``kmeans`` (with ``kmeans_options`` for
its checked options, ``kmeans_image`` for each image's prepared grids, lattices and working sets,
``working_set``, ``lattice`` and, for GPUs, ``kmeans_batched``), ``masks``, ``metrics``, ``pixels`` (a
picture's pixels on the masks' grid), ``preview`` (pictures), ``pipeline`` (all stages in one call);
``values`` (checks of input values) and ``numerics`` (float limits and helpers) serve them all.
"""
