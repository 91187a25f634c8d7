"""Image preprocessing in two halves: :class:`ImageProcessor` on the host (here), :class:`EncoderInputs` on the device
(:mod:`fusion.encoder_inputs`, re-exported here).

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

from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import torch

from .config import PROCESSOR_MODES
from .encoder_inputs import (INTERPOLATIONS, RESIZE_KINDS, EncoderInputs, InputGroup,  # noqa: F401 (re-exported)
                             encoder_inputs)
from .image_io import ALPHA_MODES, load_images
from .letterbox import mean_color
from .pixels import check_channel_stats, check_rgb255
from .resize import longest_side_shape, resize_axis, resize_images  # noqa: F401 (resize_images: re-exported)
from .roi import crop_rois

# OpenAI CLIP's normalisation: LLaVA pads with this mean colour and reads both from
# its image processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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
        self.image_mean = check_channel_stats(image_mean, "image_mean", "unit")
        self.image_std = check_channel_stats(image_std, "image_std", "positive")
        self.size = {"shortest_edge": size}
        self.crop_size = {"height": size, "width": size}
        # LLaVA: expand2square(image, tuple(int(x * 255) for x in image_processor.image_mean))
        self.pad_color = mean_color(self.image_mean) if pad_color is None else check_rgb255(pad_color, "pad_color")

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
