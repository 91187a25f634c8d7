"""Triton helpers shared by the ``grid_merge`` kernels (inlined into their callers).

Tensor layouts: a grid row is ``[w, C]`` channels-last. A program's register tiles are
``[R, BC1]`` (+ ``[R, BC2]``, the channel rest, when ``HAS_REST``): ``R`` output
positions of one output row x channels, fp32. Column weights come as per-position
vectors ``(lo, hi, w_first, w_last)`` (see :mod:`._plan`); input column ``j`` weighs
``w_last`` at ``hi - 1``, ``w_first`` elsewhere in ``[lo, hi)``, 0 outside. That is the
``USE_DOT`` path (``R >= 16``). The FMA path (``R < 16``) keeps no per-position vectors
(they would sit in every thread's registers): the same four arguments then carry
``(unused, dense table pointer, row offsets x * w, unused)`` and column ``j``'s weights
are loaded from the dense resampling matrix (``_plan.dense_table``; positions outside
the segment point at its extra all-zero last row).
The weight math is written inline in the loops: the Triton interpreter pays
milliseconds for every nested ``@triton.jit`` call.
"""
from ._triton import sum_combine as _sum, tl, triton


@triton.jit
def load_taps(idx_ptr, wt_ptr, offs, mask):
    """Per-output tap tables for indices ``offs``: ``(lo, hi, w_first, w_last)``."""
    lo = tl.load(idx_ptr + 2 * offs, mask=mask, other=0)
    hi = tl.load(idx_ptr + 2 * offs + 1, mask=mask, other=0)
    wf = tl.load(wt_ptr + 2 * offs, mask=mask, other=0.0)
    wl = tl.load(wt_ptr + 2 * offs + 1, mask=mask, other=0.0)
    return lo, hi, wf, wl


@triton.jit
def segment(cols_idx_ptr, cols_wt_ptr, dense_ptr, x0, x1, W, w_in, ct, C, R: tl.constexpr, BC1: tl.constexpr,
            BC2: tl.constexpr, HAS_REST: tl.constexpr, USE_DOT: tl.constexpr):
    """A program's output columns ``[x0, x1)`` (``offs_x``, ``xmask``: ``[R]``), their column
    weights ``(c_lo, c_hi, c_wf, c_wl)`` as the module docstring says, the input columns
    ``[jlo, jhi)`` they read, and channel tile ``ct``'s two parts with their masks."""
    offs_x = x0 + tl.arange(0, R)
    xmask = offs_x < x1
    if USE_DOT:
        c_lo, c_hi, c_wf, c_wl = load_taps(cols_idx_ptr, cols_wt_ptr, offs_x, xmask)
    else:  # FMA path: weights of column j for the R positions come from the dense [W + 1, w]
        c_lo = 0  # table; positions outside the segment read its last row, all zeros
        c_hi = dense_ptr
        c_wf = tl.where(xmask, offs_x, W) * w_in
        c_wl = 0
    jlo = tl.load(cols_idx_ptr + 2 * x0)
    jhi = tl.load(cols_idx_ptr + 2 * (x1 - 1) + 1)
    c1 = ct * BC1 + tl.arange(0, BC1)  # channels of part 1 (a channel tile without a LayerNorm)
    c2 = BC1 + tl.arange(0, BC2)       # the rest (HAS_REST: LayerNorm of a non-power-of-two C)
    m1 = (c1 < C) | HAS_REST  # with a rest, part 1 is channels [0, pow2_floor(C)): all valid
    m2 = c2 < C
    return offs_x, xmask, c_lo, c_hi, c_wf, c_wl, jlo, jhi, c1, c2, m1, m2


@triton.jit
def col_weights(j, c_lo, c_hi, c_wf, c_wl):
    """``[R, BJ]`` weights input columns ``j`` (``[1, BJ]``) get in the ``R`` positions."""
    hi = c_hi[:, None]
    wt = tl.where(j == hi - 1, c_wl[:, None], c_wf[:, None])
    return tl.where((j >= c_lo[:, None]) & (j < hi), wt, 0.0)


