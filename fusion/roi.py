"""Region-of-interest crops (Chain-of-Spot, Liu et al. 2024): zoomed crops as extra tokens.

Host side (:func:`crop_rois`, behind ``tower.image_processor(images, rois=boxes)``): each
box is normalised ``xyxy`` in the image *frame* (the square ``pixel_values`` the
processor makes, the frame every token box uses: see :mod:`fusion.boxes`). It is mapped
back to the ORIGINAL image's pixels (through the processor's pad / crop / squash,
:meth:`fusion.preprocess.ImageProcessor.frame_in_image`), its edges rounded to the
nearest original pixel, and that region is cut from the original image at its native
resolution (parts of a ``pad``-mode box over the padding get the pad colour, exactly as
the padded image has) and resized (squashed, so the crop's grid spans the box exactly)
to ``[3, S, S]``. Returned: ``roi_pixel_values [R, 3, S, S]``, ``roi_image_index [R]``
(which image each crop belongs to) and ``roi_boxes [R, 4]``: the box actually cut, after
rounding to whole pixels (within half an original pixel of the box asked for).

``rois`` (one entry per image, in image order):

- a tensor ``[B, 4]`` (one box per image) or ``[B, k, 4]`` (``k`` boxes per image);
- a list of ``B`` entries, each ``None`` / ``[]`` (no ROI), one box (4 numbers, a tensor
  ``[4]`` or box text like ``"[0.12, 0.31, 0.50, 0.90]"``), or several (a list of boxes
  or a tensor ``[k, 4]``);
- for a single image, also just its box (4 numbers or box text).

Boxes outside [0, 1], degenerate or flipped boxes, and boxes narrower than one original
pixel are errors (nothing is clamped).

Device side (:func:`check_roi_inputs`, behind ``tower(pixel_values, roi_pixel_values=...,
roi_boxes=..., roi_image_index=...)``): the crops are encoded by every encoder and merged
like the image (same LayerNorms), giving each crop the fused grid's tokens (no levels, no
reduction), appended after the image's own tokens, the image's crops in the order they
come. The batched output needs the SAME number of crops per image (``r``); images with
different numbers are an error (run them in separate calls).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

from .boxes import Box, as_box
from .pixels import as_pixels
from .resize import resize_images

ROIS_ACCEPTED = ("a tensor [B, 4] or [B, k, 4], or a list with one entry per image: None / [] (no ROI), "
                 "a box (4 numbers, a tensor [4] or text '[x0, y0, x1, y1]') or a list / tensor [k, 4] of boxes")


# ----------------------------------------------------------------------------- host side


def boxes_per_image(rois: Any, n_images: int) -> List[List[Box]]:
    """Normalise ``rois`` (see the module docstring) to one list of validated boxes per image."""
    if isinstance(rois, torch.Tensor):
        r = rois.detach().to("cpu", torch.float64)
        if r.dim() == 1 and n_images == 1:
            r = r[None]
        if r.dim() == 2:
            r = r[:, None]
        if r.dim() != 3 or r.shape[-1] != 4 or r.shape[0] != n_images:
            raise ValueError(f"rois: got a tensor of shape {list(rois.shape)} for {n_images} image(s); expected "
                             f"[{n_images}, 4] (one box per image) or [{n_images}, k, 4]")
        return [[as_box(b, f"rois[{i}][{k}]") for k, b in enumerate(per)] for i, per in enumerate(r)]
    if n_images == 1 and (isinstance(rois, str) or (
            isinstance(rois, (list, tuple)) and len(rois) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rois))):
        rois = [rois]  # one image, one box
    if not isinstance(rois, (list, tuple)):
        raise TypeError(f"rois: got {type(rois).__name__}; expected {ROIS_ACCEPTED}")
    if len(rois) != n_images:
        raise ValueError(f"rois: got {len(rois)} entries for {n_images} image(s); pass one entry per image "
                         f"({ROIS_ACCEPTED})")
    return [_entry_boxes(entry, f"rois[{i}]") for i, entry in enumerate(rois)]


def _entry_boxes(entry: Any, key: str) -> List[Box]:
    if entry is None:
        return []
    if isinstance(entry, str):
        return [as_box(entry, key)]
    if isinstance(entry, torch.Tensor):
        t = entry.detach().to("cpu", torch.float64)
        if t.dim() == 1:
            return [as_box(t, key)]
        if t.dim() == 2 and t.shape[1] == 4:
            return [as_box(b, f"{key}[{k}]") for k, b in enumerate(t)]
        raise ValueError(f"{key}: expected a box tensor [4] or boxes [k, 4], got shape {list(entry.shape)}")
    if isinstance(entry, (list, tuple)):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry) and entry:
            return [as_box(entry, key)]
        return [as_box(b, f"{key}[{k}]") for k, b in enumerate(entry)]
    raise TypeError(f"{key}: got {type(entry).__name__}; expected None, a box or a list of boxes")


def crop_box(image: torch.Tensor, box: Box, frame: Tuple[float, float, float, float], size: int,
             fill: Sequence[float], key: str = "box") -> Tuple[torch.Tensor, Box]:
    """Cut ``box`` (frame coordinates) from ``image [3, H, W]`` at native resolution and resize it.

    ``frame = (ox, oy, sx, sy)``: frame point ``(x, y)`` is original pixel position
    ``(ox + x·sx, oy + y·sy)``. Edges are rounded to the nearest pixel; pixels outside the
    image (only over ``pad``-mode padding) take ``fill``. Returns ``([3, size, size], box
    actually cut in frame coordinates)``.
    """
    _, H, W = image.shape
    ox, oy, sx, sy = frame
    x0, x1 = (int(math.floor(ox + v * sx + 0.5)) for v in (box[0], box[2]))
    y0, y1 = (int(math.floor(oy + v * sy + 0.5)) for v in (box[1], box[3]))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"{key}: box {list(box)} is narrower than one pixel of the {W}x{H} image "
                         f"(it covers {max(x1 - x0, 0)}x{max(y1 - y0, 0)} pixels); use a larger box")
    if x0 < 0 or y0 < 0 or x1 > W or y1 > H:
        crop = torch.tensor(fill, dtype=image.dtype, device=image.device).view(3, 1, 1).repeat(1, y1 - y0, x1 - x0)
        ix0, iy0, ix1, iy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
        if ix1 > ix0 and iy1 > iy0:
            crop[:, iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0] = image[:, iy0:iy1, ix0:ix1]
    else:
        crop = image[:, y0:y1, x0:x1]
    out = resize_images(crop[None], (size, size))[0]
    cut = ((x0 - ox) / sx, (y0 - oy) / sy, (x1 - ox) / sx, (y1 - oy) / sy)
    return out, cut


def crop_rois(originals: Sequence[torch.Tensor], rois: Any, frames: Sequence[Tuple[float, float, float, float]],
              size: int, pad_color: Sequence[int]) -> dict:
    """The ROI half of ``ImageProcessor.preprocess``: ``originals`` are the ``[3, H, W]`` images
    (before any resize) in batch order, ``frames`` where the processor's frame lies in each
    (``ImageProcessor.frame_in_image``), ``size`` the crops' side, ``pad_color`` the 8-bit
    colour of the padding. Returns ``roi_pixel_values``, ``roi_image_index``, ``roi_boxes``
    (see the module docstring)."""
    per_image = boxes_per_image(rois, len(originals))
    s = size
    fill = [c / 255.0 for c in pad_color]
    device = originals[0].device
    crops, index, cut = [], [], []
    for i, (img, boxes, frame) in enumerate(zip(originals, per_image, frames)):
        for k, box in enumerate(boxes):
            pixels, actual = crop_box(img, box, frame, s, fill, key=f"rois[{i}][{k}]")
            crops.append(pixels.to(device))
            index.append(i)
            cut.append(actual)
    if crops:
        roi_pixel_values = torch.stack(crops).contiguous()
    else:
        roi_pixel_values = torch.zeros(0, 3, s, s, device=device)
    return {"roi_pixel_values": roi_pixel_values,
            "roi_image_index": torch.tensor(index, dtype=torch.int64, device=device),
            "roi_boxes": torch.tensor(cut, dtype=torch.float32, device=device).reshape(-1, 4)}


# ----------------------------------------------------------------------------- device side


@dataclass
class RoiBatch:
    """Validated ROI inputs of one forward pass.

    ``pixel_values [R, 3, H, W]`` float32 in [0, 1]; ``boxes [R, 4]`` float32 (frame
    coordinates); ``order [B, r]`` int64: the ROIs of image ``b`` are rows ``order[b]`` of
    ``pixel_values``, in their original order.
    """

    pixel_values: torch.Tensor
    boxes: torch.Tensor
    order: torch.Tensor

    @property
    def per_image(self) -> int:
        return self.order.shape[1]


def check_roi_inputs(roi_pixel_values: Optional[torch.Tensor], roi_boxes: Optional[torch.Tensor],
                     roi_image_index: Optional[torch.Tensor], batch_size: int, device: torch.device,
                     ) -> Optional[RoiBatch]:
    """Validate the tower's ROI arguments; ``None`` when there are none (or zero crops).

    ``roi_image_index`` may be omitted when the ROIs come grouped by image with the same
    number per image (``R`` a multiple of ``B``): ROI ``i`` then belongs to image ``i // (R / B)``.
    """
    if roi_pixel_values is None:
        if roi_boxes is not None or roi_image_index is not None:
            raise ValueError("roi_pixel_values: missing; roi_boxes / roi_image_index were given without the crops "
                             "(pass all three, e.g. tower(**tower.image_processor(images, rois=boxes)))")
        return None
    if roi_boxes is None:
        raise ValueError("roi_boxes: required with roi_pixel_values: each crop's [x0, y0, x1, y1] box in the image "
                         "(tower.image_processor(images, rois=...) returns it as 'roi_boxes')")
    px = as_pixels(roi_pixel_values, "roi_pixel_values", rows="R", empty_ok=True)
    R = px.shape[0]
    boxes = _check_roi_boxes(roi_boxes, R)
    if R == 0:
        return None
    if roi_image_index is None:
        if R % batch_size:
            raise ValueError(f"roi_image_index: missing, and {R} crops do not split evenly over {batch_size} "
                             f"images; pass roi_image_index (which image each crop belongs to)")
        index = torch.arange(R) // (R // batch_size)
    else:
        index = _check_index(roi_image_index, R, batch_size)
    counts = torch.bincount(index, minlength=batch_size)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"roi_image_index: the images have {counts.tolist()} crops; the batched output needs "
                         f"the same number of crops per image: run images with different numbers of ROIs in "
                         f"separate calls (or repeat a box)")
    order = torch.sort(index, stable=True).indices.view(batch_size, int(counts[0]))
    return RoiBatch(px.to(device), boxes.to(device), order.to(device))


def _check_roi_boxes(b: Any, R: int) -> torch.Tensor:
    if not isinstance(b, torch.Tensor):
        b = torch.as_tensor(b, dtype=torch.float32)
    if b.shape != (R, 4):
        raise ValueError(f"roi_boxes: expected [R, 4] = [{R}, 4] (one box per crop), got {list(b.shape)}")
    b = b.detach().float()
    if R and not (bool(torch.isfinite(b).all()) and bool((b[:, 2] > b[:, 0]).all())
                  and bool((b[:, 3] > b[:, 1]).all())):
        raise ValueError("roi_boxes: every box needs finite x0 < x1 and y0 < y1 (normalised xyxy)")
    return b


def _check_index(index: Any, R: int, B: int) -> torch.Tensor:
    if not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index)
    if index.shape != (R,) or index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(f"roi_image_index: expected an integer tensor [R] = [{R}], got {list(index.shape)} "
                         f"{index.dtype}")
    index = index.detach().to("cpu", torch.int64)
    if R and (int(index.min()) < 0 or int(index.max()) >= B):
        raise ValueError(f"roi_image_index: values must be image indices in [0, {B}), got "
                         f"[{int(index.min())}, {int(index.max())}]")
    return index
