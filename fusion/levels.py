"""Granularity levels: coarser area-pooled copies of the fused grid appended to the sequence.

``fusion.levels: [12, 6]`` on a 24-grid appends a 12×12 and a 6×6 area pooling of the
fused ``24×24`` tokens (after the merge's LayerNorms, before the projector, so the
projector stays per-token), pooled by :func:`fusion.kernels.pyramid_pool` from one read.
With ``combine: sequence_concat`` the fused sequence holds one grid per encoder, and each
encoder's grid gets its own levels, encoder after encoder (segments
``"<encoder>/level12"``); with ``channel_concat`` the segments are ``"level12"``, ...

A level token's box is the union of the fused cells it averages. Area pooling
(``adaptive_avg_pool2d``) from ``G`` to ``l`` averages, along each axis, cells
``floor(i*G/l)`` to ``ceil((i+1)*G/l) - 1``, so level token ``(i, j)`` covers
``[floor(j*G/l)/G, floor(i*G/l)/G, ceil((j+1)*G/l)/G, ceil((i+1)*G/l)/G]``: exactly
``[j/l, i/l, (j+1)/l, (i+1)/l]`` when ``l`` divides ``G``, a little wider (boxes of
neighbours overlap by the shared boundary cell) when it does not.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .kernels import pyramid_pool

Segment = Tuple[str, int, int]


def pooled_boxes(grid: int, level: int) -> torch.Tensor:
    """``[level², 4]`` boxes of an ``level × level`` area pooling of a ``grid × grid`` grid (row-major)."""
    i = torch.arange(level, dtype=torch.int64)
    lo = torch.div(i * grid, level, rounding_mode="floor").double() / grid  # first averaged cell's edge
    hi = torch.div((i + 1) * grid + level - 1, level, rounding_mode="floor").double() / grid  # last's far edge
    x0, y0 = lo[None, :].expand(level, level), lo[:, None].expand(level, level)
    x1, y1 = hi[None, :].expand(level, level), hi[:, None].expand(level, level)
    # [l, l, 4] -> [l*l, 4]
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(level * level, 4).to(torch.float32)


class Levels:
    """The level plan of one tower: which levels, their token count, boxes and segments.

    ``grid``: the fused grid side ``G``; ``levels``: the appended level sides (each < ``G``);
    ``groups``: ``None`` for one fused grid (channel layout), else the labels of the
    ``k`` grids of a sequence layout, in order.
    """

    def __init__(self, grid: int, levels: Sequence[int], groups: Optional[Sequence[str]] = None,
                 backend: str = "auto"):
        self.grid = grid
        self.levels = [int(lv) for lv in levels]
        self.groups = list(groups) if groups is not None else None
        self.backend = backend

    def __bool__(self) -> bool:
        return bool(self.levels)

    @property
    def n_grids(self) -> int:
        return 1 if self.groups is None else len(self.groups)

    @property
    def per_grid(self) -> int:
        """Level tokens per fused grid: ``Σ l²``."""
        return sum(lv * lv for lv in self.levels)

    @property
    def num_tokens(self) -> int:
        """Level tokens per image."""
        return self.per_grid * self.n_grids

    def labels(self) -> List[str]:
        prefixes = [""] if self.groups is None else [f"{g}/" for g in self.groups]
        return [f"{p}level{lv}" for p in prefixes for lv in self.levels]

    def segments(self, start: int) -> List[Segment]:
        """``(label, start, end)`` of each level slice, the first starting at ``start``."""
        sizes = [lv * lv for lv in self.levels] * self.n_grids
        out = []
        for label, n in zip(self.labels(), sizes):
            out.append((label, start, start + n))
            start += n
        return out

    def boxes(self) -> torch.Tensor:
        """``[num_tokens, 4]`` boxes of the level tokens in sequence order."""
        if not self.levels:
            return torch.zeros(0, 4)
        one = torch.cat([pooled_boxes(self.grid, lv) for lv in self.levels])
        return one.repeat(self.n_grids, 1)

    def pool(self, fused: torch.Tensor) -> torch.Tensor:
        """``fused [B, k*G*G, C]`` (``k`` grids, row-major each) -> level tokens ``[B, k*Σl², C]``."""
        B, N, C = fused.shape
        k, g = self.n_grids, self.grid
        if N != k * g * g:
            raise ValueError(f"fused: expected {k} x {g}x{g} = {k * g * g} tokens, got {N}")
        # [B, k*G*G, C] -> [B*k, G*G, C] -> [B*k, Σl², C] -> [B, k*Σl², C]
        pooled = pyramid_pool(fused.reshape(B * k, g * g, C), (g, g), self.levels, backend=self.backend)
        return pooled.reshape(B, k * self.per_grid, C)
