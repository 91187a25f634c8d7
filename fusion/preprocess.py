"""Image preprocessing in two halves: :class:`ImageProcessor` on the host, :class:`EncoderInputs` on the device.

``ImageProcessor``: user images (see :mod:`fusion.image_io`) -> ``pixel_values [B, 3, S, S]``
float32 in [0, 1], one square input shared by all encoders, not normalised.
``EncoderInputs``: on the device, each encoder's own input ``[B, 3, s, s]``, resized to its
``image_size`` and normalised with its ``mean``/``std``, once per distinct request. In ``pad``
mode each encoder's letterbox gets its own colour (:mod:`fusion.letterbox`).

Resizing (both halves) is :func:`resize_images`: PIL's separable antialiased filter in float,
width pass then height pass, clamped to [0, 1] after each pass as PIL does (so it matches
``PIL.Image.resize`` to about one 8-bit step; figures in the README).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import PROCESSOR_MODES
from .image_io import ALPHA_MODES, load_images
from .letterbox import mean_color
from .pixels import as_pixels
from .resize import longest_side_shape, resize_axis, resize_images  # noqa: F401 (resize_images: re-exported)
from .roi import crop_rois

# OpenAI CLIP's normalisation: LLaVA pads with this mean colour and reads both from
# its image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZE_KINDS = ("squash", "longest_side_pad")
INTERPOLATIONS = ("bicubic", "bilinear")
RETURN_TENSORS = ("pt", None)
# Largest intermediate (in pixels; 4 M pixels is 48 MB of float32 RGB per image) that
# ImageProcessor builds to keep PIL's width-then-height order for tall images: the row
# block size of portrait padding, and the limit of width-first resizing in crop mode.
_BLOCK = 1 << 22


# ----------------------------------------------------------------------------- host side


class BatchFeature(dict):
    """What :class:`ImageProcessor` returns: a dict (``out["pixel_values"]``) with
    attribute access (``out.pixel_values``) and ``.to(...)``, like Hugging Face's."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchFeature has no key {name!r}; keys are {list(self)}") from None

    def to(self, *args, **kwargs) -> "BatchFeature":
        """``tensor.to(*args, **kwargs)`` on every float tensor value (device and/or dtype); integer
        tensors (``roi_image_index``) only change device, as in Hugging Face's ``BatchFeature``."""
        device = kwargs.get("device")
        for a in args:
            if isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):
                device = a
            elif isinstance(a, torch.Tensor):
                device = a.device
        out = {}
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                v = v.to(*args, **kwargs) if v.is_floating_point() else (v if device is None else v.to(device))
            out[k] = v
        return BatchFeature(out)


