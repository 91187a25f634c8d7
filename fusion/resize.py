"""Resizing in float as PIL does it: :func:`resize_images` (``[B, C, H, W]`` in [0, 1]).

PIL's separable antialiased filter, done with ``torch.nn.functional.interpolate(...,
antialias=True)`` in float (no 8-bit quantisation), in PIL's order (width pass, then height
pass) with PIL's clamp of bicubic overshoot to [0, 1] after each pass. Used by the image
processor, the per-encoder inputs (:mod:`fusion.preprocess`) and the ROI crops (:mod:`fusion.roi`).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def resize_images(x: torch.Tensor, size: Tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """Resize ``x [B, C, H, W]`` (float, in [0, 1]) to ``[B, C, h, w]`` with ``size = (h, w)``.

    Antialiased like PIL and torchvision (``antialias=True`` also selects PIL's
    ``a = -0.5`` cubic when upsampling), width pass first, bicubic clamped to [0, 1]
    after each pass. An axis already at its target size is left untouched, so a
    same-size call returns ``x`` itself.
    """
    x = resize_axis(x, -1, size[1], interpolation)
    return resize_axis(x, -2, size[0], interpolation)


def resize_axis(x: torch.Tensor, dim: int, length: int, interpolation: str) -> torch.Tensor:
    """Resample one spatial axis (``dim`` -1: width, -2: height) of ``[B, C, H, W]`` to ``length``."""
    if x.shape[dim] == length:
        return x
    h, w = x.shape[-2:]
    size = (h, length) if dim == -1 else (length, w)
    out = F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)
    return out.clamp(0, 1) if interpolation == "bicubic" else out


def longest_side_shape(h: int, w: int, length: int) -> Tuple[int, int]:
    """``(h', w')`` with the longest side scaled to ``length``, rounded half up (SAM's rule)."""
    scale = length / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)
