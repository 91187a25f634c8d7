"""PyTorch paths of :func:`fusion.kernels.window_attention`: the CPU path and the naive oracle.

- :func:`window_attention_reference` / :func:`window_attention_reference_backward`: what
  runs on the CPU (and for ``backend="torch"``). Query cells are taken in steps of about
  ``STEP_BYTES``: each step gathers its cells' window tokens from every encoder's keys /
  values (``[B, cells, L, heads, d]``, ``L`` = the summed largest window sizes, padding
  masked), takes the softmax over all of them, and writes its output cells. The
  backward recomputes the probabilities from the saved log-sum-exp and scatters the
  key / value gradients back with ``index_add_``. Memory stays at one step's gather,
  whatever the batch; computes in fp32 (fp64 for fp64 inputs).
- :func:`naive_window_attention`: the test oracle, sharing no code with the rest: the
  window mask of every query cell over all tokens, derived from ATen's own
  ``F.adaptive_avg_pool2d`` (an input token is in a cell's window when pooling gives it
  a non-zero weight there), then dense masked softmax attention. Differentiable
  (autograd), in the inputs' dtype (the tests use fp64).

Layouts: ``q [B, Gh*Gw, heads*d]``; ``keys[i]``, ``values[i]`` ``[B, h_i*w_i, heads*d]``
(row-major grids); output ``[B, Gh*Gw, heads*d]``, ``lse [B, heads, Gh*Gw]``. Arguments
are assumed validated (:func:`fusion.kernels.window_attention` does that).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .windows import WindowTable

STEP_BYTES = 16 << 20  # one step's gathered keys (fp32): a few of these are alive at once


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _steps(win: WindowTable, batch: int, width: int) -> List[Tuple[int, int]]:
    """Query cell ranges ``[m0, m1)`` whose gathered windows fit ``STEP_BYTES``."""
    L = sum(a * b for a, b in (win.max_window(i) for i in range(len(win.grids))))
    cells = max(1, STEP_BYTES // max(1, batch * L * width * 4))
    M = win.num_queries
    return [(m0, min(M, m0 + cells)) for m0 in range(0, M, cells)]


def _gather(ts: Sequence[torch.Tensor], win: WindowTable, m0: int, m1: int, heads: int, dtype: torch.dtype):
    """Window tokens of cells ``[m0, m1)``: ``[B, cells, L, heads, d]`` (encoders concatenated)
    and the ``[cells, L]`` validity mask."""
    parts, masks = [], []
    for i, t in enumerate(ts):
        idx, valid = win.gather_index(i, t.device)
        idx, valid = idx[m0:m1], valid[m0:m1]
        B = t.shape[0]
        g = t.index_select(1, idx.reshape(-1)).to(dtype)  # [B, cells * L_i, HD]
        parts.append(g.view(B, m1 - m0, idx.shape[1], heads, -1))
        masks.append(valid)
    return torch.cat(parts, 2), torch.cat(masks, 1)


def window_attention_reference(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                               win: WindowTable, heads: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, M, HD] in q's dtype, lse [B, heads, M] fp32 / fp64)``; no autograd graph."""
    B, M, HD = q.shape
    cdt = _compute_dtype(q.dtype)
    out = torch.empty(B, M, HD, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, heads, M, dtype=cdt, device=q.device)
    with torch.no_grad():
        for m0, m1 in _steps(win, B, HD):
            qb = q[:, m0:m1].to(cdt).view(B, m1 - m0, heads, 1, -1)       # [B, c, H, 1, d]
            kg, valid = _gather(keys, win, m0, m1, heads, cdt)             # [B, c, L, H, d]
            s = torch.matmul(qb, kg.permute(0, 1, 3, 4, 2)).squeeze(3) * scale  # [B, c, H, L]
            s.masked_fill_(~valid[None, :, None, :], float("-inf"))
            lse_b = torch.logsumexp(s, -1)                                 # [B, c, H]
            p = torch.exp(s - lse_b[..., None])
            vg, _ = _gather(values, win, m0, m1, heads, cdt)
            o = torch.matmul(p.unsqueeze(3), vg.transpose(2, 3)).squeeze(3)  # [B, c, H, d]
            out[:, m0:m1] = o.reshape(B, m1 - m0, HD).to(q.dtype)
            lse[:, :, m0:m1] = lse_b.transpose(1, 2)
    return out, lse


def window_attention_reference_backward(grad: torch.Tensor, q: torch.Tensor, keys: Sequence[torch.Tensor],
                                        values: Sequence[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                                        win: WindowTable, heads: int, scale: float) -> List[torch.Tensor]:
    """``[dq] + [dk_i...] + [dv_i...]``, each in its input's dtype."""
    B, M, HD = q.shape
    cdt = _compute_dtype(q.dtype)
    dq = torch.empty(B, M, HD, dtype=q.dtype, device=q.device)
    dks = [torch.zeros(k.shape, dtype=cdt, device=k.device) for k in keys]
    dvs = [torch.zeros(v.shape, dtype=cdt, device=v.device) for v in values]
    sizes = [win.gather_index(i, q.device)[0].shape[1] for i in range(len(keys))]
    with torch.no_grad():
        for m0, m1 in _steps(win, B, HD):
            c = m1 - m0
            qb = q[:, m0:m1].to(cdt).view(B, c, heads, 1, -1)
            gb = grad[:, m0:m1].to(cdt).view(B, c, heads, 1, -1)
            ob = out[:, m0:m1].to(cdt).view(B, c, heads, -1)
            kg, valid = _gather(keys, win, m0, m1, heads, cdt)
            vg, _ = _gather(values, win, m0, m1, heads, cdt)
            kt, vt = kg.permute(0, 1, 3, 2, 4), vg.permute(0, 1, 3, 2, 4)   # [B, c, H, L, d]
            s = torch.matmul(qb, kt.transpose(-1, -2)).squeeze(3) * scale    # [B, c, H, L]
            p = torch.exp(s - lse[:, :, m0:m1].transpose(1, 2)[..., None])
            p.masked_fill_(~valid[None, :, None, :], 0.0)
            dp = torch.matmul(gb, vt.transpose(-1, -2)).squeeze(3)
            delta = (gb.squeeze(3) * ob).sum(-1, keepdim=True)               # [B, c, H, 1]
            ds = p * (dp - delta)
            dq[:, m0:m1] = (torch.matmul(ds.unsqueeze(3), kt).squeeze(3) * scale).reshape(B, c, HD).to(q.dtype)
            dkg = (ds.unsqueeze(-1) * qb * scale).transpose(2, 3)            # [B, c, L, H, d]
            dvg = (p.unsqueeze(-1) * gb).transpose(2, 3)
            off = 0
            for i, L in enumerate(sizes):  # padded slots carry zeros: p and ds are 0 there
                idx = win.gather_index(i, q.device)[0][m0:m1].reshape(-1)
                dks[i].index_add_(1, idx, dkg[:, :, off:off + L].reshape(B, c * L, HD))
                dvs[i].index_add_(1, idx, dvg[:, :, off:off + L].reshape(B, c * L, HD))
                off += L
    return ([dq] + [g.to(k.dtype) for g, k in zip(dks, keys)] + [g.to(v.dtype) for g, v in zip(dvs, values)])


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
