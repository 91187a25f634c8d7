"""``fusion-tower show``: one picture of what the tower sees.

    fusion-tower show SOURCE IMAGE --out picture.png [--rois BOX ...] [--weights random]

The picture (PNG, drawn with Pillow only, written atomically) has one row of panels:

- ``image``: the tower's image frame (the square ``pixel_values``: padded, cropped or
  squashed as ``processor.mode`` says), with the fused tokens' boxes as thin lines (when
  a token is at least ``MIN_TOKEN_PX`` pixels wide) and each ROI as a coloured rectangle;
- one panel per encoder: its feature grid ``[h, w, C]`` at its own resolution, coloured
  by PCA (:func:`fusion.pca.pca_rgb`: the three leading components as RGB), each encoder
  with its own PCA;
- ``fused``: the fused tokens *before* the projector, coloured by one PCA shared with
  the level and ROI tokens, each token painted over its box (so a reduced or pyramid
  token covers the region it merges); with ``sequence_concat`` one panel per encoder
  segment, and one per ``fusion.levels`` level;

and, with ``--rois``, a second row with each ROI: the crop the encoders saw (the ROI's
token boxes as lines) and the ROI's tokens (same PCA as ``fused``).

Every panel is ``--panel-size`` pixels square; token maps are upsampled with nearest
neighbour, so each token is a flat block.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from .pca import pca_rgb

MARGIN = 10  # pixels between panels and around the picture
TITLE = 20  # pixels of title above each panel
MIN_TOKEN_PX = 12  # token outlines on the image are drawn only when tokens are this wide (else a white mesh)
ROI_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


# ----------------------------------------------------------------------------- painting


def grid_image(colours: torch.Tensor, size: int):
    """``colours [h, w, 3]`` in [0, 1] -> a ``size x size`` PIL image, each token a flat block."""
    from PIL import Image

    h, w, _ = colours.shape
    arr = (colours.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB").resize((size, size), Image.NEAREST)


def boxes_image(colours: torch.Tensor, boxes: torch.Tensor, size: int, frame: Optional[Sequence[float]] = None):
    """Tokens ``colours [N, 3]`` painted over their ``boxes [N, 4]`` (normalised xyxy) on a
    grey ``size x size`` canvas; ``frame`` (a box) maps that region onto the canvas
    (default the whole image). Larger boxes are painted first, so small ones stay visible."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    b = boxes.detach().to("cpu", torch.float64)
    if frame is not None:
        fx0, fy0, fx1, fy1 = (float(v) for v in frame)
        b = (b - torch.tensor([fx0, fy0, fx0, fy0], dtype=torch.float64)) / torch.tensor(
            [fx1 - fx0, fy1 - fy0, fx1 - fx0, fy1 - fy0], dtype=torch.float64)
    px = (b * size).round().long().tolist()
    rgb = (colours.clamp(0, 1) * 255).round().to(torch.uint8).tolist()
    order = sorted(range(len(px)), key=lambda i: -(px[i][2] - px[i][0]) * (px[i][3] - px[i][1]))
    for i in order:
        x0, y0, x1, y1 = px[i]
        if x1 > x0 and y1 > y0:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=tuple(rgb[i]))
    return canvas