@triton.jit
def width_row(row_ptr, sxw64, oc1, m1, oc2, m2, jlo, jhi, c_lo, c_hi, c_wf, c_wl,
              R: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr, HAS_REST: tl.constexpr,
              USE_DOT: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr):
    """One input row resampled along the width: ``([R, BC1], [R, BC2])`` fp32.

    ``USE_DOT`` (``R >= 16``): ``BJ`` columns at a time as ``[R, BJ] @ [BJ, BC]`` products
    (tensor cores). Otherwise column by column: its ``[BC]`` channel vector added with its
    weight into each of the ``R`` positions (FMAs; no ``[BJ, BC]`` tile in registers).
    Either way each column is read once.
    """
    t1 = tl.full((R, BC1), 0.0, tl.float32)
    t2 = tl.full((R, BC2), 0.0, tl.float32)
    if USE_DOT:
        for j0 in range(jlo, jhi, BJ):
            offs_j = j0 + tl.arange(0, BJ)
            wgt = col_weights(offs_j[None, :], c_lo, c_hi, c_wf, c_wl)
            cols = row_ptr + (offs_j.to(tl.int64) * sxw64)[:, None]
            jm = (offs_j < jhi)[:, None]
            tile = tl.load(cols + oc1[None, :], mask=jm & m1[None, :], other=0.0).to(tl.float32)
            t1 = tl.dot(wgt, tile, t1, input_precision=PREC)
            if HAS_REST:
                tile = tl.load(cols + oc2[None, :], mask=jm & m2[None, :], other=0.0).to(tl.float32)
                t2 = tl.dot(wgt, tile, t2, input_precision=PREC)
    else:
        col = row_ptr + jlo * sxw64
        for j in range(jlo, jhi):
            wj = tl.load(c_hi + (c_wf + j))[:, None]
            t1 += wj * tl.load(col + oc1[None, :], mask=m1[None, :], other=0.0).to(tl.float32)
            if HAS_REST:
                t2 += wj * tl.load(col + oc2[None, :], mask=m2[None, :], other=0.0).to(tl.float32)
            col += sxw64
    return t1, t2


@triton.jit
def output_row(x_b, sxh64, sxw64, oc1, m1, oc2, m2, y, rows_idx_ptr, rows_wt_ptr,
               jlo, jhi, c_lo, c_hi, c_wf, c_wl, a1, a2, id_a, b1, b2, id_b,
               TWO_SLOTS: tl.constexpr, R: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr,
               HAS_REST: tl.constexpr, USE_DOT: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr):
    """Output row ``y`` before normalisation: ``([R, BC1], [R, BC2])`` fp32.

    Streams the input rows of ``y``'s window; each is resampled along the width by
    :func:`width_row` (its columns ``[jlo, jhi)`` read once). ``(a*, id_a)``
    (and ``(b*, id_b)`` when ``TWO_SLOTS``) cache the last resampled input rows and
    their indices, carried from output row to output row by the caller, so an input row
    shared by consecutive windows is read once. With two slots row ``r`` lives in slot
    ``r % 2`` (bilinear enlargement reuses the pair ``r, r + 1``). ``oc*`` are channel
    offsets (times the channel stride), ``m*`` their masks.
    """
    rlo = tl.load(rows_idx_ptr + 2 * y)
    rhi = tl.load(rows_idx_ptr + 2 * y + 1)
    rwf = tl.load(rows_wt_ptr + 2 * y)
    rwl = tl.load(rows_wt_ptr + 2 * y + 1)
    acc1 = tl.full((R, BC1), 0.0, tl.float32)
    acc2 = tl.full((R, BC2), 0.0, tl.float32)
    for r in range(rlo, rhi):
        wr = tl.where(r == rhi - 1, rwl, rwf)
        if TWO_SLOTS:
            odd = (r % 2) == 1
            cached = tl.where(odd, id_b, id_a)
        else:
            cached = id_a
        if r != cached:
            t1, t2 = width_row(x_b + r * sxh64, sxw64, oc1, m1, oc2, m2, jlo, jhi, c_lo, c_hi, c_wf, c_wl,
                               R, BC1, BC2, HAS_REST, USE_DOT, BJ, PREC)
            if TWO_SLOTS:
                b1 = tl.where(odd, t1, b1)
                a1 = tl.where(odd, a1, t1)
                if HAS_REST:
                    b2 = tl.where(odd, t2, b2)
                    a2 = tl.where(odd, a2, t2)
                id_b = tl.where(odd, r, id_b)
                id_a = tl.where(odd, id_a, r)
            else:
                a1 = t1
                a2 = t2
                id_a = r
        if TWO_SLOTS:
            acc1 += wr * tl.where(odd, b1, a1)
            if HAS_REST:
                acc2 += wr * tl.where(odd, b2, a2)
        else:
            acc1 += wr * a1
            if HAS_REST:
                acc2 += wr * a2
    return acc1, acc2, a1, a2, id_a, b1, b2, id_b


