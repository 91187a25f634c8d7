"""The token sequence of each image, one step per granularity, composed in :class:`TokenSequence`.

:class:`fusion.merge.FusionMerge` turns the encoder grids into the fused grid ``[B, N0, C]``
(``N0 = G*G``, ``k*G*G`` for ``sequence_concat``). :meth:`TokenSequence.__call__` then builds
the sequence before the projector, each step adding one :class:`TokenPart` (tokens, boxes in
normalised xyxy of the image frame, segment labels, sizes):

1. :class:`FusedGrid`: the fused grid itself, or :class:`Reduce`: ``fusion.reduce.keep``
   tokens ToMe-merged from it (:mod:`fusion.reduce`; per-image boxes and sizes);
2. :class:`LevelTokens`: the coarser ``fusion.levels``, pooled from the full fused grid
   (:mod:`fusion.levels`);
3. :class:`CropTokens`: the ROI crops' fused grids, ``r`` per image (:mod:`fusion.roi`), each
   crop token's box mapped into its crop's box;

then :func:`join` concatenates the parts and :class:`PosEmbed` (``fusion.pos_embed: sincos``)
adds the embedding of every token's box centre (:mod:`fusion.posembed`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .boxes import grid_boxes, map_into
from .config import FusionConfig
from .levels import Levels
from .posembed import sincos_2d
from .reduce import TokenReducer

Segment = Tuple[str, int, int]  # (label, start, end) of a slice of the token sequence


@dataclass
class TokenPart:
    """One step's tokens: ``tokens [B, n, C]``; ``boxes [n, 4]`` (every image alike) or
    ``[B, n, 4]``; ``segments``: ``(label, length)`` slices in order; ``sizes [B, n]`` (fused
    grid tokens merged into each token) or ``None`` (1 each)."""

    tokens: torch.Tensor
    boxes: torch.Tensor
    segments: List[Tuple[str, int]]
    sizes: Optional[torch.Tensor] = None


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


class FusedGrid:
    """Step 1: the fused grid ``[B, N0, C]`` as it is. ``groups``: ``None`` for one grid (segment
    ``fused``), else the labels of the ``k`` grids of ``sequence_concat`` (one segment each)."""

    def __init__(self, grid: int, groups: Optional[Sequence[str]] = None):
        self.grid = grid
        self.groups = list(groups) if groups is not None else None

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid * (1 if self.groups is None else len(self.groups))

    def segments(self) -> List[Tuple[str, int]]:
        if self.groups is None:
            return [("fused", self.num_tokens)]
        return [(label, self.grid * self.grid) for label in self.groups]

    def boxes(self) -> torch.Tensor:
        """``[N0, 4]`` boxes of the fused grid tokens (each grid's cells, grid after grid)."""
        boxes = grid_boxes(self.grid, self.grid)
        return boxes if self.groups is None else boxes.repeat(len(self.groups), 1)

    def __call__(self, fused: torch.Tensor, boxes: torch.Tensor) -> TokenPart:
        return TokenPart(fused, boxes, self.segments())


class Reduce:
    """Step 1 with ``fusion.reduce``: the fused grid ToMe-merged to ``keep`` tokens (segment ``fused``)."""

    def __init__(self, reducer: TokenReducer):
        self.reducer = reducer
        self.num_tokens = reducer.keep

    def __call__(self, fused: torch.Tensor, boxes: torch.Tensor, grids: Dict[str, torch.Tensor]) -> TokenPart:
        tokens, merged_boxes, sizes = self.reducer(fused, boxes, grids)
        return TokenPart(tokens, merged_boxes, [("fused", self.num_tokens)], sizes.float())


class LevelTokens:
    """Step 2: the coarser levels of the full fused grid (see :class:`fusion.levels.Levels`)."""

    def __init__(self, levels: Levels):
        self.levels = levels

    def __bool__(self) -> bool:
        return bool(self.levels)

    def segments(self) -> List[Tuple[str, int]]:
        return [(label, end - start) for label, start, end in self.levels.segments(0)]

    def __call__(self, fused: torch.Tensor) -> TokenPart:
        return TokenPart(self.levels.pool(fused), self.levels.boxes().to(fused.device), self.segments())


class CropTokens:
    """Step 3: each image's ROI crops, their fused grids appended in the image's crop order."""

    def __call__(self, crops: torch.Tensor, crop_boxes: torch.Tensor, order: torch.Tensor,
                 boxes: torch.Tensor) -> TokenPart:
        """``crops [R, N0, C]`` (the crops' fused grids), ``crop_boxes [R, 4]`` (each crop's box in its
        image), ``order [B, r]`` (the crop rows of each image), ``boxes [N0, 4]`` (fused grid boxes)."""
        R, N0, C = crops.shape
        B, r = order.shape
        rows = order.reshape(-1)
        # [B*r, N0, C] in each image's ROI order -> [B, r*N0, C]
        tokens = crops.index_select(0, rows).reshape(B, r * N0, C)
        outer = crop_boxes.to(crops.device).index_select(0, rows).view(B, r, 4)
        mapped = map_into(boxes, outer).reshape(B, r * N0, 4)  # [B, r, N0, 4] -> [B, r*N0, 4]
        return TokenPart(tokens, mapped, [(f"roi{k}", N0) for k in range(r)])


def join(parts: Sequence[TokenPart]) -> MergedTokens:
    """The parts in order as one sequence: tokens, boxes (``[B, N, 4]`` if any part's are per
    image), segments with their offsets, sizes (``None`` unless a part has them)."""
    B = parts[0].tokens.shape[0]
    segments, start = [], 0
    for part in parts:
        for label, n in part.segments:
            segments.append((label, start, start + n))
            start += n
    boxes = [p.boxes for p in parts]
    if any(b.dim() == 3 for b in boxes):
        boxes = [b if b.dim() == 3 else b.expand(B, *b.shape) for b in boxes]
    sizes = None
    if any(p.sizes is not None for p in parts):
        sizes = torch.cat([p.sizes if p.sizes is not None else p.tokens.new_ones(B, p.tokens.shape[1],
                                                                                 dtype=torch.float32)
                           for p in parts], dim=1)
    return MergedTokens(tokens=torch.cat([p.tokens for p in parts], dim=1), boxes=torch.cat(boxes, dim=-2),
                        segments=segments, sizes=sizes)


class PosEmbed:
    """Last step with ``fusion.pos_embed: sincos``: the sin-cos embedding of each token's box centre."""

    def __init__(self, grid: int):
        self.grid = grid

    def __call__(self, merged: MergedTokens) -> MergedTokens:
        tokens = merged.tokens
        embedding = sincos_2d(merged.boxes, tokens.shape[-1], self.grid).to(tokens.dtype)
        return MergedTokens(tokens + embedding, merged.boxes, merged.segments, merged.sizes)


class TokenSequence:
    """The granularity steps of ``cfg`` (a :class:`fusion.config.FusionConfig`) for encoders
    ``names`` (channel order), composed in :meth:`__call__`. No parameters: the merge has them."""

    def __init__(self, cfg: FusionConfig, names: Sequence[str]):
        groups = list(names) if cfg.combine == "sequence_concat" else None
        self.grid = FusedGrid(cfg.grid, groups)
        self.reduce = Reduce(TokenReducer(cfg.reduce, cfg.grid, cfg.resample, cfg.kernels)) if cfg.reduce else None
        self.levels = LevelTokens(Levels(cfg.grid, cfg.extra_levels(), groups=groups, backend=cfg.kernels))
        self.crops = CropTokens()
        self.pos_embed = PosEmbed(cfg.grid) if cfg.pos_embed == "sincos" else None

    def __call__(self, fused: torch.Tensor, grids: Dict[str, torch.Tensor], crops: Optional[torch.Tensor] = None,
                 crop_boxes: Optional[torch.Tensor] = None, crop_order: Optional[torch.Tensor] = None,
                 ) -> MergedTokens:
        """``fused [B, N0, C]`` (the merge of ``grids``, name -> ``[B, h, w, C]``) -> the sequence.
        ROI crops (all three or none): ``crops [R, N0, C]`` (their fused grids), ``crop_boxes [R, 4]``,
        ``crop_order [B, r]`` (see :class:`CropTokens`)."""
        boxes = self.grid.boxes().to(fused.device)
        parts = [self.reduce(fused, boxes, grids) if self.reduce is not None else self.grid(fused, boxes)]
        if self.levels:
            parts.append(self.levels(fused))
        if crops is not None:
            parts.append(self.crops(crops, crop_boxes, crop_order, boxes))
        merged = join(parts)
        return self.pos_embed(merged) if self.pos_embed is not None else merged

    @property
    def grid_tokens(self) -> int:
        """Tokens of the fused grid(s), ``N0``; each ROI crop adds this many."""
        return self.grid.num_tokens

    @property
    def num_tokens(self) -> int:
        """Tokens per image without ROI crops: the fused grid (or ``fusion.reduce.keep``) plus the levels."""
        first = self.reduce.num_tokens if self.reduce is not None else self.grid.num_tokens
        return first + self.levels.levels.num_tokens

    def segments(self) -> List[Segment]:
        """``(label, start, end)`` of each slice of the sequence (without ROI crops)."""
        first = [("fused", self.reduce.num_tokens)] if self.reduce is not None else self.grid.segments()
        out, start = [], 0
        for label, n in first + self.levels.segments():
            out.append((label, start, start + n))
            start += n
        return out

    def token_boxes(self) -> torch.Tensor:
        """``[N, 4]`` normalised xyxy region of each token (without ROI crops).

        With ``fusion.reduce`` the boxes depend on the image: read them from the output
        (``tower(..., return_dict=True).token_boxes``).
        """
        if self.reduce is not None:
            raise ValueError("fusion.reduce: with token reduction the boxes differ per image; read them from "
                             "tower(pixel_values, return_dict=True).token_boxes ([B, N, 4])")
        return torch.cat([self.grid.boxes(), self.levels.levels.boxes()])
