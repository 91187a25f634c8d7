"""Token boxes: the normalised ``xyxy`` image region each token covers, and box text.

Boxes are in full-image coordinates, ``x`` to the right and ``y`` down, both in
[0, 1] of the tower's image frame: the square ``pixel_values`` the image processor
produces (for ``processor.mode: pad`` that is the padded square, for ``crop`` the
centre crop). A token ``(i, j)`` of an ``h × w`` grid (row ``i``, column ``j``) covers
``[j / w, i / h, (j + 1) / w, (i + 1) / h]``.

Text boxes are what VLMs are trained to read and write: ``"[0.12, 0.31, 0.50, 0.90]"``
(``x0, y0, x1, y1`` normalised, two or more decimals). :func:`parse_box` reads one such
answer strictly; :func:`text_to_boxes` finds every bracketed box in free text;
:func:`boxes_to_text` writes them.
"""
from __future__ import annotations

import math
import re
from typing import List, Sequence, Tuple, Union

import torch

Box = Tuple[float, float, float, float]
BoxLike = Union[str, Sequence[float], torch.Tensor]

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_SEP = r"\s*,\s*"
_BOX_BODY = rf"\s*({_NUMBER}){_SEP}({_NUMBER}){_SEP}({_NUMBER}){_SEP}({_NUMBER})\s*"
_BRACKETED = re.compile(rf"\[{_BOX_BODY}\]")
_WHOLE = re.compile(rf"\s*(?:\[{_BOX_BODY}\]|\({_BOX_BODY}\)|{_BOX_BODY})\s*")


# ----------------------------------------------------------------------------- grids


