"""window_attention: multi-encoder windowed cross-attention (the Spatial Vision Aggregator's core).

Every cell ``(y, x)`` of a query grid ``(Gh, Gw)`` attends, with one softmax over all
encoders jointly, to the tokens of each encoder grid inside its area window
(:mod:`.windows`), per head:

    out[b, m, head] = softmax_{t in windows(m)} (q[b, m, head] . k[b, t, head] * scale) @ v[b, t, head]

Layouts: ``q [B, Gh*Gw, heads*d]``; ``keys[i]`` / ``values[i]`` ``[B, h_i*w_i, heads*d]``
(each encoder's tokens projected once by ordinary GEMMs, row-major grids); output
``[B, Gh*Gw, heads*d]`` in ``q``'s dtype.

The Triton kernels (:mod:`._window_attention_jit`) read every window in place: no
``[B*G*G, window, C]`` gather, no score matrix in memory, fp32 accumulation, an online
softmax across encoders. Each key / value row is read once per band of query rows that
needs it (the one boundary row two bands share is read twice). The backward writes each
dk / dv element once (plus a seam partial for shared boundary rows, added by the
launcher): deterministic, no atomics. More than ``MAX_SLOTS`` encoders run as several
launches combined by their log-sum-exp.

Launch parameters (:func:`._window_plan.window_plan`, :func:`launch_grid`) are a pure function of the
shapes and dtype; every launch is a :class:`._launch.Launch`, and :func:`compile_launches`
builds the ones a call makes on a GPU for the compile report (``benchmarks/compile_report.py``).
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _validate as V
from ._canonical import require_canonical
from ._launch import Launch, run_all
from ._plan import DOT_MIN
from ._window_plan import (MAX_REGISTERS, TILES, PassPlan, WindowPlan, _band_rows, _bands_ok,  # noqa: F401
                           window_plan)
from ._triton import tl
from ._window_attention_jit import _window_attention_bwd_kernel, _window_attention_fwd_kernel
from .window_attention_reference import window_attention_reference, window_attention_reference_backward
from .windows import WindowTable, area_windows, check_windows

require_canonical(__name__)  # registering the fusion:: ops twice frees them under live handles

LOG2E = 1.4426950408889634  # the kernels take exp2 of scores pre-scaled by log2(e)
MAX_SLOTS = 4       # encoders per launch (the kernels unroll this many pointer slots)
MAX_HEAD_DIM = 256  # a [query tile, 256] fp32 accumulator is already past the register file


def operands(dtype: torch.dtype, device) -> Tuple[object, str]:
    """``(OPD, PREC)``: the dtype of the kernels' ``tl.dot`` operands and their precision.

    fp16 / bf16 inputs multiply in their own dtype on tensor cores, with the softmax
    probabilities and score gradients rounded to it for their products (as flash
    attention does; fp32 accumulation throughout). fp32 inputs use IEEE fp32 products
    (1e-5). One exception: in the Triton interpreter (CPU tensors) bf16 arithmetic is
    wrong (products of 16 x 16 tiles come out at 1e10), so bf16 runs with fp32 operands
    there; fp16 keeps its own (the interpreter gets those right).
    """
    if dtype == torch.float32 or (dtype == torch.bfloat16 and torch.device(device).type == "cpu"):
        return tl.float32, "ieee" if dtype == torch.float32 else "tf32"
    return (tl.float16 if dtype == torch.float16 else tl.bfloat16), "ieee"


def launch_grid(plan: PassPlan, batch: int, heads: int) -> Tuple[int, int]:
    """Programs of a pass: ``(bands, batch * heads)``."""
    return plan.n_bands, batch * heads


def _operand_consts(dtype: torch.dtype, cuda: bool) -> dict:
    opd, prec = operands(dtype, "cuda" if cuda else "cpu")
    return dict(OPD=opd, PREC=prec)


def _slot_groups(n: int) -> List[range]:
    return [range(s, min(n, s + MAX_SLOTS)) for s in range(0, n, MAX_SLOTS)]


def _shape_consts(win: WindowTable, g: Sequence[int], plan: WindowPlan, d: int, heads: int, which: str) -> dict:
    """The constexpr arguments of one launch: shapes (the kernels specialise on them, so index
    math folds to constants), blocks, and per slot its grid width, tokens, chunk and seams."""
    ps = plan.fwd if which == "fwd" else plan.bwd
    out = dict(Gh=win.size[0], Gw=win.size[1], heads=heads, d=d, HD=heads * d, NE=len(g), BY=ps.BY, BM=ps.BM,
               BD=plan.BD)
    for k in range(MAX_SLOTS):
        i = g[k] if k < len(g) else None  # unused slots: placeholders the kernel never reads
        br, bc = ps.chunks[i] if i is not None else (1, DOT_MIN)
        out.update({f"w{k}": win.grids[i][1] if i is not None else 1, f"n{k}": win.tokens(i) if i is not None else 1,
                    f"BR{k}": br, f"BC{k}": bc})
        if which == "bwd":
            out.update({f"so{k}": plan.seam_offsets[i] if i is not None else 0,
                        f"sr{k}": plan.seam_rows[i] if i is not None else 0})
    if which == "bwd":
        out["seam_tokens"] = plan.seam_tokens
    return out


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

def _on_gpu(t: Tensor, cuda: Optional[bool]) -> bool:
    """Whether launches on ``t`` get a CUDA launch's specialisation (``cuda=None``: ``t``'s device)."""
    return t.device.type == "cuda" if cuda is None else bool(cuda)


def forward_launches(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], win: WindowTable, heads: int,
                     scale: float, cuda: Optional[bool] = None) -> Tuple[List[Tensor], List[Tensor], List[Launch]]:
    """``(outs, lses, launches)``: per group of ``MAX_SLOTS`` encoders an output ``[B, M, HD]``
    (q's dtype, fp32 partials when there are several groups) and log-sum-exp ``[B, heads, M]``
    fp32, allocated, not yet written, and the launch that writes them.

    ``cuda``: build the launches a CUDA device runs (tensor-core operands for bf16, ``maxnreg``)
    whatever ``q``'s device (None: as ``q``'s device asks), so CPU tensors give the compile
    report the exact GPU specialisation. Inputs must be contiguous.
    """
    B, M, HD = q.shape
    d = HD // heads
    plan = window_plan(win.size, win.grids, d, q.dtype)
    gpu = _on_gpu(q, cuda)
    runs = win.runs_table(q.device)
    groups = _slot_groups(len(keys))
    outs, lses, launches = [], [], []
    for g in groups:
        out = torch.empty(B, M, HD, device=q.device, dtype=q.dtype if len(groups) == 1 else torch.float32)
        lse = torch.empty(B, heads, M, device=q.device, dtype=torch.float32)
        ptrs = [t for i in g for t in (keys[i], values[i])]
        ptrs += ptrs[:2] * (MAX_SLOTS - len(g))  # unused slots: never read
        launches.append(Launch(
            "window_attention.fwd", _window_attention_fwd_kernel, launch_grid(plan.fwd, B, heads),
            (q, out, lse, runs[g[0]:], *ptrs, scale * LOG2E),
            dict(**_shape_consts(win, g, plan, d, heads, "fwd"), **_operand_consts(q.dtype, gpu)),
            plan.fwd.warps, plan.fwd.stages, plan.maxnreg if gpu else None))
        outs.append(out)
        lses.append(lse)
    return outs, lses, launches


def window_attention_forward(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], win: WindowTable,
                             heads: int, scale: float) -> Tuple[Tensor, Tensor]:
    """Triton forward: ``(out [B, M, HD] in q's dtype, lse [B, heads, M] fp32)``."""
    B, M, HD = q.shape
    q = q.contiguous()
    keys, values = [k.contiguous() for k in keys], [v.contiguous() for v in values]
    outs, lses, launches = forward_launches(q, keys, values, win, heads, scale)
    run_all(launches)
    if len(outs) == 1:
        return outs[0], lses[0]
    # several launches: out = sum_g exp(lse_g - lse) out_g, lse = logsumexp_g lse_g
    lse = torch.logsumexp(torch.stack(lses), 0)
    out = sum(o.view(B, M, heads, HD // heads) * torch.exp(l - lse).transpose(1, 2)[..., None]
              for o, l in zip(outs, lses))
    return out.reshape(B, M, HD).to(q.dtype), lse


def backward_launches(grad: Tensor, q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], out: Tensor,
                      lse: Tensor, win: WindowTable, heads: int, scale: float, cuda: Optional[bool] = None):
    """``(dqs, dks, dvs, seam, launches)``: buffers allocated, not yet written, and the launches
    (one per group of ``MAX_SLOTS`` encoders) that write them; ``cuda`` as in
    :func:`forward_launches`. ``seam [2, B, seam_tokens, HD]`` holds each band's partial dk / dv
    of the key rows it shares with the previous band (:func:`_add_seams`). Inputs must be
    contiguous."""
    B, M, HD = q.shape
    d = HD // heads
    plan = window_plan(win.size, win.grids, d, q.dtype)
    gpu = _on_gpu(q, cuda)
    dks = [torch.empty_like(k) for k in keys]
    dvs = [torch.empty_like(v) for v in values]
    seam = torch.empty(2, B, plan.seam_tokens, HD, device=q.device, dtype=keys[0].dtype)
    runs = win.runs_table(q.device)
    groups = _slot_groups(len(keys))
    dqs, launches = [], []
    for g in groups:
        dq = torch.empty(B, M, HD, device=q.device, dtype=q.dtype if len(groups) == 1 else torch.float32)
        ptrs = [t for i in g for t in (keys[i], values[i], dks[i], dvs[i])]
        ptrs += ptrs[:4] * (MAX_SLOTS - len(g))
        launches.append(Launch(
            "window_attention.bwd", _window_attention_bwd_kernel, launch_grid(plan.bwd, B, heads),
            (q, out, grad, lse, dq, runs[g[0]:], seam if seam.numel() else q, B * plan.seam_tokens * HD,
             *ptrs, scale * LOG2E, scale),
            dict(**_shape_consts(win, g, plan, d, heads, "bwd"), **_operand_consts(q.dtype, gpu)),
            plan.bwd.warps, plan.bwd.stages, plan.maxnreg if gpu else None))
        dqs.append(dq)
    return dqs, dks, dvs, seam, launches


def window_attention_backward(grad: Tensor, q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor],
                              out: Tensor, lse: Tensor, win: WindowTable, heads: int,
                              scale: float) -> List[Tensor]:
    """Triton backward: ``[dq] + [dk_i...] + [dv_i...]`` in the inputs' dtypes."""
    q, grad, out, lse = q.contiguous(), grad.contiguous(), out.contiguous(), lse.contiguous()
    keys, values = [k.contiguous() for k in keys], [v.contiguous() for v in values]
    dqs, dks, dvs, seam, launches = backward_launches(grad, q, keys, values, out, lse, win, heads, scale)
    run_all(launches)
    plan = window_plan(win.size, win.grids, q.shape[-1] // heads, q.dtype)
    _add_seams(dks, dvs, seam, plan, win)
    dq = dqs[0] if len(dqs) == 1 else sum(dqs).to(q.dtype)
    return [dq] + dks + dvs


def compile_launches(size: Tuple[int, int], grids: Sequence[Tuple[int, int]], heads: int, head_dim: int,
                     dtype: torch.dtype, batch: int) -> List[Launch]:
    """The launches one ``window_attention`` call (forward and backward) of a ``size`` query grid
    over ``grids``, ``heads`` x ``head_dim``, makes on a CUDA device, built on CPU tensors for
    ``benchmarks/compile_report.py`` (nothing runs)."""
    win = area_windows([tuple(g) for g in grids], tuple(size))
    HD = heads * head_dim
    q = torch.empty(batch, win.num_queries, HD, dtype=dtype)
    keys = [torch.empty(batch, win.tokens(i), HD, dtype=dtype) for i in range(len(win.grids))]
    values = [torch.empty_like(k) for k in keys]
    outs, lses, launches = forward_launches(q, keys, values, win, heads, head_dim ** -0.5, cuda=True)
    out = outs[0] if len(outs) == 1 else torch.empty_like(q)
    launches += backward_launches(torch.empty_like(q), q, keys, values, out, lses[0], win, heads,
                                  head_dim ** -0.5, cuda=True)[4]
    return launches


def _add_seams(dks: List[Tensor], dvs: List[Tensor], seam: Tensor, plan: WindowPlan, win: WindowTable) -> None:
    """Add each band's partial for the key rows it shares with the previous band. Every row is
    shared by at most two bands (:func:`_bands_ok`), so ``dst`` has no repeats: a plain indexed
    write, deterministic (no ``index_add_``, which uses atomics on CUDA)."""
    for i in range(len(dks)):
        if plan.seam_rows[i] == 0:
            continue
        dst, src = _seam_index(win, plan, i, str(dks[i].device))
        dks[i][:, dst] = dks[i][:, dst] + seam[0][:, src]
        dvs[i][:, dst] = dvs[i][:, dst] + seam[1][:, src]


@functools.lru_cache(maxsize=256)
def _seam_index(win: WindowTable, plan: WindowPlan, i: int, device: str) -> Tuple[Tensor, Tensor]:
    """Token indices ``(dst in dk_i, src in the seam buffer)`` of grid ``i``'s shared rows."""
    w = win.grids[i][1]
    need = _band_rows(win, i, plan.bwd.BY)
    dst, src = [], []
    for p in range(1, plan.bwd.n_bands):
        rs, shared_end = need[p][0], min(need[p - 1][1], need[p][1])
        for r in range(rs, shared_end):
            for c in range(w):
                dst.append(r * w + c)
                src.append(plan.seam_offsets[i] + ((p - 1) * plan.seam_rows[i] + r - rs) * w + c)
    return (torch.tensor(dst, dtype=torch.int64, device=device), torch.tensor(src, dtype=torch.int64, device=device))


# --------------------------------------------------------------------------------------
# Custom ops (one opaque op for torch.compile / torch.export, both backends) and autograd
# --------------------------------------------------------------------------------------

def _win(grids: Sequence[int], Gh: int, Gw: int) -> WindowTable:
    return area_windows([(grids[i], grids[i + 1]) for i in range(0, len(grids), 2)], (Gh, Gw))


@torch.library.custom_op("fusion::window_attention", mutates_args=())
def _window_attention_op(q: Tensor, keys: List[Tensor], values: List[Tensor], grids: List[int], Gh: int, Gw: int,
                         heads: int, scale: float, use_triton: bool) -> Tuple[Tensor, Tensor]:
    run = window_attention_forward if use_triton else window_attention_reference
    return run(q, keys, values, _win(grids, Gh, Gw), heads, scale)


@_window_attention_op.register_fake
def _(q, keys, values, grids, Gh, Gw, heads, scale, use_triton):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((q.shape[0], heads, q.shape[1]), dtype=lse_dtype)


@torch.library.custom_op("fusion::window_attention_backward", mutates_args=())
def _window_attention_bwd_op(grad: Tensor, q: Tensor, keys: List[Tensor], values: List[Tensor], out: Tensor,
                             lse: Tensor, grids: List[int], Gh: int, Gw: int, heads: int, scale: float,
                             use_triton: bool) -> List[Tensor]:
    run = window_attention_backward if use_triton else window_attention_reference_backward
    return run(grad, q, keys, values, out, lse, _win(grids, Gh, Gw), heads, scale)


@_window_attention_bwd_op.register_fake
def _(grad, q, keys, values, out, lse, grids, Gh, Gw, heads, scale, use_triton):
    return [q.new_empty(q.shape)] + [k.new_empty(k.shape) for k in keys] + [v.new_empty(v.shape) for v in values]


def _setup_context(ctx, inputs, output):
    q, keys, values, grids, Gh, Gw, heads, scale, use_triton = inputs
    out, lse = output
    ctx.n = len(keys)
    ctx.args = (list(grids), Gh, Gw, heads, scale, use_triton)
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, out, lse, *keys, *values)


