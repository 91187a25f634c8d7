"""Letterbox colours in ``pad`` mode: which colour pads each encoder's image, and where the padding is.

Prismatic letterboxes each encoder's image with that encoder's own mean colour
``int(mean * 255)`` (SigLIP: 127, 127, 127; DINOv2: 123, 116, 103), as LLaVA does for
its one CLIP (122, 116, 104). fusion does the same without giving up the single
``pixel_values [B, 3, S, S]`` that LLaVA-style code passes around:

1. :class:`fusion.preprocess.ImageProcessor` pads every image once, with the *frame
   colour* ``c0`` (the processor's ``pad_color``), resizes it to ``S``, and also returns
   ``image_sizes [B, 2]`` (each original ``(height, width)``).
2. The tower (``tower(pixel_values, image_sizes=...)``, or ``tower(**batch)``) turns the
   sizes into :func:`pad_weights`: ``w [B, 1, S, S]``, the padding mask of the original
   square resized exactly as the processor resized the padded image (same bicubic
   antialiased filter, without the clamp), i.e. how much of each output pixel is padding.
3. Each encoder whose colour ``c`` differs from ``c0`` gets
   ``clamp(pixel_values + (c - c0) / 255 * w, 0, 1)`` before its own resize and
   normalisation (:class:`fusion.encoder_inputs.EncoderInputs`).

Resizing is linear, so step 3 equals padding with ``c`` in the first place, except where
the processor's [0, 1] clamp cut a bicubic overshoot at the image/padding border (a few
pixels, off by up to ~2 8-bit steps on random noise; none on the natural test images).
ROI crops (:mod:`fusion.roi`) that reach into the padding are recoloured the same way
(:func:`roi_pad_weights`). Without ``image_sizes`` (LLaVA's and Hugging
Face's forward pass ``pixel_values`` only) the tower cannot know where the padding is, and
every encoder sees the frame colour: the first encoder's mean (``image_processor.image_mean``,
which is also what LLaVA's own ``expand2square`` reads).

``processor.pad_color`` chooses (:func:`choose_pad_colors`): ``per_encoder`` (default,
as above), an encoder name (that encoder's colour for every encoder: LLaVA's single-colour
padding) or ``[R, G, B]`` (one explicit colour for every encoder).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

Color = Tuple[int, int, int]


def mean_color(mean: Sequence[float]) -> Color:
    """The 8-bit pad colour of a normalisation mean: ``int(m * 255)`` per channel (truncated,
    as LLaVA's ``expand2square`` call and Prismatic's ``LetterboxPad`` fill compute it)."""
    r, g, b = (int(m * 255) for m in mean)
    return r, g, b


@dataclass(frozen=True)
class PadColors:
    """The outcome of ``processor.pad_color``.

    ``frame``: the colour ``pixel_values`` are padded with; ``source``: the encoder whose
    mean/std the image processor reports (``image_mean``, read by LLaVA for its own
    padding); ``inputs``: encoder input name -> its letterbox colour.
    """

    frame: Color
    source: str
    inputs: Dict[str, Color]


def choose_pad_colors(choice: Union[str, Sequence[int]], encoders: Mapping[str, Any],
                      extra_inputs: Optional[Mapping[str, str]] = None, chosen: Optional[str] = None) -> PadColors:
    """Resolve ``processor.pad_color`` for ``encoders`` (name -> object with ``mean``).

    ``extra_inputs`` maps further input names (multi-scale inputs, ``dino@2x``) to the
    encoder whose colour they take. ``chosen`` (``processor.mean_from``): the encoder the
    image processor reports (the ``source``); ``None``: the encoder ``choice`` names, else the first.
    """
    names = list(encoders)
    if not names:
        raise ValueError("encoders: got none; a tower needs at least one encoder")
    own = {name: mean_color(enc.mean) for name, enc in encoders.items()}
    if isinstance(choice, str) and choice == "per_encoder":
        colors, source = own, names[0]
    elif isinstance(choice, str):
        if choice not in own:
            raise ValueError(f"processor.pad_color: got {choice!r}; accepted values are "
                             f"{['per_encoder', *names]} or [R, G, B] in 0-255")
        colors, source = {name: own[choice] for name in names}, choice
    else:
        fixed = tuple(int(v) for v in choice)
        colors, source = {name: fixed for name in names}, names[0]
    if chosen is not None:
        if chosen not in own:
            raise ValueError(f"processor.mean_from: got {chosen!r}; accepted values are {names}")
        source = chosen
    inputs = dict(colors)
    for name, base in (extra_inputs or {}).items():
        inputs[name] = colors[base]
    return PadColors(frame=colors[source], source=source, inputs=inputs)


def check_image_sizes(image_sizes: Any, batch: int) -> torch.Tensor:
    """``image_sizes`` (a tensor or nested sequence ``[B, 2]`` of positive ``(height, width)``)
    -> int64 CPU tensor ``[B, 2]``."""
    try:
        sizes = torch.as_tensor(image_sizes).cpu()
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"image_sizes: expected [B, 2] (height, width) integers, got {type(image_sizes).__name__} "
                        f"({err})") from err
    if sizes.dim() != 2 or sizes.shape[1] != 2 or sizes.shape[0] != batch:
        raise ValueError(f"image_sizes: expected shape [{batch}, 2] (one (height, width) per image of "
                         f"pixel_values), got {list(sizes.shape)}")
    if sizes.is_floating_point() or sizes.dtype == torch.bool or sizes.is_complex():
        raise TypeError(f"image_sizes: expected integers, got dtype {sizes.dtype}")
    if (sizes < 1).any():
        raise ValueError(f"image_sizes: every height and width must be >= 1, got {sizes.tolist()}")
    return sizes.to(torch.int64)


def pad_weights(image_sizes: torch.Tensor, frame: Tuple[int, int],
                device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """How much of each pixel of a ``frame = (H, W)`` ``pixel_values`` is padding: ``[B, 1, H, W]``
    float32, or None when no image was padded (all square).

    ``image_sizes [B, 2]`` are the originals' ``(h, w)``. As in ``ImageProcessor``'s ``pad``
    mode, an original sits centred (offset ``(side - short) // 2``) in a ``side = max(h, w)``
    square, which is resized to the frame.
    """
    spans = []
    for h, w in image_sizes.tolist():
        side = max(h, w)
        top, left = (side - h) // 2, (side - w) // 2
        spans.append(((side, top, top + h), (side, left, left + w)))
    return _weights(spans, frame, device)


def roi_pad_weights(image_sizes: torch.Tensor, roi_boxes: torch.Tensor, roi_images: torch.Tensor,
                    frame: Tuple[int, int], device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """:func:`pad_weights` of ROI crops (:mod:`fusion.roi`) cut in ``pad`` mode: ``[R, 1, H, W]`` or None.

    ``roi_boxes [R, 4]``: the boxes actually cut (normalised xyxy in the padded square's frame,
    as ``ImageProcessor(images, rois=...)`` returns them); ``roi_images [R]``: each crop's image.
    A crop's padding is the part of its box outside the original image.
    """
    spans = []
    sizes = image_sizes.tolist()
    for box, i in zip(roi_boxes.tolist(), roi_images.tolist()):
        h, w = sizes[i]
        side = max(h, w)
        # the crop's pixel box in the original, as fusion.roi.crop_box rounds it
        x0, y0, x1, y1 = (math.floor(o + v * side + 0.5) for o, v in zip(
            (-((side - w) // 2), -((side - h) // 2)) * 2, box))
        spans.append(((y1 - y0, -y0, h - y0), (x1 - x0, -x0, w - x0)))
    return _weights(spans, frame, device)


Span = Tuple[int, int, int]  # (pixels spanned, first image pixel, one past the last), along one axis


def _weights(spans, frame: Tuple[int, int], device: Optional[torch.device]) -> Optional[torch.Tensor]:
    """``[N, 1, H, W]`` = ``1 - rows ⊗ cols``: the image indicator of each axis (``(rows, cols)``
    spans per item) resized like the pixels, so its complement is the padding fraction. A resize
    is separable and linear, so this equals resizing the 2-D padding mask. None without padding."""
    H, W = frame
    if all(_inside(r) and _inside(c) for r, c in spans):
        return None
    cache: Dict[Tuple[Span, int], torch.Tensor] = {}
    out = torch.zeros(len(spans), 1, H, W)
    for n, (rows, cols) in enumerate(spans):
        if _inside(rows) and _inside(cols):
            continue
        for span, length in ((rows, H), (cols, W)):
            if (span, length) not in cache:
                cache[(span, length)] = _image_profile(span, length)
        out[n, 0] = 1 - cache[(rows, H)][:, None] * cache[(cols, W)][None, :]
    return out.to(device) if device is not None else out


def _inside(span: Span) -> bool:
    """The span lies within the image (no padding along this axis)."""
    return span[1] <= 0 and span[2] >= span[0]


def _image_profile(span: Span, length: int) -> torch.Tensor:
    """``[length]``: the 1-D indicator of the image pixels of ``span`` resized to ``length``
    (the processor's bicubic antialiased filter, unclamped)."""
    total, first, stop = span
    if _inside(span):
        return torch.ones(length)
    line = torch.zeros(1, 1, 1, total)  # laid out as one row: antialiased bicubic mishandles a 1-wide width
    line[..., max(first, 0):max(min(stop, total), 0)] = 1
    if total == length:
        return line.view(length)
    return F.interpolate(line, size=(1, length), mode="bicubic", align_corners=False, antialias=True).view(length)
