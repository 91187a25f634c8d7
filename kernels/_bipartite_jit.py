"""The three Triton kernels of :mod:`.bipartite_merge` (ToMe's bipartite soft matching).

Their roles, the tiling and the determinism argument are in that module's docstring;
the launchers there own the block sizes. Token, metric and gradient values are cast to fp32 as
they are loaded (the interpreter's bf16 arithmetic needs it; the sums run in fp32 anyway).
"""
from ._triton import tl, triton


@triton.jit
def _bipartite_match_kernel(
    M, INV, BEST, PARTNER,                # metric [B, N, Cm]; inv norms fp32 [B, N]; outputs [B, N_A]
    N, N_A, N_B, Cm,
    stride_b, stride_n, stride_c,         # metric strides (elements)
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Row max / argmax over j of a_i · (b_j / |b_j|), streamed over B blocks; best *= 1/|a_i|."""
    pid_a = tl.program_id(0)
    bb = tl.program_id(1).to(tl.int64)
    base = M + bb * stride_b
    inv_base = INV + bb * N
    ia = pid_a * BLOCK_A + tl.arange(0, BLOCK_A)
    a_mask = ia < N_A
    a_rows = (2 * ia).to(tl.int64) * stride_n           # A token i is token 2i
    kk0 = tl.arange(0, BLOCK_K)

    best = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    arg = tl.zeros([BLOCK_A], dtype=tl.int32)
    for b0 in range(0, N_B, BLOCK_B):
        ib = b0 + tl.arange(0, BLOCK_B)
        b_mask = ib < N_B
        b_rows = (2 * ib + 1).to(tl.int64) * stride_n   # B token j is token 2j+1
        inv_b = tl.load(inv_base + 2 * ib + 1, mask=b_mask, other=0.0)
        dot = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
        for k0 in range(0, Cm, BLOCK_K):
            kk = k0 + kk0
            k_mask = (kk < Cm)[None, :]
            a = tl.load(base + a_rows[:, None] + kk[None, :] * stride_c,
                        mask=a_mask[:, None] & k_mask, other=0.0).to(tl.float32)
            b = tl.load(base + b_rows[:, None] + kk[None, :] * stride_c,
                        mask=b_mask[:, None] & k_mask, other=0.0).to(tl.float32)
            dot += tl.dot(a, tl.trans(b * inv_b[:, None]), input_precision="ieee")
        s = tl.where(b_mask[None, :], dot, float("-inf"))
        blk_max = tl.max(s, axis=1)
        blk_arg = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int32) + b0
        upd = blk_max > best                            # strict: earlier block wins ties
        best = tl.where(upd, blk_max, best)
        arg = tl.where(upd, blk_arg, arg)

    inv_a = tl.load(inv_base + 2 * ia, mask=a_mask, other=0.0)
    out = bb * N_A + ia
    tl.store(BEST + out, best * inv_a, mask=a_mask)
    tl.store(PARTNER + out, arg.to(tl.int64), mask=a_mask)

@triton.jit
def _output_block(OFFS, n_out, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The merge programs' tile: grid ``(output blocks, channel blocks, batch)``. Returns the
    batch item (int64), the ``BLOCK_M`` output rows and their mask, each row's source
    list ``[start, start + cnt)`` in the CSR offsets ``OFFS [B, n_out + 1]``, the longest
    list, and the ``BLOCK_C`` channels and their mask. Once per program."""
    bb = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_mask = rows < n_out
    offs = OFFS + bb * (n_out + 1)
    start = tl.load(offs + rows, mask=r_mask, other=0)
    cnt = tl.load(offs + rows + 1, mask=r_mask, other=0) - start
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return bb, rows, r_mask, start, cnt, tl.max(cnt, axis=0), cols, cols < C


@triton.jit
def _gather_merge_kernel(
    X, S, SRC, OFFS, OUT, OUT_S,          # x [B,N,C]; sizes fp32 [B,N]; src [B,N]; offs [B,n_out+1]
    N, n_out, C,
    stride_xb, stride_xn, stride_xc,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """out[o] = Σ_{i in src[offs[o]:offs[o+1]]} (s_i / S_o) x_i, sources in list order."""
    bb, rows, r_mask, start, cnt, max_cnt, cols, c_mask = _output_block(OFFS, n_out, C, BLOCK_M, BLOCK_C)
    src_base = SRC + bb * N
    s_base = S + bb * N

    den = tl.zeros([BLOCK_M], dtype=tl.float32)          # S_o, summed in list order
    for j in range(0, max_cnt):
        valid = j < cnt
        src = tl.load(src_base + start + j, mask=valid, other=0)
        den += tl.load(s_base + src, mask=valid, other=0.0).to(tl.float32)
    den_safe = tl.where(den > 0.0, den, 1.0)

    x_base = X + bb * stride_xb
    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for j in range(0, max_cnt):
        valid = j < cnt
        src = tl.load(src_base + start + j, mask=valid, other=0)
        w = tl.load(s_base + src, mask=valid, other=0.0).to(tl.float32) / den_safe
        xv = tl.load(x_base + src[:, None] * stride_xn + cols[None, :] * stride_xc,
                     mask=valid[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
        acc += w[:, None] * xv

    out_rows = bb * n_out + rows
    tl.store(OUT + out_rows[:, None] * C + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=r_mask[:, None] & c_mask[None, :])
    if tl.program_id(1) == 0:
        tl.store(OUT_S + out_rows, den, mask=r_mask)


@triton.jit
def _gather_merge_backward_kernel(
    G, S, OUT_S, SRC, OFFS, GX,           # grad [B,n_out,C]; sizes fp32 [B,N]; [B,n_out]; CSR [B,N], [B,n_out+1]; [B,N,C]
    N, n_out, C,
    stride_gb, stride_gn, stride_gc,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_x[i] = grad[o] * s_i / S_o for each source i of output o.

    Programs own outputs, like the forward: each grad row is read once and written to
    its sources' rows. Every input token is the source of exactly one output, so no two
    programs write the same element: no atomics, every grad_x row written once.
    """
    bb, rows, r_mask, start, cnt, max_cnt, cols, c_mask = _output_block(OFFS, n_out, C, BLOCK_M, BLOCK_C)
    tot = tl.load(OUT_S + bb * n_out + rows, mask=r_mask, other=1.0)
    tot = tl.where(tot > 0.0, tot, 1.0)
    g = tl.load(G + bb * stride_gb + rows[:, None] * stride_gn + cols[None, :] * stride_gc,
                mask=r_mask[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    src_base = SRC + bb * N
    for j in range(0, max_cnt):
        valid = j < cnt
        src = tl.load(src_base + start + j, mask=valid, other=0)
        w = tl.load(S + bb * N + src, mask=valid, other=0.0) / tot
        tl.store(GX + (bb * N + src)[:, None] * C + cols[None, :],
                 (w[:, None] * g).to(GX.dtype.element_ty), mask=valid[:, None] & c_mask[None, :])