@triton.jit
def layer_norm_stats(acc1, acc2, m1, m2, C, eps, HAS_REST: tl.constexpr):
    """Per position mean-centred tiles and ``1/std`` over both channel parts."""
    tot = tl.reduce(acc1, 1, _sum)
    if HAS_REST:
        tot += tl.reduce(acc2, 1, _sum)
    mean = tot / C
    d1 = tl.where(m1[None, :], acc1 - mean[:, None], 0.0)
    var = tl.reduce(d1 * d1, 1, _sum)
    d2 = acc2
    if HAS_REST:
        d2 = tl.where(m2[None, :], acc2 - mean[:, None], 0.0)
        var += tl.reduce(d2 * d2, 1, _sum)
    return d1, d2, 1.0 / tl.sqrt(var / C + eps)


@triton.jit
def emit_row(dx_row, sdw64, dc1, m1, dc2, m2, t1, t2, e0, e1, first_ptr, colour,
             c_lo, c_hi, c_wf, c_wl, HAS_REST: tl.constexpr, USE_DOT: tl.constexpr,
             BJ: tl.constexpr, PREC: tl.constexpr):
    """Input-gradient row from ``t`` (``[R, BC]``: output positions x channels): column ``j``
    of ``[e0, e1)`` gets ``sum_x w_x(j) t[x]``. The launch whose colour is ``first[j]``
    stores it; a later colour adds what the earlier one stored (shared columns).
    ``USE_DOT``: ``BJ`` columns at a time as ``[BJ, R] @ [R, BC]``; else column by column."""
    if USE_DOT:
        for j0 in range(e0, e1, BJ):
            offs_j = j0 + tl.arange(0, BJ)
            jm = offs_j < e1
            later = (tl.load(first_ptr + offs_j, mask=jm, other=colour) != colour)[:, None]
            wt = tl.trans(col_weights(offs_j[None, :], c_lo, c_hi, c_wf, c_wl))  # [BJ, R]
            cols = dx_row + (offs_j.to(tl.int64) * sdw64)[:, None]
            mask = jm[:, None] & m1[None, :]
            d1 = tl.dot(wt, t1, input_precision=PREC)
            d1 += tl.load(cols + dc1[None, :], mask=mask & later, other=0.0).to(tl.float32)
            tl.store(cols + dc1[None, :], d1.to(dx_row.dtype.element_ty), mask=mask)
            if HAS_REST:
                mask = jm[:, None] & m2[None, :]
                d2 = tl.dot(wt, t2, input_precision=PREC)
                d2 += tl.load(cols + dc2[None, :], mask=mask & later, other=0.0).to(tl.float32)
                tl.store(cols + dc2[None, :], d2.to(dx_row.dtype.element_ty), mask=mask)
    else:
        col = dx_row + e0 * sdw64
        for j in range(e0, e1):
            later = tl.load(first_ptr + j) != colour
            wj = tl.load(c_hi + (c_wf + j))[:, None]
            d1 = tl.reduce(wj * t1, 0, _sum)
            d1 += tl.load(col + dc1, mask=m1 & later, other=0.0).to(tl.float32)
            tl.store(col + dc1, d1.to(dx_row.dtype.element_ty), mask=m1)
            if HAS_REST:
                d2 = tl.reduce(wj * t2, 0, _sum)
                d2 += tl.load(col + dc2, mask=m2 & later, other=0.0).to(tl.float32)
                tl.store(col + dc2, d2.to(dx_row.dtype.element_ty), mask=m2)
            col += sdw64


@triton.jit
def zero_row(dx_row, sdw64, dc1, m1, dc2, m2, e0, e1, first_ptr, colour, BC1: tl.constexpr,
             BC2: tl.constexpr, HAS_REST: tl.constexpr, BJ: tl.constexpr):
    """Zeros into the columns ``[e0, e1)`` this colour writes first (rows no output reads),
    ``BJ`` columns at a time."""
    for j0 in range(e0, e1, BJ):
        offs_j = j0 + tl.arange(0, BJ)
        mine = (offs_j < e1) & (tl.load(first_ptr + offs_j, mask=offs_j < e1, other=-1) == colour)
        cols = dx_row + (offs_j.to(tl.int64) * sdw64)[:, None]
        z1 = tl.full((BJ, BC1), 0.0, dx_row.dtype.element_ty)
        tl.store(cols + dc1[None, :], z1, mask=mine[:, None] & m1[None, :])
        if HAS_REST:
            z2 = tl.full((BJ, BC2), 0.0, dx_row.dtype.element_ty)
            tl.store(cols + dc2[None, :], z2, mask=mine[:, None] & m2[None, :])


