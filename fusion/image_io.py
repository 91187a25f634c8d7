"""Turn user images (PIL, numpy, torch) into float RGB tensors in [0, 1].

This is the input half of :class:`fusion.preprocess.ImageProcessor`: it validates and
converts, it never resizes. Every accepted input becomes one or more tensors
``[n, 3, H, W]`` float32 in [0, 1] (``n`` images of one size), on the input's device
for tensors and on the CPU otherwise.

Accepted, alone or in a list/tuple (images in a list may differ in size):

- ``PIL.Image.Image`` of any mode PIL can convert to RGB. Colour conversion is PIL's
  own ``convert("RGB")``: ``L``/``1`` are replicated to grey, ``P`` goes through its
  palette, ``CMYK``/``YCbCr`` use PIL's formulas, and ``I;16``/``I``/``F`` are *clipped*
  to 0-255 as PIL does (not rescaled: pass ``array / 65535.0`` as a float array to
  keep 16-bit precision).
- ``numpy.ndarray`` ``[H, W]`` (grey), ``[H, W, C]`` or a batch ``[B, H, W, C]``.
- ``torch.Tensor`` ``[H, W]`` (grey), ``[C, H, W]`` or a batch ``[B, C, H, W]``.

Arrays and tensors have ``C`` in {1, 3, 4} (1 is replicated to RGB, 4 is RGBA) and are
``uint8`` (0-255, divided by 255) or floating point in [0, 1] (kept as is: no 8-bit
quantisation; values up to one 8-bit step outside [0, 1] are clamped, further out is
an error). Float tensors stay differentiable.

Alpha (RGBA arrays, PIL modes with transparency) follows ``alpha``: ``"drop"`` (the
default) discards it, exactly as PIL's ``convert("RGB")`` and the open_clip, timm and
LLaVA loaders do; ``"white"`` composites the image over a white background
(``rgb * a + (1 - a)``, computed in float), as Hugging Face's ``convert_to_rgb`` does.
"""
from __future__ import annotations

import warnings
from typing import Any, List

import numpy as np
import torch

ALPHA_MODES = ("drop", "white")
ACCEPTED = (
    "a PIL image, a numpy array [H, W] / [H, W, C] / [B, H, W, C], a torch tensor "
    "[H, W] / [C, H, W] / [B, C, H, W] (C in 1, 3, 4; uint8 0-255 or float in [0, 1]), "
    "or a non-empty list of these"
)
# Float inputs may overshoot [0, 1] by this much (e.g. after a user's own bicubic
# resize) and are clamped; anything further out is a sign of 0-255 floats or of
# normalised pixels, and is refused.
RANGE_SLACK = 1.0 / 255.0
_PIL_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_images(images: Any, alpha: str = "drop") -> List[torch.Tensor]:
    """Validate ``images`` and convert them to a list of ``[n, 3, H, W]`` float32 tensors.

    A single image gives a one-element list with ``n == 1``; a batch array/tensor gives
    ``n == B``; a list gives one entry per element. Errors are ``TypeError`` /
    ``ValueError`` naming ``images`` (or ``images[i]``), what was given and what is
    accepted.
    """
    if alpha not in ALPHA_MODES:
        raise ValueError(f"alpha: got {alpha!r}; accepted values are {list(ALPHA_MODES)}")
    if isinstance(images, (list, tuple)):
        if len(images) == 0:
            raise ValueError(f"images: got an empty {type(images).__name__}; expected {ACCEPTED}")
        out = []
        for i, item in enumerate(images):
            if isinstance(item, (list, tuple)):
                raise TypeError(f"images[{i}]: got a nested {type(item).__name__}; pass a flat list of images")
            out.append(_load_one(item, f"images[{i}]", alpha))
        return out
    return [_load_one(images, "images", alpha)]


def _load_one(item: Any, key: str, alpha: str) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return _from_tensor(item, key, alpha)
    if isinstance(item, np.ndarray):
        return _from_numpy(item, key, alpha)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(item, Image.Image):
        return _from_pil(item, key, alpha)
    hint = " (file paths are not opened here: pass PIL.Image.open(path))" if isinstance(item, (str, bytes)) else ""
    raise TypeError(f"{key}: got {type(item).__name__}{hint}; expected {ACCEPTED}")


# ----------------------------------------------------------------------------- PIL


