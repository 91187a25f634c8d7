"""pyramid_pool: area-pool a token grid to several coarser levels from one read.

Layouts: ``tokens`` is ``[B, H*W, C]`` (row-major grid, any strides); the output is
``[B, sum l_h*l_w, C]`` with the levels in the order given, each row-major.

The columns of all levels are stacked into one axis of ``K = sum l_w`` entries (table
``(l_h, l_w, x, first token, valid)`` per entry, see :func:`._plan.pyramid_tables`), so a
program (one batch item, one block of ``BC`` channels) holds every level in one
``[KP, BC]`` tile. It streams the input rows once: each row is pooled along the width
for all levels at once (``[KP, BJ] @ [BJ, BC]``) and added to the two level rows it
can belong to (the current one and, for a shared boundary row, the next); a level row
is stored when its last input row has passed. Channels are independent, so programs
never share inputs or outputs. The backward streams the input rows the same way,
fetching each level row of the gradient once (carried while it is needed) and
writing each input-gradient row once. Levels must not exceed the grid (pooling only
shrinks), so an input row touches at most two rows per level.
"""
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _validate as V
from ._canonical import require_canonical
from ._launch import Launch
from ._plan import DOT_MIN, TILE_BUDGET, dot_precision, next_pow2, num_warps_for, pyramid_tables
from ._triton import tl, triton
from .reference import pyramid_pool_reference

require_canonical(__name__)  # registering the fusion:: ops twice frees them under live handles

MAX_BC = 64  # channels per program: B*C/64 programs; spill-free [32, 64] tiles on sm_90 (ptxas)
NUM_STAGES = 3  # Triton's default; the compile report shows its shared memory
# Per-row index math is written inline rather than as a @triton.jit helper: the Triton
# interpreter (CPU tests, traffic counts) re-patches triton.language on every nested
# @jit call, milliseconds each. Once-per-program helpers (_level_columns) are fine.


@triton.jit
def _col_weights(offs_j, W, lw, xk, valid):
    """``[KP, BJ]`` width weights: stacked column k averages inputs ``[s_k, e_k)``."""
    s = (xk * W) // lw
    e = ((xk + 1) * W + lw - 1) // lw
    inside = (offs_j[None, :] >= s[:, None]) & (offs_j[None, :] < e[:, None]) & valid[:, None]
    return tl.where(inside, 1.0 / (e - s).to(tl.float32)[:, None], 0.0)


@triton.jit
def _level_columns(tab_ptr, KP: tl.constexpr):
    """The ``[5, KP]`` table of :func:`._plan.pyramid_tables` as int64 ``[KP]`` vectors
    (level rows, level cols, column x, first token of the level) and the valid mask.
    Called once per program (the interpreter's cost of a nested call is per call)."""
    offs_k = tl.arange(0, KP)
    lh = tl.load(tab_ptr + offs_k).to(tl.int64)
    lw = tl.load(tab_ptr + KP + offs_k).to(tl.int64)
    xk = tl.load(tab_ptr + 2 * KP + offs_k).to(tl.int64)
    base = tl.load(tab_ptr + 3 * KP + offs_k).to(tl.int64)
    valid = tl.load(tab_ptr + 4 * KP + offs_k) != 0
    return lh, lw, xk, base, valid


@triton.jit
def _program(tab_ptr, H, W, C, KP: tl.constexpr, BC: tl.constexpr):
    """This program's batch item ``b`` (int64), ``H`` and ``W`` as int64 (no int32 overflow, no
    overflow checks in the interpreter), its channels and their mask, and the level columns."""
    cb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    lh, lw, xk, base, valid = _level_columns(tab_ptr, KP)
    offs_c = cb * BC + tl.arange(0, BC)
    return b, b * 0 + H, b * 0 + W, offs_c, offs_c < C, lh, lw, xk, base, valid


