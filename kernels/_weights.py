"""Resampling weights: the 1-D linear maps that ``area`` and ``bilinear`` apply per axis.

Both modes are separable: resizing ``[h, w] -> [H, W]`` is ``M_h @ X @ M_w^T`` with
``M_h`` of shape ``[H, h]`` and ``M_w`` of shape ``[W, w]``. Row ``i`` of ``M`` is the
weights output ``i`` gives the inputs; every row's non-zeros are a contiguous run
``[lo[i], hi[i])`` and ``lo``/``hi`` never decrease with ``i``. The reference and the
Triton kernels build their weights here, so they resample identically.

- ``area`` is ``F.adaptive_avg_pool2d``: output ``i`` averages inputs
  ``[floor(i*n/m), ceil((i+1)*n/m))``.
- ``bilinear`` is ``F.interpolate(mode="bilinear", align_corners=False)`` (no
  antialias): source ``(i + 0.5) * n / m - 0.5`` clamped at 0, two taps.
"""
from __future__ import annotations

import functools
from typing import Dict, Tuple

import torch


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
def _matrix_cpu(n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """``[n_out, n_in]`` float64 weights (CPU)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i, taps in enumerate(_matrix_rows(n_in, n_out, mode)):
        for j, wt in taps:
            m[i, j] = wt
    return m


_DEVICE_CACHE: Dict[tuple, torch.Tensor] = {}


def resample_matrix(n_in: int, n_out: int, mode: str, device, dtype) -> torch.Tensor:
    """``[n_out, n_in]`` weights on ``device`` in ``dtype`` (cached; treat as read-only)."""
    key = (n_in, n_out, mode, str(device), dtype)
    m = _DEVICE_CACHE.get(key)
    if m is None:
        m = _matrix_cpu(n_in, n_out, mode).to(device=device, dtype=dtype)
        _DEVICE_CACHE[key] = m
    return m


@functools.lru_cache(maxsize=512)
def tap_ranges(n_in: int, n_out: int, mode: str) -> Tuple[Tuple[int, int], ...]:
    """Per output index, the half-open input range ``(lo, hi)`` its taps cover."""
    out = []
    for taps in _matrix_rows(n_in, n_out, mode):
        nz = [j for j, wt in taps if wt != 0.0] or [taps[0][0]]
        out.append((min(nz), max(nz) + 1))
    return tuple(out)
