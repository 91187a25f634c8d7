"""Content-aware token reduction of the fused grid (``fusion.reduce``): ToMe's bipartite matching.

``fusion.reduce: {method: bipartite, keep: K, metric: fused}`` reduces the fused grid
tokens ``[B, N, C]`` to ``K`` with :func:`fusion.kernels.bipartite_merge.reduce_to`
(ToMe, Bolya et al. 2023: alternate A/B split, cosine similarity of the metric, each A
token's best B partner, the ``r`` most similar edges merged by size-weighted mean,
repeated while more than half must go). Where it sits in the tower: after the merge
(and its LayerNorms), on the fused grid only, before levels are appended (levels are
pooled from the full grid), before the position embedding and the projector.

- ``metric: fused``: similarity of the fused tokens themselves.
- ``metric: <encoder name>``: similarity of that encoder's grid aligned to the fused grid
  (resampled with ``fusion.resample``, no LayerNorm; cosine ignores the scale).

Bookkeeping: each output token's ``size`` is the number of fused grid tokens merged
into it, and its box is the union (enclosing box) of theirs. Output order is ToMe's
(kept A tokens by rank, then the B tokens), not spatial: read the boxes. The outputs
differ per image, so ``token_boxes`` becomes ``[B, N, 4]`` when reduction is on.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .boxes import union_boxes
from .config import ReduceConfig
from .kernels import grid_merge
from .kernels.bipartite_merge import reduce_to


class TokenReducer:
    """Reduces ``[B, N, C]`` fused grid tokens to ``cfg.keep`` (no parameters)."""

    def __init__(self, cfg: ReduceConfig, grid: int, resample: str = "area", backend: str = "auto"):
        self.cfg = cfg
        self.keep = int(cfg.keep)
        self.grid = grid
        self.resample = resample
        self.backend = backend

    def metric(self, fused: torch.Tensor, grids: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, N, Cm]`` similarity features: the fused tokens, or one encoder's aligned grid."""
        if self.cfg.metric == "fused":
            return fused  # reduce_to detaches it, and reuses the merged tokens as the next step's metric
        g = grids[self.cfg.metric].detach()
        with torch.no_grad():
            return grid_merge([g.to(fused.dtype)], self.grid, mode=self.resample, norms=None, layout="channel",
                              backend=self.backend)

    def __call__(self, fused: torch.Tensor, boxes: torch.Tensor, grids: Dict[str, torch.Tensor],
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``fused [B, N, C]``, ``boxes [N, 4]`` -> ``(tokens [B, K, C], boxes [B, K, 4], sizes [B, K])``."""
        metric = self.metric(fused, grids)
        tokens, sizes, assignment = reduce_to(fused, metric, self.keep, backend=self.backend)
        return tokens, union_boxes(boxes.to(fused.device), assignment, self.keep), sizes