@triton.jit
def layer_norm_backward(g1, g2, xh1, xh2, rstd, w1, w2, own, m1, m2, C, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, HAS_REST: tl.constexpr):
    """LayerNorm backward of one output row: ``g*`` the output gradient, ``xh*`` the
    normalised row, ``w*`` the weight. Returns the gradient before normalisation and this
    row's ``dweight`` / ``dbias`` contributions of the positions ``own`` (``[R, 1]``, 1.0 or
    0.0) marks."""
    db1 = 0.0
    db2 = 0.0
    dw1 = 0.0
    dw2 = 0.0
    if HAS_B:
        db1 = tl.reduce(g1 * own, 0, _sum)
        db2 = tl.reduce(g2 * own, 0, _sum)
    if HAS_W:
        dw1 = tl.reduce(g1 * xh1 * own, 0, _sum)
        dw2 = tl.reduce(g2 * xh2 * own, 0, _sum)
        g1 = g1 * w1[None, :]
        g2 = g2 * w2[None, :]
    k1 = tl.reduce(g1 * xh1, 1, _sum)
    k2 = tl.reduce(g1, 1, _sum)
    if HAS_REST:
        k1 += tl.reduce(g2 * xh2, 1, _sum)
        k2 += tl.reduce(g2, 1, _sum)
    k1 = (k1 / C)[:, None]
    k2 = (k2 / C)[:, None]
    g1 = tl.where(m1[None, :], rstd[:, None] * (g1 - k2 - xh1 * k1), 0.0)
    g2 = tl.where(m2[None, :], rstd[:, None] * (g2 - k2 - xh2 * k1), 0.0)
    return g1, g2, dw1, dw2, db1, db2


@triton.jit
def push_rows(dx_b, sdh64, sdw64, dc1, m1, dc2, m2, g1, g2, y, H, rlo, rhi, r0, r1, rows_idx_ptr, rows_wt_ptr,
              p1, p2, q1, q2, pid_a, pid_b, filled, e0, e1, first_ptr, colour, c_lo, c_hi, c_wf, c_wl,
              TWO_SLOTS: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr, HAS_REST: tl.constexpr,
              USE_DOT: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr):
    """Output row ``y``'s gradient ``g`` (``[R, BC]``) through the transposed row weights into
    the owned input rows ``[r0, r1)`` of its window. Rows are pending (``(p*, pid_a)``, and
    ``(q*, pid_b)`` for odd rows with two slots) until no later output row reads them, then
    written through the transposed column weights (:func:`emit_row`); rows no output reads
    (bilinear skips) get zeros. Returns the pending state and the first unwritten row."""
    nxt = tl.load(rows_idx_ptr + 2 * (y + 1), mask=y + 1 < H, other=2147483647)
    rwf = tl.load(rows_wt_ptr + 2 * y)
    rwl = tl.load(rows_wt_ptr + 2 * y + 1)
    for r in range(tl.maximum(rlo, r0), tl.minimum(rhi, r1)):
        wr = tl.where(r == rhi - 1, rwl, rwf)
        for rz in range(filled, r):
            zero_row(dx_b + rz * sdh64, sdw64, dc1, m1, dc2, m2, e0, e1, first_ptr, colour, BC1, BC2, HAS_REST, BJ)
        filled = tl.maximum(filled, r + 1)
        done = r < nxt  # no later output row reads r: input-gradient row r is complete
        keep = tl.where(done, -1, r)
        if TWO_SLOTS:
            odd = (r % 2) == 1
            t1 = wr * g1 + tl.where(r == tl.where(odd, pid_b, pid_a), tl.where(odd, q1, p1), 0.0)
            t2 = wr * g2 + tl.where(r == tl.where(odd, pid_b, pid_a), tl.where(odd, q2, p2), 0.0)
            q1 = tl.where(odd, t1, q1)
            p1 = tl.where(odd, p1, t1)
            q2 = tl.where(odd, t2, q2)
            p2 = tl.where(odd, p2, t2)
            pid_b = tl.where(odd, keep, pid_b)
            pid_a = tl.where(odd, pid_a, keep)
        else:
            t1 = wr * g1 + tl.where(r == pid_a, p1, 0.0)
            t2 = wr * g2 + tl.where(r == pid_a, p2, 0.0)
            p1 = t1
            p2 = t2
            pid_a = keep
        if done:
            emit_row(dx_b + r * sdh64, sdw64, dc1, m1, dc2, m2, t1, t2, e0, e1, first_ptr, colour,
                     c_lo, c_hi, c_wf, c_wl, HAS_REST, USE_DOT, BJ, PREC)
    return p1, p2, q1, q2, pid_a, pid_b, filled
