"""grid_merge: resample encoder grids to one grid, LayerNorm each, concatenate.

Layouts: each grid is ``[B, h, w, C]`` channels-last with any strides; the output is
``[B, H*W, sum C]`` (``layout="channel"``) or ``[B, n*H*W, C]`` (``"sequence"``); each
grid writes its own strided slice of it, so there is no ``torch.cat``.

Forward kernel: one program per (batch item, segment of ``s <= R`` output columns, band of
output rows[, channel tile]) holds its positions' channels in ``[R, BC]`` fp32 registers:
all channels when there is a LayerNorm (it needs them), else a 128-channel tile. It walks
its output rows in order; each output row is a weighted sum of a run of input rows, and
each input row is first resampled along the width by reading its columns once (one
channel vector per column, added with that column's weight into each position). The
last resampled input row is carried to the next output row, so rows shared by
neighbouring windows (27->24, 37->24, 64->24) are read once per program.

Backward kernel: one program per (batch item, segment of output columns, band of *input*
rows[, channel tile]). It recomputes the forward rows it needs (LayerNorm backward needs
``x_hat``), takes the LayerNorm backward, pushes ``dy`` through the transposed row weights
into pending input rows and, once an input row is complete, through the transposed column
weights into the input columns of its segment. Input columns shared by two segments are
written by launching the segments colour by colour (the second colour adds to what the
first stored): no atomics, a fixed summation order. ``dweight`` / ``dbias`` are per-program
partial sums reduced by ``torch.sum`` (deterministic).

Block sizes, warps, stages and the choice of segments and bands are rules in
:mod:`._merge_plan` (why: there); every launch is a :class:`._launch.Launch`, and
:func:`compile_launches` builds the ones a given workload makes for the compile report.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _validate as V
from ._canonical import require_canonical
from ._launch import Launch, run_all
from ._merge_plan import MAX_NORM_CHANNELS, MAXNREG, NUM_STAGES, bwd_plan, fits, fwd_plan
from ._plan import (axis_tables, dot_precision, int_table, l2_bytes, out_slices as _out_slices,
                    segment_table, sm_count, two_slots)
from ._grid_merge_jit import _grid_merge_bwd_kernel, _grid_merge_fwd_kernel
from .reference import grid_merge_reference

require_canonical(__name__)  # registering the fusion:: ops twice frees them under live handles


# --------------------------------------------------------------------------------------
# Launchers: plan, allocate, build one Launch per grid (and colour), run them.
# --------------------------------------------------------------------------------------

def _param(p: Optional[Tensor], like: Tensor) -> Tensor:
    return like if p is None else p.contiguous()


def _needs_int64(*ts: Tensor) -> bool:
    """Whether an offset within one batch item (dims after the first) can reach 2**31: the
    kernels then index in int64 (``IDX64``), else in int32 (fewer registers)."""
    return any(sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) >= 2 ** 31 for t in ts)


def _devices_sms(dev: torch.device, sms: Optional[int]) -> int:
    return sm_count(dev) if sms is None else int(sms)


def _devices_l2(dev: torch.device, sms: Optional[int], l2: Optional[int]) -> int:
    """The L2 bytes to plan for: given, else the device's when its SM count is (0 on a CPU)."""
    return int(l2) if l2 is not None else (l2_bytes(dev) if sms is None else 0)


