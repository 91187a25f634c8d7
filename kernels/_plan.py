"""Launch plans and the small index tables the Triton kernels read.

A kernel program of ``grid_merge`` owns a block of columns and a band of rows of one
batch item and streams its rows once. Tables (int32 / fp32, a few hundred bytes) tell
it, per output index, which input run ``[lo, hi)`` it reads and with which weights
(first / last tap: area weights are all ``1/(hi-lo)``, bilinear's two taps are ``1-l``
and ``l``), built in Python from :mod:`._weights`, whose weights the tests
check against ATen's pooling / interpolation: no index math is duplicated in-kernel.

Block sizes:

- ``TILE_BUDGET``: ``pyramid_pool``'s ``[levels' columns, BC]`` fp32 tiles hold at most
  2048 elements (8 per thread at 8 warps), so its accumulators and the row being pooled
  fit registers for any level set (``benchmarks/compile_report.py``).
- ``DOT_MIN = 16``: ``tl.dot`` needs every dimension >= 16.

``grid_merge``'s plans (positions per program, segments, bands, backward colours) are
in :mod:`._merge_plan`.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from ._weights import _matrix_rows, tap_ranges

TILE_BUDGET = 2048
DOT_MIN = 16


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


@functools.lru_cache(maxsize=512)
def _axis_rows(n_in: int, n_out: int, mode: str):
    """Per output index: (lo, hi) int pairs and (first, last) tap weights.

    Two weights describe every window: area windows weigh all their taps equally and
    bilinear windows have at most two taps, so a tap weighs ``last`` at ``hi - 1`` and
    ``first`` anywhere else in ``[lo, hi)`` (checked here).
    """
    idx, wts = [], []
    for (lo, hi), taps in zip(tap_ranges(n_in, n_out, mode), _matrix_rows(n_in, n_out, mode)):
        d = dict(taps)
        first, last = d[lo], d[hi - 1]
        if any(d.get(j, 0.0) != first for j in range(lo + 1, hi - 1)):
            raise AssertionError(f"{mode} {n_in}->{n_out}: a window's middle taps differ from its first")
        idx.append((lo, hi))
        wts.append((first, last))
    return tuple(idx), tuple(wts)


_TABLES: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def axis_tables(n_in: int, n_out: int, mode: str, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(int32 [n_out, 2] lo/hi, fp32 [n_out, 2] first/last weights)`` on ``device``."""
    key = (n_in, n_out, mode, str(device))
    if key not in _TABLES:
        idx, wts = _axis_rows(n_in, n_out, mode)
        _TABLES[key] = (torch.tensor(idx, dtype=torch.int32, device=device),
                        torch.tensor(wts, dtype=torch.float32, device=device))
    return _TABLES[key]


def segment_table(n_in: int, n_out: int, mode: str, seg: int, R: int, device) -> torch.Tensor:
    """fp32 ``[n_in, n_seg * R]``: the resampling matrix of one axis, transposed and cut into
    the launch's segments of ``seg`` output positions (``n_seg = ceil(n_out / seg)``).

    Entry ``[j, k * R + p]`` is the weight of input ``j`` in output ``k * seg + p`` when the
    segment owns that output (``p < seg``, ``k * seg + p < n_out``), else 0. The FMA path of
    ``grid_merge`` loads column ``j``'s weights for its ``R`` positions as ``R``
    consecutive floats: no per-position offsets or masks in registers.
    """
    key = ("segments", n_in, n_out, mode, seg, R, str(device))
    if key not in _TABLES:
        n_seg = -(-n_out // seg)
        m = torch.zeros(n_in, n_seg * R, dtype=torch.float32)
        for i, taps in enumerate(_matrix_rows(n_in, n_out, mode)):
            k, p = divmod(i, seg)
            for j, wt in taps:
                m[j, k * R + p] += wt
        _TABLES[key] = m.to(device)
    return _TABLES[key]


def two_slots(n_in: int, n_out: int, mode: str) -> bool:
    """Whether an input row can feed output rows that are not consecutive in the stream.

    Area windows (and bilinear windows when shrinking) overlap their successor in at
    most their last input row, so one cached row suffices; bilinear enlargement reuses
    the pair ``(i, i + 1)`` for several outputs and needs two.
    """
    return mode == "bilinear" and n_out > n_in


def _covering(n_in: int, n_out: int, mode: str, lo_in: int, hi_in: int) -> Tuple[int, int]:
    """Output indices ``[a, b)`` whose taps touch inputs ``[lo_in, hi_in)``."""
    rng = tap_ranges(n_in, n_out, mode)
    hits = [i for i, (lo, hi) in enumerate(rng) if lo < hi_in and hi > lo_in]
    return (hits[0], hits[-1] + 1) if hits else (0, 0)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (the fewest-bytes plan)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def l2_bytes(device: torch.device) -> int:
    """L2 cache of a CUDA device in bytes; 0 elsewhere (no launch counts as L2-resident)."""
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))


_BLOCK_TABLES: Dict[tuple, torch.Tensor] = {}


def int_table(rows: Sequence[Sequence[int]], device) -> torch.Tensor:
    """A small int32 table on ``device`` (cached by content)."""
    key = (tuple(tuple(r) for r in rows), str(device))
    if key not in _BLOCK_TABLES:
        _BLOCK_TABLES[key] = torch.tensor(key[0], dtype=torch.int32, device=device)
    return _BLOCK_TABLES[key]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision. fp32 inputs need IEEE products to hold 1e-5; for fp16/bf16
    inputs tf32 keeps the input values exact and rounds the weights to 10 bits (~5e-4),
    well inside their 2e-2 tolerance, on tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def out_slices(out: Tensor, sizes: Sequence[int], hw: int, layout: str) -> List[Tensor]:
    """Per-grid ``[B, H*W, C_i]`` views of the ``[B, N, D]`` output (no copies)."""
    views, off = [], 0
    for i, c in enumerate(sizes):
        if layout == "channel":
            views.append(out[:, :, off:off + c])
            off += c
        else:
            views.append(out[:, i * hw:(i + 1) * hw, :])
    return views


def num_warps_for(elems: int) -> int:
    """``pyramid_pool``: one warp per 256 tile elements, 4..8 (its tiles stay within 2048
    elements; ``benchmarks/compile_report.py`` shows no spills at these sizes)."""
    return max(4, min(8, next_pow2(elems // 256)))


def pyramid_tables(levels: Sequence[Tuple[int, int]], device) -> Tuple[torch.Tensor, int]:
    """Per stacked output column ``k`` of all levels: ``[5, KP]`` int32 rows
    ``(level rows Lh, level cols Lw, column x, first token of the level, valid)``."""
    cols, base = [], 0
    for lh, lw in levels:
        for x in range(lw):
            cols.append((lh, lw, x, base, 1))
        base += lh * lw
    KP = max(DOT_MIN, next_pow2(len(cols)))
    cols += [(1, 1, 0, 0, 0)] * (KP - len(cols))
    return int_table(list(zip(*cols)), device), KP
