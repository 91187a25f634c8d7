"""pyramid_pool: area-pool a token grid to several coarser levels."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

from . import _validate as V
from .reference import pyramid_pool_reference


def pyramid_pool(tokens: torch.Tensor, grid: Union[int, Tuple[int, int]],
                 levels: Sequence[Union[int, Tuple[int, int]]], backend: str = "auto") -> torch.Tensor:
    """``[B, H*W, C]`` on ``grid`` -> ``[B, sum l_h*l_w, C]``, levels in the order given."""
    H, W = V.check_size("grid", grid)
    V.check_tokens(tokens, (H, W))
    lv = V.check_levels(levels, (H, W))
    be = V.resolve_backend(backend, tokens.device, True)
    return pyramid_pool_reference(tokens, (H, W), lv)
