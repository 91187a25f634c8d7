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
otherwise, per ``fusion.kernels``).

:meth:`FusionMerge.sequence` then builds the full token sequence of one image, every
token with its box (normalised xyxy in the image frame), in this order:

1. the fused grid (``G*G`` tokens; ``k*G*G`` for ``sequence_concat``), or, with
   ``fusion.reduce``, ``keep`` tokens merged from it (:mod:`fusion.reduce`; per-image
   boxes = unions of the merged cells, and ``sizes``);
2. the coarser ``fusion.levels`` pooled from the full fused grid (:mod:`fusion.levels`);
3. the ROI crops' fused grids, ``r`` crops per image (:mod:`fusion.roi`), each crop
   token's box mapped into its crop's box.

With ``fusion.pos_embed: sincos`` a fixed sin-cos embedding of every token's box
centre is added last (:mod:`fusion.posembed`). All of it happens before the projector,
which stays per-token.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .boxes import grid_boxes, map_into
from .config import FusionConfig
from .kernels import grid_merge
from .levels import Levels
from .posembed import sincos_2d
from .reduce import TokenReducer
from .sva import SpatialVisionAggregator


@dataclass(frozen=True)
class GridSpec:
    """What the merge needs to know of one encoder: its name, grid (h, w) and width."""

    name: str
    grid: Tuple[int, int]
    dim: int


Segment = Tuple[str, int, int]  # (label, start, end) of a slice of the token sequence


@dataclass
class MergedTokens:
    """The fused token sequence before the projector, with its bookkeeping.

    - ``tokens``: ``[B, N, C]``.
    - ``boxes``: ``[N, 4]`` when every image has the same layout, ``[B, N, 4]`` when
      boxes differ per image (``fusion.reduce`` on, or ROI crops given).
    - ``segments``: ``(label, start, end)`` slices: ``fused`` (or one per encoder for
      ``sequence_concat`` without reduction), ``level<l>`` (``<encoder>/level<l>``),
      ``roi<k>``.
    - ``sizes``: ``None`` without ``fusion.reduce``; else ``[B, N]``: how many fused grid
      tokens each reduced token merges (1 for level and ROI tokens).
    """

    tokens: torch.Tensor
    boxes: torch.Tensor
    segments: List[Segment]
    sizes: Optional[torch.Tensor] = None


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
        groups = None if self.layout == "channel" else [s.name for s in self.specs]
        self.levels = Levels(cfg.grid, cfg.extra_levels(), groups=groups, backend=cfg.kernels)
        self.reducer = (TokenReducer(cfg.reduce, cfg.grid, cfg.resample, cfg.kernels)
                        if cfg.reduce is not None else None)
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

    @property
    def num_tokens(self) -> int:
        """Tokens per image in :meth:`sequence` without ROI crops: the fused grid (or
        ``fusion.reduce.keep``) plus the levels. Each ROI crop adds :attr:`grid_tokens`."""
        base = self.reducer.keep if self.reducer is not None else self.grid_tokens
        return base + self.levels.num_tokens

    def segments(self) -> List[Segment]:
        """``(label, start, end)`` of each slice of the sequence (without ROI crops)."""
        if self.reducer is not None:
            base = [("fused", 0, self.reducer.keep)]
        elif self.layout == "channel":
            base = [("fused", 0, self.grid_tokens)]
        else:
            per_grid = self.size[0] * self.size[1]
            base = [(s.name, i * per_grid, (i + 1) * per_grid) for i, s in enumerate(self.specs)]
        return base + self.levels.segments(base[-1][2])

    def grid_boxes(self) -> torch.Tensor:
        """``[grid_tokens, 4]`` boxes of the fused grid tokens (what :meth:`forward` returns)."""
        boxes = grid_boxes(*self.size)
        return boxes if self.layout == "channel" else boxes.repeat(len(self.specs), 1)

    def token_boxes(self) -> torch.Tensor:
        """``[N, 4]`` normalised xyxy region of each token of the sequence (without ROI crops).

        With ``fusion.reduce`` the boxes depend on the image: read them from
        :meth:`sequence` (``tower(..., return_dict=True).token_boxes``).
        """
        if self.reducer is not None:
            raise ValueError("fusion.reduce: with token reduction the boxes differ per image; read them from "
                             "tower(pixel_values, return_dict=True).token_boxes ([B, N, 4])")
        return torch.cat([self.grid_boxes(), self.levels.boxes()])

    def sequence(self, grids: Dict[str, torch.Tensor], roi_grids: Optional[Dict[str, torch.Tensor]] = None,
                 roi_boxes: Optional[torch.Tensor] = None, roi_order: Optional[torch.Tensor] = None,
                 ) -> MergedTokens:
        """The whole sequence before the projector (see the module docstring for the order).

        ``grids``: name -> ``[B, h, w, C]``. ROI crops (optional, all three together):
        ``roi_grids`` name -> ``[R, h, w, C]`` (the crops' encoder grids), ``roi_boxes [R, 4]``
        (each crop's box in the image), ``roi_order [B, r]`` (the crop rows of each image).
        """
        full = self(grids)  # [B, N0, C]
        B, N0, C = full.shape
        dev = full.device
        boxes = self.grid_boxes().to(dev)
        segments = self.segments()
        parts, box_parts, sizes = [full], [boxes], None
        if self.reducer is not None:
            reduced, red_boxes, red_sizes = self.reducer(full, boxes, grids)
            parts, box_parts = [reduced], [red_boxes]
            sizes = red_sizes.float()
        if self.levels:
            parts.append(self.levels.pool(full))
            box_parts.append(self.levels.boxes().to(dev))
        if roi_grids is not None:
            r = roi_order.shape[1]
            roi_fused = self(roi_grids)  # [R, N0, C]
            # [B*r, N0, C] in each image's ROI order -> [B, r*N0, C]
            parts.append(roi_fused.index_select(0, roi_order.reshape(-1)).reshape(B, r * N0, C))
            outer = roi_boxes.to(dev).index_select(0, roi_order.reshape(-1)).view(B, r, 4)
            box_parts.append(map_into(boxes, outer).reshape(B, r * N0, 4))  # [B, r, N0, 4] -> [B, r*N0, 4]
            start = segments[-1][2]
            segments = segments + [(f"roi{k}", start + k * N0, start + (k + 1) * N0) for k in range(r)]
        if any(b.dim() == 3 for b in box_parts):
            box_parts = [b if b.dim() == 3 else b.expand(B, *b.shape) for b in box_parts]
        token_boxes = torch.cat(box_parts, dim=-2)
        tokens = torch.cat(parts, dim=1)
        if sizes is not None:
            sizes = torch.cat([sizes, sizes.new_ones(B, tokens.shape[1] - sizes.shape[1])], dim=1)
        if self.cfg.pos_embed == "sincos":
            tokens = tokens + sincos_2d(token_boxes, C, self.cfg.grid).to(tokens.dtype)
        return MergedTokens(tokens=tokens, boxes=token_boxes, segments=segments, sizes=sizes)

    def forward(self, grids: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``grids``: name -> ``[B, h, w, C]``; returns the fused grid tokens ``[B, N, out_dim]``
        (``N`` = :attr:`grid_tokens`) in the norms' dtype. :meth:`sequence` builds the rest."""
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
