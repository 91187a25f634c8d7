"""Cambrian's Spatial Vision Aggregator written the way ``cambrian/model/vision_sampler.py``
computes it (reshape-and-SDPA): the test oracle and the benchmark baseline for
:mod:`fusion.sva`. It shares no code with fusion.sva or fusion.kernels.

Every query cell becomes its own batch row: each encoder's tokens are rearranged into
``[B*G*G, window, dim]`` copies, the position embedding is added to the copies, LayerNorm
and the key / value projections run on every copy, and ``F.scaled_dot_product_attention``
takes one query per row over the concatenated windows with a boolean mask.

- Grids that are multiples of ``G`` use Cambrian's own rearrangement (``view`` +
  ``permute``, ``rearrange_vision_tower_features_*`` in ``cambrian_arch.py``) and its
  position embedding ``pos[None]`` on window slots: Cambrian's arithmetic exactly.
- Other grids (Cambrian refuses them) gather each cell's area window, padded to the
  largest window and masked, with windows derived from ATen's ``adaptive_avg_pool1d``
  (the inputs with a non-zero weight). The copy in a slot gets the embedding of its
  token's position in its *primary* window (the cell containing the token's centre),
  fusion's choice for overlapping windows, which equals the slot index when windows do
  not overlap.

Module names follow Cambrian's (``mm_projector_aux_{i}``, ``vision_query``,
``layers.{l}.cross_attn.k_proj_{i}``, ``pos_embed_{i}``); :func:`load_from_sva` copies
the weights of a :class:`fusion.sva.SpatialVisionAggregator` into it.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _axis_windows(n_in: int, n_out: int) -> List[List[int]]:
    """Per output index, the inputs ``adaptive_avg_pool1d`` gives a non-zero weight."""
    w = F.adaptive_avg_pool1d(torch.eye(n_in, dtype=torch.float64).unsqueeze(1), n_out).squeeze(1)  # [in, out]
    return [torch.nonzero(w[:, i] > 0).flatten().tolist() for i in range(n_out)]


def _window_table(grid: Tuple[int, int], G: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token [G*G, L], slot position [G*G, L], valid [G*G, L])`` of each cell's window."""
    h, w = grid
    rows, cols = _axis_windows(h, G), _axis_windows(w, G)
    mh, mw = max(map(len, rows)), max(map(len, cols))

    def primary(r: int, runs: List[List[int]], n: int) -> int:
        return runs[int((r + 0.5) * G / n)].index(r)

    tok, pos, valid = [], [], []
    for ry in rows:
        for cx in cols:
            cell = [(r, c) for r in ry for c in cx]
            pad = mh * mw - len(cell)
            tok.append([r * w + c for r, c in cell] + [0] * pad)
            pos.append([primary(r, rows, h) * mw + primary(c, cols, w) for r, c in cell] + [0] * pad)
            valid.append([True] * len(cell) + [False] * pad)
    return torch.tensor(tok), torch.tensor(pos), torch.tensor(valid)


class MLP(nn.Module):
    def __init__(self, d_in, d_hidden, d_out):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_hidden, bias=False)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_hidden, d_out, bias=False)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


class MultiKVCrossAttention(nn.Module):
    def __init__(self, dim: int, n_kv: int, heads: int, eps: float):
        super().__init__()
        self.heads, self.n_kv = heads, n_kv
        self.q_proj = nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim, bias=False))
        for i in range(n_kv):
            setattr(self, f"k_proj_{i}", nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim, bias=False)))
            setattr(self, f"v_proj_{i}", nn.Sequential(nn.LayerNorm(dim, eps=eps), nn.Linear(dim, dim, bias=False)))
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, queries, latents, masks):
        """``queries [R, 1, D]``, ``latents[i] [R, L_i, D]``, ``masks[i] [R, 1, 1, L_i]`` bool."""
        R, q_len, D = queries.shape
        d = D // self.heads
        q = self.q_proj(queries)
        k = torch.cat([getattr(self, f"k_proj_{i}")(x) for i, x in enumerate(latents)], 1)
        v = torch.cat([getattr(self, f"v_proj_{i}")(x) for i, x in enumerate(latents)], 1)
        q = q.view(R, q_len, self.heads, d).transpose(1, 2)
        k = k.view(R, -1, self.heads, d).transpose(1, 2)
        v = v.view(R, -1, self.heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.cat(masks, -1))
        return self.o_proj(out.transpose(1, 2).reshape(R, q_len, D))


class VisionCrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, kv_sizes: Sequence[int], heads: int, context: bool, eps: float):
        super().__init__()
        self.context = context
        if context:
            self.proj_context = nn.Linear(dim, dim, bias=False)
        self.proj_in = nn.Linear(2 * dim if context else dim, dim, bias=False)
        self.proj_out = MLP(dim, dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = MultiKVCrossAttention(dim, len(kv_sizes), heads, eps)
        for i, size in enumerate(kv_sizes):
            if size > 1:
                setattr(self, f"pos_embed_{i}", nn.Parameter(torch.randn(size, dim)))

    def forward(self, queries, context, latents, slot_pos, masks):
        residual = queries
        if self.context:
            queries = torch.cat([queries, self.proj_context(context)], -1)
        queries = self.proj_in(queries)
        with_pos = []
        for i, x in enumerate(latents):
            if hasattr(self, f"pos_embed_{i}"):
                pe = getattr(self, f"pos_embed_{i}")
                x = x + (pe[None, :, :] if slot_pos[i] is None else pe[slot_pos[i]])
            with_pos.append(x)
        queries = queries + self.cross_attn(queries, with_pos, masks)
        queries = self.proj_out(self.norm(queries))
        return queries + residual


class CambrianSVA(nn.Module):
    """``forward(grids)``: list of ``[B, h_i, w_i, C_i]`` -> ``[B, G*G, dim]``."""

    def __init__(self, grids: Sequence[Tuple[int, int]], channels: Sequence[int], G: int, dim: int, heads: int,
                 layers: int, context: bool = True, norm: bool = True, eps: float = 1e-5, queries: int = 1):
        super().__init__()
        self.grids, self.G, self.context = [tuple(g) for g in grids], G, context
        self.tables = [_window_table(g, G) for g in self.grids]
        for i, c in enumerate(channels):
            setattr(self, f"mm_projector_aux_{i}", nn.Sequential(
                nn.Linear(c, dim), nn.GELU(), nn.Linear(dim, dim),
                nn.LayerNorm(dim, eps=eps) if norm else nn.Identity()))
        self.vision_query = nn.Parameter(torch.randn(queries, dim))
        kv_sizes = [t[0].shape[1] for t in self.tables]
        self.layers = nn.ModuleList(VisionCrossAttentionLayer(dim, kv_sizes, heads, context, eps)
                                    for _ in range(layers))

    def _rearrange(self, i: int, feats: torch.Tensor):
        """``[B, h*w, D]`` -> ``([B*G*G, window, D], slot positions or None, mask [B*G*G, 1, 1, L])``."""
        (h, w), G = self.grids[i], self.G
        B, _, D = feats.shape
        if h % G == 0 and w % G == 0 and h // G == w // G:  # Cambrian's own rearrangement
            k = h // G
            x = feats.view(B, G, k, G, k, D).permute(0, 1, 3, 2, 4, 5).contiguous().flatten(0, 2).flatten(1, 2)
            return x, None, torch.ones(B * G * G, 1, 1, k * k, dtype=torch.bool, device=feats.device)
        tok, pos, valid = (t.to(feats.device) for t in self.tables[i])
        x = feats[:, tok.flatten()].view(B * G * G, tok.shape[1], D)
        mask = valid[None].expand(B, -1, -1).reshape(B * G * G, 1, 1, -1)
        return x, pos.repeat(B, 1), mask

    def forward(self, grids: Sequence[torch.Tensor]) -> torch.Tensor:
        B, GG = grids[0].shape[0], self.G * self.G
        feats = [getattr(self, f"mm_projector_aux_{i}")(g.flatten(1, 2)) for i, g in enumerate(grids)]
        context = feats[0].mean(1).view(B, 1, 1, -1).expand(-1, GG, 1, -1).flatten(0, 1)  # [B*G*G, 1, D]
        queries = self.vision_query.view(1, -1, 1, feats[0].shape[-1]).expand(B, GG, -1, -1).flatten(0, 1)
        parts = [self._rearrange(i, f) for i, f in enumerate(feats)]
        latents, slot_pos, masks = [p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts]
        for layer in self.layers:
            queries = layer(queries, context, latents, slot_pos, masks)
        return queries.view(B, GG, -1)


def load_from_sva(ref: CambrianSVA, sva) -> None:
    """Copy a :class:`fusion.sva.SpatialVisionAggregator`'s weights into ``ref`` (Cambrian names)."""
    index = {name: i for i, name in enumerate(sva.names)}
    state = {}
    for key, value in sva.state_dict().items():
        parts = key.split(".")
        if parts[0] == "inputs":
            parts = [f"mm_projector_aux_{index[parts[1]]}"] + parts[2:]
        elif parts[0] == "query":
            parts = ["vision_query"]
            if ref.vision_query.shape[0] == 1:  # Cambrian's single query: every cell's row must be it
                if not torch.equal(value, value[:1].expand_as(value)):
                    raise ValueError("sva.query: rows differ, but the reference has Cambrian's single query")
                value = value[:1]
        elif parts[2] == "pos_embed":
            parts = parts[:2] + [f"pos_embed_{index[parts[3]]}"]
        elif parts[3] in ("k_proj", "v_proj"):
            parts = parts[:3] + [f"{parts[3]}_{index[parts[4]]}"] + parts[5:]
        state[".".join(parts)] = value
    ref.load_state_dict(state, strict=True)