def _from_pil(img, key: str, alpha: str) -> torch.Tensor:
    """PIL image (any mode) -> ``[1, 3, H, W]`` float32 in [0, 1]."""
    if img.width == 0 or img.height == 0:
        raise ValueError(f"{key}: got an empty PIL image of size {img.width}x{img.height}; "
                         f"images need at least one pixel")
    has_alpha = img.mode in _PIL_ALPHA_MODES or "transparency" in img.info
    target = "RGBA" if alpha == "white" and has_alpha else "RGB"
    try:
        arr = np.asarray(img if img.mode == target else img.convert(target))  # [H, W, 3 or 4] uint8
    except (ValueError, OSError) as err:
        raise ValueError(f"{key}: cannot convert a PIL image of mode {img.mode!r} to RGB ({err}); "
                         f"convert it to 'RGB' or 'RGBA' first") from err
    x = _uint8_to_float(_read_only_view(arr).permute(2, 0, 1))  # [3 or 4, H, W]
    return (_composite_white(x) if target == "RGBA" else x)[None]


# ----------------------------------------------------------------------------- numpy


def _from_numpy(arr: np.ndarray, key: str, alpha: str) -> torch.Tensor:
    """``[H, W]`` / ``[H, W, C]`` / ``[B, H, W, C]`` array -> ``[n, 3, H, W]`` float32."""
    given = tuple(arr.shape)
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{key}: numpy array of dtype {arr.dtype}; accepted dtypes are uint8 (0-255) "
                        f"or floating point in [0, 1] (for 16-bit data pass arr / 65535.0)")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4:
        raise ValueError(f"{key}: numpy array of shape {given} (rank {len(given)}); "
                         f"expected [H, W], [H, W, C] or [B, H, W, C]")
    channels = arr.shape[-1]
    if channels not in (1, 3, 4):
        hint = (" (this looks channels-first: numpy arrays are read as HWC, use arr.transpose(1, 2, 0)"
                " or pass a torch tensor)" if arr.shape[1] in (1, 3, 4) else "")
        raise ValueError(f"{key}: numpy array of shape {given} has {channels} channels{hint}; "
                         f"expected 1 (grey), 3 (RGB) or 4 (RGBA) channels last")
    if arr.dtype.itemsize > 8:  # long double: torch has no such dtype
        arr = arr.astype(np.float64)
    if not arr.dtype.isnative or any(stride < 0 for stride in arr.strides):  # torch cannot view these
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    return _from_tensor(_read_only_view(arr).permute(0, 3, 1, 2), key, alpha,  # [B, H, W, C] -> [B, C, H, W]
                        shown_shape=given)


