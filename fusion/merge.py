"""Multi-granularity token merging: encoder grids ``[B, h_i, w_i, C_i]`` -> fused tokens.

Every grid is resampled to the target grid (``area`` = adaptive average pooling,
``bilinear`` = ``F.interpolate(align_corners=False)``), layer-normalised per encoder
(``norm: layernorm``) and combined:

- ``channel_concat`` (Eagle): ``[B, G*G, ΣC_i]``, channels in encoder order.
- ``sequence_concat`` (VSRE): ``[B, k*G*G, C]``, encoder after encoder. Widths must be
  equal, or ``fusion.width`` set: then each encoder's grid is first mapped to that
  width by its own trainable ``Linear``.
- ``sva`` (Cambrian's Spatial Vision Aggregator, :mod:`fusion.sva`): ``[B, G*G, dim]``,
  learned queries cross-attending to each cell's window in every encoder grid
  (instead of resampling; ``fusion.norm`` is its input projections' LayerNorm).

The work is done by :func:`fusion.kernels.grid_merge` (Triton on CUDA, PyTorch
otherwise, per ``fusion.kernels``). The granularity steps that turn the fused grid into
the whole token sequence (reduction, levels, ROI crops, position embedding) are
:class:`fusion.sequence.TokenSequence`'s.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import FusionConfig
from .kernels import grid_merge
from .sequence import MergedTokens, Segment, TokenSequence  # noqa: F401 (MergedTokens, Segment: re-exported)
from .sva import SpatialVisionAggregator


@dataclass(frozen=True)
class GridSpec:
    """What the merge needs to know of one encoder: its name, grid (h, w) and width."""

    name: str
    grid: Tuple[int, int]
    dim: int


class FusionMerge(nn.Module):
    """Aligns, normalises and combines encoder grids; owns the per-encoder LayerNorms."""

    def __init__(self, specs: Sequence[GridSpec], cfg: FusionConfig):
        super().__init__()
        self.specs = list(specs)
        self.cfg = cfg
        self.size = (cfg.grid, cfg.grid)
        widths = {s.name: s.dim for s in self.specs}
        self.adapters = nn.ModuleDict()
        self.layout = "sequence" if cfg.combine == "sequence_concat" else "channel"  # sva: one token per cell
        self.sva = None
        if cfg.combine == "sva":
            self.sva = SpatialVisionAggregator([(s.name, s.grid, s.dim) for s in self.specs], cfg.grid, cfg.sva,
                                               norm=cfg.norm == "layernorm", eps=cfg.eps, backend=cfg.kernels)
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
        if cfg.norm == "layernorm" and self.sva is None:
            self.norms = nn.ModuleDict({name: nn.LayerNorm(c, eps=cfg.eps) for name, c in widths.items()})
        if cfg.pos_embed == "sincos" and self.out_dim < 4:
            raise ValueError(f"fusion.pos_embed: 'sincos' needs a fused width of at least 4 channels, "
                             f"got {self.out_dim}; use pos_embed 'none'")

    @property
    def out_dim(self) -> int:
        """Width of each fused token."""
        if self.sva is not None:
            return self.sva.dim
        widths = list(self.widths.values())
        return sum(widths) if self.layout == "channel" else widths[0]

    @property
    def grid_tokens(self) -> int:
        """Tokens of the fused grid(s), what :meth:`forward` returns: ``G*G`` (``k*G*G`` for sequence)."""
        per_grid = self.size[0] * self.size[1]
        return per_grid if self.layout == "channel" else per_grid * len(self.specs)

    def sequence(self, grids: Dict[str, torch.Tensor], roi_grids: Optional[Dict[str, torch.Tensor]] = None,
                 roi_boxes: Optional[torch.Tensor] = None, roi_order: Optional[torch.Tensor] = None,
                 ) -> MergedTokens:
        """Deprecated: ``tower.fuse(grids)``, or :class:`fusion.sequence.TokenSequence` on :meth:`forward`'s output."""
        warnings.warn("FusionMerge.sequence is deprecated; use tower.fuse(encoder_grids) or "
                      "fusion.sequence.TokenSequence(cfg, names)(merge(grids), grids)", DeprecationWarning,
                      stacklevel=2)
        steps = TokenSequence(self.cfg, [s.name for s in self.specs])
        crops = None if roi_grids is None else self(roi_grids)
        return steps(self(grids), grids, crops, roi_boxes, roi_order)

    def forward(self, grids: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``grids``: name -> ``[B, h, w, C]``; returns the fused grid tokens ``[B, N, out_dim]``
        (``N`` = :attr:`grid_tokens`) in the norms' dtype; :class:`fusion.sequence.TokenSequence` builds the rest."""
        dtype = self._dtype(grids)
        ordered = []
        for spec in self.specs:
            x = grids[spec.name].to(dtype)
            if spec.name in self.adapters:
                x = self.adapters[spec.name](x)
            ordered.append(x)
        if self.sva is not None:
            return self.sva(ordered)
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
