"""bipartite_merge: content-aware token reduction by ToMe's bipartite soft matching.

Public API:

- :func:`bipartite_merge` ``(x, metric, r, sizes=None, backend="auto") -> (merged, sizes, assignment)``:
  one step that removes ``r`` tokens.
- :func:`reduce_to` ``(x, metric, keep, sizes=None, backend="auto")``: repeated steps down to
  ``keep`` tokens, with the assignment maps composed.

The decisions, the output order and the merge rule are those of ToMe (Bolya et al. 2023,
"Token Merging: Your ViT But Faster"); :mod:`.bipartite_reference` states them in full.
In short: A = even positions, B = odd positions, cosine scores, each A token's best B
partner (ties: lowest index), A tokens ranked by that score descending (stable), the top
``r`` merged into their partners by size-weighted mean, output ``[kept A in rank order,
all B in order]`` of ``N - r`` tokens.

The Triton path, three kernels:

1. ``_bipartite_match_kernel``: each program owns ``BLOCK_A`` A tokens and streams B in
   ``BLOCK_B`` blocks (``BLOCK_K`` metric channels at a time), keeping a running row
   max/argmax, flash-attention style: the ``N_A × N_B`` score matrix is never
   materialised. Inverse norms ``[B, N]`` are computed once beforehand (one read of the
   metric); B tiles are scaled by them, the A norm scales the best score at the end.
   Dot products run in exact fp32 (``input_precision="ieee"``, no TF32), the same
   products as the reference, so decisions match it up to summation order.
2. The ranking (a sort of ``N_A`` scalars per image) and the source lists are plain
   torch between the kernels: ``assignment`` is stably sorted, giving each output's
   source tokens contiguously and in increasing input order (a CSR list).
3. ``_gather_merge_kernel``: each program owns ``BLOCK_M`` output tokens × ``BLOCK_C``
   channels and sums its sources in that fixed order, in fp32: deterministic, no
   atomics. ``_gather_merge_backward_kernel`` walks the same lists:
   ``grad_x[i] = grad_merged[o] * s_i / S_o`` for each source ``i`` of output ``o``, so
   each grad row is read once and each ``grad_x`` row written once (every input has
   exactly one output: no two programs write the same row, no atomics).

Gradients flow to ``x`` only: the decisions are discrete, ``metric`` and ``sizes`` get none.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import _validate as V
from ._canonical import require_canonical
from .bipartite_reference import (
    bipartite_assignment,
    inverse_norms,
    bipartite_merge_reference,
    merge_by_assignment_reference,
)

from ._bipartite_jit import _bipartite_match_kernel, _gather_merge_backward_kernel, _gather_merge_kernel
from ._launch import Launch
from ._triton import triton

require_canonical(__name__)  # registering the fusion:: ops twice frees them under live handles

# ---------------------------------------------------------------------------- constants
# A tokens per match program. 64 rows x 64 columns of fp32 scores is 16 KiB of
# registers per program at 4 warps, and 64 keeps tl.dot's minimum tile (16) satisfied.
_MATCH_BLOCK_A = 64
# B tokens per inner step: each step reuses the A tile against 64 new B rows.
_MATCH_BLOCK_B = 64
# Metric channels per inner step: bounds the A and B tiles to 64x32 fp32 (8 KiB each)
# whatever Cm is (a fused metric can be thousands of channels wide).
_MATCH_BLOCK_K = 32
# Output tokens per merge program: most outputs have 1-3 sources, so 16 rows give a
# program enough independent loads while the per-program source loop stays short.
_MERGE_BLOCK_M = 16
# Channels per merge program: 128 fp32 accumulators per row, 16x128 = 8 KiB per program.
_MERGE_BLOCK_C = 128


# ---------------------------------------------------------------------------- launchers
def _match_triton(metric: torch.Tensor, block_a: int = _MATCH_BLOCK_A, block_b: int = _MATCH_BLOCK_B,
                  block_k: int = _MATCH_BLOCK_K) -> Tuple[torch.Tensor, torch.Tensor]:
    """``metric [B, N, Cm]`` (any strides) -> ``best [B, N_A]`` fp32, ``partner [B, N_A]`` int64."""
    if metric.dim() != 3 or metric.dtype not in V.TRITON_DTYPES:
        raise ValueError(f"metric must be a [B, N, Cm] float16/bfloat16/float32 tensor, got "
                         f"{tuple(metric.shape)} {metric.dtype}")
    for name, blk in (("block_a", block_a), ("block_b", block_b), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name}={blk} must be a power of two >= 16 (tl.dot's smallest tile)")
    Bsz, N, Cm = metric.shape
    n_a, n_b = (N + 1) // 2, N // 2
    best = torch.empty((Bsz, n_a), dtype=torch.float32, device=metric.device)
    partner = torch.empty((Bsz, n_a), dtype=torch.int64, device=metric.device)
    if Bsz == 0 or n_a == 0:
        return best, partner
    if n_b == 0:
        return best.fill_(float("-inf")), partner.zero_()
    inv = inverse_norms(metric).contiguous()           # [B, N] fp32: one read of metric
    _match_launch(metric, inv, best, partner, block_a, block_b, block_k)()
    return best, partner


def _match_launch(metric, inv, best, partner, block_a=_MATCH_BLOCK_A, block_b=_MATCH_BLOCK_B,
                  block_k=_MATCH_BLOCK_K) -> Launch:
    Bsz, N, Cm = metric.shape
    n_a, n_b = (N + 1) // 2, N // 2
    return Launch("bipartite.match", _bipartite_match_kernel, (triton.cdiv(n_a, block_a), Bsz),
                  (metric, inv, best, partner, N, n_a, n_b, Cm, *metric.stride()),
                  dict(BLOCK_A=block_a, BLOCK_B=block_b, BLOCK_K=block_k), num_warps=4, num_stages=3,
                  maxnreg=255)  # ptxas' own heuristic spilled 40 B/thread at 168 registers (bf16, sm_90)


def _merge_launch(x, sizes, src, offsets, merged, merged_sizes, block_m=_MERGE_BLOCK_M,
                  block_c=_MERGE_BLOCK_C) -> Launch:
    Bsz, N, C = x.shape
    n_out = offsets.shape[1] - 1
    return Launch("bipartite.gather_merge", _gather_merge_kernel,
                  (triton.cdiv(n_out, block_m), triton.cdiv(C, block_c), Bsz),
                  (x, sizes, src, offsets, merged, merged_sizes, N, n_out, C, *x.stride()),
                  dict(BLOCK_M=block_m, BLOCK_C=block_c), num_warps=4, num_stages=3)


def _merge_backward_launch(grad, sizes, merged_sizes, src, offsets, grad_x, block_m=_MERGE_BLOCK_M,
                           block_c=_MERGE_BLOCK_C) -> Launch:
    Bsz, n_out, C = grad.shape
    return Launch("bipartite.gather_merge_bwd", _gather_merge_backward_kernel,
                  (triton.cdiv(n_out, block_m), triton.cdiv(C, block_c), Bsz),
                  (grad, sizes, merged_sizes, src, offsets, grad_x, src.shape[1], n_out, C, *grad.stride()),
                  dict(BLOCK_M=block_m, BLOCK_C=block_c), num_warps=4, num_stages=3)


def compile_launches(N: int, C: int, Cm: Optional[int], keep: int, dtype: torch.dtype, batch: int,
                     backward: bool = True) -> List[Launch]:
    """The launches of ``reduce_to`` from ``N`` to ``keep`` tokens of ``C`` channels (metric:
    ``Cm`` channels, or the tokens themselves when None), on CPU tensors without running
    anything: for ``benchmarks/compile_report.py``. Each step removes
    ``min(n - keep, ceil(n / 2))`` tokens, as :func:`reduce_to` does."""
    launches, n = [], N
    while n > keep:
        r = min(n - keep, (n + 1) // 2)
        x = torch.empty(batch, n, C, dtype=dtype)
        metric = x if Cm is None else torch.empty(batch, n, Cm, dtype=dtype)
        n_a = (n + 1) // 2
        launches.append(_match_launch(metric, torch.empty(batch, n), torch.empty(batch, n_a),
                                      torch.empty(batch, n_a, dtype=torch.int64)))
        sizes, src = torch.empty(batch, n), torch.empty(batch, n, dtype=torch.int64)
        offsets = torch.empty(batch, n - r + 1, dtype=torch.int64)
        merged, merged_sizes = torch.empty(batch, n - r, C, dtype=dtype), torch.empty(batch, n - r)
        launches.append(_merge_launch(x, sizes, src, offsets, merged, merged_sizes))
        if Cm is not None:  # the metric is merged with the same assignment
            launches.append(_merge_launch(metric, sizes, src, offsets, torch.empty(batch, n - r, Cm, dtype=dtype),
                                          merged_sizes))
        if backward:
            launches.append(_merge_backward_launch(merged, sizes, merged_sizes, src, offsets, torch.empty_like(x)))
        n -= r
    return launches


def _merge_triton(x: torch.Tensor, sizes: torch.Tensor, src: torch.Tensor, offsets: torch.Tensor,
                  block_m: int = _MERGE_BLOCK_M, block_c: int = _MERGE_BLOCK_C
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather-merge: ``x [B, N, C]``, ``sizes [B, N]`` fp32, ``src [B, N]`` / ``offsets [B, n_out+1]`` int64.

    Returns ``merged [B, n_out, C]`` (x.dtype) and ``merged_sizes [B, n_out]`` fp32.
    """
    Bsz, N, C = x.shape
    n_out = offsets.shape[1] - 1
    if tuple(sizes.shape) != (Bsz, N) or tuple(src.shape) != (Bsz, N) or offsets.shape[0] != Bsz:
        raise ValueError(f"sizes and src must be [B, N] = [{Bsz}, {N}] and offsets [B, n_out + 1]; got "
                         f"{tuple(sizes.shape)}, {tuple(src.shape)}, {tuple(offsets.shape)}")
    sizes, src, offsets = (t.contiguous() for t in (sizes, src, offsets))
    merged = torch.empty((Bsz, n_out, C), dtype=x.dtype, device=x.device)
    merged_sizes = torch.empty((Bsz, n_out), dtype=torch.float32, device=x.device)
    if merged.numel() == 0:
        return merged, merged_sizes.zero_()
    _merge_launch(x, sizes, src, offsets, merged, merged_sizes, block_m, block_c)()
    return merged, merged_sizes