def outline_boxes(img, boxes: torch.Tensor, colour, width: int = 1, frame: Optional[Sequence[float]] = None):
    """Draw ``boxes [N, 4]`` (normalised xyxy, in ``frame``) as outlines on ``img`` (in place)."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    W, H = img.size
    b = boxes.detach().to("cpu", torch.float64)
    if frame is not None:
        fx0, fy0, fx1, fy1 = (float(v) for v in frame)
        b = (b - torch.tensor([fx0, fy0, fx0, fy0], dtype=torch.float64)) / torch.tensor(
            [fx1 - fx0, fy1 - fy0, fx1 - fx0, fy1 - fy0], dtype=torch.float64)
    for x0, y0, x1, y1 in b.tolist():
        draw.rectangle((round(x0 * W), round(y0 * H), round(x1 * W) - 1, round(y1 * H) - 1),
                       outline=colour, width=width)
    return img


def tensor_image(pixels: torch.Tensor, size: int):
    """``pixels [3, H, W]`` in [0, 1] -> a ``size x size`` PIL image."""
    from PIL import Image

    arr = (pixels.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB").resize((size, size), Image.BICUBIC)


def _sparse(n_tokens: int, size: int) -> bool:
    """Token outlines are drawn only while a token is at least :data:`MIN_TOKEN_PX` wide."""
    return size / max(1.0, n_tokens ** 0.5) >= MIN_TOKEN_PX


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def compose(rows: List[List[Tuple[str, object]]], size: int, heading: str = ""):
    """Lay out ``rows`` of ``(title, PIL image)`` panels on a white canvas."""
    from PIL import Image, ImageDraw

    cols = max(len(r) for r in rows)
    head = TITLE + MARGIN // 2 if heading else 0
    width = MARGIN + cols * (size + MARGIN)
    height = MARGIN + head + len(rows) * (TITLE + size + MARGIN)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    if heading:
        draw.text((MARGIN, MARGIN), heading, fill=(0, 0, 0), font=_font(15))
    for r, row in enumerate(rows):
        y = MARGIN + head + r * (TITLE + size + MARGIN)
        for c, (title, panel) in enumerate(row):
            x = MARGIN + c * (size + MARGIN)
            draw.text((x, y + 2), title, fill=(0, 0, 0), font=font)
            canvas.paste(panel, (x, y + TITLE))
    return canvas


# ----------------------------------------------------------------------------- the picture


def render(tower, image, rois: Optional[Sequence] = None, size: int = 192, heading: str = ""):
    """The picture (a PIL image) of ``tower`` on one ``image`` (anything the image processor
    takes), with optional ``rois`` (boxes: text, 4 numbers or tensors ``[4]``, normalised
    xyxy in the image frame)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ValueError(f"size: expected an int >= 16 (pixels per panel), got {size!r}")
    rois = list(rois or [])
    batch = tower.image_processor(image, rois=[rois] if rois else None)
    if batch["pixel_values"].shape[0] != 1:
        raise ValueError(f"image: expected one image, got a batch of {batch['pixel_values'].shape[0]}")
    tower.eval()
    with torch.no_grad():
        out = tower(**batch.to(tower.device), return_dict=True)
    fused = out.merged_tokens[0]  # [N, C_fused]: the tokens before the projector
    boxes = out.token_boxes[0] if out.token_boxes.dim() == 3 else out.token_boxes  # [N, 4]
    colours = pca_rgb(fused)  # one PCA for every fused, level and ROI token

    frame_img = tensor_image(batch["pixel_values"][0], size)
    grid_segments = [(label, s, e) for label, s, e in out.segments if not label.startswith(("level", "roi"))]
    for _, s, e in grid_segments:
        if _sparse(e - s, size):
            outline_boxes(frame_img, boxes[s:e], (255, 255, 255), 1)
    roi_boxes = batch["roi_boxes"] if rois else torch.zeros(0, 4)
    for k, box in enumerate(roi_boxes):
        outline_boxes(frame_img, box[None], ROI_COLOURS[k % len(ROI_COLOURS)], 3)
    row: List[Tuple[str, object]] = [("image", frame_img)]
    for name, grid in out.encoder_grids.items():
        g = grid[0]  # [h, w, C]
        h, w, c = g.shape
        row.append((f"{name} {h}x{w}x{c}", grid_image(pca_rgb(g.reshape(h * w, c)).reshape(h, w, 3), size)))
    for label, s, e in out.segments:
        if label.startswith("roi"):
            continue
        title = f"fused {label}" if label != "fused" else "fused"
        row.append((f"{title} {e - s}x{fused.shape[1]}", boxes_image(colours[s:e], boxes[s:e], size)))
    rows = [row]
    if rois:
        roi_row: List[Tuple[str, object]] = []
        for k, box in enumerate(roi_boxes):
            label = f"roi{k}"
            s, e = next((s, e) for lab, s, e in out.segments if lab == label)
            crop = tensor_image(batch["roi_pixel_values"][k], size)
            if _sparse(e - s, size):
                outline_boxes(crop, boxes[s:e], (255, 255, 255), 1, frame=box.tolist())
            outline_boxes(crop, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), ROI_COLOURS[k % len(ROI_COLOURS)], 3)
            coords = ", ".join(f"{v:.2f}" for v in box.tolist())
            roi_row.append((f"{label} [{coords}]", crop))
            roi_row.append((f"{label} tokens {e - s}", boxes_image(colours[s:e], boxes[s:e], size, frame=box.tolist())))
        rows.append(roi_row)
    return compose(rows, size, heading)


# ----------------------------------------------------------------------------- command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="preset name (see `fusion-tower presets`), .yaml/.json file")
    p.add_argument("image", help="the image file to show")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. fusion.grid=16")
    p.add_argument("--out", required=True, help="the picture to write (.png)")
    p.add_argument("--rois", nargs="+", default=[], metavar="BOX",
                   help="regions of interest as normalised x0,y0,x1,y1 boxes, e.g. '[0.1,0.2,0.6,0.7]'")
    p.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                   help="'random' initialises every encoder from --seed (no downloads)")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random (default 0)")
    p.add_argument("--panel-size", type=int, default=192, help="pixels per panel side (default 192)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def run(args) -> int:
    """``fusion-tower show``: build the tower, render, write ``--out`` atomically."""
    from .atomic import atomic_write
    from .boxes import parse_box
    from .config import load_config
    from .image_io import open_image
    from .tower import MultiEncoderTower

    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out: {args.out!r} must end in .png (the picture is a PNG)")
    rois = [parse_box(text, key=f"--rois[{i}]") for i, text in enumerate(args.rois)]
    with open_image(args.image) as img:
        image = img.copy()
    tower = MultiEncoderTower(load_config(args.source, args.overrides), weights=args.weights, seed=args.seed)
    tower.to(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    heading = f"{args.source}{' ' + ' '.join(args.overrides) if args.overrides else ''} ({args.weights} weights): " \
              f"{os.path.basename(args.image)}; colours: PCA (3 components -> RGB)"
    picture = render(tower, image, rois=rois, size=args.panel_size, heading=heading)
    atomic_write(out, lambda tmp: picture.save(tmp, format="PNG", optimize=True))
    print(f"wrote {out} ({picture.width}x{picture.height}): image, {len(tower.encoders)} encoder maps, fused tokens"
          + (f", {len(rois)} ROIs" if rois else ""))
    return 0
