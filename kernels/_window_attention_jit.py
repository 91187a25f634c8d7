"""@triton.jit bodies of :mod:`.window_attention` (launchers, plan and ops live there).

A program owns one *band* of query rows ``[y0, y1)`` (all ``Gw`` columns: ``BM`` query
cells, flattened row-major) of one batch item and one head. For each encoder (up to
``MAX_SLOTS`` per launch, unrolled on the constexpr ``NE``) it streams the key / value
rows the band's windows need, ``[lo(y0), hi(y1 - 1))``, straight from that encoder's
``[B, h*w, heads*d]`` tensors, in chunks of ``BR`` rows x ``BCW`` columns, each chunk
once. A query cell scores every key of the chunk and masks out those outside its window
(the run tables, ``[E, Gh + Gw, 2]`` int32: rows then columns); the softmax runs online
across all chunks of all encoders (flash-attention style), in fp32 and base 2.

Backward (same bands and chunks): ``p = exp(s - lse)`` is recomputed, ``dv = p^T dO``,
``ds = p * (dO V^T - delta)``, ``dk = ds^T q``, ``dq += ds K``. Each band owns the key
rows it needs that the previous band does not; rows shared with the previous band (at
most the one boundary row of area windows, more when enlarging) get this band's
partial in a *seam* buffer, which the launcher adds in. So every dk / dv element is
written by exactly one program plus at most one seam partial: deterministic, no atomics.

Per-chunk code is written inline (one helper call per encoder and program, not per
chunk): the Triton interpreter re-patches ``triton.language`` on every nested call.
"""
from ._triton import HAVE_TRITON, tl, triton

try:  # the reductions the interpreter runs through numpy (tl.sum / tl.max are @jit wrappers)
    from triton.language.standard import _elementwise_max as _max_combine, _sum_combine
except ImportError:  # pragma: no cover - no Triton: nothing here runs
    _max_combine = _sum_combine = None

_constexpr = tl.constexpr if HAVE_TRITON else float  # globals a @jit body may read
LOG2E = _constexpr(1.4426950408889634)
LN2 = _constexpr(0.6931471805599453)


@triton.jit
def _query_cells(band, Gh, Gw, BY: tl.constexpr, BM: tl.constexpr):
    """Query rows ``[y0, y1)`` of ``band`` and, per tile row, its cell ``m``, row, column, validity."""
    y0 = band * BY
    y1 = tl.minimum(y0 + BY, Gh)
    offs = tl.arange(0, BM)
    y = y0 + offs // Gw
    x = offs % Gw
    valid = (offs < BY * Gw) & (y < y1)
    return y0, y1, y * Gw + x, y, x, valid


@triton.jit
def _band_program(Gh, Gw, heads, d, HD, BY: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):
    """This program's band, batch item and head, its query cells (:func:`_query_cells`), the
    head's channels, and where its ``[BM, BD]`` tile lies in a ``[B, Gh*Gw, HD]`` tensor: an
    int64 batch offset plus int32 offsets inside the batch item (``M*HD < 2**31``), and a mask."""
    band = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    head = bh % heads
    y0, y1, m_idx, y, x, valid = _query_cells(band, Gh, Gw, BY, BM)
    offs_d = tl.arange(0, BD)
    dmask = offs_d < d
    cols = head * d + offs_d
    qb = b * (Gh * Gw) * HD
    tile = m_idx[:, None] * HD + cols[None, :]
    tmask = valid[:, None] & dmask[None, :]
    return band, b, head, y0, y1, m_idx, y, x, valid, cols, dmask, qb, tile, tmask


@triton.jit
def _runs(runs_ptr, Gh, y, x, valid, y0, y1):
    """Each query cell's window as first row / column and row / column counts (unsigned: a
    key is inside when ``(kr - rlo) < nr`` and ``(kc - clo) < nc``, one compare per axis;
    0 for invalid cells), and the band's key rows ``[rs, re)``."""
    rlo = tl.load(runs_ptr + 2 * y, mask=valid, other=0)
    nr = tl.load(runs_ptr + 2 * y + 1, mask=valid, other=0) - rlo
    clo = tl.load(runs_ptr + 2 * (Gh + x), mask=valid, other=0)
    nc = tl.load(runs_ptr + 2 * (Gh + x) + 1, mask=valid, other=0) - clo
    rs = tl.load(runs_ptr + 2 * y0)
    re = tl.load(runs_ptr + 2 * (y1 - 1) + 1)
    return rlo, nr.to(tl.uint32), clo, nc.to(tl.uint32), rs, re


