"""Launch plans and the small index tables the Triton kernels read.

A kernel program of ``grid_merge`` owns a block of columns and a band of rows of one
batch item and streams its rows once. Tables (int32 / fp32, a few hundred bytes) tell
it, per output index, which input run ``[lo, hi)`` it reads and with which weights
(first / last tap: area weights are all ``1/(hi-lo)``, bilinear's two taps are ``1-l``
and ``l``), built in Python from :mod:`._weights`, whose weights the tests
check against ATen's pooling / interpolation: no index math is duplicated in-kernel.

Block sizes:

- ``TILE_BUDGET``: a program holds a few ``[rows, BC]`` fp32 tiles (accumulator, one or
  two cached input rows, the row being read); 8192 elements (32 KiB) each fits a GPU
  register file for ``C <= 512``. The LayerNorm needs all channels at once and
  ``tl.dot`` at least 16 rows, so wider grids get ``[16, next_pow2(C)]`` tiles and
  spill some registers (``benchmarks/bench_kernels.py --ptx-report``).
- ``DOT_MIN = 16``: ``tl.dot`` needs every dimension >= 16.
- Row bands buy parallelism for small batches on a GPU, at the price of re-reading
  what neighbouring bands share (hits in L2 on a GPU, but counted by the traffic
  check). A forward band boundary re-reads at most one input row: ``FWD_BAND_ROWS =
  12`` input rows per band keeps that under ~4 %. A backward boundary recomputes the
  output rows on both sides (their whole input windows) and re-reads their gradient
  rows: ``BWD_BAND_ROWS = 32`` input rows per band keeps that under ~5 %.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._weights import _matrix_rows, tap_ranges

TILE_BUDGET = 8192
DOT_MIN = 16
FWD_BAND_ROWS = 12
BWD_BAND_ROWS = 32


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def pow2_floor(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def channel_block(C: int) -> int:
    return max(DOT_MIN, next_pow2(C))


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


def dense_table(n_in: int, n_out: int, mode: str, device) -> torch.Tensor:
    """fp32 ``[n_out + 1, n_in]``: the resampling matrix of one axis (row ``i`` = output ``i``'s
    weights) and a last row of zeros.

    The FMA path of ``grid_merge`` loads column ``j`` of it for its ``R`` positions instead
    of keeping four tap vectors per position in registers; positions a program does not
    own read the zero row, so no mask is kept either.
    """
    key = ("dense", n_in, n_out, mode, str(device))
    if key not in _TABLES:
        m = torch.zeros(n_out + 1, n_in, dtype=torch.float32)
        for i, taps in enumerate(_matrix_rows(n_in, n_out, mode)):
            for j, wt in taps:
                m[i, j] += wt
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


@dataclass(frozen=True)
class MergePlan:
    """Block sizes and per-block tables for one grid ``[h, w] -> [H, W]``."""
    BC: int            # channel tile (all channels: the LayerNorm needs them)
    BX: int            # forward: output columns per program
    n_cb: int          # forward: column blocks
    fwd_bands: Tuple[Tuple[int, int], ...]           # output rows [y0, y1) per band
    BJF: int           # forward: input columns per width-product step
    BJO: int           # backward: input columns a program owns
    BXO: int           # backward: output columns it covers (tile rows)
    bwd_cols: Tuple[Tuple[int, int], ...]            # covered output cols [xa, xb) per block
    bwd_bands: Tuple[Tuple[int, int, int, int], ...]  # input rows [r0, r1), output rows [ya, yb)
    BJB: int           # backward: input columns per width-product step (recompute)


@functools.lru_cache(maxsize=512)
def merge_plan(h: int, w: int, H: int, W: int, C: int, mode: str,
               fwd_bands: int = 1, bwd_bands: int = 1) -> MergePlan:
    """Blocks for ``[h, w] -> [H, W]`` with ``C`` channels and the given band counts."""
    BC = channel_block(C)
    rows_fit = max(1, pow2_floor(TILE_BUDGET // BC))
    BX = max(DOT_MIN, min(next_pow2(W), rows_fit))
    n_cb = -(-W // BX)
    nb = max(1, min(fwd_bands, H))
    fwd = tuple((H * i // nb, H * (i + 1) // nb) for i in range(nb))

    BJO = max(DOT_MIN, min(next_pow2(w), rows_fit))
    bwd_cols = tuple(_covering(w, W, mode, j, min(j + BJO, w)) for j in range(0, w, BJO))
    BXO = max(DOT_MIN, next_pow2(max(b - a for a, b in bwd_cols)))
    nbb = max(1, min(bwd_bands, h))
    bwd = tuple((h * i // nbb, h * (i + 1) // nbb) + _covering(h, H, mode, h * i // nbb, h * (i + 1) // nbb)
                for i in range(nbb))
    cols = tap_ranges(w, W, mode)
    span_f = max(cols[min(x + BX, W) - 1][1] - cols[x][0] for x in range(0, W, BX))
    span_b = max(cols[b - 1][1] - cols[a][0] for a, b in bwd_cols if b > a)
    return MergePlan(BC, BX, n_cb, fwd, _step(span_f, rows_fit), BJO, BXO, bwd_cols, bwd,
                     _step(span_b, rows_fit))


def _step(span: int, rows_fit: int) -> int:
    """Input columns per width product: the whole span when it fits the tile budget."""
    return max(DOT_MIN, min(next_pow2(span), rows_fit))


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 elsewhere (one band)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def band_counts(h: int, H: int, batch: int, fwd_col_blocks: int, bwd_col_blocks: int,
                sms: int) -> Tuple[int, int]:
    """(forward, backward) row bands: about two programs per SM, within the re-read caps."""
    if sms <= 0:
        return 1, 1
    want_f = -(-2 * sms // max(1, batch * fwd_col_blocks))
    want_b = -(-2 * sms // max(1, batch * bwd_col_blocks))
    return (max(1, min(want_f, h // FWD_BAND_ROWS, H)), max(1, min(want_b, h // BWD_BAND_ROWS)))


def plan_for(h: int, w: int, H: int, W: int, C: int, mode: str, batch: int, sms: int,
             bands: Optional[Tuple[int, int]] = None) -> MergePlan:
    """The plan a launch uses: explicit ``bands``, else :func:`band_counts` for ``sms``."""
    if bands is None:
        base = merge_plan(h, w, H, W, C, mode)
        bands = band_counts(h, H, batch, base.n_cb, len(base.bwd_cols), sms)
    return merge_plan(h, w, H, W, C, mode, *bands)


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
    """One warp per 256 tile elements (4..32): ptxas' spills for the vsre shapes were
    lowest there (``bench_kernels.py --ptx-report``; not yet timed on a GPU)."""
    return max(4, min(32, next_pow2(elems // 256)))


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
