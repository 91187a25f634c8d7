"""Pure-PyTorch bipartite soft matching (ToMe, Bolya et al. 2023): the CPU path.

One bipartite step on ``x [B, N, C]`` with similarity features ``metric [B, N, Cm]``:

1. Tokens are split alternately: set A = even positions ``0, 2, 4, …`` (``N_A = ceil(N/2)``
   tokens), set B = odd positions ``1, 3, 5, …`` (``N_B = floor(N/2)`` tokens).
2. Cosine similarity ``score[i, j] = <m_i, m_j> / (|m_i| |m_j|)`` of A token ``i`` and B
   token ``j`` (norms clamped below at ``1e-12`` like ``F.normalize``, so an all-zero
   metric row scores 0 instead of NaN).
3. Each A token's best partner: ``best[i] = max_j score[i, j]``, ``partner[i] = argmax_j``
   (ties: the lowest ``j``).
4. A tokens are ranked by ``best`` descending (a stable sort: ties keep the lower index
   first). The ``r`` top-ranked A tokens are merged into their partners, the other
   ``N_A - r`` are kept.
5. Merge: every output token is the size-weighted mean of the input tokens that went
   into it, ``y_o = Σ_{i→o} (s_i / S_o) x_i`` with ``S_o = Σ_{i→o} s_i`` (its new size).

Output order (ToMe's ``cat([unmerged, dst])``): first the ``N_A - r`` kept A tokens in rank
order (most similar first), then all ``N_B`` B tokens in their original order, so the
output has ``N - r`` tokens. ``assignment [B, N]`` (int64) gives, for every input token,
the output position it went into. ``r = 0`` is the identity (ToMe's early return): the
input comes back unchanged and ``assignment = arange(N)``.

- :func:`bipartite_merge_reference` is the path CPU users run. The ``N_A × N_B`` score
  matrix is never held: scores are computed block by block (``[B, rows, block_b]``
  chunks, ``_SCORE_CHUNK_ELEMS`` elements at most) with a running row max/argmax, the
  metric is never normalised into a full copy (inverse norms ``[B, N]`` scale each B
  chunk) and the merge adds weighted source rows into the output in bounded chunks of
  input tokens, in increasing input order (deterministic on CPU).
- The straightforward full-matrix version, the benchmark baseline, is
  :func:`fusion.kernels.naive.bipartite_merge_full`.

Arguments are assumed validated (:func:`fusion.kernels.bipartite_merge` does that).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# F.normalize's default: the smallest norm a metric row is divided by.
NORM_EPS = 1e-12
# Largest score chunk [B, rows, cols] the blocked matcher holds at once: 2**19 fp32
# elements = 2 MiB, about 1.5% of the 128 MiB full matrix at N=4096, B=8, small enough
# for L2-friendly bmm calls and large enough that each call still runs at BLAS speed.
_SCORE_CHUNK_ELEMS = 1 << 19
# B tokens (columns) per score chunk; the rows per chunk follow from the budget above.
# 256 gives 64 bmm + max calls at N=4096, B=8 (256 x 256 chunks): few enough that
# per-call and thread-synchronisation overheads stay small, and the normalised B block
# [B, 256, Cm] is 2 MiB at Cm=256 (it is capped by the same budget for wider metrics).
_BLOCK_B = 256
# Elements per chunk of the merge's (x * weight) temporary: 2**18 = 1 MiB fp32.
_MERGE_CHUNK_ELEMS = 1 << 18


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other float dtype computes in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def inverse_norms(metric: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """``[B, N, Cm]`` -> ``[B, N]`` ``1 / max(|m_n|, eps)`` in the compute dtype, without a copy of metric."""
    norms = torch.linalg.vector_norm(metric, dim=-1, dtype=compute_dtype(metric.dtype))
    return norms.clamp_min_(eps).reciprocal_()


def bipartite_match_reference(metric: torch.Tensor, block_b: int = _BLOCK_B,
                              chunk_elems: int = _SCORE_CHUNK_ELEMS) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each A token's best B partner, by blocks: ``[B, N, Cm]`` -> ``(best, partner)``.

    Returns ``best [B, N_A]`` (cosine, compute dtype) and ``partner [B, N_A]`` (int64, the
    B-local index ``j`` of token ``2j + 1``). For each ``[B, rows, block_b]`` chunk (at most
    ``chunk_elems`` elements) the B rows are scaled by their inverse norms, ``a · b̂`` is one
    batched product and its row max/argmax updates the running best; a later chunk replaces
    it only when strictly greater, so ties resolve to the lowest j. The A norm, a positive
    per-row constant that cannot change the argmax, scales ``best`` at the end.
    """
    Bsz, N, _ = metric.shape
    n_a, n_b = (N + 1) // 2, N // 2
    cd = compute_dtype(metric.dtype)
    inv = inverse_norms(metric)                        # [B, N]
    inv_a, inv_b = inv[:, 0::2], inv[:, 1::2]          # [B, N_A], [B, N_B]
    m_a, m_b = metric[:, 0::2], metric[:, 1::2]        # strided views, no copies
    best = torch.full((Bsz, n_a), float("-inf"), dtype=cd, device=metric.device)
    partner = torch.zeros((Bsz, n_a), dtype=torch.int64, device=metric.device)
    Cm = metric.shape[-1]
    # the normalised B block [B, rb, Cm] and, when metric needs a cast, the A block
    # [B, ra, Cm] are copies: they are held to the score budget too
    block_b = max(1, min(block_b, n_b, chunk_elems // (Bsz * Cm)))
    rows = max(1, chunk_elems // (Bsz * block_b))
    if metric.dtype != cd:
        rows = max(1, min(rows, chunk_elems // (Bsz * Cm)))
    for b0 in range(0, n_b, block_b):
        b1 = min(b0 + block_b, n_b)
        b_hat = m_b[:, b0:b1].to(cd) * inv_b[:, b0:b1, None]       # [B, rb, Cm] unit rows, once per block
        for a0 in range(0, n_a, rows):
            a1 = min(a0 + rows, n_a)
            # [B, ra, Cm] @ [B, Cm, rb] -> [B, ra, rb]
            blk_max, blk_arg = torch.matmul(m_a[:, a0:a1].to(cd), b_hat.transpose(1, 2)).max(dim=-1)
            run_max, run_arg = best[:, a0:a1], partner[:, a0:a1]  # views: updated in place
            upd = blk_max > run_max                                # first max within a block, earlier block on ties
            run_max.copy_(torch.where(upd, blk_max, run_max))
            run_arg.copy_(torch.where(upd, blk_arg + b0, run_arg))
    return best.mul_(inv_a), partner


def bipartite_assignment(best: torch.Tensor, partner: torch.Tensor, r: int, n: int) -> torch.Tensor:
    """Decisions -> ``assignment [B, n]`` (int64): the output position of every input token.

    ``best`` / ``partner``: ``[B, N_A]`` from a matcher. A tokens are ranked by ``best``
    descending (stable). An A token of rank ``k < r`` goes to ``(N_A - r) + partner``, one of
    rank ``k >= r`` to ``k - r``; B token ``j`` goes to ``(N_A - r) + j``.
    """
    Bsz, n_a = best.shape
    n_unm = n_a - r
    order = torch.sort(best, dim=1, descending=True, stable=True).indices  # [B, N_A] A indices by rank
    ranks = torch.arange(n_a, device=best.device).expand(Bsz, n_a)
    rank = torch.empty_like(order).scatter_(1, order, ranks)               # [B, N_A] rank of each A token
    a_out = torch.where(rank < r, partner + n_unm, rank - r)
    b_out = torch.arange(n_unm, n_unm + n // 2, device=best.device).expand(Bsz, n // 2)
    assignment = torch.empty((Bsz, n), dtype=torch.int64, device=best.device)
    assignment[:, 0::2] = a_out
    assignment[:, 1::2] = b_out
    return assignment


def merge_by_assignment_reference(x: torch.Tensor, sizes: torch.Tensor, assignment: torch.Tensor,
                                  n_out: int, chunk_elems: int = _MERGE_CHUNK_ELEMS
                                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted means of the tokens mapped to each output.

    ``x [B, N, C]``, ``sizes [B, N]``, ``assignment [B, N]`` (values in ``[0, n_out)``) ->
    ``merged [B, n_out, C]`` (x.dtype) and ``merged_sizes [B, n_out]`` (compute dtype).
    ``merged[o] = Σ_{i→o} w_i x_i`` with ``w_i = s_i / S_o``, accumulated in the compute
    dtype by ``scatter_add_`` over chunks of input tokens taken in increasing order, so on
    CPU (a sequential scatter) each output's sources are added in increasing input order,
    the Triton kernel's order; a token alone keeps its exact value. On CUDA ``scatter_add_``
    uses atomics, so this path is not bitwise deterministic there (the Triton path is).
    Differentiable in ``x``; ``sizes`` is treated as a constant.
    """
    Bsz, N, C = x.shape
    cd = compute_dtype(x.dtype)
    s = sizes.detach().to(cd)
    merged_sizes = torch.zeros((Bsz, n_out), dtype=cd, device=x.device).scatter_add_(1, assignment, s)
    w = s / merged_sizes.gather(1, assignment)                                  # [B, N]
    acc = torch.zeros((Bsz, n_out, C), dtype=cd, device=x.device)
    step = max(1, chunk_elems // (Bsz * C))                                     # input tokens per chunk
    for i0 in range(0, N, step):
        i1 = min(i0 + step, N)
        # [B, L, C] rows weighted, added at their outputs along the token dim
        acc.scatter_add_(1, assignment[:, i0:i1, None].expand(Bsz, i1 - i0, C),
                         x[:, i0:i1].to(cd) * w[:, i0:i1, None])
    return acc.to(x.dtype), merged_sizes


def bipartite_merge_reference(x: torch.Tensor, metric: torch.Tensor, r: int,
                              sizes: Optional[torch.Tensor] = None, block_b: int = _BLOCK_B,
                              chunk_elems: int = _SCORE_CHUNK_ELEMS
                              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One blocked bipartite step: ``x [B, N, C]``, ``metric [B, N, Cm]`` -> ``(merged, sizes, assignment)``.

    ``merged [B, N - r, C]`` (x.dtype), ``sizes [B, N - r]`` (dtype of ``sizes``, fp32 when
    None), ``assignment [B, N]`` int64. See the module docstring for the decisions and order.
    """
    Bsz, N, _ = x.shape
    out_dtype = sizes.dtype if sizes is not None else torch.float32
    if sizes is None:
        sizes = torch.ones((Bsz, N), dtype=out_dtype, device=x.device)
    if r == 0:
        return x, sizes, torch.arange(N, device=x.device).expand(Bsz, N).clone()
    best, partner = bipartite_match_reference(metric.detach(), block_b, chunk_elems)
    assignment = bipartite_assignment(best, partner, r, N)
    merged, merged_sizes = merge_by_assignment_reference(x, sizes, assignment, N - r)
    return merged, merged_sizes.to(out_dtype), assignment