@triton.jit
def _fwd_encoder(q, m_i, l_i, acc, k_ptr, v_ptr, runs_ptr, w, HD, cols, dmask, Gh, y, x, valid, y0, y1, qk_scale,
                 BR: tl.constexpr, BCW: tl.constexpr, OPD: tl.constexpr, PREC: tl.constexpr):
    """Stream one encoder's key / value chunks of the band into the online softmax.

    ``q`` is ``[BM, BD]`` in the operand dtype ``OPD``; ``k_ptr`` / ``v_ptr`` point at this
    batch item's first token; ``cols`` are the head's channel offsets; scores are scaled
    by ``qk_scale = scale * log2(e)`` (base-2 softmax)."""
    rlo, nr, clo, nc, rs, re = _runs(runs_ptr, Gh, y, x, valid, y0, y1)
    offs_k = tl.arange(0, BR * BCW)
    ncc = (w + BCW - 1) // BCW
    for t in range(0, (re - rs + BR - 1) // BR * ncc):  # chunks: BR rows x BCW columns
        kr = rs + (t // ncc) * BR + offs_k // BCW
        kc = (t % ncc) * BCW + offs_k % BCW
        tok = (kr * w + kc) * HD  # int32: the launcher checks h*w*HD < 2**31
        lmask = ((kr < re) & (kc < w))[:, None] & dmask[None, :]
        kt = tl.load(k_ptr + tok[:, None] + cols[None, :], mask=lmask, other=0.0).to(OPD)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale  # [BM, BK] fp32, log2 units
        hit = (((kr[None, :] - rlo[:, None]).to(tl.uint32) < nr[:, None])
               & ((kc[None, :] - clo[:, None]).to(tl.uint32) < nc[:, None]))
        s = tl.where(hit, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _sum_combine)
        vt = tl.load(v_ptr + tok[:, None] + cols[None, :], mask=lmask, other=0.0).to(OPD)
        acc = acc * alpha[:, None] + tl.dot(p.to(OPD), vt, input_precision=PREC)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _window_attention_fwd_kernel(
        q_ptr, o_ptr, lse_ptr, runs_ptr,
        k0_ptr, v0_ptr, k1_ptr, v1_ptr, k2_ptr, v2_ptr, k3_ptr, v3_ptr, qk_scale,
        w0: tl.constexpr, n0: tl.constexpr, w1: tl.constexpr, n1: tl.constexpr,
        w2: tl.constexpr, n2: tl.constexpr, w3: tl.constexpr, n3: tl.constexpr,
        Gh: tl.constexpr, Gw: tl.constexpr, heads: tl.constexpr, d: tl.constexpr, HD: tl.constexpr,
        NE: tl.constexpr, BY: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
        BR0: tl.constexpr, BC0: tl.constexpr, BR1: tl.constexpr, BC1: tl.constexpr,
        BR2: tl.constexpr, BC2: tl.constexpr, BR3: tl.constexpr, BC3: tl.constexpr, OPD: tl.constexpr,
        PREC: tl.constexpr):
    """``o [B, Gh*Gw, HD]`` (normalised) and ``lse [B, heads, Gh*Gw]`` (natural log) of one band."""
    band, b, head, y0, y1, m_idx, y, x, valid, cols, dmask, qb, tile, qmask = _band_program(
        Gh, Gw, heads, d, HD, BY, BM, BD)
    q = tl.load(q_ptr + qb + tile, mask=qmask, other=0.0).to(OPD)
    m_i = tl.full((BM,), float("-inf"), tl.float32)
    l_i = tl.full((BM,), 0.0, tl.float32)
    acc = tl.full((BM, BD), 0.0, tl.float32)
    tab = Gh + Gw
    m_i, l_i, acc = _fwd_encoder(q, m_i, l_i, acc, k0_ptr + b * n0 * HD, v0_ptr + b * n0 * HD, runs_ptr, w0, HD,
                                 cols, dmask, Gh, y, x, valid, y0, y1, qk_scale, BR0, BC0, OPD, PREC)
    if NE > 1:
        m_i, l_i, acc = _fwd_encoder(q, m_i, l_i, acc, k1_ptr + b * n1 * HD, v1_ptr + b * n1 * HD,
                                     runs_ptr + 2 * tab, w1, HD, cols, dmask, Gh, y, x, valid, y0, y1,
                                     qk_scale, BR1, BC1, OPD, PREC)
    if NE > 2:
        m_i, l_i, acc = _fwd_encoder(q, m_i, l_i, acc, k2_ptr + b * n2 * HD, v2_ptr + b * n2 * HD,
                                     runs_ptr + 4 * tab, w2, HD, cols, dmask, Gh, y, x, valid, y0, y1,
                                     qk_scale, BR2, BC2, OPD, PREC)
    if NE > 3:
        m_i, l_i, acc = _fwd_encoder(q, m_i, l_i, acc, k3_ptr + b * n3 * HD, v3_ptr + b * n3 * HD,
                                     runs_ptr + 6 * tab, w3, HD, cols, dmask, Gh, y, x, valid, y0, y1,
                                     qk_scale, BR3, BC3, OPD, PREC)
    l_safe = tl.where(valid, l_i, 1.0)
    tl.store(o_ptr + qb + tile, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=qmask)
    lse = (m_i + tl.log2(l_safe)) * LN2
    tl.store(lse_ptr + (b * heads + head) * (Gh * Gw) + m_idx, lse, mask=valid)


@triton.jit
def _bwd_encoder(q, do, lse2, delta, dq, k_ptr, v_ptr, dk_ptr, dv_ptr, sk_ptr, sv_ptr, runs_ptr, w, HD,
                 cols, dmask, Gh, y, x, valid, y0, y1, band, SR, qk_scale, scale,
                 BR: tl.constexpr, BCW: tl.constexpr, OPD: tl.constexpr, PREC: tl.constexpr):
    """One encoder's chunks of the band: writes its dk / dv (own rows to ``dk_ptr``, rows
    shared with the previous band to the seam slot ``band - 1``), returns ``dq`` + ``ds K``."""
    rlo, nr, clo, nc, rs, re = _runs(runs_ptr, Gh, y, x, valid, y0, y1)
    # rows [rs, re_prev) are shared with the previous band, which owns them
    prev_hi = tl.load(runs_ptr + 2 * tl.maximum(y0 - 1, 0) + 1)
    re_prev = tl.where(band > 0, tl.minimum(prev_hi, re), rs)
    offs_k = tl.arange(0, BR * BCW)
    ncc = (w + BCW - 1) // BCW
    for t in range(0, (re - rs + BR - 1) // BR * ncc):  # chunks: BR rows x BCW columns
        kr = rs + (t // ncc) * BR + offs_k // BCW
        kc = (t % ncc) * BCW + offs_k % BCW
        kmask = (kr < re) & (kc < w)
        tok = (kr * w + kc) * HD  # int32: the launcher checks h*w*HD < 2**31
        lmask = kmask[:, None] & dmask[None, :]
        kt = tl.load(k_ptr + tok[:, None] + cols[None, :], mask=lmask, other=0.0).to(OPD)
        s = tl.dot(q, tl.trans(kt), input_precision=PREC) * qk_scale  # log2 units
        hit = (((kr[None, :] - rlo[:, None]).to(tl.uint32) < nr[:, None])
               & ((kc[None, :] - clo[:, None]).to(tl.uint32) < nc[:, None]))
        p = tl.where(hit, tl.exp2(s - lse2[:, None]), 0.0)  # [BM, BK] fp32
        # own rows to dk / dv, rows shared with the previous band to its seam slot
        own = (kr >= re_prev)[:, None]
        sdst = ((((band - 1) * SR + kr - rs) * w + kc) * HD)[:, None] + cols[None, :]
        dst = tok[:, None] + cols[None, :]
        dv = tl.dot(tl.trans(p.to(OPD)), do, input_precision=PREC)  # [BK, BD]
        tl.store(dv_ptr + dst, dv.to(dv_ptr.dtype.element_ty), mask=lmask & own)
        tl.store(sv_ptr + sdst, dv.to(sv_ptr.dtype.element_ty), mask=lmask & ~own)
        vt = tl.load(v_ptr + dst, mask=lmask, other=0.0).to(OPD)
        ds = (p * (tl.dot(do, tl.trans(vt), input_precision=PREC) - delta[:, None])).to(OPD)
        dq += tl.dot(ds, kt, input_precision=PREC)
        dk = tl.dot(tl.trans(ds), q, input_precision=PREC) * scale
        tl.store(dk_ptr + dst, dk.to(dk_ptr.dtype.element_ty), mask=lmask & own)
        tl.store(sk_ptr + sdst, dk.to(sk_ptr.dtype.element_ty), mask=lmask & ~own)
    return dq


@triton.jit
def _window_attention_bwd_kernel(
        q_ptr, o_ptr, do_ptr, lse_ptr, dq_ptr, runs_ptr, seam_ptr, seam_kv,
        k0_ptr, v0_ptr, dk0_ptr, dv0_ptr, k1_ptr, v1_ptr, dk1_ptr, dv1_ptr,
        k2_ptr, v2_ptr, dk2_ptr, dv2_ptr, k3_ptr, v3_ptr, dk3_ptr, dv3_ptr, qk_scale, scale,
        w0: tl.constexpr, n0: tl.constexpr, so0: tl.constexpr, sr0: tl.constexpr,
        w1: tl.constexpr, n1: tl.constexpr, so1: tl.constexpr, sr1: tl.constexpr,
        w2: tl.constexpr, n2: tl.constexpr, so2: tl.constexpr, sr2: tl.constexpr,
        w3: tl.constexpr, n3: tl.constexpr, so3: tl.constexpr, sr3: tl.constexpr, seam_tokens: tl.constexpr,
        Gh: tl.constexpr, Gw: tl.constexpr, heads: tl.constexpr, d: tl.constexpr, HD: tl.constexpr,
        NE: tl.constexpr, BY: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
        BR0: tl.constexpr, BC0: tl.constexpr, BR1: tl.constexpr, BC1: tl.constexpr,
        BR2: tl.constexpr, BC2: tl.constexpr, BR3: tl.constexpr, BC3: tl.constexpr, OPD: tl.constexpr,
        PREC: tl.constexpr):
    """dq of one band's queries; dk / dv of its encoders' key rows (see the module docstring).

    ``seam_ptr``: ``[2, B, seam_tokens, HD]`` (dk partials, then dv; ``seam_kv`` elements
    apart); encoder ``e``'s slots start at token ``so_e``, ``sr_e`` rows per band boundary."""
    band, b, head, y0, y1, m_idx, y, x, valid, cols, dmask, qb, tile, qmask = _band_program(
        Gh, Gw, heads, d, HD, BY, BM, BD)
    q = tl.load(q_ptr + qb + tile, mask=qmask, other=0.0).to(OPD)
    do = tl.load(do_ptr + qb + tile, mask=qmask, other=0.0)
    o = tl.load(o_ptr + qb + tile, mask=qmask, other=0.0)
    delta = tl.reduce(do.to(tl.float32) * o.to(tl.float32), 1, _sum_combine)
    do = do.to(OPD)
    lse2 = tl.load(lse_ptr + (b * heads + head) * (Gh * Gw) + m_idx, mask=valid, other=0.0) * LOG2E
    dq = tl.full((BM, BD), 0.0, tl.float32)
    tab = Gh + Gw
    sb = seam_ptr + b * seam_tokens * HD
    dq = _bwd_encoder(q, do, lse2, delta, dq, k0_ptr + b * n0 * HD, v0_ptr + b * n0 * HD, dk0_ptr + b * n0 * HD,
                      dv0_ptr + b * n0 * HD, sb + so0 * HD, sb + seam_kv + so0 * HD, runs_ptr, w0, HD, cols,
                      dmask, Gh, y, x, valid, y0, y1, band, sr0, qk_scale, scale, BR0, BC0, OPD, PREC)
    if NE > 1:
        dq = _bwd_encoder(q, do, lse2, delta, dq, k1_ptr + b * n1 * HD, v1_ptr + b * n1 * HD,
                          dk1_ptr + b * n1 * HD, dv1_ptr + b * n1 * HD, sb + so1 * HD, sb + seam_kv + so1 * HD,
                          runs_ptr + 2 * tab, w1, HD, cols, dmask, Gh, y, x, valid, y0, y1, band, sr1, qk_scale,
                          scale, BR1, BC1, OPD, PREC)
    if NE > 2:
        dq = _bwd_encoder(q, do, lse2, delta, dq, k2_ptr + b * n2 * HD, v2_ptr + b * n2 * HD,
                          dk2_ptr + b * n2 * HD, dv2_ptr + b * n2 * HD, sb + so2 * HD, sb + seam_kv + so2 * HD,
                          runs_ptr + 4 * tab, w2, HD, cols, dmask, Gh, y, x, valid, y0, y1, band, sr2, qk_scale,
                          scale, BR2, BC2, OPD, PREC)
    if NE > 3:
        dq = _bwd_encoder(q, do, lse2, delta, dq, k3_ptr + b * n3 * HD, v3_ptr + b * n3 * HD,
                          dk3_ptr + b * n3 * HD, dv3_ptr + b * n3 * HD, sb + so3 * HD, sb + seam_kv + so3 * HD,
                          runs_ptr + 6 * tab, w3, HD, cols, dmask, Gh, y, x, valid, y0, y1, band, sr3, qk_scale,
                          scale, BR3, BC3, OPD, PREC)
    tl.store(dq_ptr + qb + tile, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qmask)