def _backward(ctx, grad, _grad_lse):
    q, out, lse, *kv = ctx.saved_tensors
    keys, values = kv[:ctx.n], kv[ctx.n:]
    res = _window_attention_bwd_op(grad, q, keys, values, out, lse, *ctx.args)
    return res[0], list(res[1:1 + ctx.n]), list(res[1 + ctx.n:]), None, None, None, None, None, None


_window_attention_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

def _check_inputs(q, keys, values, win: WindowTable, heads) -> None:
    V.check_float_tensor("q", q, 3, "[B, Gh*Gw, heads*d]")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0:
        raise ValueError(f"heads={heads!r} must be a positive int")
    B, M, HD = q.shape
    if M != win.num_queries:
        raise ValueError(f"q has {M} query tokens but windows.size={win.size} needs {win.num_queries}; "
                         f"q must be [B, Gh*Gw, heads*d]")
    if HD % heads or HD // heads > MAX_HEAD_DIM:
        raise ValueError(f"q has {HD} channels, which heads={heads} must divide into heads of at most "
                         f"{MAX_HEAD_DIM} channels")
    for name, ts in (("keys", keys), ("values", values)):
        if isinstance(ts, Tensor) or not isinstance(ts, (list, tuple)):
            raise TypeError(f"{name} must be a list of [B, h*w, heads*d] tensors, got {type(ts).__name__}")
        if len(ts) != len(win.grids):
            raise ValueError(f"{name} has {len(ts)} tensors but windows covers {len(win.grids)} grids "
                             f"{list(win.grids)}; pass one per grid")
        for i, t in enumerate(ts):
            V.check_float_tensor(f"{name}[{i}]", t, 3, "[B, h*w, heads*d]")
            want = (B, win.tokens(i), HD)
            if tuple(t.shape) != want:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}; grid {win.grids[i]} with q "
                                 f"{tuple(q.shape)} needs {want}")
            if t.dtype != q.dtype or t.device != q.device:
                raise ValueError(f"{name}[{i}] is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}; "
                                 f"pass every tensor in one dtype on one device")