def forward_launches(grids: Sequence[Tensor], weights: Sequence[Optional[Tensor]],
                     biases: Sequence[Optional[Tensor]], normalize: Sequence[bool], H: int, W: int,
                     mode: str, eps: float, layout: str, sms: Optional[int] = None,
                     l2: Optional[int] = None) -> Tuple[Tensor, List[Launch]]:
    """The merged output (allocated, not yet written) and the launches that write it.

    ``grids[i]``: ``[B, h_i, w_i, C_i]``. ``sms``: plan for a device with this many SMs
    (None: the grids' device; 0: one program per column segment, the CPU plan); ``l2``: and
    this many bytes of L2 cache (None: the device's when ``sms`` is None, else 0).
    """
    B, dev, dtype = grids[0].shape[0], grids[0].device, grids[0].dtype
    l2 = _devices_l2(dev, sms, l2)
    sms = _devices_sms(dev, sms)
    sizes = [g.shape[-1] for g in grids]
    if layout == "channel":
        out = torch.empty(B, H * W, sum(sizes), device=dev, dtype=dtype)
    else:
        out = torch.empty(B, len(grids) * H * W, sizes[0], device=dev, dtype=dtype)
    launches = []
    for x, wt, bs, norm, o in zip(grids, weights, biases, normalize, _out_slices(out, sizes, H * W, layout)):
        _, h, w, C = x.shape
        pl = fwd_plan(h, w, H, W, C, mode, bool(norm), B, sms,
                      int(bool(norm) and wt is not None) + int(bool(norm) and bs is not None), x.element_size(), l2)
        t = pl.tile
        r_idx, r_wt = axis_tables(h, H, mode, dev)
        c_idx, c_wt = axis_tables(w, W, mode, dev)
        launches.append(Launch(
            "grid_merge.fwd", _grid_merge_fwd_kernel, (len(pl.progs) * t.n_ct, B),
            (x, o, _param(wt, x), _param(bs, x), r_idx, r_wt, c_idx, c_wt, int_table(pl.progs, dev),
             segment_table(w, W, mode, pl.seg, t.R, dev), W, pl.seg, C, t.n_ct, eps, *x.stride(), *o.stride()),
            dict(NORM=bool(norm), HAS_W=bool(norm) and wt is not None, HAS_B=bool(norm) and bs is not None,
                 TWO_SLOTS=two_slots(h, H, mode), R=t.R, BC1=t.BC1, BC2=t.BC2, HAS_REST=t.has_rest,
                 USE_DOT=t.use_dot, BJ=t.BJ, PREC=dot_precision(dtype), CONTIG=t.contig, IDX64=_needs_int64(x, o)),
            t.warps, NUM_STAGES, MAXNREG))
    return out, launches


def grid_merge_forward(grids: Sequence[Tensor], weights: Sequence[Optional[Tensor]],
                       biases: Sequence[Optional[Tensor]], normalize: Sequence[bool], H: int, W: int,
                       mode: str, eps: float, layout: str, sms: Optional[int] = None,
                       l2: Optional[int] = None) -> Tensor:
    """Triton forward. ``grids[i]``: ``[B, h_i, w_i, C_i]``; returns the merged tokens."""
    out, launches = forward_launches(grids, weights, biases, normalize, H, W, mode, eps, layout, sms, l2)
    run_all(launches)
    return out


def backward_launches(grad: Tensor, grids: Sequence[Tensor], weights: Sequence[Optional[Tensor]],
                      biases: Sequence[Optional[Tensor]], normalize: Sequence[bool], need_dx: Sequence[bool],
                      H: int, W: int, mode: str, eps: float, layout: str, sms: Optional[int] = None,
                      l2: Optional[int] = None):
    """``(dxs, dweight partials, dbias partials, launches)``: buffers allocated, not written.

    Per grid one launch per colour (see :mod:`._merge_plan`), in order. Partials are
    ``[B * programs, C]`` fp32 rows, one per program, summed by :func:`grid_merge_backward`.
    """
    B, dev = grids[0].shape[0], grids[0].device
    l2 = _devices_l2(dev, sms, l2)
    sms = _devices_sms(dev, sms)
    n = len(grids)
    dxs, dwps, dbps = [None] * n, [None] * n, [None] * n
    launches = []
    slices = _out_slices(grad, [g.shape[-1] for g in grids], H * W, layout)
    for i, (x, g) in enumerate(zip(grids, slices)):
        _, h, w, C = x.shape
        norm = bool(normalize[i])
        has_w, has_b = norm and weights[i] is not None, norm and biases[i] is not None
        if not (need_dx[i] or has_w or has_b):
            continue
        pl = bwd_plan(h, w, H, W, C, mode, norm, bool(need_dx[i]), B, sms, 2 * has_w + has_b, x.element_size(), l2)
        t = pl.tile
        dx = torch.empty(x.shape, device=dev, dtype=x.dtype) if need_dx[i] else x
        dwp = torch.empty(B * pl.n_slots, C, device=dev, dtype=torch.float32) if has_w else x
        dbp = torch.empty(B * pl.n_slots, C, device=dev, dtype=torch.float32) if has_b else x
        dxs[i], dwps[i], dbps[i] = (dx if need_dx[i] else None), (dwp if has_w else None), (dbp if has_b else None)
        r_idx, r_wt = axis_tables(h, H, mode, dev)
        c_idx, c_wt = axis_tables(w, W, mode, dev)
        first = int_table([pl.first], dev)
        for colour, progs in enumerate(pl.launches):
            launches.append(Launch(
                "grid_merge.bwd", _grid_merge_bwd_kernel, (len(progs) * t.n_ct, B),
                (x, g, dx, _param(weights[i], x), dwp, dbp, r_idx, r_wt, c_idx, c_wt, int_table(progs, dev), first,
                 segment_table(w, W, mode, pl.seg, t.R, dev), H, W, pl.seg, C, t.n_ct, pl.n_slots, colour, eps,
                 *x.stride(), *g.stride(), *dx.stride()),
                dict(NORM=norm, HAS_W=has_w, HAS_B=has_b, NEED_DX=bool(need_dx[i]), TWO_SLOTS=two_slots(h, H, mode),
                     R=t.R, BC1=t.BC1, BC2=t.BC2, HAS_REST=t.has_rest, USE_DOT=t.use_dot, BJ=t.BJ,
                     PREC=dot_precision(x.dtype), CONTIG=t.contig, IDX64=_needs_int64(x, g, dx)),
                t.warps, NUM_STAGES, MAXNREG))
    return dxs, dwps, dbps, launches


