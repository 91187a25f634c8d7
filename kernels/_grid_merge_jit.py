"""The two Triton kernels of :mod:`.grid_merge`; their design is in that module's docstring,
the block sizes and plans in :mod:`._merge_plan`, the shared pieces in :mod:`._resample_jit`.

Layouts: a grid ``[B, h, w, C]`` (any strides), the output slice ``[B, H*W, C]``. A program
holds ``[R, BC1]`` fp32 tiles: ``R`` positions of one output row x channels, and with
``HAS_REST`` the channel rest as a flat ``[BC2 * R]`` vector (see :mod:`._resample_jit`).
Loads are cast to fp32 before any arithmetic (the interpreter's bf16 math needs it; the
sums run in fp32 anyway). Offsets within one batch item are int32 unless ``IDX64`` (an
item of 2**31 elements or more); the batch item's base pointer is always 64-bit.
"""
from ._resample_jit import (item_offset, layer_norm_backward, layer_norm_stats, output_row, push_rows, rest_index,
                            rest_of_channels, rest_of_rows, rest_position_sums, segment, zero_row)
from ._triton import tl, triton


@triton.jit
def _grid_merge_fwd_kernel(
    x_ptr, out_ptr, w_ptr, b_ptr, rows_idx_ptr, rows_wt_ptr, cols_idx_ptr, cols_wt_ptr, progs_ptr, seg_ptr,
    W, S: tl.constexpr, C, n_ct, eps, sxb, sxh, sxw, sxc, sob, son, soc,
    NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, TWO_SLOTS: tl.constexpr,
    R: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr, HAS_REST: tl.constexpr,
    USE_DOT: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr, CONTIG: tl.constexpr, IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ct = pid % n_ct
    prog = progs_ptr + 4 * (pid // n_ct)
    x0 = tl.load(prog)
    x1 = tl.load(prog + 1)
    y0 = tl.load(prog + 2)
    y1 = tl.load(prog + 3)
    offs_x, xmask, c_lo, c_hi, c_wf, c_wl, jlo, jhi, c1, c2, m1, m2 = segment(
        cols_idx_ptr, cols_wt_ptr, seg_ptr, x0, x1, W, S, ct, C, R, BC1, BC2, HAS_REST, USE_DOT, CONTIG)
    xf, xmf, cf, m2f = rest_index(x0, x1, C, R, BC1, BC2)
    if HAS_W:
        w1 = tl.load(w_ptr + c1, mask=m1, other=0.0).to(tl.float32)
        w2 = rest_of_channels(tl.load(w_ptr + c2, mask=m2, other=0.0).to(tl.float32), R, BC2)
    if HAS_B:
        v1 = tl.load(b_ptr + c1, mask=m1, other=0.0).to(tl.float32)
        v2 = rest_of_channels(tl.load(b_ptr + c2, mask=m2, other=0.0).to(tl.float32), R, BC2)
    x_b = x_ptr + b * sxb
    o_b = out_ptr + b * sob
    sxh64 = item_offset(b, sxh, IDX64)
    sxw64 = item_offset(b, sxw, IDX64)
    W64 = item_offset(b, W, IDX64)
    oc1 = c1 * sxc
    oc2 = c2 * sxc
    o1 = o_b + (c1 * soc)[None, :]
    a1 = tl.full((R, BC1), 0.0, tl.float32)  # cached resampled input rows (slots a, b)
    a2 = tl.full((BC2 * R,), 0.0, tl.float32)
    b1 = tl.full((R, BC1), 0.0, tl.float32)
    b2 = tl.full((BC2 * R,), 0.0, tl.float32)
    id_a = y0 * 0 - 1
    id_b = y0 * 0 - 1
    for y in range(y0, y1):
        acc1, acc2, a1, a2, id_a, b1, b2, id_b = output_row(
            x_b, sxh64, sxw64, oc1, m1, oc2, m2, y, rows_idx_ptr, rows_wt_ptr, jlo, jhi,
            c_lo, c_hi, c_wf, c_wl, a1, a2, id_a, b1, b2, id_b, TWO_SLOTS, R, BC1, BC2, HAS_REST,
                USE_DOT, BJ, PREC)
        if NORM:
            acc1, acc2, rstd = layer_norm_stats(acc1, acc2, m1, m2f, C, eps, HAS_REST, R, BC2)
            acc1 = acc1 * rstd[:, None]
            acc2 = acc2 * rest_of_rows(rstd, R, BC2)
            if HAS_W:
                acc1 = acc1 * w1[None, :]
                acc2 = acc2 * w2
            if HAS_B:
                acc1 = acc1 + v1[None, :]
                acc2 = acc2 + v2
        rows = ((y * W64 + offs_x) * son)[:, None]
        tl.store(o1 + rows, acc1.to(out_ptr.dtype.element_ty), mask=xmask[:, None] & m1[None, :])
        if HAS_REST:
            tl.store(o_b + (y * W64 + xf) * son + cf * soc, acc2.to(out_ptr.dtype.element_ty), mask=xmf & m2f)


@triton.jit(do_not_specialize=["colour"])  # one binary for every colour
def _grid_merge_bwd_kernel(
    x_ptr, g_ptr, dx_ptr, w_ptr, dwp_ptr, dbp_ptr,
    rows_idx_ptr, rows_wt_ptr, cols_idx_ptr, cols_wt_ptr, progs_ptr, first_ptr, seg_ptr,
    H, W, S: tl.constexpr, C, n_ct, n_slots, colour, eps,
    sxb, sxh, sxw, sxc, sgb, sgn, sgc, sdb, sdh, sdw, sdc,
    NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, NEED_DX: tl.constexpr,
    TWO_SLOTS: tl.constexpr, R: tl.constexpr, BC1: tl.constexpr, BC2: tl.constexpr,
    HAS_REST: tl.constexpr, USE_DOT: tl.constexpr, BJ: tl.constexpr, PREC: tl.constexpr,
    CONTIG: tl.constexpr, IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ct = pid % n_ct
    prog = progs_ptr + 9 * (pid // n_ct)
    x0 = tl.load(prog)
    x1 = tl.load(prog + 1)
    e0 = tl.load(prog + 2)
    e1 = tl.load(prog + 3)
    r0 = tl.load(prog + 4)
    r1 = tl.load(prog + 5)
    ya = tl.load(prog + 6)
    yb = tl.load(prog + 7)
    offs_x, xmask, c_lo, c_hi, c_wf, c_wl, jlo, jhi, c1, c2, m1, m2 = segment(
        cols_idx_ptr, cols_wt_ptr, seg_ptr, x0, x1, W, S, ct, C, R, BC1, BC2, HAS_REST, USE_DOT, CONTIG)
    xf, xmf, cf, m2f = rest_index(x0, x1, C, R, BC1, BC2)
    w1 = 0.0
    w2 = 0.0
    if HAS_W:
        w1 = tl.load(w_ptr + c1, mask=m1, other=0.0).to(tl.float32)
        w2 = rest_of_channels(tl.load(w_ptr + c2, mask=m2, other=0.0).to(tl.float32), R, BC2)
    dw1 = tl.full((BC1,), 0.0, tl.float32)
    dw2 = tl.full((BC2 * R,), 0.0, tl.float32)  # the rest's partial sums stay flat until the end
    db1 = tl.full((BC1,), 0.0, tl.float32)
    db2 = tl.full((BC2 * R,), 0.0, tl.float32)
    x_b = x_ptr + b * sxb
    g_b = g_ptr + b * sgb
    dx_b = dx_ptr + b * sdb
    sxh64 = item_offset(b, sxh, IDX64)
    sxw64 = item_offset(b, sxw, IDX64)
    sdh64 = item_offset(b, sdh, IDX64)
    sdw64 = item_offset(b, sdw, IDX64)
    W64 = item_offset(b, W, IDX64)
    oc1 = c1 * sxc
    oc2 = c2 * sxc
    gc1 = (c1 * sgc)[None, :]
    dc1 = c1 * sdc
    dc2 = c2 * sdc
    a1 = tl.full((R, BC1), 0.0, tl.float32)  # cached resampled input rows (recompute), slots a / b
    a2 = tl.full((BC2 * R,), 0.0, tl.float32)
    b1 = tl.full((R, BC1), 0.0, tl.float32)
    b2 = tl.full((BC2 * R,), 0.0, tl.float32)
    p1 = tl.full((R, BC1), 0.0, tl.float32)  # pending input-gradient rows, slots a / b
    p2 = tl.full((BC2 * R,), 0.0, tl.float32)
    q1 = tl.full((R, BC1), 0.0, tl.float32)
    q2 = tl.full((BC2 * R,), 0.0, tl.float32)
    id_a = r0 * 0 - 1
    id_b = r0 * 0 - 1
    pid_a = r0 * 0 - 1
    pid_b = r0 * 0 - 1
    filled = r0  # input-gradient rows below this have been written
    for y in range(ya, yb):  # every output row that reads an owned input row
        rlo = tl.load(rows_idx_ptr + 2 * y)
        rhi = tl.load(rows_idx_ptr + 2 * y + 1)
        if NORM:  # recompute the output row first: the gradient row is not live meanwhile
            acc1, acc2, a1, a2, id_a, b1, b2, id_b = output_row(
                x_b, sxh64, sxw64, oc1, m1, oc2, m2, y, rows_idx_ptr, rows_wt_ptr, jlo, jhi,
                c_lo, c_hi, c_wf, c_wl, a1, a2, id_a, b1, b2, id_b, TWO_SLOTS, R, BC1, BC2, HAS_REST,
                USE_DOT, BJ, PREC)
            xh1, xh2, rstd = layer_norm_stats(acc1, acc2, m1, m2f, C, eps, HAS_REST, R, BC2)
            xh1 = xh1 * rstd[:, None]
            xh2 = xh2 * rest_of_rows(rstd, R, BC2)
        grow = g_b + ((y * W64 + offs_x) * sgn)[:, None]
        g1 = tl.load(grow + gc1, mask=xmask[:, None] & m1[None, :], other=0.0).to(tl.float32)
        g2 = tl.full((BC2 * R,), 0.0, tl.float32)
        if HAS_REST:
            g2 = tl.load(g_b + (y * W64 + xf) * sgn + cf * sgc, mask=xmf & m2f, other=0.0).to(tl.float32)
        if NORM:
            # each position's partials once; a 0/1 factor, not a boolean [R, 1] mask (whose
            # broadcast ptxas keeps live: 16 B/thread of spills on sm_80 at 8 x 1024 channels)
            own = tl.where(xmask & (rlo >= r0) & (rlo < r1), 1.0, 0.0)
            g1, g2, d_w1, d_w2, d_b1, d_b2 = layer_norm_backward(g1, g2, xh1, xh2, rstd, w1, w2, own, m1, m2f, C,
                                                                 HAS_W, HAS_B, HAS_REST, R, BC2)
            dw1 += d_w1
            dw2 += d_w2
            db1 += d_b1
            db2 += d_b2
        if NEED_DX:
            p1, p2, q1, q2, pid_a, pid_b, filled = push_rows(
                dx_b, sdh64, sdw64, dc1, m1, dc2, m2, g1, g2, y, H, rlo, rhi, r0, r1, rows_idx_ptr, rows_wt_ptr,
                p1, p2, q1, q2, pid_a, pid_b, filled, e0, e1, first_ptr, colour, c_lo, c_hi, c_wf, c_wl,
                TWO_SLOTS, R, BC1, BC2, HAS_REST, USE_DOT, BJ, PREC)
    if NEED_DX:
        for rz in range(filled, r1):
            zero_row(dx_b + rz * sdh64, sdw64, dc1, m1, dc2, m2, e0, e1, first_ptr, colour, BC1, BC2, HAS_REST, BJ)
    part = (b * n_slots + tl.load(prog + 8)) * C  # loaded here: one register less in the loop
    if HAS_W:
        tl.store(dwp_ptr + part + c1, dw1, mask=m1)
        if HAS_REST:
            tl.store(dwp_ptr + part + c2, rest_position_sums(dw2, R, BC2), mask=m2)
    if HAS_B:
        tl.store(dbp_ptr + part + c1, db1, mask=m1)
        if HAS_REST:
            tl.store(dbp_ptr + part + c2, rest_position_sums(db2, R, BC2), mask=m2)
