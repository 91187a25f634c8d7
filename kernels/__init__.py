"""Triton kernels for multi-granularity token merging (imported as ``fusion.kernels``).

Public ops (each with a Triton path for CUDA tensors and a PyTorch reference path):

- :func:`grid_merge`: resample several ``[B, h_i, w_i, C_i]`` encoder grids to one target
  grid (area or bilinear), LayerNorm each, concatenate (channels or sequence).
- :func:`pyramid_pool`: area-pool ``[B, H*W, C]`` tokens to several coarser levels.
- :func:`window_attention`: each cell of a query grid attends to its area window in
  several encoder grids, one softmax (the SVA's cross-attention; windows from
  :func:`area_windows`).

Words: the *reference* (``*_reference``; ``reference.py``, ``window_attention_reference.py``,
``bipartite_reference.py``) is an op's PyTorch path, what runs on CPUs; ``naive_*`` and
``bipartite_merge_full`` (``naive.py``) are the hand-written sequences that share no code
with either path: the tests' independent oracles and the benchmarks' baselines.
"""
if __name__ == "fusion.kernels":
    from .grid_merge import grid_merge  # noqa: F401  (binds the function over the submodule)
    from .pyramid_pool import pyramid_pool  # noqa: F401
    from .bipartite_merge import bipartite_merge, reduce_to  # noqa: F401
    from .window_attention import window_attention  # noqa: F401
    from .windows import WindowTable, area_windows  # noqa: F401
    from .reference import grid_merge_reference, pyramid_pool_reference  # noqa: F401
    from .bipartite_reference import bipartite_merge_reference  # noqa: F401
    from .naive import bipartite_merge_full, naive_grid_merge, naive_pyramid_pool, naive_window_attention  # noqa: F401

    __all__ = [
        "grid_merge",
        "pyramid_pool",
        "grid_merge_reference",
        "pyramid_pool_reference",
        "naive_grid_merge",
        "naive_pyramid_pool",
        "bipartite_merge",
        "reduce_to",
        "bipartite_merge_reference",
        "bipartite_merge_full",
        "window_attention",
        "area_windows",
        "WindowTable",
        "naive_window_attention",
    ]
else:
    # Under any other name (a top-level ``kernels`` import from a checkout's root) this
    # module stays empty: see _canonical.py. transformers reads the version of a ``kernels``
    # module that has no distribution metadata from ``__version__`` (5.4-5.x crash on a
    # missing one); "0" is below any kernel-hub release, so it reports no usable hub.
    __version__ = "0"
