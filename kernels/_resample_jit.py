"""Triton helpers shared by the ``grid_merge`` kernels (inlined into their callers).

Tensor layouts: a grid row is ``[w, C]`` channels-last. A program's register tiles are
``[R, BC1]``: ``R`` output positions of one output row x channels, fp32. With
``HAS_REST`` (a LayerNorm over a non-power-of-two ``C``, 1152 = 1024 + 128) the channel
rest is a flat ``[BC2 * R]`` vector, element ``k`` = channel ``BC1 + k // R`` of position
``k % R`` (:func:`rest_of_rows` and its siblings convert). Kept as an ``[R, BC2]`` tile
instead, the rest gets a register layout of its own (warps along ``R``: 128 channels do
not fill 8 warps), and Triton then converts the ``[R, BC1]`` tiles into that layout
wherever the two parts meet (row statistics), through shared memory and extra
registers; flat, every per-position value stays in the ``[R, BC1]`` tiles' layout
(measured: ``benchmarks/compile_report.py``, see :mod:`._merge_plan`).

Column weights come as per-position vectors ``(lo, hi, w_first, w_last)`` (see
:mod:`._plan`); input column ``j`` weighs ``w_last`` at ``hi - 1``, ``w_first`` elsewhere
in ``[lo, hi)``, 0 outside. That is the ``USE_DOT`` path (``R >= 16``). The FMA path
(``R < 16``) keeps no per-position vectors (they would sit in every thread's registers):
the same four arguments then carry ``(unused, segment table pointer, 0..R-1, table row
stride)`` and column ``j``'s weights for the ``R`` positions are ``R`` consecutive floats
of the segment table (``_plan.segment_table``: zeros at positions the segment does not
own, so no mask is kept either).
The weight math is written inline in the loops: the Triton interpreter pays
milliseconds for every nested ``@triton.jit`` call.
"""
from ._triton import sum_combine as _sum, tl, triton


@triton.jit
def item_offset(b, v, IDX64: tl.constexpr):
    """``v`` (a stride or extent) typed for offsets within one batch item: int64 with ``IDX64``
    (``b``, the batch index, is int64; also: no interpreter overflow checks), else int32 as
    given. int32 saves registers: SigLIP's 1152-channel ``R = 8`` backward spills with
    64-bit copies of its five."""
    out = v
    if IDX64:
        out = b * 0 + v
    return out


@triton.jit
def load_taps(idx_ptr, wt_ptr, offs, mask):
    """Per-output tap tables for indices ``offs``: ``(lo, hi, w_first, w_last)``."""
    lo = tl.load(idx_ptr + 2 * offs, mask=mask, other=0)
    hi = tl.load(idx_ptr + 2 * offs + 1, mask=mask, other=0)
    wf = tl.load(wt_ptr + 2 * offs, mask=mask, other=0.0)
    wl = tl.load(wt_ptr + 2 * offs + 1, mask=mask, other=0.0)
    return lo, hi, wf, wl


