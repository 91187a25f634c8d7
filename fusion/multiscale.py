"""Multi-scale encoders (S2, "scaling on scales", Shi et al. 2024): ``encoders.<name>.scales``.

``scales: [1, 2]`` runs the encoder on the image at its input size ``S`` and at ``2S``.
The ``sS`` image (resized and normalised on the device like the plain input, see
:class:`fusion.encoder_inputs.EncoderInputs`) is split into ``s × s`` tiles of ``S × S``
(:func:`split_tiles`); the tiles of every scale go through the encoder as ONE batch; each
scale's tile grids are stitched back into one ``s·h × s·w`` grid (:func:`stitch_tiles`)
and area-pooled to the encoder's base grid ``h × w`` (:func:`fusion.kernels.pyramid_pool`);
the scales are concatenated on channels in the order listed. The token count is
unchanged and the encoder's width becomes ``dim × len(scales)``. ``scales: [1]`` (the
default) is the plain encoder; other scales wrap it in :class:`MultiScaleEncoder`
(:func:`fusion.tower.build_encoder` does that).
"""
from __future__ import annotations

import warnings
from typing import Sequence, Tuple

import torch

from .encoders.base import Encoder, InputSpec
from .kernels import pyramid_pool


def scaled_name(name: str, scale: int) -> str:
    """Key of the encoder's input at ``scale`` in :class:`~fusion.encoder_inputs.EncoderInputs`' output."""
    return name if scale == 1 else f"{name}@{scale}x"


class MultiScaleEncoder(Encoder):
    """``inner`` run at each of ``scales`` (see the module docstring): ``[B, h, w, dim × len(scales)]``.

    It asks for one input per scale (:meth:`input_specs`: ``name`` at ``S``, ``name@2x`` at
    ``2S``, ... each resized from ``pixel_values`` and normalised like ``inner``'s own) and
    ``forward(*pixels)`` takes them in that order. ``image_size``, ``patch_size``, ``grid``,
    ``mean``, ``std``, ``resize`` and ``interpolation`` are ``inner``'s; ``dim`` is the width of
    the output, ``inner.dim × len(scales)``. ``backend`` is ``fusion.kernels`` for the pooling.

    It holds ``inner``'s submodules, parameters and buffers under their own names (the very
    same objects, not under ``inner.``), so its ``state_dict`` keys are the plain encoder's:
    checkpoints, frozen-encoder rules and FSDP units do not change with ``scales``.
    """

    def __init__(self, inner: Encoder, scales: Sequence[int], backend: str = "auto"):
        super().__init__(inner.cfg)
        for store in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            object.__setattr__(self, store, getattr(inner, store))  # shared, not copied
        object.__setattr__(self, "inner", inner)  # not a submodule: its submodules are ours
        self.scales = tuple(int(s) for s in scales)
        self.backend = backend
        self.encoder_type = inner.encoder_type
        self.image_size, self.patch_size, self.grid = inner.image_size, inner.patch_size, tuple(inner.grid)
        self.dim = inner.dim * len(self.scales)
        self.mean, self.std = tuple(inner.mean), tuple(inner.std)
        self.resize, self.interpolation = inner.resize, inner.interpolation
        self._inputs = tuple(InputSpec(scaled_name(self.name, s), s * self.image_size, self.mean, self.std,
                                       self.resize, self.interpolation) for s in self.scales)

    @property
    def loaded_weights(self):
        return self.inner.loaded_weights

    @loaded_weights.setter
    def loaded_weights(self, value) -> None:
        self.inner.loaded_weights = value

    @property
    def depth(self):
        """Blocks of the wrapped encoder's unpruned model (``None`` if it does not say)."""
        return getattr(self.inner, "depth", None)

    def upstream_name(self) -> str:
        return self.inner.upstream_name()

    def input_specs(self) -> Tuple[InputSpec, ...]:
        return self._inputs

    def train(self, mode: bool = True) -> "MultiScaleEncoder":
        super().train(mode)
        self.inner.training = mode
        return self

    def forward(self, *pixels: torch.Tensor) -> torch.Tensor:
        """One normalised input per scale, ``[B, 3, s·S, s·S]`` in :attr:`scales` order -> ``[B, h, w, dim]``."""
        if len(pixels) != len(self.scales):
            raise TypeError(f"{type(self).__name__}({self.name!r}): expected {len(self.scales)} inputs (one per scale "
                            f"{list(self.scales)}, see input_specs()), got {len(pixels)}")
        return encode_scales(self.inner, pixels, self.scales, backend=self.backend)


def is_multiscale(enc) -> bool:
    """Whether ``enc`` runs at several scales (a :class:`MultiScaleEncoder`)."""
    return isinstance(enc, MultiScaleEncoder)


def scales_of(enc) -> list:
    """Deprecated: read ``enc.scales`` (every :class:`~fusion.encoders.base.Encoder` has it)."""
    warnings.warn("fusion.multiscale.scales_of(enc) is deprecated; read enc.scales", DeprecationWarning, stacklevel=2)
    return list(enc.scales)


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
