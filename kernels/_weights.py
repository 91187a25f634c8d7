"""Resampling weights: the 1-D linear maps that ``area`` and ``bilinear`` apply per axis.

Both modes are separable: resizing ``[h, w] -> [H, W]`` is ``M_h @ X @ M_w^T`` with
``M_h`` of shape ``[H, h]`` and ``M_w`` of shape ``[W, w]``. Row ``i`` of ``M`` is the
weights output ``i`` gives the inputs; every row's non-zeros are a contiguous run
``[lo[i], hi[i])`` and ``lo``/``hi`` never decrease with ``i``. The Triton kernels take
their weights from here (via the tables in :mod:`._plan`); the tests check them
against ATen's own pooling / interpolation.

- ``area`` is ``F.adaptive_avg_pool2d``: output ``i`` averages inputs
  ``[floor(i*n/m), ceil((i+1)*n/m))``.
- ``bilinear`` is ``F.interpolate(mode="bilinear", align_corners=False)`` (no
  antialias): source ``(i + 0.5) * n / m - 0.5`` clamped at 0, two taps.
"""
from __future__ import annotations

import functools
from typing import Tuple


@functools.lru_cache(maxsize=512)
def _matrix_rows(n_in: int, n_out: int, mode: str) -> Tuple[Tuple[Tuple[int, float], ...], ...]:
    rows = []
    for i in range(n_out):
        if mode == "area":
            lo = (i * n_in) // n_out
            hi = -((-(i + 1) * n_in) // n_out)
            rows.append(tuple((j, 1.0 / (hi - lo)) for j in range(lo, hi)))
        else:  # bilinear, align_corners=False, as ATen computes it
            src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = int(src)
            i1 = i0 + 1 if i0 < n_in - 1 else i0
            l1 = src - i0
            taps = {i0: 1.0 - l1}
            taps[i1] = taps.get(i1, 0.0) + l1
            rows.append(tuple(sorted(taps.items())))
    return tuple(rows)


@functools.lru_cache(maxsize=512)
def tap_ranges(n_in: int, n_out: int, mode: str) -> Tuple[Tuple[int, int], ...]:
    """Per output index, the half-open input range ``(lo, hi)`` its taps cover."""
    out = []
    for taps in _matrix_rows(n_in, n_out, mode):
        nz = [j for j, wt in taps if wt != 0.0] or [taps[0][0]]
        out.append((min(nz), max(nz) + 1))
    return tuple(out)