def _read_only_view(arr: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` without a copy, also for read-only arrays (PIL's buffers, memory
    maps): nothing here writes into the input, every result is freshly allocated."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


# ----------------------------------------------------------------------------- torch


def _from_tensor(t: torch.Tensor, key: str, alpha: str, shown_shape=None) -> torch.Tensor:
    """``[H, W]`` / ``[C, H, W]`` / ``[B, C, H, W]`` tensor -> ``[n, 3, H, W]`` float32."""
    shape = tuple(t.shape) if shown_shape is None else shown_shape
    if t.dtype != torch.uint8 and not t.is_floating_point():
        raise TypeError(f"{key}: tensor of dtype {t.dtype}; accepted dtypes are torch.uint8 (0-255) or "
                        f"floating point in [0, 1] (convert other integer data with t.float() / max_value)")
    if t.dim() == 2:
        t = t[None]
    if t.dim() == 3:
        t = t[None]
    if t.dim() != 4:
        raise ValueError(f"{key}: tensor of shape {shape} (rank {len(shape)}); "
                         f"expected [H, W], [C, H, W] or [B, C, H, W]")
    if t.shape[1] not in (1, 3, 4):
        hint = (" (this looks channels-last: use t.permute(2, 0, 1), or pass a numpy array)"
                if t.shape[-1] in (1, 3, 4) else "")
        raise ValueError(f"{key}: tensor of shape {shape} has {t.shape[1]} channels{hint}; "
                         f"expected 1 (grey), 3 (RGB) or 4 (RGBA) channels first")
    if t.numel() == 0:
        raise ValueError(f"{key}: got an image (batch) of shape {shape} with no pixels; "
                         f"images need at least one pixel and a batch at least one image")
    x = _uint8_to_float(t) if t.dtype == torch.uint8 else _check_float(t.to(torch.float32), key, shape)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = _composite_white(x) if alpha == "white" else x[:, :3]
    return x.contiguous()


def _uint8_to_float(t: torch.Tensor) -> torch.Tensor:
    # Same arithmetic as torchvision's ToTensor: float32, then divide by 255.
    return t.to(torch.float32).div(255)


def _check_float(x: torch.Tensor, key: str, shape) -> torch.Tensor:
    """Refuse NaN/inf and values outside [0, 1] (beyond :data:`RANGE_SLACK`); clamp the slack."""
    finite = torch.isfinite(x.detach())
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{key}: float image of shape {shape} holds {bad} NaN/inf values; expected finite "
                         f"values in [0, 1]")
    lo, hi = float(x.detach().min()), float(x.detach().max())
    if lo < -RANGE_SLACK or hi > 1 + RANGE_SLACK:
        hint = (" (this looks like 0-255 data: pass uint8, or divide by 255)" if hi > 2 else
                " (this looks normalised: pass pixels before mean/std normalisation)" if lo < 0 else "")
        raise ValueError(f"{key}: float image of shape {shape} has values in [{lo:.4g}, {hi:.4g}]{hint}; "
                         f"float images must lie in [0, 1]")
    if lo < 0 or hi > 1:
        x = x.clamp(0, 1)
    return x


def _composite_white(x: torch.Tensor) -> torch.Tensor:
    """``[..., 4, H, W]`` RGBA in [0, 1] -> ``[..., 3, H, W]`` RGB over a white background."""
    rgb, a = x[..., :3, :, :], x[..., 3:, :, :]
    return rgb * a + (1 - a)


# ----------------------------------------------------------------------------- files

# Largest image (in pixels) that open_image decodes at full size: 2**26 is 8192 x 8192,
# 192 MiB as 8-bit RGB (768 MiB once ImageProcessor makes it float32). A larger JPEG is
# decoded at 1/2, 1/4 or 1/8 scale by libjpeg's DCT scaling (Image.draft: the full-size
# image is never built); a larger image of any other format is refused with a ValueError.
MAX_DECODE_PIXELS = 1 << 26
_JPEG_MAGIC = b"\xff\xd8\xff"


def open_image(path, max_pixels: int = MAX_DECODE_PIXELS):
    """Open and decode an image file with bounded memory; returns a loaded ``PIL.Image``.

    The image keeps its mode (convert with ``.convert("RGB")`` or let
    :class:`fusion.ImageProcessor` do it). A JPEG of more than ``max_pixels`` pixels is
    decoded at the smallest reduction (1/2, 1/4, 1/8) that fits, without building the
    full-size image (PIL's decompression-bomb guard is replaced by this bound for JPEG);
    any other file over the bound is a ``ValueError``. A missing file is a
    ``FileNotFoundError``; an unreadable, truncated or non-image file a ``ValueError``
    naming the path.
    """
    import os

    from PIL import Image, JpegImagePlugin, UnidentifiedImageError

    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels: expected a positive int, got {max_pixels!r}")
    key = f"image {os.fspath(path)!r}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{key}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{key}: is a folder; expected an image file (JPEG, PNG, ...)")
    try:
        with open(path, "rb") as f:
            is_jpeg = f.read(3) == _JPEG_MAGIC
        if is_jpeg:  # the plugin directly: Image.open's bomb check would refuse before draft() can shrink it
            fp = open(path, "rb")
            try:
                img = JpegImagePlugin.jpeg_factory(fp, os.fspath(path))
            except BaseException:
                fp.close()
                raise
            img._exclusive_fp = True  # close the file after load(), as Image.open(path) does
        else:
            img = Image.open(path)
    except UnidentifiedImageError as err:
        raise ValueError(f"{key}: not an image file PIL can read; accepted are the formats PIL decodes "
                         f"(JPEG, PNG, BMP, GIF, WebP, TIFF, ...)") from err
    except Image.DecompressionBombError as err:
        raise ValueError(f"{key}: PIL refuses to open it as a possible decompression bomb ({err}); fusion decodes "
                         f"at most max_pixels={max_pixels} pixels (fusion.image_io.MAX_DECODE_PIXELS) and only "
                         f"JPEG at reduced size: downscale the file first") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"{key}: cannot read the image header ({type(err).__name__}: {err})") from err
    try:
        w, h = img.size
        if w * h > max_pixels:
            if img.format in ("JPEG", "MPO"):
                for scale in (2, 4, 8):
                    if -(-w // scale) * -(-h // scale) <= max_pixels:
                        break
                img.draft(img.mode, (w // scale, h // scale))
            if img.width * img.height > max_pixels:
                raise ValueError(
                    f"{key}: {w}x{h} is {w * h / 1e6:.1f} M pixels, more than max_pixels={max_pixels} "
                    f"({max_pixels / 1e6:.1f} M; fusion.image_io.MAX_DECODE_PIXELS)"
                    + (" even at 1/8 scale" if img.format in ("JPEG", "MPO") else
                       f"; only JPEG can be decoded at reduced size, this is {img.format}")
                    + "; downscale the file first or pass a larger max_pixels")
        img.load()
    except ValueError:
        img.close()
        raise
    except (OSError, SyntaxError) as err:
        img.close()
        raise ValueError(f"{key}: cannot decode the image ({type(err).__name__}: {err}); the file is damaged "
                         f"or truncated: re-encode or re-download it") from err
    return img
