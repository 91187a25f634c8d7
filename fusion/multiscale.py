"""Multi-scale encoders (S2, "scaling on scales", Shi et al. 2024): ``encoders.<name>.scales``.

``scales: [1, 2]`` runs the encoder on the image at its input size ``S`` and at ``2S``.
The ``sS`` image (resized and normalised on the device like the plain input, see
:class:`fusion.preprocess.EncoderInputs`) is split into ``s × s`` tiles of ``S × S``
(:func:`split_tiles`); the tiles of every scale go through the encoder as ONE batch; each
scale's tile grids are stitched back into one ``s·h × s·w`` grid (:func:`stitch_tiles`)
and area-pooled to the encoder's base grid ``h × w`` (:func:`fusion.kernels.pyramid_pool`);
the scales are concatenated on channels in the order listed. The token count is
unchanged and the encoder's width becomes ``dim × len(scales)``. ``scales: [1]`` (the
default) is the plain encoder, computed by exactly the same code path as before.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Iterable, List, Sequence

import torch

from .kernels import pyramid_pool


def scales_of(enc) -> List[int]:
    """The encoder's ``scales`` (``[1]`` when its config has none)."""
    return list(getattr(enc.cfg, "scales", None) or [1])


def is_multiscale(enc) -> bool:
    return scales_of(enc) != [1]


def scaled_dim(enc) -> int:
    """Channels of the encoder's (multi-scale) grid: ``dim × len(scales)``."""
    return enc.dim * len(scales_of(enc))


def scaled_name(name: str, scale: int) -> str:
    """Key of the encoder's input at ``scale`` in :class:`~fusion.preprocess.EncoderInputs`' output."""
    return name if scale == 1 else f"{name}@{scale}x"


def scaled_input_specs(encoders: Iterable) -> List[SimpleNamespace]:
    """Input requests for the scales above 1: ``image_size = s × S``, the encoder's normalisation."""
    specs = []
    for enc in encoders:
        for s in scales_of(enc):
            if s != 1:
                specs.append(SimpleNamespace(name=scaled_name(enc.name, s), image_size=s * enc.image_size,
                                             mean=enc.mean, std=enc.std, resize=enc.resize,
                                             interpolation=enc.interpolation))
    return specs


def split_tiles(x: torch.Tensor, s: int) -> torch.Tensor:
    """``[B, C, s·T, s·T]`` -> ``[B·s², C, T, T]``: tile ``(ty, tx)`` of image ``b`` at ``b·s² + ty·s + tx``."""
    B, C, H, W = x.shape
    if H % s or W % s:
        raise ValueError(f"split_tiles: a {H}x{W} image does not split into {s}x{s} equal tiles")
    th, tw = H // s, W // s
    # [B, C, s, th, s, tw] -> [B, s(ty), s(tx), C, th, tw]
    return x.reshape(B, C, s, th, s, tw).permute(0, 2, 4, 1, 3, 5).reshape(B * s * s, C, th, tw)


def stitch_tiles(grids: torch.Tensor, s: int) -> torch.Tensor:
    """``[B·s², h, w, C]`` tile grids (order of :func:`split_tiles`) -> ``[B, s·h, s·w, C]``."""
    n, h, w, C = grids.shape
    if n % (s * s):
        raise ValueError(f"stitch_tiles: {n} tile grids are not a whole number of {s}x{s} tilings")
    B = n // (s * s)
    # [B, s(ty), s(tx), h, w, C] -> [B, ty, h, tx, w, C]
    return grids.reshape(B, s, s, h, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, s * h, s * w, C)


def encode_scales(enc, inputs: Sequence[torch.Tensor], scales: Sequence[int], backend: str = "auto",
                  ) -> torch.Tensor:
    """Run ``enc`` at every scale in one batch: ``inputs[i]`` is ``[B, 3, s_i·S, s_i·S]`` (normalised).

    Returns ``[B, h, w, C × len(scales)]``: each scale's stitched grid area-pooled to the base
    grid ``(h, w)`` (the scale-1 grid as is), concatenated on channels in ``scales`` order.
    """
    B = inputs[0].shape[0]
    tiles = torch.cat([split_tiles(x, s) for x, s in zip(inputs, scales)])  # [B·Σs², 3, S, S]
    out = enc(tiles)  # [B·Σs², h, w, C]
    _, h, w, C = out.shape
    parts = []
    for part, s in zip(out.split([B * s * s for s in scales]), scales):
        full = stitch_tiles(part, s)  # [B, s·h, s·w, C]
        if s != 1:
            # [B, s·h·s·w, C] -> [B, h·w, C] -> [B, h, w, C]
            full = pyramid_pool(full.reshape(B, s * h * s * w, C), (s * h, s * w), [(h, w)],
                                backend=backend).reshape(B, h, w, C)
        parts.append(full)
    return torch.cat(parts, dim=-1)
