"""The device half of preprocessing: :class:`EncoderInputs` makes each encoder's own input.

From the shared ``pixel_values [B, 3, S, S]`` (float in [0, 1], made on the host by
:class:`fusion.preprocess.ImageProcessor`), on the device: each encoder's input
``[B, 3, s, s]``, resized to its ``image_size`` and normalised with its ``mean``/``std``, once
per distinct request; in ``pad`` mode each encoder's letterbox gets its own colour
(:mod:`fusion.letterbox`). Resizing is :func:`fusion.resize.resize_images`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .pixels import as_pixels, check_channel_stats, check_rgb255
from .resize import longest_side_shape, resize_images

RESIZE_KINDS = ("squash", "longest_side_pad")
INTERPOLATIONS = ("bicubic", "bilinear")

@dataclass(frozen=True)
class InputGroup:
    """Encoders fed from one resize: same ``(image_size, resize, interpolation)``.

    ``norms[k]`` is a distinct ``(mean, std)``, ``shifts[k]`` its letterbox recolouring
    (``(c - c0) / 255`` per channel, None when the pad colour is the frame's; see
    :mod:`fusion.letterbox`) and ``names[k]`` the encoders using both.
    """

    image_size: int
    resize: str
    interpolation: str
    norms: Tuple[Tuple[Tuple[float, ...], Tuple[float, ...]], ...]
    names: Tuple[Tuple[str, ...], ...]
    shifts: Tuple[Optional[Tuple[float, float, float]], ...] = ()


class EncoderInputs(nn.Module):
    """Per-encoder inputs from shared ``pixel_values``, on the device.

    Built from encoders (objects with ``name``, ``image_size``, ``mean``, ``std``,
    ``resize``, ``interpolation``; see :class:`fusion.encoders.base.Encoder`).
    ``forward(pixel_values [B, 3, H, W] float in [0, 1])`` returns ``{name: [B, 3,
    image_size, image_size] float32}`` in encoder order, in one batched step per
    :class:`InputGroup`: one resize, then one broadcast normalisation
    ``(x - mean) / std`` over the group's distinct ``(mean, std)``
    (``[K, B, 3, h, w]``). Encoders with identical requests get the same tensor.

    ``resize``: ``"squash"`` resizes to ``image_size``²; ``"longest_side_pad"`` (SAM's
    ``ResizeLongestSide`` + ``Sam.preprocess``) resizes the longest side to
    ``image_size`` keeping the aspect ratio, normalises, then zero-pads bottom/right
    (for square ``pixel_values`` that is a plain resize). A resize to the size the
    input already has is skipped. mean/std live in non-persistent float32 buffers:
    ``.to(device)`` moves them, ``.to(dtype)`` leaves them exact, ``state_dict`` omits them.

    Letterbox colours (``pad`` mode, :mod:`fusion.letterbox`): ``pad_colors`` maps input
    names to their 8-bit pad colour and ``frame_color`` is the colour ``pixel_values`` were
    padded with. ``forward(pixel_values, pad_weight)`` with ``pad_weight [B, 1, H, W]``
    (:func:`fusion.letterbox.pad_weights`) gives an input whose colour differs
    ``clamp(pixel_values + (c - c0) / 255 * pad_weight, 0, 1)`` before its resize (one
    resize per distinct colour in a group); without ``pad_weight`` every input keeps
    ``pixel_values``' padding and each group resizes once.
    """

    def __init__(self, encoders: Iterable[Any], pad_colors: Optional[Dict[str, Sequence[int]]] = None,
                 frame_color: Optional[Sequence[int]] = None):
        super().__init__()
        specs = [_encoder_spec(e, i) for i, e in enumerate(encoders)]
        if not specs:
            raise ValueError("encoders: got none; EncoderInputs needs at least one encoder")
        seen = set()
        plan: Dict[Tuple, Dict[Tuple, List[str]]] = {}
        for i, (name, size, resize, interp, mean, std) in enumerate(specs):
            if name in seen:
                raise ValueError(f"encoders[{i}].name: {name!r} appears twice; encoder names must be unique")
            seen.add(name)
            shift = _pad_shift(name, pad_colors, frame_color)
            plan.setdefault((size, resize, interp), {}).setdefault((mean, std, shift), []).append(name)
        self.names = tuple(s[0] for s in specs)
        self.groups = tuple(
            InputGroup(size, resize, interp, tuple(k[:2] for k in norms), tuple(tuple(v) for v in norms.values()),
                       tuple(k[2] for k in norms))
            for (size, resize, interp), norms in plan.items())
        self._set_stats(torch.device("cpu"))

    def refresh_stats(self) -> None:
        """Recreate the mean/std buffers, exact, on the device they are on: for loaders that
        replace non-persistent buffers with uninitialised memory (transformers' ``from_pretrained``)."""
        self._set_stats(self.mean_0.device)

    def _set_stats(self, device: torch.device) -> None:
        """(Re)create the mean/std buffers ``[K, 1, 3, 1, 1]`` (broadcast against
        ``[1, B, 3, h, w]``) as exact float32 values on ``device``."""
        for g, group in enumerate(self.groups):
            for prefix, which in (("mean", 0), ("std", 1)):
                values = torch.tensor([norm[which] for norm in group.norms], dtype=torch.float32, device=device)
                self.register_buffer(f"{prefix}_{g}", values.view(-1, 1, 3, 1, 1), persistent=False)

    def _apply(self, fn, recurse=True):
        # Follow .to(device) / .cuda(), but never let a module-wide .half() / .to(bfloat16)
        # round the normalisation constants: they stay exact float32.
        super()._apply(fn, recurse)
        self._set_stats(self.mean_0.device)
        return self

    def forward(self, pixel_values: torch.Tensor, pad_weight: Optional[torch.Tensor] = None,
                ) -> Dict[str, torch.Tensor]:
        x = as_pixels(pixel_values, "pixel_values", uint8=False, finite=False,
                       hint=" (ImageProcessor makes pixel_values from images)")
        h, w = x.shape[-2:]
        if pad_weight is not None and (pad_weight.dim() != 4 or pad_weight.shape[0] != x.shape[0]
                                       or tuple(pad_weight.shape[1:]) != (1, h, w)):
            raise ValueError(f"pad_weight: expected [{x.shape[0]}, 1, {h}, {w}] (fusion.letterbox.pad_weights of "
                             f"pixel_values' frame), got {list(pad_weight.shape)}")
        out: Dict[str, torch.Tensor] = {}
        recoloured: Dict[Tuple[float, float, float], torch.Tensor] = {}  # shift -> [B, 3, H, W]
        for g, group in enumerate(self.groups):
            s = group.image_size
            target = longest_side_shape(h, w, s) if group.resize == "longest_side_pad" else (s, s)
            shifts = [None] * len(group.norms) if pad_weight is None else list(group.shifts)
            resized: Dict[Any, torch.Tensor] = {}  # shift -> [B, 3, h', w']
            for shift in dict.fromkeys(shifts):
                source = x
                if shift is not None:
                    if shift not in recoloured:
                        delta = torch.tensor(shift, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
                        recoloured[shift] = (x + delta * pad_weight.to(x.device, torch.float32)).clamp(0, 1)
                    source = recoloured[shift]
                resized[shift] = resize_images(source, target, group.interpolation)
            mean, std = getattr(self, f"mean_{g}"), getattr(self, f"std_{g}")
            if mean.device != x.device:
                mean, std = mean.to(x.device), std.to(x.device)
            if len(resized) == 1:
                y = next(iter(resized.values())).unsqueeze(0)  # [1, B, 3, h', w'], broadcast over K
            else:
                y = torch.stack([resized[shift] for shift in shifts])  # [K, B, 3, h', w']
            z = (y - mean) / std  # [K, B, 3, h', w']
            if target != (s, s):
                z = F.pad(z, (0, s - target[1], 0, s - target[0]))  # zeros bottom/right, after normalising
            for k, names in enumerate(group.names):
                view = z[k]  # [B, 3, s, s]; one tensor shared by identical requests
                for name in names:
                    out[name] = view
        return {name: out[name] for name in self.names}

    def extra_repr(self) -> str:
        parts = []
        for g in self.groups:
            enc = ", ".join("+".join(n) for n in g.names)
            recolour = "" if not any(g.shifts) else " (own pad colours)"
            parts.append(f"{g.image_size}px {g.resize}/{g.interpolation}{recolour}: {enc}")
        return "; ".join(parts)


def encoder_inputs(pixel_values: torch.Tensor, encoders: Iterable[Any]) -> Dict[str, torch.Tensor]:
    """One-off ``EncoderInputs(encoders)(pixel_values)``."""
    return EncoderInputs(encoders).to(pixel_values.device)(pixel_values)


def _pad_shift(name: str, pad_colors: Optional[Dict[str, Sequence[int]]], frame_color: Optional[Sequence[int]],
               ) -> Optional[Tuple[float, float, float]]:
    """``(c - c0) / 255`` of input ``name`` (None when it keeps the frame colour ``c0``)."""
    if not pad_colors or name not in pad_colors:
        return None
    if frame_color is None:
        raise ValueError("frame_color: required with pad_colors (the colour pixel_values are padded with)")
    color, frame = check_rgb255(pad_colors[name], f"pad_colors[{name!r}]"), check_rgb255(frame_color, "frame_color")
    if color == frame:
        return None
    r, g, b = ((c - f) / 255.0 for c, f in zip(color, frame))
    return r, g, b


def _encoder_spec(enc: Any, i: int):
    """``(name, image_size, resize, interpolation, mean, std)`` of one encoder, validated."""
    name = getattr(enc, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoders[{i}].name: expected a non-empty string, got {name!r}")
    key = f"encoders[{i}] ({name!r})"
    missing = [a for a in ("image_size", "mean", "std", "resize", "interpolation") if not hasattr(enc, a)]
    if missing:
        raise TypeError(f"{key}: {type(enc).__name__} lacks {missing}; encoders need image_size, mean, std, "
                        f"resize and interpolation (see fusion.encoders.base.Encoder)")
    size = enc.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{key}.image_size: expected a positive int, got {size!r}")
    if enc.resize not in RESIZE_KINDS:
        raise ValueError(f"{key}.resize: got {enc.resize!r}; accepted values are {list(RESIZE_KINDS)}")
    if enc.interpolation not in INTERPOLATIONS:
        raise ValueError(f"{key}.interpolation: got {enc.interpolation!r}; accepted values are {list(INTERPOLATIONS)}")
    mean = tuple(check_channel_stats(enc.mean, f"{key}.mean", "finite"))
    std = tuple(check_channel_stats(enc.std, f"{key}.std", "positive"))
    return name, size, enc.resize, enc.interpolation, mean, std
