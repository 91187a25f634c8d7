"""Multi-granularity token merging: encoder grids ``[B, h_i, w_i, C_i]`` -> fused tokens.

Every grid is resampled to the target grid (``area`` = adaptive average pooling,
``bilinear`` = ``F.interpolate(align_corners=False)``), layer-normalised per encoder
(``norm: layernorm``) and combined:

- ``channel_concat`` (Eagle): ``[B, G*G, ΣC_i]``, channels in encoder order.
- ``sequence_concat`` (VSRE): ``[B, k*G*G, C]``, encoder after encoder. Widths must be
  equal, or ``fusion.width`` set: then each encoder's grid is first mapped to that
  width by its own trainable ``Linear``.

The work is done by :func:`fusion.kernels.grid_merge` (Triton on CUDA, PyTorch
otherwise, per ``fusion.kernels``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from .boxes import grid_boxes
from .config import FusionConfig
from .kernels import grid_merge


@dataclass(frozen=True)
class GridSpec:
    """What the merge needs to know of one encoder: its name, grid (h, w) and width."""

    name: str
    grid: Tuple[int, int]
    dim: int


Segment = Tuple[str, int, int]  # (label, start, end) of a slice of the token sequence


class FusionMerge(nn.Module):
    """Aligns, normalises and combines encoder grids; owns the per-encoder LayerNorms."""

    def __init__(self, specs: Sequence[GridSpec], cfg: FusionConfig):
        super().__init__()
        self.specs = list(specs)
        self.cfg = cfg
        self.size = (cfg.grid, cfg.grid)
        widths = {s.name: s.dim for s in self.specs}
        self.adapters = nn.ModuleDict()
        self.layout = "channel" if cfg.combine == "channel_concat" else "sequence"
        if self.layout == "sequence":
            if cfg.width is not None:
                self.adapters = nn.ModuleDict({s.name: nn.Linear(s.dim, cfg.width) for s in self.specs})
                widths = {s.name: cfg.width for s in self.specs}
            elif len(set(widths.values())) > 1:
                raise ValueError(
                    f"fusion.combine: 'sequence_concat' appends tokens, so every encoder needs the same "
                    f"width, but the widths are {widths}; set fusion.width to project each encoder to a "
                    f"common width, or use combine 'channel_concat'"
                )
        self.widths = widths
        self.norms = nn.ModuleDict()
        if cfg.norm == "layernorm":
            self.norms = nn.ModuleDict({name: nn.LayerNorm(c, eps=cfg.eps) for name, c in widths.items()})

    @property
    def out_dim(self) -> int:
        """Width of each fused token."""
        widths = list(self.widths.values())
        return sum(widths) if self.layout == "channel" else widths[0]

    @property
    def num_tokens(self) -> int:
        per_grid = self.size[0] * self.size[1]
        return per_grid if self.layout == "channel" else per_grid * len(self.specs)

    def segments(self) -> List[Segment]:
        """``(label, start, end)`` of each slice of the fused sequence."""
        per_grid = self.size[0] * self.size[1]
        if self.layout == "channel":
            return [("fused", 0, per_grid)]
        return [(s.name, i * per_grid, (i + 1) * per_grid) for i, s in enumerate(self.specs)]

    def token_boxes(self) -> torch.Tensor:
        """``[N, 4]`` normalised xyxy region of each fused token."""
        boxes = grid_boxes(*self.size)
        return boxes if self.layout == "channel" else boxes.repeat(len(self.specs), 1)

    def forward(self, grids: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``grids``: name -> ``[B, h, w, C]``; returns ``[B, N, out_dim]`` in the norms' dtype."""
        dtype = self._dtype(grids)
        ordered = []
        for spec in self.specs:
            x = grids[spec.name].to(dtype)
            if spec.name in self.adapters:
                x = self.adapters[spec.name](x)
            ordered.append(x)
        norms = None
        if len(self.norms):
            norms = [(self.norms[s.name].weight, self.norms[s.name].bias) for s in self.specs]
        return grid_merge(ordered, self.size, mode=self.cfg.resample, norms=norms, eps=self.cfg.eps,
                          layout=self.layout, backend=self.cfg.kernels)

    def _dtype(self, grids: Dict[str, torch.Tensor]) -> torch.dtype:
        params = list(self.parameters())
        if params:
            return params[0].dtype
        return functools.reduce(torch.promote_types, [g.dtype for g in grids.values()])
