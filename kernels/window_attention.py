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

Launch parameters (:func:`window_plan`, :func:`launch_grid`) are a pure function of the
shapes and dtype, separate from the launches, so a compile report can build every
variant ahead of time.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _validate as V
from ._canonical import require_canonical
from ._plan import DOT_MIN, dot_precision, next_pow2
from ._triton import HAVE_TRITON, triton_runs_on
from ._window_attention_jit import _window_attention_bwd_kernel, _window_attention_fwd_kernel
from .window_attention_reference import window_attention_reference, window_attention_reference_backward
from .windows import WindowTable, area_windows, check_windows

require_canonical(__name__)  # registering the fusion:: ops twice frees them under live handles

MAX_SLOTS = 4      # encoders per launch (the kernels unroll this many pointer slots)
QUERY_TILE = 128   # query cells per program: [128, 64] fp32 tiles are 32 registers/thread at 8 warps
FWD_KEYS = 64      # keys per forward chunk: q, acc, scores [128, 64] + K, V [64, 64] fit without spills
BWD_KEYS = 32      # the backward holds q, dO, dq, p, ds and four [keys, d] tiles: half the chunk
MAX_HEAD_DIM = 256  # a [128, 256] fp32 tile per program is already past the register file


# --------------------------------------------------------------------------------------
# Launch plan
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WindowPlan:
    """Block sizes of one ``window_attention`` shape (see :func:`window_plan`)."""
    BY: int                                   # query rows per band (one program per band, batch, head)
    BM: int                                   # query tile rows (pow2 >= BY * Gw)
    BD: int                                   # head-dim tile (pow2 >= d)
    n_bands: int
    fwd_chunks: Tuple[Tuple[int, int], ...]   # per encoder: (rows BR, columns BCW) of a forward key chunk
    bwd_chunks: Tuple[Tuple[int, int], ...]   # the same for the backward
    seam_rows: Tuple[int, ...]                # per encoder: key rows a band shares with the previous one (max)
    seam_offsets: Tuple[int, ...]             # per encoder: first seam token
    seam_tokens: int                          # seam tokens per batch item, all encoders
    fwd_warps: int
    bwd_warps: int
    num_stages: int


def _band_rows(win: WindowTable, i: int, BY: int) -> List[Tuple[int, int]]:
    """Key rows ``[rs, re)`` of grid ``i`` each band of ``BY`` query rows needs."""
    Gh = win.size[0]
    return [(win.rows[i][y0][0], win.rows[i][min(y0 + BY, Gh) - 1][1]) for y0 in range(0, Gh, BY)]


def _bands_ok(win: WindowTable, BY: int) -> bool:
    """No key row is needed by two bands that are not neighbours (the seam scheme's premise)."""
    for i in range(len(win.grids)):
        need = _band_rows(win, i, BY)
        if any(need[p - 1][1] > need[p + 1][0] for p in range(1, len(need) - 1)):
            return False
    return True