@triton.jit
def _pyramid_fwd_kernel(x_ptr, out_ptr, tab_ptr, H, W, C, stb, stn, stc, sob, son, soc,
                        KP: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    b, H, W, offs_c, cmask, lh, lw, xk, base, valid = _program(tab_ptr, H, W, C, KP, BC)
    x_b = x_ptr + b * stb + offs_c.to(tl.int64)[None, :] * stc
    o_b = out_ptr + b * sob + offs_c.to(tl.int64)[None, :] * soc
    stn64 = b * 0 + stn
    wgt0 = _col_weights(tl.arange(0, BJ), W, lw, xk, valid)
    acc_a = tl.full((KP, BC), 0.0, tl.float32)  # level row ylo
    acc_b = tl.full((KP, BC), 0.0, tl.float32)  # level row ylo + 1 (shared boundary row)
    for r in range(0, H):
        t = tl.full((KP, BC), 0.0, tl.float32)
        for j0 in range(0, W, BJ):
            offs_j = j0 + tl.arange(0, BJ)
            tile = tl.load(x_b + (r * W + offs_j)[:, None] * stn64,
                           mask=(offs_j < W)[:, None] & cmask[None, :], other=0.0)
            if j0 == 0:
                wgt = wgt0
            else:
                wgt = _col_weights(offs_j, W, lw, xk, valid)
            t = tl.dot(wgt, tile.to(tl.float32), t, input_precision=PREC)
        # the level rows input row r feeds (ylo, and yhi = ylo + 1 when r is shared)
        ylo = (r * lh) // H
        yhi = ((r + 1) * lh + H - 1) // H - 1
        e_lo = ((ylo + 1) * H + lh - 1) // lh
        w_lo = 1.0 / (e_lo - (ylo * H) // lh).to(tl.float32)
        w_hi = tl.where(yhi > ylo, 1.0 / (((yhi + 1) * H + lh - 1) // lh - (yhi * H) // lh).to(tl.float32), 0.0)
        acc_a += w_lo[:, None] * t
        acc_b += w_hi[:, None] * t
        done = (r == e_lo - 1) & valid
        optrs = o_b + (base + ylo * lw + xk).to(tl.int64)[:, None] * son
        tl.store(optrs, acc_a.to(out_ptr.dtype.element_ty), mask=done[:, None] & cmask[None, :])
        acc_a = tl.where(done[:, None], acc_b, acc_a)
        acc_b = tl.where(done[:, None], 0.0, acc_b)


@triton.jit
def _pyramid_bwd_kernel(g_ptr, dx_ptr, tab_ptr, H, W, C, sgb, sgn, sgc, sdb, sdn, sdc,
                        KP: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr):
    b, H, W, offs_c, cmask, lh, lw, xk, base, valid = _program(tab_ptr, H, W, C, KP, BC)
    g_b = g_ptr + b * sgb + offs_c.to(tl.int64)[None, :] * sgc
    d_b = dx_ptr + b * sdb + offs_c.to(tl.int64)[None, :] * sdc
    sdn64 = b * 0 + sdn
    wgt0 = tl.trans(_col_weights(tl.arange(0, BJ), W, lw, xk, valid))  # [BJ, KP]
    g_a = tl.full((KP, BC), 0.0, tl.float32)  # gradient of level row id_a, per stacked column
    g_b2 = tl.full((KP, BC), 0.0, tl.float32)
    id_a = lh * 0 - 1
    id_b = lh * 0 - 1
    kmask = valid[:, None] & cmask[None, :]
    for r in range(0, H):
        # the level rows input row r feeds (ylo, and yhi = ylo + 1 when r is shared)
        ylo = (r * lh) // H
        yhi = ((r + 1) * lh + H - 1) // H - 1
        e_lo = ((ylo + 1) * H + lh - 1) // lh
        w_lo = 1.0 / (e_lo - (ylo * H) // lh).to(tl.float32)
        w_hi = tl.where(yhi > ylo, 1.0 / (((yhi + 1) * H + lh - 1) // lh - (yhi * H) // lh).to(tl.float32), 0.0)
        shift = (id_a != ylo) & (id_b == ylo)  # the shared row loaded last time becomes current
        g_a = tl.where(shift[:, None], g_b2, g_a)
        id_a = tl.where(shift, id_b, id_a)
        need_a = id_a != ylo
        ga_new = tl.load(g_b + (base + ylo * lw + xk).to(tl.int64)[:, None] * sgn,
                         mask=need_a[:, None] & kmask, other=0.0).to(tl.float32)
        g_a = tl.where(need_a[:, None], ga_new, g_a)
        id_a = ylo
        need_b = (yhi > ylo) & (id_b != yhi)
        gb_new = tl.load(g_b + (base + yhi * lw + xk).to(tl.int64)[:, None] * sgn,
                         mask=need_b[:, None] & kmask, other=0.0).to(tl.float32)
        g_b2 = tl.where(need_b[:, None], gb_new, g_b2)
        id_b = tl.where(need_b, yhi, id_b)
        u = w_lo[:, None] * g_a + w_hi[:, None] * g_b2  # [KP, BC]
        for j0 in range(0, W, BJ):
            offs_j = j0 + tl.arange(0, BJ)
            if j0 == 0:
                wgt = wgt0
            else:
                wgt = tl.trans(_col_weights(offs_j, W, lw, xk, valid))
            d = tl.dot(wgt, u, input_precision=PREC)
            tl.store(d_b + (r * W + offs_j)[:, None] * sdn64, d.to(dx_ptr.dtype.element_ty),
                     mask=(offs_j < W)[:, None] & cmask[None, :])


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

def _blocks(W: int, C: int, KP: int) -> Tuple[int, int]:
    """``(BJ, BC)``: input columns per width product (the whole row when it fits) and channels."""
    BJ = max(DOT_MIN, min(next_pow2(W), 64))
    BC = max(DOT_MIN, min(next_pow2(C), MAX_BC, TILE_BUDGET // KP))
    return BJ, BC


def _pairs(levels: Sequence[int]) -> List[Tuple[int, int]]:
    return [(levels[i], levels[i + 1]) for i in range(0, len(levels), 2)]


def forward_launch(tokens: Tensor, H: int, W: int, levels: Sequence[Tuple[int, int]]) -> Tuple[Tensor, Launch]:
    """The pooled output ``[B, sum l_h*l_w, C]`` (allocated) and the launch that writes it."""
    B, _, C = tokens.shape
    tab, KP = pyramid_tables(levels, tokens.device)
    BJ, BC = _blocks(W, C, KP)
    out = torch.empty(B, sum(lh * lw for lh, lw in levels), C, device=tokens.device, dtype=tokens.dtype)
    return out, Launch("pyramid_pool.fwd", _pyramid_fwd_kernel, (triton.cdiv(C, BC), B),
                       (tokens, out, tab, H, W, C, *tokens.stride(), *out.stride()),
                       dict(KP=KP, BJ=BJ, BC=BC, PREC=dot_precision(tokens.dtype)), num_warps_for(KP * BC), NUM_STAGES)


def backward_launch(grad: Tensor, H: int, W: int, levels: Sequence[Tuple[int, int]]) -> Tuple[Tensor, Launch]:
    """The input gradient ``[B, H*W, C]`` (allocated) and the launch that writes it."""
    B, _, C = grad.shape
    tab, KP = pyramid_tables(levels, grad.device)
    BJ, BC = _blocks(W, C, KP)
    dx = torch.empty(B, H * W, C, device=grad.device, dtype=grad.dtype)
    return dx, Launch("pyramid_pool.bwd", _pyramid_bwd_kernel, (triton.cdiv(C, BC), B),
                      (grad, dx, tab, H, W, C, *grad.stride(), *dx.stride()),
                      dict(KP=KP, BJ=BJ, BC=BC, PREC=dot_precision(grad.dtype)), num_warps_for(KP * BC), NUM_STAGES)


def pyramid_pool_forward(tokens: Tensor, H: int, W: int, levels: Sequence[Tuple[int, int]]) -> Tensor:
    """Triton forward: ``[B, H*W, C]`` -> ``[B, sum l_h*l_w, C]``."""
    out, launch = forward_launch(tokens, H, W, levels)
    launch()
    return out


def pyramid_pool_backward(grad: Tensor, H: int, W: int, levels: Sequence[Tuple[int, int]]) -> Tensor:
    """Triton backward: ``[B, sum l_h*l_w, C]`` -> ``[B, H*W, C]``."""
    dx, launch = backward_launch(grad, H, W, levels)
    launch()
    return dx


def compile_launches(grid: Tuple[int, int], C: int, levels: Sequence[Tuple[int, int]], dtype: torch.dtype,
                     batch: int) -> List[Launch]:
    """Forward and backward launches of ``pyramid_pool`` on ``[batch, H*W, C]`` CPU tensors
    (nothing runs), for ``benchmarks/compile_report.py``."""
    H, W = grid
    tokens = torch.empty(batch, H * W, C, dtype=dtype)
    out, fwd = forward_launch(tokens, H, W, levels)
    return [fwd, backward_launch(torch.empty_like(out), H, W, levels)[1]]


# --------------------------------------------------------------------------------------
# Custom ops and autograd (levels travel flattened: [h0, w0, h1, w1, ...])
# --------------------------------------------------------------------------------------

@torch.library.custom_op("fusion::pyramid_pool", mutates_args=())
def _pyramid_op(tokens: Tensor, H: int, W: int, levels: List[int]) -> Tensor:
    return pyramid_pool_forward(tokens, H, W, _pairs(levels))


@_pyramid_op.register_fake
def _(tokens, H, W, levels):
    return tokens.new_empty(tokens.shape[0], sum(lh * lw for lh, lw in _pairs(levels)), tokens.shape[2])


@torch.library.custom_op("fusion::pyramid_pool_backward", mutates_args=())
def _pyramid_bwd_op(grad: Tensor, H: int, W: int, levels: List[int]) -> Tensor:
    return pyramid_pool_backward(grad, H, W, _pairs(levels))


@_pyramid_bwd_op.register_fake
def _(grad, H, W, levels):
    return grad.new_empty(grad.shape[0], H * W, grad.shape[2])


def _setup_context(ctx, inputs, output):
    _, ctx.H, ctx.W, ctx.levels = inputs


def _backward(ctx, grad):
    return _pyramid_bwd_op(grad, ctx.H, ctx.W, ctx.levels), None, None, None


_pyramid_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

def pyramid_pool(tokens: Tensor, grid: Union[int, Tuple[int, int]],
                 levels: Sequence[Union[int, Tuple[int, int]]], backend: str = "auto") -> Tensor:
    """Area-pool ``[B, H*W, C]`` tokens on ``grid`` to every level, from one read.

    Args:
        tokens: ``[B, H*W, C]``, row-major over the ``H x W`` grid (any strides).
        grid: ``(H, W)``, or an int for a square grid.
        levels: ints ``l`` (an ``l x l`` level) or ``(l_h, l_w)`` pairs, each ``<= grid``,
            e.g. ``[12, 6, 3, 1]`` (Matryoshka-style). Each level equals
            ``F.adaptive_avg_pool2d`` of the grid.
        backend: ``"auto"`` (Triton for CUDA tensors, else PyTorch), ``"triton"``, ``"torch"``.

    Returns:
        ``[B, sum l_h*l_w, C]`` in ``tokens``' dtype, levels concatenated in the order given.
    """
    H, W = V.check_size("grid", grid)
    V.check_tokens(tokens, (H, W))
    lv = V.check_levels(levels, (H, W))
    if V.choose_backend(backend, _pyramid_fwd_kernel, {"tokens": tokens}) == "torch":
        return pyramid_pool_reference(tokens, (H, W), lv)
    return _pyramid_op(tokens, H, W, [v for pair in lv for v in pair])
