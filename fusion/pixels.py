"""The checks on pixel tensors handed to fusion: type, layout ``[N, 3, H, W]``, dtype, finiteness;
and on the per-channel values that describe pixels (8-bit colours, normalisation statistics).

One rule set for ``pixel_values`` (tower, on-device preprocessing), ``roi_pixel_values`` and an
encoder's normalised input, so every entry point rejects the same mistakes with the same words.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple

import torch

NONFINITE = "contains NaN or infinite values"


def check_layout(x: Any, arg: str, rows: str = "B", size: Optional[int] = None, key: str = "",
                 empty_ok: bool = False, hint: str = "") -> torch.Tensor:
    """``x`` must be a tensor ``[rows, 3, H, W]`` (``[rows, 3, size, size]`` when ``size`` is given;
    ``key`` names the config key that sets it). TypeError / ValueError naming ``arg`` otherwise."""
    want = f"[{rows}, 3, {size}, {size}]" if size is not None else f"[{rows}, 3, H, W]"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{arg}: expected a torch.Tensor {want}{' in [0, 1]' if size is None else ''}, "
                        f"got {type(x).__name__}{hint}")
    if x.dim() != 4 or x.shape[1] != 3 or (size is not None and tuple(x.shape[2:]) != (size, size)):
        where = f" ({key})" if key else ""
        raise ValueError(f"{arg}: expected {'pixels' if size is not None else 'shape'} {want}{where}, "
                         f"got {list(x.shape)}")
    if not empty_ok and x.numel() == 0:
        raise ValueError(f"{arg}: empty tensor of shape {list(x.shape)}")
    return x


def as_pixels(x: Any, arg: str, rows: str = "B", uint8: bool = True, finite: bool = True,
              empty_ok: bool = False, hint: str = "") -> torch.Tensor:
    """Checked pixels ``[rows, 3, H, W]`` in [0, 1] as float32.

    ``uint8``: a uint8 tensor is taken as 0-255 and divided by 255 (else it is a TypeError).
    ``finite``: NaN/inf is a ValueError; under ``torch.compile`` the check stays in the graph as
    an asynchronous assertion (no graph break, no host sync: RuntimeError on the CPU, a
    device-side assert on CUDA) with the same message.
    """
    x = check_layout(x, arg, rows, empty_ok=empty_ok, hint=hint)
    if x.dtype == torch.uint8 and uint8:
        x = x.float() / 255.0
    elif not x.is_floating_point():
        accepted = "a float tensor in [0, 1] (or uint8 in [0, 255])" if uint8 else "a float tensor in [0, 1]"
        raise TypeError(f"{arg}: expected {accepted}, got dtype {x.dtype}{hint}")
    x = x.float()
    if finite:
        ok = torch.isfinite(x).all()
        if torch.compiler.is_compiling():
            torch._assert_async(ok, f"{arg}: {NONFINITE}")
        elif not ok:
            raise ValueError(f"{arg}: {NONFINITE}")
    return x


def check_rgb255(value: Any, key: str) -> Tuple[int, int, int]:
    """Validate an 8-bit RGB colour: three ints in 0-255."""
    items = list(value) if isinstance(value, (list, tuple)) else []
    if len(items) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in items):
        raise ValueError(f"{key}: expected [R, G, B], three integers in 0-255, got {value!r}")
    return items[0], items[1], items[2]


def check_channel_stats(value: Any, key: str, kind: str) -> List[float]:
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
