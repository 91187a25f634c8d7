"""grid_merge: resample encoder grids to one grid, LayerNorm each, concatenate.

Layouts: each grid is ``[B, h, w, C]`` channels-last with any strides; the output is
``[B, H*W, sum C]`` (``layout="channel"``) or ``[B, n*H*W, C]`` (``"sequence"``); each
grid writes its own strided slice of it, so there is no ``torch.cat``.

Forward kernel: one program per (batch item, block of ``BX`` output columns, band of
output rows) holds all ``C`` channels (the LayerNorm needs them). It walks its output
rows in order; each output row is a weighted sum of a run of input rows, each input
row first resampled along the width as a ``[BX, BJ] @ [BJ, C]`` product. The last
resampled input row is carried to the next output row, so rows shared by neighbouring
windows (27->24, 37->24, 64->24) are read once: the input is read once per program.

Backward kernel: one program per (batch item, block of ``BJO`` *input* columns, band
of input rows). It recomputes the forward rows it needs (LayerNorm backward needs
``x_hat``), takes the LayerNorm backward, and scatters ``dy`` back through the
transposed weights into the input rows it owns, storing each once it is complete.
Owning input blocks means no two programs write the same ``dx`` element: no atomics.
``dweight`` / ``dbias`` are per-program partial sums reduced by ``torch.sum``
(deterministic). Constants and block sizes are in :mod:`._plan`.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _validate as V
from ._canonical import require_canonical
from ._plan import axis_tables, dot_precision as _prec, int_table, num_warps_for, out_slices as _out_slices, \
    plan_for, sm_count, two_slots
from ._resample_jit import load_taps, output_row, tap_weight
from ._triton import HAVE_TRITON, sum_combine as _sum, tl, triton, triton_runs_on
from .reference import grid_merge_reference

require_canonical(__name__)  # registering the fusion:: ops twice frees them under live handles


@triton.jit
def _grid_merge_fwd_kernel(
    x_ptr, out_ptr, w_ptr, b_ptr, rows_idx_ptr, rows_wt_ptr, cols_idx_ptr, cols_wt_ptr, bands_ptr,
    W, C, n_cb, eps, sxb, sxh, sxw, sxc, sob, son, soc,
    NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, TWO_SLOTS: tl.constexpr,
    BX: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cb = pid % n_cb
    y0 = tl.load(bands_ptr + 2 * (pid // n_cb))
    y1 = tl.load(bands_ptr + 2 * (pid // n_cb) + 1)
    offs_x = cb * BX + tl.arange(0, BX)
    xmask = offs_x < W
    offs_c = tl.arange(0, BC)
    cmask = offs_c < C
    offs_c64 = offs_c.to(tl.int64) * sxc
    c_lo, c_hi, c_wf, c_wm, c_wl = load_taps(cols_idx_ptr, cols_wt_ptr, offs_x, xmask)
    jlo = tl.load(cols_idx_ptr + 2 * (cb * BX))
    jhi = tl.load(cols_idx_ptr + 2 * (tl.minimum(cb * BX + BX, W) - 1) + 1)
    if HAS_W:
        wv = tl.load(w_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        bv = tl.load(b_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    x_b = x_ptr + b * sxb
    o_b = out_ptr + b * sob
    sxh64 = b * 0 + sxh
    sxw64 = b * 0 + sxw
    W64 = b * 0 + W  # int64 index math: no overflow, no interpreter overflow checks
    omask = xmask[:, None] & cmask[None, :]
    offs_j0 = jlo + tl.arange(0, BJ)
    wgt0 = tap_weight(offs_j0[None, :], c_lo[:, None], c_hi[:, None],
                      c_wf[:, None], c_wm[:, None], c_wl[:, None])  # first [BX, BJ] width slice
    t_a = tl.full((BX, BC), 0.0, tl.float32)
    t_b = tl.full((BX, BC), 0.0, tl.float32)
    id_a = y0 * 0 - 1
    id_b = y0 * 0 - 1
    for y in range(y0, y1):
        acc, t_a, id_a, t_b, id_b = output_row(
            x_b, sxh64, sxw64, offs_c64, cmask, y, rows_idx_ptr, rows_wt_ptr, jlo, jhi,
            c_lo, c_hi, c_wf, c_wm, c_wl, wgt0, t_a, id_a, t_b, id_b, TWO_SLOTS, BX, BJ, BC, PREC)
        if NORM:
            mean = tl.reduce(acc, 1, _sum) / C
            diff = tl.where(cmask[None, :], acc - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.reduce(diff * diff, 1, _sum) / C + eps)
            acc = diff * rstd[:, None]
            if HAS_W:
                acc = acc * wv[None, :]
            if HAS_B:
                acc = acc + bv[None, :]
        optrs = o_b + (y * W64 + offs_x)[:, None] * son + offs_c.to(tl.int64)[None, :] * soc
        tl.store(optrs, acc.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _grid_merge_bwd_kernel(
    x_ptr, g_ptr, dx_ptr, w_ptr, dwp_ptr, dbp_ptr,
    rows_idx_ptr, rows_wt_ptr, cols_idx_ptr, cols_wt_ptr, bcols_ptr, bands_ptr,
    H, W, w_in, C, n_cb, eps,
    sxb, sxh, sxw, sxc, sgb, sgn, sgc, sdb, sdh, sdw, sdc,
    NORM: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, NEED_DX: tl.constexpr,
    TWO_SLOTS: tl.constexpr, BXO: tl.constexpr, BJO: tl.constexpr, BJ: tl.constexpr,
    BC: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cb = pid % n_cb
    band = pid // n_cb
    j0 = cb * BJO
    j1 = tl.minimum(j0 + BJO, w_in)
    xa = tl.load(bcols_ptr + 2 * cb)
    xb = tl.load(bcols_ptr + 2 * cb + 1)
    r0 = tl.load(bands_ptr + 4 * band)
    r1 = tl.load(bands_ptr + 4 * band + 1)
    ya = tl.load(bands_ptr + 4 * band + 2)
    yb = tl.load(bands_ptr + 4 * band + 3)
    offs_x = xa + tl.arange(0, BXO)
    xmask = offs_x < xb
    offs_j = j0 + tl.arange(0, BJO)
    jmask = offs_j < j1
    offs_c = tl.arange(0, BC)
    cmask = offs_c < C
    c_lo, c_hi, c_wf, c_wm, c_wl = load_taps(cols_idx_ptr, cols_wt_ptr, offs_x, xmask)
    jlo = tl.load(cols_idx_ptr + 2 * xa)
    jhi = tl.load(cols_idx_ptr + 2 * (tl.maximum(xb, xa + 1) - 1) + 1)
    own_x = xmask & (c_lo >= j0) & (c_lo < j1)  # (y, x) is reduced by the owner of its first tap
    # [BJO, BXO]: what each owned input column gets from each covered output column
    w_t = tap_weight(offs_j[:, None], c_lo[None, :], c_hi[None, :],
                     c_wf[None, :], c_wm[None, :], c_wl[None, :])
    if HAS_W:
        wv = tl.load(w_ptr + offs_c, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.full((BC,), 0.0, tl.float32)
    db_acc = tl.full((BC,), 0.0, tl.float32)
    x_b = x_ptr + b * sxb
    g_b = g_ptr + b * sgb
    dx_b = dx_ptr + b * sdb
    sxh64 = b * 0 + sxh
    sxw64 = b * 0 + sxw
    sdh64 = b * 0 + sdh
    W64 = b * 0 + W  # int64 index math: no overflow, no interpreter overflow checks
    offs_c64 = offs_c.to(tl.int64) * sxc
    offs_j0 = jlo + tl.arange(0, BJ)
    wgt0 = tap_weight(offs_j0[None, :], c_lo[:, None], c_hi[:, None],
                      c_wf[:, None], c_wm[:, None], c_wl[:, None])  # first [BXO, BJ] width slice
    offs_gc = offs_c.to(tl.int64)[None, :] * sgc
    dx_cols = offs_j.to(tl.int64)[:, None] * sdw + offs_c.to(tl.int64)[None, :] * sdc
    dmask = jmask[:, None] & cmask[None, :]
    zeros = tl.full((BJO, BC), 0.0, tl.float32).to(dx_ptr.dtype.element_ty)
    t_a = tl.full((BXO, BC), 0.0, tl.float32)
    t_b = tl.full((BXO, BC), 0.0, tl.float32)
    id_a = r0 * 0 - 1
    id_b = r0 * 0 - 1
    p_a = tl.full((BJO, BC), 0.0, tl.float32)  # pending dx rows (slot r % 2 when TWO_SLOTS)
    p_b = tl.full((BJO, BC), 0.0, tl.float32)
    pid_a = r0 * 0 - 1
    pid_b = r0 * 0 - 1
    filled = r0  # dx rows below this have been written
    for y in range(ya, yb):  # every output row that reads an owned input row
        g = tl.load(g_b + (y * W64 + offs_x)[:, None] * sgn + offs_gc,
                    mask=xmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        rlo = tl.load(rows_idx_ptr + 2 * y)
        rhi = tl.load(rows_idx_ptr + 2 * y + 1)
        if NORM:
            acc, t_a, id_a, t_b, id_b = output_row(
                x_b, sxh64, sxw64, offs_c64, cmask, y, rows_idx_ptr, rows_wt_ptr,
                jlo, jhi, c_lo, c_hi, c_wf, c_wm, c_wl, wgt0, t_a, id_a, t_b, id_b,
                TWO_SLOTS, BXO, BJ, BC, PREC)
            mean = tl.reduce(acc, 1, _sum) / C
            diff = tl.where(cmask[None, :], acc - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.reduce(diff * diff, 1, _sum) / C + eps)
            xhat = diff * rstd[:, None]
            own = own_x & (rlo >= r0) & (rlo < r1)
            if HAS_W:
                dw_acc += tl.reduce(tl.where(own[:, None], g * xhat, 0.0), 0, _sum)
            if HAS_B:
                db_acc += tl.reduce(tl.where(own[:, None], g, 0.0), 0, _sum)
            if HAS_W:
                g = g * wv[None, :]
            c1 = tl.reduce(g * xhat, 1, _sum) / C
            c2 = tl.reduce(g, 1, _sum) / C
            g = tl.where(cmask[None, :], rstd[:, None] * (g - c2[:, None] - xhat * c1[:, None]), 0.0)
        if NEED_DX:
            # dy through the transposed weights: row y's share of the owned dx rows
            u = tl.dot(w_t, g, input_precision=PREC)  # [BJO, BC]
            nxt = tl.load(rows_idx_ptr + 2 * (y + 1), mask=y + 1 < H, other=2147483647)
            rwf = tl.load(rows_wt_ptr + 3 * y)
            rwm = tl.load(rows_wt_ptr + 3 * y + 1)
            rwl = tl.load(rows_wt_ptr + 3 * y + 2)
            for r in range(tl.maximum(rlo, r0), tl.minimum(rhi, r1)):
                wr = tl.where(r == rlo, rwf, tl.where(r == rhi - 1, rwl, rwm))
                for rz in range(filled, r):  # rows no output reads (bilinear skips) get zeros
                    tl.store(dx_b + rz * sdh64 + dx_cols, zeros, mask=dmask)
                filled = tl.maximum(filled, r + 1)
                done = r < nxt  # no later output row reads r: dx row r is complete
                keep = tl.where(done, -1, r)
                if TWO_SLOTS:
                    odd = (r % 2) == 1
                    tot = wr * u + tl.where(r == tl.where(odd, pid_b, pid_a), tl.where(odd, p_b, p_a), 0.0)
                    p_b = tl.where(odd, tot, p_b)
                    p_a = tl.where(odd, p_a, tot)
                    pid_b = tl.where(odd, keep, pid_b)
                    pid_a = tl.where(odd, pid_a, keep)
                else:
                    tot = wr * u + tl.where(r == pid_a, p_a, 0.0)
                    p_a = tot
                    pid_a = keep
                if done:
                    tl.store(dx_b + r * sdh64 + dx_cols, tot.to(dx_ptr.dtype.element_ty), mask=dmask)
    if NEED_DX:
        for rz in range(filled, r1):
            tl.store(dx_b + rz * sdh64 + dx_cols, zeros, mask=dmask)
    prog = b * tl.num_programs(0) + pid
    if HAS_W:
        tl.store(dwp_ptr + prog * C + offs_c, dw_acc, mask=cmask)
    if HAS_B:
        tl.store(dbp_ptr + prog * C + offs_c, db_acc, mask=cmask)


# --------------------------------------------------------------------------------------
# Launchers: take validated arguments, allocate, launch one kernel per grid.
# --------------------------------------------------------------------------------------

def _param(p: Optional[Tensor], like: Tensor) -> Tensor:
    return like if p is None else p.contiguous()


def grid_merge_forward(grids: Sequence[Tensor], weights: Sequence[Optional[Tensor]],
                       biases: Sequence[Optional[Tensor]], normalize: Sequence[bool], H: int, W: int,
                       mode: str, eps: float, layout: str,
                       row_blocks: Optional[Tuple[int, int]] = None) -> Tensor:
    """Triton forward. ``grids[i]``: ``[B, h_i, w_i, C_i]``; returns the merged tokens.

    ``row_blocks``: (forward, backward) row bands; None picks them for the device.
    """
    B, dev, dtype = grids[0].shape[0], grids[0].device, grids[0].dtype
    sizes = [g.shape[-1] for g in grids]
    if layout == "channel":
        out = torch.empty(B, H * W, sum(sizes), device=dev, dtype=dtype)
    else:
        out = torch.empty(B, len(grids) * H * W, sizes[0], device=dev, dtype=dtype)
    for x, wt, bs, norm, o in zip(grids, weights, biases, normalize, _out_slices(out, sizes, H * W, layout)):
        _, h, w, C = x.shape
        pl = plan_for(h, w, H, W, C, mode, B, sm_count(dev), row_blocks)
        r_idx, r_wt = axis_tables(h, H, mode, dev)
        c_idx, c_wt = axis_tables(w, W, mode, dev)
        bands = int_table(pl.fwd_bands, dev)
        _grid_merge_fwd_kernel[(pl.n_cb * len(pl.fwd_bands), B)](
            x, o, _param(wt, x), _param(bs, x), r_idx, r_wt, c_idx, c_wt, bands,
            W, C, pl.n_cb, eps, *x.stride(), *o.stride(),
            NORM=bool(norm), HAS_W=bool(norm) and wt is not None, HAS_B=bool(norm) and bs is not None,
            TWO_SLOTS=two_slots(h, H, mode), BX=pl.BX, BJ=pl.BJF, BC=pl.BC, PREC=_prec(dtype),
            num_warps=num_warps_for(pl.BX * pl.BC))
    return out


def grid_merge_backward(grad: Tensor, grids: Sequence[Tensor], weights: Sequence[Optional[Tensor]],
                        biases: Sequence[Optional[Tensor]], normalize: Sequence[bool],
                        need_dx: Sequence[bool], H: int, W: int, mode: str, eps: float, layout: str,
                        row_blocks: Optional[Tuple[int, int]] = None) -> List[Tensor]:
    """Triton backward. Returns ``[dx_i...] + [dweight_i...] + [dbias_i...]``; entries not
    needed (``need_dx`` False, no weight / bias) are empty ``[0]`` tensors."""
    B, dev = grids[0].shape[0], grids[0].device
    n = len(grids)
    dxs, dws, dbs = ([grad.new_empty(0) for _ in range(n)] for _ in range(3))
    slices = _out_slices(grad, [g.shape[-1] for g in grids], H * W, layout)
    for i, (x, g) in enumerate(zip(grids, slices)):
        _, h, w, C = x.shape
        norm = bool(normalize[i])
        has_w, has_b = norm and weights[i] is not None, norm and biases[i] is not None
        if not (need_dx[i] or has_w or has_b):
            continue
        pl = plan_for(h, w, H, W, C, mode, B, sm_count(dev), row_blocks)
        n_cb = len(pl.bwd_cols)
        n_prog = n_cb * len(pl.bwd_bands)
        dx = torch.empty(x.shape, device=dev, dtype=x.dtype) if need_dx[i] else x
        dwp = torch.empty(B * n_prog, C, device=dev, dtype=torch.float32) if has_w else x
        dbp = torch.empty(B * n_prog, C, device=dev, dtype=torch.float32) if has_b else x
        r_idx, r_wt = axis_tables(h, H, mode, dev)
        c_idx, c_wt = axis_tables(w, W, mode, dev)
        _grid_merge_bwd_kernel[(n_prog, B)](
            x, g, dx, _param(weights[i], x), dwp, dbp, r_idx, r_wt, c_idx, c_wt,
            int_table(pl.bwd_cols, dev), int_table(pl.bwd_bands, dev),
            H, W, w, C, n_cb, eps, *x.stride(), *g.stride(), *dx.stride(),
            NORM=norm, HAS_W=has_w, HAS_B=has_b, NEED_DX=bool(need_dx[i]),
            TWO_SLOTS=two_slots(h, H, mode), BXO=pl.BXO, BJO=pl.BJO, BJ=pl.BJB, BC=pl.BC,
            PREC=_prec(x.dtype), num_warps=num_warps_for(max(pl.BXO, pl.BJO) * pl.BC))
        if need_dx[i]:
            dxs[i] = dx
        if has_w:
            dws[i] = dwp.sum(0).to(weights[i].dtype)
        if has_b:
            dbs[i] = dbp.sum(0).to(biases[i].dtype)
    return dxs + dws + dbs


# --------------------------------------------------------------------------------------
# Custom ops (so torch.compile / torch.export see one opaque op) and autograd.
# --------------------------------------------------------------------------------------

# Absent LayerNorm weights / biases travel as empty [0] tensors: autograd only tracks
# list arguments that hold tensors only (a list with a None in it gets no gradients).

def _opt(ts: Sequence[Tensor]) -> List[Optional[Tensor]]:
    return [None if t.numel() == 0 else t for t in ts]


@torch.library.custom_op("fusion::grid_merge", mutates_args=())
def _grid_merge_op(grids: List[Tensor], weights: List[Tensor], biases: List[Tensor],
                   normalize: List[bool], H: int, W: int, mode: str, eps: float, layout: str) -> Tensor:
    return grid_merge_forward(grids, _opt(weights), _opt(biases), normalize, H, W, mode, eps, layout)


@_grid_merge_op.register_fake
def _(grids, weights, biases, normalize, H, W, mode, eps, layout):
    B = grids[0].shape[0]
    if layout == "channel":
        return grids[0].new_empty(B, H * W, sum(g.shape[-1] for g in grids))
    return grids[0].new_empty(B, len(grids) * H * W, grids[0].shape[-1])


@torch.library.custom_op("fusion::grid_merge_backward", mutates_args=())
def _grid_merge_bwd_op(grad: Tensor, grids: List[Tensor], weights: List[Tensor], biases: List[Tensor],
                       normalize: List[bool], need_dx: List[bool], H: int, W: int, mode: str,
                       eps: float, layout: str) -> List[Tensor]:
    return grid_merge_backward(grad, grids, _opt(weights), _opt(biases), normalize, need_dx,
                               H, W, mode, eps, layout)


@_grid_merge_bwd_op.register_fake
def _(grad, grids, weights, biases, normalize, need_dx, H, W, mode, eps, layout):
    def like(t, keep):
        return t.new_empty(t.shape) if keep else grad.new_empty(0)
    return ([like(g, k) for g, k in zip(grids, need_dx)]
            + [like(w, n and w.numel() > 0) for w, n in zip(weights, normalize)]
            + [like(b, n and b.numel() > 0) for b, n in zip(biases, normalize)])


def _setup_context(ctx, inputs, output):
    grids, weights, biases, normalize, H, W, mode, eps, layout = inputs
    ctx.n = len(grids)
    ctx.args = (list(normalize), [bool(g.requires_grad) for g in grids], H, W, mode, eps, layout)
    ctx.save_for_backward(*grids, *weights, *biases)


def _backward(ctx, grad):
    n = ctx.n
    saved = ctx.saved_tensors
    grids, weights, biases = list(saved[:n]), list(saved[n:2 * n]), list(saved[2 * n:])
    normalize, need_dx, H, W, mode, eps, layout = ctx.args
    res = _grid_merge_bwd_op(grad, grids, weights, biases, normalize, need_dx, H, W, mode, eps, layout)
    dg = [res[i] if need_dx[i] else None for i in range(n)]
    dw = [res[n + i] if (normalize[i] and weights[i].numel()) else None for i in range(n)]
    db = [res[2 * n + i] if (normalize[i] and biases[i].numel()) else None for i in range(n)]
    return dg, dw, db, None, None, None, None, None, None


_grid_merge_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

def grid_merge(grids: Sequence[Tensor], size: Union[int, Tuple[int, int]], mode: str = "area",
               norms: Optional[Sequence] = None, eps: float = 1e-5, layout: str = "channel",
               backend: str = "auto") -> Tensor:
    """Resample each grid to ``size``, LayerNorm it (optional), concatenate.

    Args:
        grids: list of ``[B, h_i, w_i, C_i]`` channels-last tensors (any strides; fp16,
            bf16, fp32; fp64 on the ``"torch"`` backend).
        size: target ``(H, W)``, or an int for a square grid.
        mode: ``"area"`` (= ``F.adaptive_avg_pool2d``) or ``"bilinear"``
            (= ``F.interpolate(mode="bilinear", align_corners=False)``).
        norms: None, or one entry per grid: None (no LayerNorm) or ``(weight, bias)``
            with each ``[C_i]`` or None (LayerNorm without that affine part).
        eps: LayerNorm epsilon.
        layout: ``"channel"`` -> ``[B, H*W, sum C_i]``; ``"sequence"`` -> ``[B, n*H*W, C]``
            (grid ``i`` at tokens ``[i*H*W, (i+1)*H*W)``; needs equal ``C_i``).
        backend: ``"auto"`` (Triton for CUDA tensors, else PyTorch), ``"triton"``, ``"torch"``.

    Returns:
        The merged tokens in the grids' dtype; differentiable w.r.t. grids and norm params.
    """
    grids = V.check_grids(grids)
    H, W = V.check_size("size", size)
    V.check_choice("mode", mode, V.MODES)
    norms = V.check_norms(norms, grids)
    eps = V.check_eps(eps)
    V.check_layout(layout, grids)
    dev, dtype = grids[0].device, grids[0].dtype
    ok = triton_runs_on(_grid_merge_fwd_kernel, dev) and dtype != torch.float64
    be = V.resolve_backend(backend, dev, HAVE_TRITON)
    if be == "triton" and not ok and backend == "triton":
        raise ValueError(V.triton_unavailable(dev, dtype))
    if be == "torch" or not ok:  # "auto" falls back to PyTorch (e.g. float64 on CUDA)
        return grid_merge_reference(grids, (H, W), mode, norms, eps, layout)
    none = grids[0].new_empty(0)
    weights = [none if nm is None or nm[0] is None else nm[0] for nm in norms]
    biases = [none if nm is None or nm[1] is None else nm[1] for nm in norms]
    return _grid_merge_op(grids, weights, biases, [nm is not None for nm in norms], H, W, mode, eps, layout)
