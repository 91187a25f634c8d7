"""Fixed 2-D sin-cos position embedding of token box centres (``fusion.pos_embed: sincos``).

MAE's 2-D sin-cos embedding (Chen/He et al.), evaluated at each token's box centre
instead of at integer grid positions, so tokens from every level, ROI crop or merge get
an embedding of where they are. With width ``D`` and ``q = D // 4`` frequencies
``ω_k = 10000^(-k/q)`` (k = 0 … q-1), and the centre in fused-grid cell units
``(px, py) = G · ((x0 + x1) / 2, (y0 + y1) / 2)`` (``G = fusion.grid``, so the fused token
in column ``j`` sits at ``px = j + 0.5``):

    emb = [sin(px ω), cos(px ω), sin(py ω), cos(py ω), 0 …]

each block ``q`` wide, the last ``D - 4q`` channels zero. It is added to the fused tokens
before the projector (width = the fused width), and has no parameters.
"""
from __future__ import annotations

import torch

POS_EMBED_BASE = 10000.0  # MAE / Transformer frequency base


def sincos_2d(boxes: torch.Tensor, dim: int, grid: int) -> torch.Tensor:
    """``boxes [..., 4]`` (normalised xyxy) -> ``[..., dim]`` float32 embeddings of their centres."""
    if dim < 4:
        raise ValueError(f"fusion.pos_embed: 'sincos' needs a fused width of at least 4 channels, got {dim}")
    q = dim // 4
    omega = POS_EMBED_BASE ** (-torch.arange(q, dtype=torch.float64, device=boxes.device) / q)  # [q]
    b = boxes.to(torch.float64)
    px = (b[..., 0] + b[..., 2]) * (grid / 2)  # [...]
    py = (b[..., 1] + b[..., 3]) * (grid / 2)
    ax, ay = px[..., None] * omega, py[..., None] * omega  # [..., q]
    parts = [ax.sin(), ax.cos(), ay.sin(), ay.cos()]
    pad = dim - 4 * q
    if pad:
        parts.append(b.new_zeros(*b.shape[:-1], pad))
    return torch.cat(parts, dim=-1).to(torch.float32)
