"""Token boxes: the normalised ``xyxy`` image region each token covers.

Boxes are in full-image coordinates, ``x`` to the right and ``y`` down, both in
[0, 1]. A token ``(i, j)`` of an ``h × w`` grid (row ``i``, column ``j``) covers
``[j / w, i / h, (j + 1) / w, (i + 1) / h]``.
"""
from __future__ import annotations

import torch


def grid_boxes(h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boxes of an ``h × w`` grid in row-major token order: ``[h * w, 4]`` (x0, y0, x1, y1)."""
    if h < 1 or w < 1:
        raise ValueError(f"grid_boxes: h and w must be >= 1, got h={h}, w={w}")
    ys = torch.arange(h, dtype=torch.float64)
    xs = torch.arange(w, dtype=torch.float64)
    y0 = (ys / h)[:, None].expand(h, w)
    y1 = ((ys + 1) / h)[:, None].expand(h, w)
    x0 = (xs / w)[None, :].expand(h, w)
    x1 = ((xs + 1) / w)[None, :].expand(h, w)
    # [h, w, 4] -> [h * w, 4]
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(h * w, 4).to(dtype)