@triton.jit
def segment(cols_idx_ptr, cols_wt_ptr, seg_ptr, x0, x1, W, S, ct, C, R: tl.constexpr, BC1: tl.constexpr,
            BC2: tl.constexpr, HAS_REST: tl.constexpr, USE_DOT: tl.constexpr, CONTIG: tl.constexpr):
    """A program's output columns ``[x0, x1)`` (``offs_x``, ``xmask``: ``[R]``), their column
    weights ``(c_lo, c_hi, c_wf, c_wl)`` as the module docstring says (``S``: the launch's
    segment width, every ``x0`` a multiple of it), the input columns ``[jlo, jhi)`` they
    read, and channel tile ``ct``'s two parts with their masks.

    ``CONTIG > 0`` tells Triton that part 1's channels are contiguous in runs of ``CONTIG``
    only: loads of ``CONTIG`` elements a thread, which keeps all ``R`` positions of a
    channel in one thread (the rule and its measurements: ``_merge_plan.Tile.contig``)."""
    offs_x = x0 + tl.arange(0, R)
    xmask = offs_x < x1
    if USE_DOT:
        c_lo, c_hi, c_wf, c_wl = load_taps(cols_idx_ptr, cols_wt_ptr, offs_x, xmask)
    else:  # FMA path: weights of column j for the R positions come from the [w, n_seg * R]
        c_lo = 0  # segment table: R consecutive floats per input column, zeros where the
        c_wl = ((W + S - 1) // S) * R  # segment owns no position; c_wl: its row stride
        c_hi = seg_ptr + (x0 // S) * R
        c_wf = tl.arange(0, R)
    jlo = tl.load(cols_idx_ptr + 2 * x0)
    jhi = tl.load(cols_idx_ptr + 2 * (x1 - 1) + 1)
    k1 = tl.arange(0, BC1)  # channels of part 1 (a channel tile without a LayerNorm)
    if CONTIG > 0:
        c1 = ct * BC1 + (k1 // CONTIG) * CONTIG + k1 % CONTIG
    else:
        c1 = ct * BC1 + k1
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
def rest_of_rows(v, R: tl.constexpr, BC2: tl.constexpr):
    """``[R]`` per-position values -> the rest's flat ``[BC2 * R]`` layout."""
    return tl.reshape(tl.broadcast_to(v[None, :], (BC2, R)), (BC2 * R,))


@triton.jit
def rest_of_channels(v, R: tl.constexpr, BC2: tl.constexpr):
    """``[BC2]`` per-channel values -> the rest's flat ``[BC2 * R]`` layout."""
    return tl.reshape(tl.broadcast_to(v[:, None], (BC2, R)), (BC2 * R,))


@triton.jit
def rest_row_sums(v, R: tl.constexpr, BC2: tl.constexpr):
    """The rest (flat ``[BC2 * R]``) -> ``[R]``: each position's sum over its channels."""
    return tl.reduce(tl.reshape(v, (BC2, R)), 0, _sum)


@triton.jit
def rest_position_sums(v, R: tl.constexpr, BC2: tl.constexpr):
    """The rest (flat ``[BC2 * R]``) -> ``[BC2]``: each channel's sum over the positions."""
    return tl.reduce(tl.reshape(v, (BC2, R)), 1, _sum)


@triton.jit
def rest_index(x0, x1, C, R: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr):
    """The rest's flat ``[BC2 * R]`` layout: each element's output column, whether the
    program owns it, its channel and whether that is one of the ``C``."""
    k = tl.arange(0, BC2 * R)
    xf = x0 + k % R
    cf = BC1 + k // R
    return xf, xf < x1, cf, cf < C


@triton.jit
def width_row(row_ptr, sxw64, oc1, m1, oc2, m2, jlo, jhi, c_lo, c_hi, c_wf, c_wl,
              R: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr, HAS_REST: tl.constexpr,
              USE_DOT: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr):
    """One input row resampled along the width: ``([R, BC1], [BC2 * R])`` fp32.

    ``USE_DOT`` (``R >= 16``): ``BJ`` columns at a time as ``[R, BJ] @ [BJ, BC]`` products
    (tensor cores). Otherwise column by column: its ``[BC]`` channel vector added with its
    weight into each of the ``R`` positions (FMAs; no ``[BJ, BC]`` tile in registers).
    Either way each column is read once.
    """
    t1 = tl.full((R, BC1), 0.0, tl.float32)
    t2 = tl.full((BC2 * R,), 0.0, tl.float32)
    if USE_DOT:
        d2 = tl.full((R, BC2), 0.0, tl.float32)  # the rest as a product tile, flattened once
        for j0 in range(jlo, jhi, BJ):
            offs_j = j0 + tl.arange(0, BJ)
            wgt = col_weights(offs_j[None, :], c_lo, c_hi, c_wf, c_wl)
            cols = row_ptr + (offs_j.to(tl.int64) * sxw64)[:, None]
            jm = (offs_j < jhi)[:, None]
            tile = tl.load(cols + oc1[None, :], mask=jm & m1[None, :], other=0.0).to(tl.float32)
            t1 = tl.dot(wgt, tile, t1, input_precision=PREC)
            if HAS_REST:
                tile = tl.load(cols + oc2[None, :], mask=jm & m2[None, :], other=0.0).to(tl.float32)
                d2 = tl.dot(wgt, tile, d2, input_precision=PREC)
        if HAS_REST:
            t2 = tl.reshape(tl.trans(d2), (BC2 * R,))
    else:
        col = row_ptr + jlo * sxw64
        for j in range(jlo, jhi):
            wj = tl.load(c_hi + (c_wf + j * c_wl))
            t1 += wj[:, None] * tl.load(col + oc1[None, :], mask=m1[None, :], other=0.0).to(tl.float32)
            if HAS_REST:  # flat rest: weight of position k % R x channel k // R
                xr = tl.load(col + oc2, mask=m2, other=0.0).to(tl.float32)
                t2 += (tl.reshape(tl.broadcast_to(wj[None, :], (BC2, R)), (BC2 * R,))
                       * tl.reshape(tl.broadcast_to(xr[:, None], (BC2, R)), (BC2 * R,)))
            col += sxw64
    return t1, t2


@triton.jit
def output_row(x_b, sxh64, sxw64, oc1, m1, oc2, m2, y, rows_idx_ptr, rows_wt_ptr,
               jlo, jhi, c_lo, c_hi, c_wf, c_wl, a1, a2, id_a, b1, b2, id_b,
               TWO_SLOTS: tl.constexpr, R: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr,
               HAS_REST: tl.constexpr, USE_DOT: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr):
    """Output row ``y`` before normalisation: ``([R, BC1], [BC2 * R])`` fp32.

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
    acc2 = tl.full((BC2 * R,), 0.0, tl.float32)
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
def layer_norm_stats(acc1, acc2, m1, m2f, C, eps, HAS_REST: tl.constexpr, R: tl.constexpr, BC2: tl.constexpr):
    """Per position mean-centred parts (``[R, BC1]``, flat rest; ``m2f``: the rest's valid
    channels) and ``1/std`` (``[R]``) over both."""
    tot = tl.reduce(acc1, 1, _sum)
    if HAS_REST:
        tot += rest_row_sums(acc2, R, BC2)
    mean = tot / C
    d1 = tl.where(m1[None, :], acc1 - mean[:, None], 0.0)
    var = tl.reduce(d1 * d1, 1, _sum)
    d2 = acc2
    if HAS_REST:
        d2 = tl.where(m2f, acc2 - rest_of_rows(mean, R, BC2), 0.0)
        var += rest_row_sums(d2 * d2, R, BC2)
    return d1, d2, 1.0 / tl.sqrt(var / C + eps)


@triton.jit
def emit_row(dx_row, sdw64, dc1, m1, dc2, m2, t1, t2, e0, e1, first_ptr, colour,
             c_lo, c_hi, c_wf, c_wl, HAS_REST: tl.constexpr, USE_DOT: tl.constexpr,
             BJ: tl.constexpr, PREC: tl.constexpr, R: tl.constexpr, BC2: tl.constexpr):
    """Input-gradient row from ``t`` (``[R, BC1]`` output positions x channels, and the flat
    rest): column ``j``
    of ``[e0, e1)`` gets ``sum_x w_x(j) t[x]``. The launch whose colour is ``first[j]``
    stores it; a later colour adds what the earlier one stored (shared columns).
    ``USE_DOT``: ``BJ`` columns at a time as ``[BJ, R] @ [R, BC]``; else column by column."""
    if USE_DOT:
        r2 = tl.trans(tl.reshape(t2, (BC2, R)))  # the flat rest as an [R, BC2] operand, once
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
                d2 = tl.dot(wt, r2, input_precision=PREC)
                d2 += tl.load(cols + dc2[None, :], mask=mask & later, other=0.0).to(tl.float32)
                tl.store(cols + dc2[None, :], d2.to(dx_row.dtype.element_ty), mask=mask)
    else:
        col = dx_row + e0 * sdw64
        for j in range(e0, e1):
            later = tl.load(first_ptr + j) != colour
            wj = tl.load(c_hi + (c_wf + j * c_wl))
            d1 = tl.reduce(wj[:, None] * t1, 0, _sum)
            d1 += tl.load(col + dc1, mask=m1 & later, other=0.0).to(tl.float32)
            tl.store(col + dc1, d1.to(dx_row.dtype.element_ty), mask=m1)
            if HAS_REST:
                d2 = tl.reduce(tl.reshape(t2, (BC2, R)) * wj[None, :], 1, _sum)
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
def layer_norm_backward(g1, g2, xh1, xh2, rstd, w1, w2, own, m1, m2f, C, HAS_W: tl.constexpr,
                        HAS_B: tl.constexpr, HAS_REST: tl.constexpr, R: tl.constexpr, BC2: tl.constexpr):
    """LayerNorm backward of one output row: ``g*`` the output gradient, ``xh*`` the
    normalised row, ``w*`` the weight (``w2`` in the rest's flat layout). Returns the
    gradient before normalisation and this row's ``dweight`` / ``dbias`` contributions of
    the positions ``own`` (``[R]``, 1.0 or 0.0) marks: ``[BC1]`` for part 1, and for the
    rest still flat (the caller sums over the positions once, at the end)."""
    db1 = 0.0
    db2 = 0.0
    dw1 = 0.0
    dw2 = 0.0
    own2 = rest_of_rows(own, R, BC2)
    if HAS_B:
        db1 = tl.reduce(g1 * own[:, None], 0, _sum)
        db2 = g2 * own2
    if HAS_W:
        dw1 = tl.reduce(g1 * xh1 * own[:, None], 0, _sum)
        dw2 = g2 * xh2 * own2
        g1 = g1 * w1[None, :]
        g2 = g2 * w2
    k1 = tl.reduce(g1 * xh1, 1, _sum)
    k2 = tl.reduce(g1, 1, _sum)
    if HAS_REST:
        k1 += rest_row_sums(g2 * xh2, R, BC2)
        k2 += rest_row_sums(g2, R, BC2)
    k1 = k1 / C
    k2 = k2 / C
    g1 = tl.where(m1[None, :], rstd[:, None] * (g1 - k2[:, None] - xh1 * k1[:, None]), 0.0)
    if HAS_REST:
        g2 = tl.where(m2f, rest_of_rows(rstd, R, BC2)
                      * (g2 - rest_of_rows(k2, R, BC2) - xh2 * rest_of_rows(k1, R, BC2)), 0.0)
    return g1, g2, dw1, dw2, db1, db2


@triton.jit
def push_rows(dx_b, sdh64, sdw64, dc1, m1, dc2, m2, g1, g2, y, H, rlo, rhi, r0, r1, rows_idx_ptr, rows_wt_ptr,
              p1, p2, q1, q2, pid_a, pid_b, filled, e0, e1, first_ptr, colour, c_lo, c_hi, c_wf, c_wl,
              TWO_SLOTS: tl.constexpr, R: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr,
              HAS_REST: tl.constexpr, USE_DOT: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr):
    """Output row ``y``'s gradient ``g`` (``[R, BC1]`` and the flat rest) through the transposed row weights into
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
                     c_lo, c_hi, c_wf, c_wl, HAS_REST, USE_DOT, BJ, PREC, R, BC2)
    return p1, p2, q1, q2, pid_a, pid_b, filled
