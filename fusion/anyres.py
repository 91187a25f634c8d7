"""LLaVA-1.6 ("anyres") tiling: what it needs from the tower, checked with errors that name keys.

LLaVA-1.6 (LLaVA-NeXT) cuts an image into tiles of the tower's input side ``S``: it picks
the best ``[height, width]`` among ``image_grid_pinpoints`` (multiples of ``S``), resizes
and pads the image to it, cuts ``S x S`` tiles, and adds the whole image resized to
``S x S`` in front. The tower encodes every tile; with ``mm_patch_merge_type`` ``spatial``
/ ``spatial_unpad`` (LLaVA's code) or always (Hugging Face's ``LlavaNext``), each tile's
tokens are laid out as a ``g x g`` grid (``g = num_patches_per_side``) and the tiles are
stitched into one big grid. Two things must hold for that:

- the tower's ``N`` tokens per image are exactly its ``g x g`` fused grid. Features that
  append or remove tokens make ``N`` something else: ``fusion.levels`` (coarser levels
  appended), ``fusion.reduce`` (ToMe keeps ``keep`` tokens), ``fusion.combine:
  sequence_concat`` (one grid per encoder). ROI crops are never involved: they are passed
  to ``tower.forward`` by the caller, which LLaVA's ``vision_tower(images)`` never does.
- every pinpoint is a multiple of ``S`` (otherwise LLaVA cuts a partial tile and the grid
  shape it computes disagrees with the tiles it encoded).

``LLAVA16_TILES`` is LLaVA-1.6's own layout (its ``image_grid_pinpoints`` ``[[336, 672],
[672, 336], [672, 672], [1008, 336], [336, 1008]]`` in tiles of its 336-pixel CLIP);
:func:`default_pinpoints` gives it for any ``S``.
"""
from __future__ import annotations

import ast
from typing import Any, List

from .config import TowerConfig

# LLaVA-1.6's image_grid_pinpoints, as (tiles high, tiles wide).
LLAVA16_TILES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def default_pinpoints(tile: int) -> List[List[int]]:
    """LLaVA-1.6's ``image_grid_pinpoints`` for tiles of ``tile`` pixels (``[[S, 2S], [2S, S], ...]``)."""
    return [[rows * tile, cols * tile] for rows, cols in LLAVA16_TILES]


def non_grid_keys(config: TowerConfig) -> List[str]:
    """The config settings (``"key=value"``) that make the token count differ from ``grid ** 2``."""
    fusion = config.fusion
    found = []
    if fusion.extra_levels():
        found.append(f"fusion.levels={fusion.levels}")
    if fusion.reduce is not None:
        found.append(f"fusion.reduce (keep={fusion.reduce.keep})")
    if fusion.combine == "sequence_concat":
        found.append("fusion.combine=sequence_concat")
    return found


def check_token_grid(config: TowerConfig, context: str) -> None:
    """Raise a ``ValueError`` naming the keys if the tokens are not exactly the ``g x g`` fused grid.

    ``context`` says who lays the tokens out as a grid (e.g. ``"mm_patch_merge_type='spatial'"``).
    """
    found = non_grid_keys(config)
    if found:
        g = config.fusion.grid
        raise ValueError(f"{context} lays each image's tokens out as the tower's {g}x{g} grid, but {found} make the "
                         f"token count differ from {g * g}; remove them (e.g. the override 'fusion.levels=[]', "
                         f"'fusion.reduce=null', 'fusion.combine=channel_concat'), or use a layout that takes any "
                         f"token count (LLaVA: mm_patch_merge_type='flat')")


def parse_pinpoints(pinpoints: Any, tile: int, key: str = "image_grid_pinpoints") -> List[List[int]]:
    """``pinpoints`` (a list of ``[height, width]``, or its text as LLaVA stores it) checked to be
    positive multiples of ``tile``; returned as a list of ``[height, width]`` lists."""
    value = pinpoints
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)  # literals only, never code (LLaVA stores the list as text)
        except (ValueError, SyntaxError):
            raise ValueError(f"{key}: {pinpoints!r} is not a list of [height, width] pairs") from None
    pairs = list(value) if isinstance(value, (list, tuple)) else None
    if not pairs or any(not isinstance(p, (list, tuple)) or len(p) != 2 for p in pairs):
        raise ValueError(f"{key}: expected a non-empty list of [height, width] pairs, got {pinpoints!r}")
    bad = [list(p) for p in pairs
           if any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % tile for v in p)]
    if bad:
        raise ValueError(f"{key}: {bad} are not positive multiples of the tower's tile size {tile} (its "
                         f"image_size, the side of each anyres tile); use multiples of {tile}, e.g. LLaVA-1.6's "
                         f"layout for this tower: {default_pinpoints(tile)}")
    return [[int(h), int(w)] for h, w in pairs]


__all__ = ["LLAVA16_TILES", "check_token_grid", "default_pinpoints", "non_grid_keys", "parse_pinpoints"]
