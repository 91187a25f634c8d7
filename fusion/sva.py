"""Spatial Vision Aggregator (Cambrian-1, Tong et al. 2024): a learned, windowed merge.

``fusion.combine: sva`` replaces resample + concatenate with cross-attention. Layouts:
encoder grids ``[B, h_i, w_i, C_i]`` in, ``[B, G*G, dim]`` out (``G = fusion.grid``).

1. Each encoder's tokens go through their own input projection
   ``Linear(C_i, dim) -> GELU -> Linear(dim, dim) -> LayerNorm`` (Cambrian's
   ``mm_projector_aux``; the LayerNorm follows ``fusion.norm``): ``x_i [B, h_i*w_i, dim]``.
2. The global context (``context: first``) is the mean of the first encoder's ``x``.
3. A ``G x G`` grid of learned queries ``[G*G, dim]`` goes through ``layers`` layers with
   Cambrian's ``VisionCrossAttentionLayer`` structure::

       residual = q
       q = proj_in(cat(q, proj_context(context)))          # or proj_in(q) for context: none
       k_i, v_i = Linear(LN(x_i + pos_i)) per encoder       # LN + Linear, no bias (MultiKVCrossAttention)
       q = q + o_proj(window_attention(Linear(LN(q)), k, v))  # one softmax over every encoder's window
       q = proj_out(norm(q)) + residual                     # proj_out: Linear -> GELU -> Linear

   Query cell ``(y, x)`` attends, in every encoder, only to the tokens of its area window
   (:mod:`fusion.kernels.windows`): for grids that are multiples of ``G`` exactly
   Cambrian's ``k x k`` blocks; otherwise the input runs ``grid_merge``'s area tables give
   (overlapping windows of 2-4 rows for 27, 37, 64 onto 24).

Departures from Cambrian (where its arithmetic cannot carry over):

- Position embeddings: ``pos_i [max window size, dim]`` per layer and encoder (none when
  every window is one token, as Cambrian). Cambrian adds position ``p`` to a token's copy
  in window slot ``p``; with overlapping windows a token sits in up to four windows at
  different slots, and ``LN(x + pos)`` would differ per window, so keys could not be
  projected once per token. Here each token carries the embedding of its slot in its
  *primary* window (the query cell containing its centre): identical to Cambrian when
  windows do not overlap (every multiple of ``G``).
- Queries: one learned vector per cell (Cambrian broadcasts a single vector to every
  cell); all rows equal is Cambrian's.
- No attention masks (Cambrian masks the padding of unpadded images at inference).

The attention itself is :func:`fusion.kernels.window_attention` (Triton on CUDA, reading
every window in place; PyTorch otherwise, per ``fusion.kernels``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import SVAConfig
from .kernels import area_windows, window_attention
from .kernels.windows import WindowTable


class MLP(nn.Module):
    """``Linear(d_in, d_hidden) -> GELU -> Linear(d_hidden, d_out)``, no biases (Cambrian's ``MLP``)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden, bias=False)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


def _norm_linear(dim: int, eps: float) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim, bias=False))


class WindowCrossAttention(nn.Module):
    """Cambrian's ``MultiKVCrossAttention`` over windows: ``q_proj`` and per-encoder
    ``k_proj`` / ``v_proj`` (LayerNorm + Linear), ``o_proj``."""

    def __init__(self, dim: int, heads: int, names: Sequence[str], eps: float):
        super().__init__()
        self.heads = heads
        self.q_proj = _norm_linear(dim, eps)
        self.k_proj = nn.ModuleDict({n: _norm_linear(dim, eps) for n in names})
        self.v_proj = nn.ModuleDict({n: _norm_linear(dim, eps) for n in names})
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, queries: torch.Tensor, latents: Dict[str, torch.Tensor], windows: WindowTable,
                backend: str) -> torch.Tensor:
        """``queries [B, G*G, dim]``, ``latents`` name -> ``[B, h*w, dim]`` -> ``[B, G*G, dim]``."""
        keys = [self.k_proj[n](x) for n, x in latents.items()]
        values = [self.v_proj[n](x) for n, x in latents.items()]
        out = window_attention(self.q_proj(queries), keys, values, windows, self.heads, backend=backend)
        return self.o_proj(out)