def _merge_backward_triton(grad: torch.Tensor, sizes: torch.Tensor, merged_sizes: torch.Tensor,
                           src: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype,
                           block_m: int = _MERGE_BLOCK_M, block_c: int = _MERGE_BLOCK_C) -> torch.Tensor:
    """``grad [B, n_out, C]`` (any strides) -> ``grad_x [B, N, C]`` in ``dtype``; CSR as the forward."""
    Bsz, n_out, C = grad.shape
    N = src.shape[1]
    if tuple(merged_sizes.shape) != (Bsz, n_out) or tuple(offsets.shape) != (Bsz, n_out + 1):
        raise ValueError(f"merged_sizes must be [B, n_out] = [{Bsz}, {n_out}] and offsets [B, n_out + 1]; got "
                         f"{tuple(merged_sizes.shape)}, {tuple(offsets.shape)}")
    sizes, merged_sizes, src, offsets = (t.contiguous() for t in (sizes, merged_sizes, src, offsets))
    grad_x = torch.empty((Bsz, N, C), dtype=dtype, device=grad.device)
    if grad_x.numel() == 0:
        return grad_x
    _merge_backward_launch(grad, sizes, merged_sizes, src, offsets, grad_x, block_m, block_c)()
    return grad_x


# ---------------------------------------------------------------------------- custom ops
@torch.library.custom_op("fusion::bipartite_match", mutates_args=())
def _match_op(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # builtin tuple: torch<2.8 evals it
    """Triton matcher as an opaque op: ``[B, N, Cm]`` -> ``best [B, N_A]`` fp32, ``partner [B, N_A]`` int64."""
    return _match_triton(metric)


@_match_op.register_fake
def _(metric):
    Bsz, N, _ = metric.shape
    n_a = (N + 1) // 2
    return (metric.new_empty((Bsz, n_a), dtype=torch.float32),
            metric.new_empty((Bsz, n_a), dtype=torch.int64))


@torch.library.custom_op("fusion::bipartite_gather_merge", mutates_args=())
def _merge_op(x: torch.Tensor, sizes: torch.Tensor, src: torch.Tensor,
              offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton gather-merge as an op: ``(merged [B, n_out, C], merged_sizes [B, n_out] fp32)``."""
    return _merge_triton(x, sizes, src, offsets)


@_merge_op.register_fake
def _(x, sizes, src, offsets):
    Bsz, _, C = x.shape
    n_out = offsets.shape[1] - 1
    return x.new_empty((Bsz, n_out, C)), x.new_empty((Bsz, n_out), dtype=torch.float32)


@torch.library.custom_op("fusion::bipartite_gather_merge_backward", mutates_args=())
def _merge_backward_op(grad: torch.Tensor, sizes: torch.Tensor, merged_sizes: torch.Tensor,
                       src: torch.Tensor, offsets: torch.Tensor, x_like: torch.Tensor) -> torch.Tensor:
    """Triton backward of the gather-merge; ``x_like`` (an empty tensor of x's dtype) gives the grad dtype."""
    return _merge_backward_triton(grad, sizes, merged_sizes, src, offsets, x_like.dtype)


@_merge_backward_op.register_fake
def _(grad, sizes, merged_sizes, src, offsets, x_like):
    Bsz, _, C = grad.shape
    return grad.new_empty((Bsz, src.shape[1], C), dtype=x_like.dtype)


def _merge_setup_context(ctx, inputs, output):
    x, sizes, src, offsets = inputs
    _merged, merged_sizes = output
    ctx.save_for_backward(sizes, merged_sizes, src, offsets)
    ctx.x_dtype = x.dtype


def _merge_backward(ctx, grad_merged, _grad_sizes):
    sizes, merged_sizes, src, offsets = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        x_like = grad_merged.new_empty((0,), dtype=ctx.x_dtype)
        grad_x = _merge_backward_op(grad_merged, sizes, merged_sizes, src, offsets, x_like)
    return grad_x, None, None, None


_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup_context)


# ---------------------------------------------------------------------------- public API
def _source_lists(assignment: torch.Tensor, n_out: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``assignment [B, N]`` -> CSR ``src [B, N]`` (inputs grouped by output, increasing within
    a group) and ``offsets [B, n_out + 1]``: output ``o``'s sources are ``src[offsets[o]:offsets[o+1]]``."""
    Bsz = assignment.shape[0]
    sorted_out, src = torch.sort(assignment, dim=1, stable=True)
    bounds = torch.arange(n_out + 1, device=assignment.device).expand(Bsz, n_out + 1).contiguous()
    return src, torch.searchsorted(sorted_out, bounds)


def _merge_by_assignment(x: torch.Tensor, sizes: torch.Tensor, assignment: torch.Tensor, n_out: int,
                         backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of ``x [B, N, C]`` by ``assignment``; sizes in the compute dtype."""
    if backend == "torch":
        return merge_by_assignment_reference(x, sizes, assignment, n_out)
    src, offsets = _source_lists(assignment, n_out)
    return _merge_op(x, sizes.detach().float(), src, offsets)


def _check_common(x, metric, sizes, backend) -> str:
    V.check_float_tensor("x", x, 3, "[B, N, C]")
    V.check_float_tensor("metric", metric, 3, "[B, N, Cm]")
    if metric.shape[:2] != x.shape[:2]:
        raise ValueError(f"metric has shape {tuple(metric.shape)} but x has {tuple(x.shape)}; metric must be "
                         f"[B, N, Cm] with the same B={x.shape[0]} and N={x.shape[1]} as x")
    if metric.device != x.device:
        raise ValueError(f"metric is on {metric.device} but x is on {x.device}")
    if sizes is not None:
        V.check_float_tensor("sizes", sizes, 2, "[B, N]")
        if sizes.shape != x.shape[:2]:
            raise ValueError(f"sizes has shape {tuple(sizes.shape)}; it must be [B, N] = "
                             f"[{x.shape[0]}, {x.shape[1]}] like x's first two dims")
        if sizes.device != x.device:
            raise ValueError(f"sizes is on {sizes.device} but x is on {x.device}")
    return V.choose_backend(backend, _bipartite_match_kernel, {"x": x, "metric": metric})


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__} {value!r}")
    return value


def bipartite_merge(x: torch.Tensor, metric: torch.Tensor, r: int, sizes: Optional[torch.Tensor] = None,
                    backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ToMe bipartite-soft-matching step that removes ``r`` tokens.

    Args:
        x: ``[B, N, C]`` tokens (float16/bfloat16/float32/float64, any strides).
        metric: ``[B, N, Cm]`` similarity features (may be ``x`` itself); only its
            direction matters (cosine). It gets no gradient.
        r: tokens to remove, ``0 <= r <= N_A = ceil(N / 2)`` (the number of A tokens; 0 when
            ``N == 1``). ``r = 0`` returns ``x`` unchanged. A Python int, so shapes are static.
        sizes: ``[B, N]`` positive token sizes (how many original tokens each one stands
            for); None means ones. Treated as constants (no gradient).
        backend: ``"auto"`` (Triton for CUDA tensors, the PyTorch reference otherwise),
            ``"triton"`` or ``"torch"``.

    Returns:
        ``merged [B, N - r, C]`` (x.dtype): the kept A tokens in rank order (most similar
        first), then all B tokens in order, each the size-weighted mean of what went in;
        ``sizes [B, N - r]`` (dtype of ``sizes``, fp32 when None): the summed sizes;
        ``assignment [B, N]`` int64: for every input token, the output position it went
        into (``merged[b, assignment[b, i]]`` contains ``x[b, i]``).
    """
    be = _check_common(x, metric, sizes, backend)
    _check_int("r", r)
    Bsz, N, _ = x.shape
    n_a, n_b = (N + 1) // 2, N // 2
    r_max = n_a if n_b > 0 else 0
    if not 0 <= r <= r_max:
        raise ValueError(f"r={r} is out of range: one bipartite step removes 0 <= r <= {r_max} tokens "
                         f"(the number of A tokens, ceil(N/2), for N={N}"
                         f"{'; a single token has no partner' if N == 1 else ''})")
    if be == "torch":
        return bipartite_merge_reference(x, metric, r, sizes)
    out_dtype = sizes.dtype if sizes is not None else torch.float32
    if r == 0:
        if sizes is None:
            sizes = torch.ones((Bsz, N), dtype=out_dtype, device=x.device)
        return x, sizes, torch.arange(N, device=x.device).expand(Bsz, N).clone()
    s32 = (sizes.detach().float() if sizes is not None
           else torch.ones((Bsz, N), dtype=torch.float32, device=x.device))
    best, partner = _match_op(metric.detach())
    assignment = bipartite_assignment(best, partner, r, N)
    merged, merged_sizes = _merge_by_assignment(x, s32, assignment, N - r, be)
    return merged, merged_sizes.to(out_dtype), assignment


def reduce_to(x: torch.Tensor, metric: torch.Tensor, keep: int, sizes: Optional[torch.Tensor] = None,
              backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite steps until ``keep`` tokens remain: ``[B, N, C]`` -> ``[B, keep, C]``.

    Each step removes ``r = min(N_cur - keep, ceil(N_cur / 2))`` tokens, so it repeats
    while more than half must go. Between steps the metric is merged with the same
    assignment (size-weighted mean; when ``metric is x`` the merged ``x`` is reused), and
    sizes accumulate. The per-step assignments are composed, so the returned
    ``assignment [B, N]`` maps every input token to its final output token; the result
    equals the size-weighted mean of the input tokens mapped to each output.

    Args/returns as :func:`bipartite_merge`, with ``keep`` an int in ``[1, N]``
    (``keep == N`` returns ``x`` unchanged).
    """
    be = _check_common(x, metric, sizes, backend)
    _check_int("keep", keep)
    Bsz, N, _ = x.shape
    if not 1 <= keep <= N:
        raise ValueError(f"keep={keep} is out of range: it must be between 1 and the token count N={N}")
    out_dtype = sizes.dtype if sizes is not None else torch.float32
    cur_sizes = (sizes.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)
                 if sizes is not None else torch.ones((Bsz, N), dtype=torch.float32, device=x.device))
    assignment = torch.arange(N, device=x.device).expand(Bsz, N).clone()
    same = metric is x
    metric = metric.detach()
    n = N
    while n > keep:
        r = min(n - keep, (n + 1) // 2)
        merged, new_sizes, step = bipartite_merge(x, metric, r, cur_sizes, backend=be)
        if same:
            metric = merged.detach()
        else:
            with torch.no_grad():
                metric, _ = _merge_by_assignment(metric, cur_sizes, step, n - r, be)
        assignment = step.gather(1, assignment)
        x, cur_sizes, n = merged, new_sizes, n - r
    return x, cur_sizes.to(out_dtype), assignment