def _beyond_kernel_limits(win: WindowTable, channels: int) -> str:
    """Why the kernels cannot take this shape ('' when they can): they index tokens of one
    batch item with int32 and pack window starts and sizes into 16 bits each."""
    sides = [s for g in win.grids for s in g] + list(win.size)
    if max(sides) >= 1 << 15:
        return f"grid sides up to {max(sides)}, but the kernels take sides below {1 << 15}"
    biggest = max([win.num_queries] + [win.tokens(i) for i in range(len(win.grids))]) * channels
    if biggest >= 1 << 31:
        return f"{biggest} elements in one batch item of one tensor, but the kernels index below 2**31"
    return ""


def window_attention(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], windows: WindowTable,
                     heads: int, scale: Optional[float] = None, backend: str = "auto") -> Tensor:
    """Windowed cross-attention of a query grid over several encoder grids, one joint softmax.

    Args:
        q: ``[B, Gh*Gw, heads*d]`` queries, one per cell of ``windows.size`` (row-major).
        keys, values: one ``[B, h_i*w_i, heads*d]`` tensor per grid of ``windows.grids``.
        windows: ``fusion.kernels.area_windows(grids, size)``: each query cell sees, in each
            grid, its area window (adaptive average pooling's input run).
        heads: attention heads (``d = channels / heads``).
        scale: score scale, default ``1 / sqrt(d)``.
        backend: ``"auto"`` (Triton for CUDA tensors, else PyTorch), ``"triton"``, ``"torch"``.

    Returns:
        ``[B, Gh*Gw, heads*d]`` in ``q``'s dtype; differentiable w.r.t. q, keys and values.
    """
    win = check_windows(windows)
    _check_inputs(q, keys, values, win, heads)
    d = q.shape[-1] // heads
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale={scale!r} must be a positive float (or None for 1/sqrt(d))")
    be = V.choose_backend(backend, _window_attention_fwd_kernel, {"q": q}, _beyond_kernel_limits(win, q.shape[-1]))
    grids = [v for g in win.grids for v in g]
    out, _ = _window_attention_op(q, list(keys), list(values), grids, win.size[0], win.size[1], heads,
                                  float(scale), be == "triton")
    return out