class SVALayer(nn.Module):
    """One aggregation layer (Cambrian's ``VisionCrossAttentionLayer``, see the module docstring)."""

    def __init__(self, dim: int, heads: int, positions: Dict[str, int], context: bool, eps: float):
        super().__init__()
        self.proj_context = nn.Linear(dim, dim, bias=False) if context else None
        self.proj_in = nn.Linear(2 * dim if context else dim, dim, bias=False)
        self.proj_out = MLP(dim, dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = WindowCrossAttention(dim, heads, list(positions), eps)
        self.pos_embed = nn.ParameterDict({n: nn.Parameter(torch.randn(p, dim)) for n, p in positions.items() if p})

    def forward(self, queries: torch.Tensor, context: Optional[torch.Tensor], latents: Dict[str, torch.Tensor],
                positions: Dict[str, torch.Tensor], windows: WindowTable, backend: str) -> torch.Tensor:
        """``queries [B, G*G, dim]``, ``context [B, 1, dim]`` or None, ``latents`` name ->
        ``[B, h*w, dim]``, ``positions`` name -> int64 ``[h*w]`` (slot in the primary window)."""
        residual = queries
        if self.proj_context is not None:
            ctx = self.proj_context(context).expand(-1, queries.shape[1], -1)
            queries = torch.cat([queries, ctx], -1)
        queries = self.proj_in(queries)
        with_pos = {n: x + self.pos_embed[n][positions[n]].to(x.dtype) if n in self.pos_embed else x
                    for n, x in latents.items()}
        queries = queries + self.cross_attn(queries, with_pos, windows, backend)
        return self.proj_out(self.norm(queries)) + residual


class SpatialVisionAggregator(nn.Module):
    """Learned queries on a ``G x G`` grid cross-attending to every encoder's windows.

    ``specs``: ``(name, (h, w), channels)`` per encoder, in config order (the first
    gives the context). ``forward(grids)``: list of ``[B, h_i, w_i, C_i]`` in that order
    -> ``[B, G*G, dim]``.
    """

    def __init__(self, specs: Sequence[Tuple[str, Tuple[int, int], int]], grid: int, cfg: SVAConfig,
                 norm: bool = True, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.names = [name for name, _, _ in specs]
        self.dim, self.grid, self.backend = cfg.dim, grid, backend
        self.windows = area_windows([tuple(g) for _, g, _ in specs], (grid, grid))
        self.inputs = nn.ModuleDict({
            name: nn.Sequential(nn.Linear(c, cfg.dim), nn.GELU(), nn.Linear(cfg.dim, cfg.dim),
                                nn.LayerNorm(cfg.dim, eps=eps) if norm else nn.Identity())
            for name, _, c in specs})
        self.query = nn.Parameter(torch.randn(grid * grid, cfg.dim) * cfg.dim ** -0.5)
        slots = {name: self._slots(i) for i, name in enumerate(self.names)}
        self.context = cfg.context == "first"
        self.layers = nn.ModuleList(SVALayer(cfg.dim, cfg.heads, slots, self.context, eps)
                                    for _ in range(cfg.layers))

    def _slots(self, i: int) -> int:
        """Position-embedding rows of encoder ``i``: its largest window, 0 for one-token windows."""
        mh, mw = self.windows.max_window(i)
        return mh * mw if mh * mw > 1 else 0

    def forward(self, grids: Sequence[torch.Tensor]) -> torch.Tensor:
        latents = {n: self.inputs[n](g.flatten(1, 2)) for n, g in zip(self.names, grids)}  # [B, h*w, dim]
        first = latents[self.names[0]]
        context = first.mean(1, keepdim=True) if self.context else None  # [B, 1, dim]
        positions = {n: self.windows.positions(i, first.device) for i, n in enumerate(self.names)}
        queries = self.query.to(first.dtype).expand(first.shape[0], -1, -1)
        for layer in self.layers:
            queries = layer(queries, context, latents, positions, self.windows, self.backend)
        return queries

    def blocks(self) -> List[nn.Module]:
        """The aggregation layers (FSDP units)."""
        return list(self.layers)
