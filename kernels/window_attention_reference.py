"""The PyTorch path of :func:`fusion.kernels.window_attention` (its oracle is in :mod:`.naive`).

- :func:`window_attention_reference` / :func:`window_attention_reference_backward`: what
  runs on the CPU (and for ``backend="torch"``). Tensors are laid out per head once
  (``[B, heads, N, d]``); query cells are taken in steps of about ``STEP_BYTES``: each
  step gathers its cells' window tokens from each encoder's keys / values
  (``[B, heads, cells, L_i, d]``, ``L_i`` = the largest window, padding masked), takes
  one softmax over all encoders' windows, and writes its output cells. The backward
  recomputes the probabilities from the saved log-sum-exp and scatters the key / value
  gradients back with ``index_add_``. Memory stays at a step's gather whatever the
  batch; computes in fp32 (fp64 for fp64 inputs).

Layouts: ``q [B, Gh*Gw, heads*d]``; ``keys[i]``, ``values[i]`` ``[B, h_i*w_i, heads*d]``
(row-major grids); output ``[B, Gh*Gw, heads*d]``, ``lse [B, heads, Gh*Gw]``. Arguments
are assumed validated (:func:`fusion.kernels.window_attention` does that).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from .windows import WindowTable

STEP_BYTES = 16 << 20  # one step's gathered keys (fp32): a few of these are alive at once


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _steps(win: WindowTable, batch: int, width: int) -> List[Tuple[int, int]]:
    """Query cell ranges ``[m0, m1)`` whose gathered windows (one encoder's keys) fit ``STEP_BYTES``."""
    L = max(a * b for a, b in (win.max_window(i) for i in range(len(win.grids))))
    cells = max(1, STEP_BYTES // max(1, batch * L * width * 4))
    M = win.num_queries
    return [(m0, min(M, m0 + cells)) for m0 in range(0, M, cells)]


def _heads(t: torch.Tensor, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, N, heads*d]`` -> ``[B, heads, N, d]`` contiguous in ``dtype`` (one copy per call, so
    that every step's gathers and products run on plain strides)."""
    B, N, HD = t.shape
    return t.to(dtype).view(B, N, heads, HD // heads).transpose(1, 2).contiguous()


def _gather(th: torch.Tensor, win: WindowTable, i: int, m0: int, m1: int) -> torch.Tensor:
    """Window tokens of cells ``[m0, m1)`` in grid ``i``: ``[B, heads, cells, L_i, d]``."""
    idx = win.gather_index(i, th.device)[0][m0:m1]
    B, H, _, d = th.shape
    return th.index_select(2, idx.reshape(-1)).view(B, H, m1 - m0, idx.shape[1], d)


def _probs(qb, kgs, win: WindowTable, m0: int, m1: int, scale: float, lse=None):
    """Softmax over every encoder's window: per-encoder ``p_i [B, H, cells, L_i]`` and the
    log-sum-exp ``[B, H, cells]`` (recomputed from ``lse`` when given)."""
    s = torch.cat([(qb @ kg.transpose(-1, -2)).squeeze(-2) for kg in kgs], -1) * scale  # [B, H, c, L]
    valid = torch.cat([win.gather_index(i, qb.device)[1][m0:m1] for i in range(len(kgs))], -1)
    s.masked_fill_(~valid, float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None])
    return p.split([kg.shape[3] for kg in kgs], -1), lse


def window_attention_reference(q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                               win: WindowTable, heads: int, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, M, HD] in q's dtype, lse [B, heads, M] fp32 / fp64)``; no autograd graph."""
    B, M, HD = q.shape
    cdt = _compute_dtype(q.dtype)
    with torch.no_grad():
        qh = _heads(q, heads, cdt)
        kh = [_heads(k, heads, cdt) for k in keys]
        vh = [_heads(v, heads, cdt) for v in values]
        out = torch.empty_like(qh)                      # [B, H, M, d]
        lse = torch.empty(B, heads, M, dtype=cdt, device=q.device)
        for m0, m1 in _steps(win, B, HD):
            qb = qh[:, :, m0:m1, None, :]               # [B, H, c, 1, d]
            ps, lse[:, :, m0:m1] = _probs(qb, [_gather(k, win, i, m0, m1) for i, k in enumerate(kh)], win, m0,
                                          m1, scale)
            out[:, :, m0:m1] = sum((p.unsqueeze(-2) @ _gather(v, win, i, m0, m1)).squeeze(-2)
                                   for i, (p, v) in enumerate(zip(ps, vh)))
    return out.transpose(1, 2).reshape(B, M, HD).to(q.dtype), lse


def window_attention_reference_backward(grad: torch.Tensor, q: torch.Tensor, keys: Sequence[torch.Tensor],
                                        values: Sequence[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                                        win: WindowTable, heads: int, scale: float) -> List[torch.Tensor]:
    """``[dq] + [dk_i...] + [dv_i...]``, each in its input's dtype."""
    B, M, HD = q.shape
    cdt = _compute_dtype(q.dtype)
    with torch.no_grad():
        qh, gh, oh = (_heads(t, heads, cdt) for t in (q, grad, out))
        kh = [_heads(k, heads, cdt) for k in keys]
        vh = [_heads(v, heads, cdt) for v in values]
        dq = torch.empty_like(qh)
        dkh = [torch.zeros_like(k) for k in kh]
        dvh = [torch.zeros_like(v) for v in vh]
        delta = (gh * oh).sum(-1)                       # [B, H, M]
        for m0, m1 in _steps(win, B, HD):
            qb, gb = qh[:, :, m0:m1, None, :], gh[:, :, m0:m1, None, :]   # [B, H, c, 1, d]
            kgs = [_gather(k, win, i, m0, m1) for i, k in enumerate(kh)]
            ps, _ = _probs(qb, kgs, win, m0, m1, scale, lse[:, :, m0:m1].to(cdt))
            dqb = 0
            for i, (p, kg) in enumerate(zip(ps, kgs)):  # padded slots carry p = 0, so zero gradients
                vg = _gather(vh[i], win, i, m0, m1)
                ds = p * ((gb @ vg.transpose(-1, -2)).squeeze(-2) - delta[:, :, m0:m1, None])  # [B, H, c, L_i]
                dqb = dqb + (ds.unsqueeze(-2) @ kg).squeeze(-2)
                idx = win.gather_index(i, q.device)[0][m0:m1].reshape(-1)
                c, L = p.shape[2], p.shape[3]
                dkh[i].index_add_(2, idx, (ds.unsqueeze(-1) * qb).view(B, heads, c * L, -1), alpha=scale)
                dvh[i].index_add_(2, idx, (p.unsqueeze(-1) * gb).view(B, heads, c * L, -1))
            dq[:, :, m0:m1] = dqb * scale

    def back(t, like):
        return t.transpose(1, 2).reshape(like.shape).to(like.dtype)

    return [back(dq, q)] + [back(g, k) for g, k in zip(dkh, keys)] + [back(g, v) for g, v in zip(dvh, values)]