def _chunk(w: int, rows_per_band: Sequence[int], keys: int) -> Tuple[int, int]:
    """``(BR, BCW)`` with ``BR * BCW == keys``: the chunk shape with the fewest padded key slots
    over the bands' rows (ties: wider chunks, fewer loop steps)."""
    best = None
    for bcw in sorted({min(next_pow2(w), keys)} | {c for c in (16, 32, 64) if c <= keys}):
        br = keys // bcw
        slots = sum(-(-r // br) * br for r in rows_per_band) * (-(-w // bcw) * bcw)
        if best is None or (slots, -bcw) < best[0]:
            best = ((slots, -bcw), (br, bcw))
    return best[1]


@functools.lru_cache(maxsize=256)
def window_plan(size: Tuple[int, int], grids: Tuple[Tuple[int, int], ...], head_dim: int,
                dtype: torch.dtype = torch.float16) -> WindowPlan:
    """Block sizes for query grid ``size`` over ``grids`` with head dimension ``head_dim``.

    Bands of ``BY = QUERY_TILE // Gw`` query rows (all columns); more rows when
    enlarging windows would share a key row between non-neighbouring bands. ``dtype``
    is part of the key (kernels specialise on it); the blocks do not depend on it yet.
    """
    win = area_windows(grids, size)
    Gh, Gw = size
    BY = max(1, min(Gh, QUERY_TILE // Gw))
    while BY < Gh and not _bands_ok(win, BY):
        BY += 1
    n_bands = -(-Gh // BY)
    BM = max(DOT_MIN, next_pow2(BY * Gw))
    BD = max(DOT_MIN, next_pow2(head_dim))
    fwd, bwd, seam_rows, seam_off, off = [], [], [], [], 0
    for i, (h, w) in enumerate(grids):
        need = _band_rows(win, i, BY)
        rows = [re - rs for rs, re in need]
        fwd.append(_chunk(w, rows, FWD_KEYS))
        bwd.append(_chunk(w, rows, BWD_KEYS))
        sr = max([max(0, need[p - 1][1] - need[p][0]) for p in range(1, n_bands)], default=0)
        seam_rows.append(sr)
        seam_off.append(off)
        off += (n_bands - 1) * sr * w
    warps = 8 if BM * BD >= 8192 else 4
    return WindowPlan(BY, BM, BD, n_bands, tuple(fwd), tuple(bwd), tuple(seam_rows), tuple(seam_off), off,
                      fwd_warps=warps, bwd_warps=warps, num_stages=2)


def launch_grid(plan: WindowPlan, batch: int, heads: int) -> Tuple[int, int]:
    """Programs: ``(bands, batch * heads)``."""
    return plan.n_bands, batch * heads


def _slot_groups(n: int) -> List[range]:
    return [range(s, min(n, s + MAX_SLOTS)) for s in range(0, n, MAX_SLOTS)]


def _pad_slots(items: list, filler) -> list:
    return items + [filler] * (MAX_SLOTS - len(items))


def _chunk_consts(chunks: Sequence[Tuple[int, int]]) -> dict:
    chunks = _pad_slots(list(chunks), (1, DOT_MIN))
    return {f"{n}{k}": v for k, (br, bc) in enumerate(chunks) for n, v in (("BR", br), ("BC", bc))}


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------

def window_attention_forward(q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor], win: WindowTable,
                             heads: int, scale: float) -> Tuple[Tensor, Tensor]:
    """Triton forward: ``(out [B, M, HD] in q's dtype, lse [B, heads, M] fp32)``."""
    B, M, HD = q.shape
    d = HD // heads
    plan = window_plan(win.size, win.grids, d, q.dtype)
    q = q.contiguous()
    keys, values = [k.contiguous() for k in keys], [v.contiguous() for v in values]
    runs = win.runs_table(q.device)
    groups = _slot_groups(len(keys))
    outs, lses = [], []
    for g in groups:
        out = torch.empty(B, M, HD, device=q.device, dtype=q.dtype if len(groups) == 1 else torch.float32)
        lse = torch.empty(B, heads, M, device=q.device, dtype=torch.float32)
        slots = []
        for i in g:
            slots += [keys[i], values[i], win.grids[i][1], win.tokens(i)]
        slots = slots + [keys[g[0]], values[g[0]], 1, 1] * (MAX_SLOTS - len(g))
        _window_attention_fwd_kernel[launch_grid(plan, B, heads)](
            q, out, lse, runs[g[0]:], *slots, win.size[0], win.size[1], heads, d, HD, scale * 1.4426950408889634,
            NE=len(g), BY=plan.BY, BM=plan.BM, BD=plan.BD, **_chunk_consts([plan.fwd_chunks[i] for i in g]),
            PREC=dot_precision(q.dtype), num_warps=plan.fwd_warps, num_stages=plan.num_stages)
        outs.append(out)
        lses.append(lse)
    if len(groups) == 1:
        return outs[0], lses[0]
    # several launches: out = sum_g exp(lse_g - lse) out_g, lse = logsumexp_g lse_g
    lse = torch.logsumexp(torch.stack(lses), 0)
    out = sum(o.view(B, M, heads, d) * torch.exp(l - lse).transpose(1, 2)[..., None] for o, l in zip(outs, lses))
    return out.reshape(B, M, HD).to(q.dtype), lse


def window_attention_backward(grad: Tensor, q: Tensor, keys: Sequence[Tensor], values: Sequence[Tensor],
                              out: Tensor, lse: Tensor, win: WindowTable, heads: int,
                              scale: float) -> List[Tensor]:
    """Triton backward: ``[dq] + [dk_i...] + [dv_i...]`` in the inputs' dtypes."""
    B, M, HD = q.shape
    d = HD // heads
    plan = window_plan(win.size, win.grids, d, q.dtype)
    q, grad, out, lse = q.contiguous(), grad.contiguous(), out.contiguous(), lse.contiguous()
    keys, values = [k.contiguous() for k in keys], [v.contiguous() for v in values]
    dks = [torch.empty_like(k) for k in keys]
    dvs = [torch.empty_like(v) for v in values]
    seam = torch.empty(2, B, plan.seam_tokens, HD, device=q.device, dtype=keys[0].dtype)
    runs = win.runs_table(q.device)
    groups = _slot_groups(len(keys))
    dqs = []
    for g in groups:
        dq = torch.empty(B, M, HD, device=q.device, dtype=q.dtype if len(groups) == 1 else torch.float32)
        slots = []
        for i in g:
            slots += [keys[i], values[i], dks[i], dvs[i], win.grids[i][1], win.tokens(i), plan.seam_offsets[i],
                      plan.seam_rows[i]]
        slots = slots + [keys[g[0]], values[g[0]], dks[g[0]], dvs[g[0]], 1, 1, 0, 0] * (MAX_SLOTS - len(g))
        _window_attention_bwd_kernel[launch_grid(plan, B, heads)](
            q, out, grad, lse, dq, runs[g[0]:], seam if seam.numel() else q, plan.seam_tokens,
            B * plan.seam_tokens * HD, *slots, win.size[0], win.size[1], heads, d, HD,
            scale * 1.4426950408889634, scale,
            NE=len(g), BY=plan.BY, BM=plan.BM, BD=plan.BD, **_chunk_consts([plan.bwd_chunks[i] for i in g]),
            PREC=dot_precision(q.dtype), num_warps=plan.bwd_warps, num_stages=plan.num_stages)
        dqs.append(dq)
    _add_seams(dks, dvs, seam, plan, win)
    dq = dqs[0] if len(dqs) == 1 else sum(dqs).to(q.dtype)
    return [dq] + dks + dvs


def _add_seams(dks: List[Tensor], dvs: List[Tensor], seam: Tensor, plan: WindowPlan, win: WindowTable) -> None:
    """Add each band's partial for the key rows it shares with the previous band."""
    for i in range(len(dks)):
        if plan.seam_rows[i] == 0:
            continue
        dst, src = _seam_index(win, plan, i, str(dks[i].device))
        dks[i].index_add_(1, dst, seam[0].index_select(1, src))
        dvs[i].index_add_(1, dst, seam[1].index_select(1, src))


@functools.lru_cache(maxsize=256)
def _seam_index(win: WindowTable, plan: WindowPlan, i: int, device: str) -> Tuple[Tensor, Tensor]:
    """Token indices ``(dst in dk_i, src in the seam buffer)`` of grid ``i``'s shared rows."""
    w = win.grids[i][1]
    need = _band_rows(win, i, plan.BY)
    dst, src = [], []
    for p in range(1, plan.n_bands):
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
    dev, dtype = q.device, q.dtype
    ok = triton_runs_on(_window_attention_fwd_kernel, dev) and dtype != torch.float64
    be = V.resolve_backend(backend, dev, HAVE_TRITON)
    if be == "triton" and not ok and backend == "triton":
        raise ValueError(V.triton_unavailable(dev, dtype))
    grids = [v for g in win.grids for v in g]
    out, _ = _window_attention_op(q, list(keys), list(values), grids, win.size[0], win.size[1], heads,
                                  float(scale), be == "triton" and ok)
    return out