class ImageProcessor:
    """Host-side processor: images -> ``{"pixel_values": [B, 3, size, size]}`` float32 in [0, 1].

    ``mode``:

    - ``"pad"`` (LLaVA-1.5's ``expand2square``): pad to a square with ``pad_color``
      (default ``int(m * 255)`` of each ``image_mean`` channel: LLaVA truncates, giving
      (122, 116, 104) for CLIP), the image centred (offset ``(long - short) // 2``),
      then resize to ``size``. The tower can recolour the padding per encoder from
      ``image_sizes`` (:mod:`fusion.letterbox`).
    - ``"squash"``: resize to ``size`` x ``size``, aspect ratio ignored.
    - ``"crop"``: resize the short side to ``size`` (long side ``int(size * long /
      short)``), then centre crop (offset ``round((side - size) / 2)``), as
      torchvision's ``Resize(size)`` + ``CenterCrop(size)`` do.

    Resizing is bicubic in float (:func:`resize_images`), so float inputs keep their
    precision. Besides ``pixel_values`` the output holds ``image_sizes [B, 2]`` (int64,
    each original's ``(height, width)``). Pixel values are *not* normalised
    (``do_normalize`` is False): each encoder normalises its own input on the device
    (:class:`EncoderInputs`).
    ``image_mean``/``image_std`` are exposed for code that reads them (LLaVA reads the
    mean for its pad colour). ``alpha``: ``"drop"`` or ``"white"``, see
    :mod:`fusion.image_io`.

    LLaVA attributes: ``image_mean``, ``image_std`` (lists), ``crop_size``
    (``{"height": size, "width": size}``), ``size`` (``{"shortest_edge": size}`` as in
    CLIP's Hugging Face processor; the int is ``image_size``).
    """

    model_input_names = ["pixel_values"]
    do_normalize = False

    def __init__(self, size: int, mode: str = "pad", image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, alpha: str = "drop",
                 pad_color: Optional[Sequence[int]] = None):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size: expected a positive int (the output side in pixels), got {size!r}")
        if mode not in PROCESSOR_MODES:
            raise ValueError(f"mode: got {mode!r}; accepted values are {list(PROCESSOR_MODES)}")
        if alpha not in ALPHA_MODES:
            raise ValueError(f"alpha: got {alpha!r}; accepted values are {list(ALPHA_MODES)}")
        self.image_size = size
        self.mode = mode
        self.alpha = alpha
        self.image_mean = _triple(image_mean, "image_mean", "unit")
        self.image_std = _triple(image_std, "image_std", "positive")
        self.size = {"shortest_edge": size}
        self.crop_size = {"height": size, "width": size}
        # LLaVA: expand2square(image, tuple(int(x * 255) for x in image_processor.image_mean))
        self.pad_color = mean_color(self.image_mean) if pad_color is None else _color(pad_color, "pad_color")

    @classmethod
    def from_config(cls, cfg, encoders: Iterable[Any] = ()) -> "ImageProcessor":
        """From a :class:`fusion.config.ProcessorConfig`; ``size: null`` becomes the largest
        ``image_size`` of ``encoders``."""
        size = cfg.size
        if size is None:
            sizes = [e.image_size for e in encoders]
            if not sizes:
                raise ValueError("processor.size: null means the largest encoder input size, "
                                 "but no encoders were given; set processor.size to an int")
            size = max(sizes)
        return cls(size=size, mode=cfg.mode)

    def __call__(self, images: Any = None, return_tensors: Optional[str] = "pt", rois: Any = None) -> BatchFeature:
        return self.preprocess(images, return_tensors=return_tensors, rois=rois)

    def preprocess(self, images: Any = None, return_tensors: Optional[str] = "pt", rois: Any = None,
                   ) -> BatchFeature:
        """``images`` (one or a list, see :mod:`fusion.image_io`) -> ``{"pixel_values": [B, 3, S, S],
        "image_sizes": [B, 2]}`` (``image_sizes``: int64 ``(height, width)`` of each original).

        Tensors keep their device (a list is gathered on its first element's device);
        everything else is processed on the CPU.

        ``rois``: region-of-interest boxes (normalised xyxy in the frame of
        ``pixel_values``), one entry per image, any number of boxes each (see
        :mod:`fusion.roi`). Each is cut from the ORIGINAL image at native resolution and
        resized to ``[3, S, S]``; the result also holds ``roi_pixel_values [R, 3, S, S]``,
        ``roi_image_index [R]`` and ``roi_boxes [R, 4]``, which the tower takes as
        ``tower(**out)``.
        """
        if return_tensors not in RETURN_TENSORS:
            raise ValueError(f"return_tensors: got {return_tensors!r}; accepted values are {list(RETURN_TENSORS)} "
                             f"(both give torch tensors)")
        if images is None:
            raise ValueError("images: got None; pass the image(s) to process")
        loaded = load_images(images, alpha=self.alpha)
        batches = [self._square(x) for x in loaded]
        device = batches[0].device
        pixel_values = torch.cat([b.to(device) for b in batches]).contiguous()
        sizes = [tuple(b.shape[-2:]) for b in loaded for _ in range(b.shape[0])]
        out = BatchFeature(pixel_values=pixel_values,
                           image_sizes=torch.tensor(sizes, dtype=torch.int64, device=device).reshape(-1, 2))
        if rois is not None:
            originals = [img for batch in loaded for img in batch]  # each [3, H, W], before any resize
            frames = [self.frame_in_image(*img.shape[-2:]) for img in originals]
            out.update(crop_rois(originals, rois, frames, self.image_size, self.pad_color))
        return out

    def frame_in_image(self, h: int, w: int) -> Tuple[float, float, float, float]:
        """Where the output frame lies in an ``h × w`` original: ``(ox, oy, sx, sy)``.

        Frame point ``(x, y)`` (normalised, as token boxes) is original pixel position
        ``(ox + x * sx, oy + y * sy)``. ``squash``: the whole image; ``pad``: the padded
        square (negative offsets over the padding); ``crop``: the centre crop.
        """
        s = self.image_size
        if self.mode == "squash" or h == w:
            return 0.0, 0.0, float(w), float(h)
        if self.mode == "pad":
            side = max(h, w)
            return -float((side - w) // 2), -float((side - h) // 2), float(side), float(side)
        if w > h:  # crop, landscape: resized width int(s * w / h), cropped at round((nw - s) / 2)
            nw = int(s * w / h)
            return int(round((nw - s) / 2.0)) * w / nw, 0.0, s * w / nw, float(h)
        nh = int(s * h / w)
        return 0.0, int(round((nh - s) / 2.0)) * h / nh, float(w), s * h / nh

    def _square(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, 3, H, W]`` in [0, 1] -> ``[n, 3, S, S]`` according to ``mode``."""
        s = self.image_size
        h, w = x.shape[-2:]
        if self.mode == "squash" or h == w:
            return resize_images(x, (s, s))
        if self.mode == "crop":
            return self._resize_short_side_and_crop(x)
        return self._pad_to_square(x)

    def _resize_short_side_and_crop(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's ``Resize(S)`` + ``CenterCrop(S)`` on a non-square ``[n, 3, h, w]``.

        Width pass first, as PIL; the long axis is cropped right after its pass. A
        portrait so narrow that width-first would upsample it to more than
        :data:`_BLOCK` pixels (and more than ``S x h``) is resized height-first instead,
        so memory stays bounded whatever the aspect ratio.
        """
        s = self.image_size
        h, w = x.shape[-2:]
        if w > h:  # landscape: the long axis is the width
            nw = int(s * w / h)
            left = int(round((nw - s) / 2.0))
            x = resize_axis(x, -1, nw, "bicubic")[..., left:left + s]
            return resize_axis(x, -2, s, "bicubic")
        nh = int(s * h / w)
        top = int(round((nh - s) / 2.0))
        if nh * s <= max(_BLOCK, s * h):
            x = resize_axis(x, -1, s, "bicubic")
            return resize_axis(x, -2, nh, "bicubic")[..., top:top + s, :]
        x = resize_axis(x, -2, nh, "bicubic")[..., top:top + s, :]
        return resize_axis(x, -1, s, "bicubic")

    def _pad_to_square(self, x: torch.Tensor) -> torch.Tensor:
        """expand2square then resize (width pass first, as PIL), without the full-size square.

        Landscape: the width pass runs on the unpadded image and the bands are added to
        its ``[h, S]`` result. Portrait: the width pass runs on padded row blocks of at
        most :data:`_BLOCK` pixels. Both give the pixels of padding first, with memory
        ``S x long`` instead of ``long x long``.
        """
        n, _, h, w = x.shape
        s, side = self.image_size, max(h, w)
        fill = torch.tensor(self.pad_color, dtype=torch.float32, device=x.device).div(255).view(1, 3, 1, 1)
        if w > h:  # bands above and below
            x = resize_axis(x, -1, s, "bicubic")  # [n, 3, h, s]
            canvas = fill.expand(n, 3, side, s).clone()
            top = (side - h) // 2
            canvas[:, :, top:top + h] = x
            return resize_axis(canvas, -2, s, "bicubic")
        left = (side - w) // 2  # bands left and right
        rows = max(1, _BLOCK // side)
        blocks = []
        for r in range(0, h, rows):
            block = fill.expand(n, 3, min(rows, h - r), side).clone()
            block[..., left:left + w] = x[:, :, r:r + rows]
            blocks.append(resize_axis(block, -1, s, "bicubic"))  # rows are independent in a width pass
        return resize_axis(torch.cat(blocks, dim=2), -2, s, "bicubic")

    def to_dict(self) -> Dict[str, Any]:
        return {"size": self.image_size, "mode": self.mode, "image_mean": list(self.image_mean),
                "image_std": list(self.image_std), "alpha": self.alpha, "pad_color": list(self.pad_color)}

    def __repr__(self) -> str:
        return (f"ImageProcessor(size={self.image_size}, mode={self.mode!r}, "
                f"image_mean={self.image_mean}, alpha={self.alpha!r})")


def _color(value: Any, key: str) -> Tuple[int, int, int]:
    """Validate an 8-bit RGB colour: three ints in 0-255."""
    items = list(value) if isinstance(value, (list, tuple)) else []
    if len(items) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in items):
        raise ValueError(f"{key}: expected [R, G, B], three integers in 0-255, got {value!r}")
    return items[0], items[1], items[2]


def _triple(value: Any, key: str, kind: str) -> List[float]:
    """Validate a 3-channel statistic: ``kind`` "unit" (in [0, 1]), "finite" or "positive"."""
    checks = {"unit": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
              "finite": (math.isfinite, "finite"),
              "positive": (lambda v: 0.0 < v < math.inf, "positive and finite")}
    check, want = checks[kind]
    try:
        items = [float(v) for v in value]
    except (TypeError, ValueError):
        items = []
    if len(items) != 3 or not all(check(v) for v in items):
        raise ValueError(f"{key}: expected 3 numbers (R, G, B) {want}, got {value!r}")
    return items


# ----------------------------------------------------------------------------- device side


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
    color, frame = _color(pad_colors[name], f"pad_colors[{name!r}]"), _color(frame_color, "frame_color")
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
    mean = tuple(_triple(enc.mean, f"{key}.mean", "finite"))
    std = tuple(_triple(enc.std, f"{key}.std", "positive"))
    return name, size, enc.resize, enc.interpolation, mean, std