def grid_merge_backward(grad: Tensor, grids: Sequence[Tensor], weights: Sequence[Optional[Tensor]],
                        biases: Sequence[Optional[Tensor]], normalize: Sequence[bool],
                        need_dx: Sequence[bool], H: int, W: int, mode: str, eps: float, layout: str,
                        sms: Optional[int] = None, l2: Optional[int] = None) -> List[Tensor]:
    """Triton backward. Returns ``[dx_i...] + [dweight_i...] + [dbias_i...]``; entries not
    needed (``need_dx`` False, no weight / bias) are empty ``[0]`` tensors."""
    dxs, dwps, dbps, launches = backward_launches(grad, grids, weights, biases, normalize, need_dx,
                                                  H, W, mode, eps, layout, sms, l2)
    run_all(launches)
    def empty():  # a new one each time: custom-op outputs must not alias each other
        return grad.new_empty(0)

    return ([empty() if d is None else d for d in dxs]
            + [empty() if p is None else p.sum(0).to(weights[i].dtype) for i, p in enumerate(dwps)]
            + [empty() if p is None else p.sum(0).to(biases[i].dtype) for i, p in enumerate(dbps)])


def compile_launches(specs: Sequence[Tuple[int, int, int]], size: Tuple[int, int], mode: str, norm: str,
                     layout: str, dtype: torch.dtype, batch: int, sms: int, need_dx: bool = True,
                     backward: bool = True, l2: int = 0) -> List[Launch]:
    """The launches a ``grid_merge`` of ``[batch, h, w, C]`` grids (``specs``) makes on a device
    with ``sms`` SMs and ``l2`` bytes of L2, built on CPU tensors for
    ``benchmarks/compile_report.py`` (nothing runs).

    ``norm``: ``"none"``, ``"affine"`` (LayerNorm with weight and bias) or ``"plain"``.
    """
    H, W = size
    grids = [torch.empty(batch, h, w, c, dtype=dtype) for h, w, c in specs]
    params = [torch.empty(c, dtype=torch.float32) if norm == "affine" else None for _, _, c in specs]
    normalize = [norm != "none"] * len(specs)
    out, launches = forward_launches(grids, params, params, normalize, H, W, mode, 1e-5, layout, sms, l2)
    if backward:
        launches += backward_launches(torch.empty_like(out), grids, params, params, normalize,
                                      [need_dx] * len(specs), H, W, mode, 1e-5, layout, sms, l2)[3]
    return launches


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

def _fits(g: Tensor, norm, size: Tuple[int, int], mode: str) -> bool:
    """Whether the Triton kernels hold a position of ``g``'s channels (always without a norm)."""
    if norm is None:
        return True
    has_w, has_b = norm[0] is not None, norm[1] is not None
    return all(fits(n, N, g.shape[-1], mode, True, g.requires_grad, has_w + has_b, 2 * has_w + has_b)
               for n, N in zip(g.shape[1:3], size))


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
    wide = [i for i, (g, nm) in enumerate(zip(grids, norms)) if not _fits(g, nm, (H, W), mode)]
    limit = "" if not wide else (
        f"grids[{wide[0]}] has {grids[wide[0]].shape[-1]} channels and a LayerNorm; the Triton kernel holds up "
        f"to {MAX_NORM_CHANNELS} ({mode} {tuple(grids[wide[0]].shape[1:3])} -> {(H, W)}, kernels/_merge_plan.py)")
    if V.choose_backend(backend, _grid_merge_fwd_kernel, {"grids[0]": grids[0]}, limit) == "torch":
        return grid_merge_reference(grids, (H, W), mode, norms, eps, layout)
    none = grids[0].new_empty(0)
    weights = [none if nm is None or nm[0] is None else nm[0] for nm in norms]
    biases = [none if nm is None or nm[1] is None else nm[1] for nm in norms]
    return _grid_merge_op(grids, weights, biases, [nm is not None for nm in norms], H, W, mode, eps, layout)
