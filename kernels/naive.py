"""Naive PyTorch versions of every op: the independent test oracles and benchmark baselines.

Each is the sequence a VLM codebase writes by hand and shares no code with the paths that
run (the Triton kernels, and the PyTorch paths in :mod:`.reference`,
:mod:`.window_attention_reference`, :mod:`.bipartite_reference`):

- :func:`naive_grid_merge` / :func:`naive_pyramid_pool`: Eagle-style: transpose to NCHW,
  upcast, ``F.interpolate`` / ``F.adaptive_avg_pool2d``, transpose back, ``F.layer_norm``,
  ``torch.cat``.
- :func:`naive_window_attention`: the window mask of every query cell over all tokens,
  derived from ATen's own ``F.adaptive_avg_pool2d`` (an input token is in a cell's window
  when pooling gives it a non-zero weight there), then dense masked softmax attention.
  Differentiable (autograd), in the inputs' dtype (the tests use fp64).
- :func:`bipartite_merge_full`: ToMe's full-matrix step (normalise, one ``A @ Bᵀ``
  product, ``argsort``, ``gather`` and ``scatter_reduce`` of ``x * size``), the contract
  of :func:`.bipartite_reference.bipartite_merge_reference` (order, ties, sizes).

Layouts are the ops' own (``[B, h, w, C]`` grids, ``[B, N, C]`` tokens); arguments are
assumed valid.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .bipartite_reference import NORM_EPS, compute_dtype  # the contract's epsilon; fp64 stays fp64

Norm = Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]


def naive_grid_merge(grids: Sequence[torch.Tensor], size: Tuple[int, int], mode: str = "area",
                     norms: Optional[Sequence[Norm]] = None, eps: float = 1e-5,
                     layout: str = "channel") -> torch.Tensor:
    """Eagle-style merge: NCHW copy, upcast, interpolate/pool, back to tokens, LN, cat."""
    H, W = size
    norms = [None] * len(grids) if norms is None else norms
    outs: List[torch.Tensor] = []
    for x, norm in zip(grids, norms):
        B, _, _, C = x.shape
        up = torch.float64 if x.dtype == torch.float64 else torch.float32
        nchw = x.permute(0, 3, 1, 2).contiguous().to(up)  # [B, C, h, w]
        if mode == "area":
            r = F.adaptive_avg_pool2d(nchw, (H, W))
        else:
            r = F.interpolate(nchw, size=(H, W), mode="bilinear", align_corners=False)
        tok = r.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if norm is not None:
            wt, bs = norm
            tok = F.layer_norm(tok, (C,), None if wt is None else wt.to(up),
                               None if bs is None else bs.to(up), eps)
        outs.append(tok.to(x.dtype))
    return torch.cat(outs, dim=-1 if layout == "channel" else 1)


def naive_pyramid_pool(tokens: torch.Tensor, grid: Tuple[int, int],
                       levels: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """One ``F.adaptive_avg_pool2d`` per level on an NCHW copy, then ``torch.cat``."""
    B, _, C = tokens.shape
    H, W = grid
    up = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    nchw = tokens.transpose(1, 2).reshape(B, C, H, W).to(up)
    outs = [F.adaptive_avg_pool2d(nchw, lv).flatten(2).transpose(1, 2) for lv in levels]
    return torch.cat(outs, dim=1).to(tokens.dtype)


def _window_mask(grid: Tuple[int, int], size: Tuple[int, int], device) -> torch.Tensor:
    """bool ``[Gh*Gw, h*w]``: token ``t`` is in cell ``m``'s window when ATen's adaptive average
    pooling gives it a non-zero weight in output cell ``m``."""
    h, w = grid
    basis = torch.eye(h * w, dtype=torch.float64, device=device).view(h * w, 1, h, w)
    weights = F.adaptive_avg_pool2d(basis, size).view(h * w, -1)  # [tokens, cells]
    return (weights > 0).t()


def naive_window_attention(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                           grids: Sequence[Tuple[int, int]], size: Tuple[int, int], heads: int,
                           scale: float) -> torch.Tensor:
    """Dense masked attention over every encoder's tokens: ``[B, Gh*Gw, heads*d]``, differentiable."""
    B, M, HD = q.shape
    k = torch.cat(list(keys), 1).view(B, -1, heads, HD // heads).transpose(1, 2)   # [B, H, N, d]
    v = torch.cat(list(values), 1).view(B, -1, heads, HD // heads).transpose(1, 2)
    mask = torch.cat([_window_mask(g, size, q.device) for g in grids], 1)         # [M, N]
    qh = q.view(B, M, heads, -1).transpose(1, 2)
    s = (qh @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, M, HD)


def bipartite_merge_full(x: torch.Tensor, metric: torch.Tensor, r: int,
                         sizes: Optional[torch.Tensor] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The straightforward full-matrix step (ToMe-style): same contract as :func:`bipartite_merge_reference`.

    Materialises the normalised metric, the ``[B, N_A, N_B]`` score matrix and ``x * size``;
    merges with ``scatter_reduce(sum)``. The benchmark baseline.
    """
    Bsz, N, C = x.shape
    out_dtype = sizes.dtype if sizes is not None else torch.float32
    if sizes is None:
        sizes = torch.ones((Bsz, N), dtype=out_dtype, device=x.device)
    if r == 0:
        return x, sizes, torch.arange(N, device=x.device).expand(Bsz, N).clone()
    cd = compute_dtype(x.dtype)
    n_a, n_b = (N + 1) // 2, N // 2
    n_unm = n_a - r
    with torch.no_grad():
        m = metric.to(compute_dtype(metric.dtype))
        m = m / m.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        scores = m[:, 0::2] @ m[:, 1::2].transpose(1, 2)                   # [B, N_A, N_B]
        node_max, node_idx = scores.max(dim=-1)                             # [B, N_A]
        edge_idx = node_max.argsort(dim=-1, descending=True, stable=True)  # [B, N_A]
        unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
        dst_idx = node_idx.gather(1, src_idx)                               # [B, r]
    s = sizes.detach().to(cd)
    xs = x.to(cd) * s[..., None]                                            # [B, N, C]
    src, dst = xs[:, 0::2], xs[:, 1::2]
    unm = src.gather(1, unm_idx[..., None].expand(Bsz, n_unm, C))
    picked = src.gather(1, src_idx[..., None].expand(Bsz, r, C))
    dst = dst.scatter_reduce(1, dst_idx[..., None].expand(Bsz, r, C), picked, reduce="sum")
    s_a, s_b = s[:, 0::2], s[:, 1::2]
    size_out = torch.cat([s_a.gather(1, unm_idx), s_b.scatter_reduce(1, dst_idx, s_a.gather(1, src_idx),
                                                                      reduce="sum")], dim=1)
    merged = (torch.cat([unm, dst], dim=1) / size_out[..., None]).to(x.dtype)
    assignment = torch.empty((Bsz, N), dtype=torch.int64, device=x.device)
    a_out = torch.empty((Bsz, n_a), dtype=torch.int64, device=x.device)
    a_out.scatter_(1, unm_idx, torch.arange(n_unm, device=x.device).expand(Bsz, n_unm))
    a_out.scatter_(1, src_idx, dst_idx + n_unm)
    assignment[:, 0::2] = a_out
    assignment[:, 1::2] = torch.arange(n_unm, n_unm + n_b, device=x.device)
    return merged, size_out.to(out_dtype), assignment
