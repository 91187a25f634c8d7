"""Triton helpers shared by the resampling kernels (inlined into their callers).

Tensor layouts: a grid row is ``[w, C]`` channels-last; a resampled row is a
``[BX, BC]`` tile (output columns x channels) held in fp32 registers.
"""
from ._triton import tl, triton


@triton.jit
def tap_weight(i, lo, hi, wf, wm, wl):
    """Weight input index ``i`` gets from an output whose taps are ``[lo, hi)``.

    ``wf`` / ``wl`` weigh the first / last tap, ``wm`` the ones between (broadcasts).
    """
    wt = tl.where(i == lo, wf, tl.where(i == hi - 1, wl, wm))
    return tl.where((i >= lo) & (i < hi), wt, 0.0)


@triton.jit
def load_taps(idx_ptr, wt_ptr, offs, mask):
    """Per-output tap tables for indices ``offs``: ``(lo, hi, w_first, w_mid, w_last)``."""
    lo = tl.load(idx_ptr + 2 * offs, mask=mask, other=0)
    hi = tl.load(idx_ptr + 2 * offs + 1, mask=mask, other=0)
    wf = tl.load(wt_ptr + 3 * offs, mask=mask, other=0.0)
    wm = tl.load(wt_ptr + 3 * offs + 1, mask=mask, other=0.0)
    wl = tl.load(wt_ptr + 3 * offs + 2, mask=mask, other=0.0)
    return lo, hi, wf, wm, wl


@triton.jit
def output_row(x_b, sxh64, sxw64, offs_c64, cmask, y, rows_idx_ptr, rows_wt_ptr,
               jlo, jhi, c_lo, c_hi, c_wf, c_wm, c_wl, wgt0, t_a, id_a, t_b, id_b,
               TWO_SLOTS: tl.constexpr, BX: tl.constexpr, BJ: tl.constexpr,
               BC: tl.constexpr, PREC: tl.constexpr):
    """Output row ``y`` before normalisation, ``[BX, BC]`` fp32, streaming its input rows.

    Each input row is first resampled along the width: its columns ``[jlo, jhi)`` are
    read once, ``BJ`` at a time, and multiplied by the ``[BX, BJ]`` slice of the width
    weights (``wgt0`` is the first slice, precomputed by the caller). ``(t_a, id_a)``
    (and ``(t_b, id_b)`` when ``TWO_SLOTS``) cache the last width-resampled input rows
    and their indices, carried from output row to output row by the caller, so an input
    row shared by consecutive output rows is read once. With two slots row ``r`` lives
    in slot ``r % 2`` (bilinear enlargement reuses the pair ``r, r + 1``).
    """
    rlo = tl.load(rows_idx_ptr + 2 * y)
    rhi = tl.load(rows_idx_ptr + 2 * y + 1)
    rwf = tl.load(rows_wt_ptr + 3 * y)
    rwm = tl.load(rows_wt_ptr + 3 * y + 1)
    rwl = tl.load(rows_wt_ptr + 3 * y + 2)
    acc = tl.full((BX, BC), 0.0, tl.float32)
    for r in range(rlo, rhi):
        wr = tl.where(r == rlo, rwf, tl.where(r == rhi - 1, rwl, rwm))
        if TWO_SLOTS:
            odd = (r % 2) == 1
            cached = tl.where(odd, id_b, id_a)
        else:
            cached = id_a
        if r != cached:
            row_ptr = x_b + r * sxh64
            tn = tl.full((BX, BC), 0.0, tl.float32)
            for j0 in range(jlo, jhi, BJ):
                offs_j = j0 + tl.arange(0, BJ)
                tile = tl.load(row_ptr + offs_j[:, None] * sxw64 + offs_c64[None, :],
                               mask=(offs_j < jhi)[:, None] & cmask[None, :], other=0.0)
                if j0 == jlo:
                    wgt = wgt0
                else:
                    wgt = tap_weight(offs_j[None, :], c_lo[:, None], c_hi[:, None],
                                     c_wf[:, None], c_wm[:, None], c_wl[:, None])
                tn = tl.dot(wgt, tile.to(tl.float32), tn, input_precision=PREC)
            if TWO_SLOTS:
                t_b = tl.where(odd, tn, t_b)
                t_a = tl.where(odd, t_a, tn)
                id_b = tl.where(odd, r, id_b)
                id_a = tl.where(odd, id_a, r)
            else:
                t_a = tn
                id_a = r
        if TWO_SLOTS:
            acc += wr * tl.where(odd, t_b, t_a)
        else:
            acc += wr * t_a
    return acc, t_a, id_a, t_b, id_b