def grid_boxes(h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Boxes of an ``h × w`` grid in row-major token order: ``[h * w, 4]`` (x0, y0, x1, y1)."""
    if h < 1 or w < 1:
        raise ValueError(f"grid_boxes: h and w must be >= 1, got h={h}, w={w}")
    ys = torch.arange(h, dtype=torch.float64)
    xs = torch.arange(w, dtype=torch.float64)
    y0 = (ys / h)[:, None].expand(h, w)
    y1 = ((ys + 1) / h)[:, None].expand(h, w)
    x0 = (xs / w)[None, :].expand(h, w)
    x1 = ((xs + 1) / w)[None, :].expand(h, w)
    # [h, w, 4] -> [h * w, 4]
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(h * w, 4).to(dtype)


def map_into(boxes: torch.Tensor, outer: torch.Tensor) -> torch.Tensor:
    """Boxes given relative to ``outer`` (a crop) -> full-image boxes.

    ``boxes [..., N, 4]`` in [0, 1] of the crop, ``outer [..., 4]`` the crop's own box in the
    image; returns ``[..., N, 4]`` with ``x = X0 + x * (X1 - X0)``, ``y = Y0 + y * (Y1 - Y0)``.
    """
    x0, y0, x1, y1 = outer.to(boxes.dtype).unsqueeze(-2).unbind(-1)  # each [..., 1]
    origin = torch.stack([x0, y0, x0, y0], dim=-1)  # [..., 1, 4]
    extent = torch.stack([x1 - x0, y1 - y0, x1 - x0, y1 - y0], dim=-1)
    return origin + boxes * extent


def union_boxes(boxes: torch.Tensor, assignment: torch.Tensor, n_out: int) -> torch.Tensor:
    """The union (enclosing box) of the boxes merged into each output token.

    ``boxes [N, 4]`` or ``[B, N, 4]``; ``assignment [B, N]`` int64, the output position of
    each input token (values in ``[0, n_out)``, every output hit). Returns ``[B, n_out, 4]``.
    """
    Bsz, N = assignment.shape
    b = boxes.expand(Bsz, N, 4)
    idx = assignment.unsqueeze(-1).expand(Bsz, N, 2)
    lo = b.new_full((Bsz, n_out, 2), math.inf).scatter_reduce(1, idx, b[..., :2], "amin")
    hi = b.new_full((Bsz, n_out, 2), -math.inf).scatter_reduce(1, idx, b[..., 2:], "amax")
    return torch.cat([lo, hi], dim=-1)


def overlap_mask(token_boxes: torch.Tensor, box: torch.Tensor, min_overlap: float = 0.0) -> torch.Tensor:
    """Which tokens overlap ``box``: ``[..., N]`` bool.

    Rule: the intersection of the token's box and ``box`` has positive area (touching edges
    do not count) *and* covers at least ``min_overlap`` of the token's own area
    (intersection over the token's area, IoA). ``min_overlap=0`` keeps every token that
    overlaps at all; ``1`` keeps the tokens that lie entirely inside ``box``.
    """
    box = box.to(token_boxes.dtype)
    iw = (torch.minimum(token_boxes[..., 2], box[2]) - torch.maximum(token_boxes[..., 0], box[0])).clamp_min(0)
    ih = (torch.minimum(token_boxes[..., 3], box[3]) - torch.maximum(token_boxes[..., 1], box[1])).clamp_min(0)
    inter = iw * ih
    area = (token_boxes[..., 2] - token_boxes[..., 0]) * (token_boxes[..., 3] - token_boxes[..., 1])
    # a relative tolerance so that a token exactly inside the box passes min_overlap=1 despite rounding
    return (inter > 0) & (inter >= min_overlap * area * (1 - 1e-6))


def tokens_in(token_boxes: torch.Tensor, box: BoxLike, min_overlap: float = 0.0
              ) -> Union[torch.Tensor, List[torch.Tensor]]:
    """Indices of the tokens whose region overlaps ``box`` (rule: :func:`overlap_mask`).

    ``token_boxes`` ``[N, 4]`` gives one int64 index tensor; ``[B, N, 4]`` (per-image boxes,
    e.g. with ``fusion.reduce`` or ROI crops) gives a list of ``B`` of them. ``box`` is a box
    (4 numbers, a tensor ``[4]`` or box text, validated like :func:`parse_box`).
    """
    if isinstance(min_overlap, bool) or not isinstance(min_overlap, (int, float)) or not 0 <= min_overlap <= 1:
        raise ValueError(f"min_overlap: expected a number in [0, 1] (a fraction of each token's area), "
                         f"got {min_overlap!r}")
    if token_boxes.dim() not in (2, 3) or token_boxes.shape[-1] != 4:
        raise ValueError(f"token_boxes: expected [N, 4] or [B, N, 4], got {list(token_boxes.shape)}")
    b = torch.tensor(as_box(box, "box"), dtype=torch.float64, device=token_boxes.device)
    mask = overlap_mask(token_boxes.to(torch.float64), b, float(min_overlap))
    if mask.dim() == 1:
        return mask.nonzero().flatten()
    return [m.nonzero().flatten() for m in mask]


# ----------------------------------------------------------------------------- validation


def check_box(values: Sequence[float], key: str) -> Box:
    """Validate 4 numbers as a normalised ``x0, y0, x1, y1`` box inside the image.

    Errors (``ValueError`` naming ``key``): not 4 finite numbers; a coordinate outside
    [0, 1] (out of the image: nothing is clamped); ``x0 >= x1`` or ``y0 >= y1`` (a
    degenerate or flipped box).
    """
    try:
        items = [float(v) for v in values]
    except (TypeError, ValueError):
        items = []
    if len(items) != 4 or not all(math.isfinite(v) for v in items):
        raise ValueError(f"{key}: expected 4 finite numbers [x0, y0, x1, y1], got {_show(values)}")
    x0, y0, x1, y1 = items
    if not all(0.0 <= v <= 1.0 for v in items):
        hint = ""
        if all(0.0 <= v for v in items) and max(items) <= 1000:
            hint = (" (this looks like 0-1000 or pixel coordinates: divide by 1000 or by the image size)"
                    if max(items) > 1 else "")
        raise ValueError(f"{key}: box {_show(items)} lies outside the image; coordinates are normalised "
                         f"x0, y0, x1, y1 in [0, 1]{hint}")
    if not (x0 < x1 and y0 < y1):
        what = "flipped" if (x0 > x1 or y0 > y1) else "empty (zero width or height)"
        raise ValueError(f"{key}: box {_show(items)} is {what}; it needs x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


def as_box(box: BoxLike, key: str) -> Box:
    """A box from text (:func:`parse_box`), 4 numbers or a tensor ``[4]``, validated."""
    if isinstance(box, str):
        return parse_box(box, key=key)
    if isinstance(box, torch.Tensor):
        if box.shape != (4,):
            raise ValueError(f"{key}: expected a box tensor of shape [4], got {list(box.shape)}")
        box = box.tolist()
    return check_box(box, key)


def _show(values) -> str:
    try:
        return "[" + ", ".join(f"{float(v):g}" for v in values) + "]"
    except (TypeError, ValueError):
        return repr(values)


# ----------------------------------------------------------------------------- text


def parse_box(text: str, key: str = "text") -> Box:
    """Parse one box answer, e.g. ``"[0.12, 0.305, 0.5, 0.9]"`` -> ``(0.12, 0.305, 0.5, 0.9)``.

    Accepted: four numbers separated by commas, in ``[...]``, ``(...)`` or bare, with
    optional whitespace around; nothing else. Errors (``ValueError``): malformed text
    (quoting it, with the expected form), coordinates outside [0, 1], degenerate or
    flipped boxes (see :func:`check_box`). Boxes are never clamped.
    """
    if not isinstance(text, str):
        raise TypeError(f"{key}: expected box text like '[0.12, 0.31, 0.50, 0.90]', got {type(text).__name__}")
    m = _WHOLE.fullmatch(text)
    if m is None:
        found = _BRACKETED.findall(text)
        hint = (f"; it contains {len(found)} bracketed box(es): use fusion.text_to_boxes to find boxes "
                f"in free text" if found else "")
        raise ValueError(f"{key}: cannot parse {text!r} as a box; expected four comma-separated numbers "
                         f"x0, y0, x1, y1 in [0, 1], e.g. '[0.12, 0.31, 0.50, 0.90]'{hint}")
    numbers = [g for g in m.groups() if g is not None]
    return check_box([float(v) for v in numbers], f"{key} ({text.strip()!r})")


def text_to_boxes(text: str) -> List[Box]:
    """Every bracketed box ``[x0, y0, x1, y1]`` in ``text`` (e.g. a VLM answer), in order.

    Only groups of exactly four numbers in square brackets count as boxes; each is
    validated (:func:`check_box`: in [0, 1], not degenerate) and a bad one is an error,
    not skipped. Text with no box gives ``[]``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text: expected a string, got {type(text).__name__}")
    out = []
    for i, m in enumerate(_BRACKETED.finditer(text)):
        out.append(check_box([float(v) for v in m.groups()], f"text box {i} ({m.group(0)!r})"))
    return out


def boxes_to_text(boxes: Union[BoxLike, Sequence[BoxLike]], decimals: int = 2) -> str:
    """Write boxes as VLM text: one box -> ``"[0.12, 0.31, 0.50, 0.90]"``; several (a list of
    boxes or a tensor ``[n, 4]``) -> the boxes joined by ``", "``.

    Each coordinate is written with ``decimals`` (>= 2) decimals, rounded to nearest.
    Boxes are validated first (:func:`check_box`), so the text always parses back with
    :func:`text_to_boxes` to the rounded values (an edge that rounds onto the other is an
    error: use more decimals).
    """
    if isinstance(decimals, bool) or not isinstance(decimals, int) or decimals < 2:
        raise ValueError(f"decimals: expected an int >= 2, got {decimals!r}")
    if isinstance(boxes, torch.Tensor):
        if boxes.dim() == 1:
            items = [boxes]
        elif boxes.dim() == 2 and boxes.shape[1] == 4:
            items = list(boxes)
        else:
            raise ValueError(f"boxes: expected a tensor [4] or [n, 4], got {list(boxes.shape)}")
    elif isinstance(boxes, str) or (isinstance(boxes, Sequence) and boxes and
                                    all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in boxes)):
        items = [boxes]
    elif isinstance(boxes, Sequence):
        items = list(boxes)
    else:
        raise TypeError(f"boxes: expected a box, a list of boxes or a tensor [n, 4], got {type(boxes).__name__}")
    parts = []
    for i, b in enumerate(items):
        box = as_box(b, f"boxes[{i}]")
        text = "[" + ", ".join(f"{v:.{decimals}f}" for v in box) + "]"
        check_box([float(v) for v in _BRACKETED.fullmatch(text).groups()],
                  f"boxes[{i}] written with {decimals} decimals ({text})")
        parts.append(text)
    return ", ".join(parts)
