"""The encoder contract every adapter implements.

An adapter wraps an upstream library's own model (open_clip, segment_anything, timm);
it never re-implements a network. The tower resizes and normalises ``pixel_values``
on the device according to the attributes below, then calls :meth:`Encoder.forward`.
The helpers below hold the parts of that contract every adapter shares: the input check
(:func:`check_pixels`), what ``layer`` means (:func:`block_index`) and the cast to the
model's dtype (:func:`param_dtype`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..config import EncoderConfig
from ..pixels import check_layout

if TYPE_CHECKING:  # pragma: no cover
    from .fetch import Remote
    from .sources import LoadedWeights


@dataclass(frozen=True)
class InputSpec:
    """One input an encoder takes: :class:`fusion.encoder_inputs.EncoderInputs` makes it from
    ``pixel_values`` (resized to ``image_size`` with ``resize`` / ``interpolation``, normalised
    with ``mean`` / ``std``) under the key ``name``."""

    name: str
    image_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    resize: str = "squash"
    interpolation: str = "bicubic"


def block_index(layer: int, depth: int, key: str) -> int:
    """0-based index of the block whose output ``layer`` selects.

    ``-k`` is the k-th block from the end (-1: the last block's output, before any final
    norm: LLaVA's ``mm_vision_select_layer``); ``k >= 1`` the k-th block from the start.
    """
    if -depth <= layer <= -1:
        return depth + layer
    if 1 <= layer <= depth:
        return layer - 1
    raise ValueError(f"{key}: got {layer}, but the model has {depth} blocks; use -1..-{depth} "
                     f"(from the end, -1 = last block output) or 1..{depth} (from the start)")


def param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first parameter: what its inputs are cast to."""
    for p in module.parameters():
        return p.dtype
    return torch.get_default_dtype()


def check_pixels(pixels: torch.Tensor, image_size: int, name: str) -> None:
    """``pixels`` must be ``[B, 3, image_size, image_size]`` (an encoder's normalised input)."""
    check_layout(pixels, f"encoder {name!r}", size=image_size, key=f"encoders.{name}.image_size", empty_ok=True)


class Encoder(nn.Module):
    """Base class of all encoder adapters.

    Subclasses set, in ``__init__``:

    - ``image_size`` (int): the square input side the encoder takes.
    - ``patch_size`` (int): pixels per token side (SAM: 16).
    - ``grid`` ((h, w)): the token grid :meth:`forward` returns.
    - ``dim`` (int): channels of each token.
    - ``mean`` / ``std`` (3-tuples): normalisation on pixels in [0, 1].
    - ``resize`` (str): ``"squash"`` (resize to ``image_size``², aspect ignored) or
      ``"longest_side_pad"`` (SAM: resize the longest side, pad bottom/right with zeros
      after normalisation).
    - ``interpolation`` (str): ``"bicubic"`` or ``"bilinear"``, what the upstream
      transform uses.
    - ``model`` (nn.Module): the upstream model (or the part that is used).

    ``forward(pixels)`` takes normalised pixels ``[B, 3, image_size, image_size]`` and
    returns ``[B, h, w, C]``: prefix tokens (CLS, registers) removed, the configured
    layer selected through the upstream's public API. More precisely ``forward`` takes one
    tensor per entry of :meth:`input_specs`: one, the encoder's own input, unless the
    encoder says otherwise (:class:`fusion.multiscale.MultiScaleEncoder`: one per scale).

    Weights: ``loaded_weights`` (a :class:`fusion.encoders.sources.LoadedWeights`) says
    where the weights came from, for ``tower.weights_report()``; ``None`` when the
    adapter does not say. An adapter whose upstream has tags lists them in
    :meth:`pretrained_tags` and says where each tag's file lives in
    :meth:`tag_checkpoint`, so ``fusion-tower download`` can prefetch it.
    """

    encoder_type: str = ""
    image_size: int
    patch_size: int
    grid: Tuple[int, int]
    dim: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    resize: str = "squash"
    interpolation: str = "bicubic"
    loaded_weights: Optional["LoadedWeights"] = None
    scales: Tuple[int, ...] = (1,)  # S2 scales; more than (1,) only for fusion.multiscale.MultiScaleEncoder

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True):
        super().__init__()
        self.cfg = cfg
        self.name = cfg.name

    @property
    def layer(self) -> Optional[int]:
        return self.cfg.layer

    @property
    def frozen(self) -> bool:
        return self.cfg.freeze

    def input_specs(self) -> Tuple[InputSpec, ...]:
        """The inputs :meth:`forward` takes, in order (objects with :class:`InputSpec`'s
        attributes); by default one: the encoder itself, which has them all."""
        return (self,)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def pretrained_tags(cls, cfg: EncoderConfig) -> Sequence[str]:
        """The tags ``cfg.pretrained`` may name for ``cfg.model`` (none by default)."""
        return ()

    @classmethod
    def tag_checkpoint(cls, cfg: EncoderConfig, tag: str) -> "Remote":
        """Where the checkpoint file of ``tag`` lives (a :class:`fusion.encoders.fetch.Remote`)."""
        raise ValueError(f"encoders.{cfg.name}.pretrained: {cls.__name__} has no tags (got {tag!r})")

    def upstream_name(self) -> str:
        """The upstream library and model name, for ``fusion-tower info``."""
        return f"{type(self).__name__}:{self.cfg.model}"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{type(self).__name__} must implement forward(pixels) -> [B, h, w, C]")

    def block_grid(self, pixels: torch.Tensor,
                   intermediates: Callable[[torch.Tensor, List[int]], torch.Tensor]) -> torch.Tensor:
        """The forward of a ViT adapter with a ``block`` attribute: ``[B, 3, S, S]`` normalised
        pixels -> ``[B, h, w, C]`` output of block ``self.block``.

        ``intermediates(pixels, [block])`` calls the upstream's ``forward_intermediates`` and
        returns that block's tokens ``[B, h*w, C]`` (prefix tokens already split off).
        """
        check_pixels(pixels, self.image_size, self.name)
        tokens = intermediates(pixels.to(param_dtype(self.model)), [self.block])
        h, w = self.grid
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).contiguous()  # [B, h*w, C] -> [B, h, w, C]
