"""Pure-PyTorch reference of every op in ``fusion.kernels``: the CPU path and the oracle.

Two flavours live here:

- ``grid_merge_reference`` / ``pyramid_pool_reference``: the path CPU users run. Grids
  stay channels-last; resampling is two small matrix products (``[W, w]`` along the
  width, ``[H, h]`` along the height, weights from :mod:`._weights`), the LayerNorm
  runs on the ``[B, H*W, C]`` result, and identity resizes cost nothing.
- ``naive_grid_merge`` / ``naive_pyramid_pool``: the sequence a VLM codebase writes by
  hand (Eagle-style: transpose to NCHW, upcast, ``F.interpolate`` /
  ``F.adaptive_avg_pool2d``, transpose back, ``F.layer_norm``, ``torch.cat``). It shares
  no code with the rest of the package, which makes it the independent test oracle and
  the benchmark baseline.

Arguments are assumed validated (the public functions in ``fusion.kernels`` do that).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._weights import resample_matrix

Norm = Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resample_grid(x: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """``[B, h, w, C]`` (any strides, any float dtype) -> ``[B, H, W, C]`` in fp32 (fp64 stays).

    Separable: one ``[W, w]`` product along the width, one ``[H, h]`` along the height,
    the smaller intermediate first. Axes whose size already matches are skipped.
    """
    B, h, w, C = x.shape
    H, W = size
    cd = _compute_dtype(x.dtype)
    x = x.to(cd)
    if (h, w) == (H, W):
        return x
    if h == H:
        return torch.matmul(resample_matrix(w, W, mode, x.device, cd), x)
    if w == W:
        # [H, h] @ [B, h, w*C] -> [B, H, w*C]
        return torch.matmul(resample_matrix(h, H, mode, x.device, cd),
                            x.reshape(B, h, w * C)).view(B, H, W, C)
    mh = resample_matrix(h, H, mode, x.device, cd)
    mw = resample_matrix(w, W, mode, x.device, cd)
    if h * W <= H * w:  # width first: intermediate [B, h, W, C]
        t = torch.matmul(mw, x)  # [W, w] @ [B, h, w, C] -> [B, h, W, C]
        return torch.matmul(mh, t.view(B, h, W * C)).view(B, H, W, C)
    # height first: intermediate [B, H, w, C]
    t = torch.matmul(mh, x.reshape(B, h, w * C)).view(B, H, w, C)
    return torch.matmul(mw, t)


def _layer_norm(y: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    if norm is None:
        return y
    weight, bias = norm
    weight = None if weight is None else weight.to(y.dtype)
    bias = None if bias is None else bias.to(y.dtype)
    return F.layer_norm(y, (y.shape[-1],), weight, bias, eps)


def grid_merge_reference(grids: Sequence[torch.Tensor], size: Tuple[int, int], mode: str = "area",
                         norms: Optional[Sequence[Norm]] = None, eps: float = 1e-5,
                         layout: str = "channel") -> torch.Tensor:
    """Resample each ``[B, h_i, w_i, C_i]`` grid to ``size``, LayerNorm it, concatenate.

    Returns ``[B, H*W, sum C_i]`` (``layout="channel"``) or ``[B, n*H*W, C]``
    (``"sequence"``) in the grids' dtype; computes in fp32 (fp64 for fp64 grids).
    """
    H, W = size
    norms = [None] * len(grids) if norms is None else norms
    B, n, x0 = grids[0].shape[0], len(grids), grids[0]
    sizes = [g.shape[-1] for g in grids]
    if layout == "channel":
        out = x0.new_empty(B, H * W, sum(sizes))
    else:
        out = x0.new_empty(B, n * H * W, sizes[0])
    off = 0
    for i, (x, norm) in enumerate(zip(grids, norms)):
        C = x.shape[-1]
        y = _layer_norm(resample_grid(x, (H, W), mode).reshape(B, H * W, C), norm, eps)
        if n == 1:
            return y.to(x.dtype)
        # writing each grid into its slice is one copy; torch.cat over the channel axis
        # is several times slower on CPU
        if layout == "channel":
            out[:, :, off:off + C] = y
            off += C
        else:
            out[:, i * H * W:(i + 1) * H * W] = y
    return out


def pyramid_pool_reference(tokens: torch.Tensor, grid: Tuple[int, int],
                           levels: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """``[B, H*W, C]`` on ``grid`` -> ``[B, sum l_h*l_w, C]``: area pooling to each level.

    All levels' width products run as one ``[sum l_w, W]`` matrix product, so the input
    is read once; each level's height product then reads its slice of that result.
    """
    B, _, C = tokens.shape
    H, W = grid
    cd = _compute_dtype(tokens.dtype)
    x = tokens.to(cd).view(B, H, W, C)
    mw = torch.cat([resample_matrix(W, lw, "area", x.device, cd) for _, lw in levels])
    t = torch.matmul(mw, x)  # [sum lw, W] @ [B, H, W, C] -> [B, H, sum lw, C]
    outs, col = [], 0
    for lh, lw in levels:
        mh = resample_matrix(H, lh, "area", x.device, cd)
        part = t[:, :, col:col + lw, :]  # [B, H, lw, C]
        col += lw
        if lh == H:
            outs.append(part.reshape(B, H * lw, C))
        else:
            outs.append(torch.matmul(mh, part.reshape(B, H, lw * C)).view(B, lh * lw, C))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.to(tokens.dtype)


# --------------------------------------------------------------------------------------
# The naive, hand-written sequence: independent oracle and benchmark baseline.
# --------------------------------------------------------------------------------------

def naive_grid_merge(grids: Sequence[torch.Tensor], size: Tuple[int, int], mode: str = "area",
                     norms: Optional[Sequence[Norm]] = None, eps: float = 1e-5,
                     layout: str = "channel") -> torch.Tensor:
    """Eagle-style merge: NCHW copy, upcast, interpolate/pool, back to tokens, LN, cat."""
    H, W = size
    norms = [None] * len(grids) if norms is None else norms
    outs: List[torch.Tensor] = []
    for x, norm in zip(grids, norms):
        B, _, _, C = x.shape
        up = torch.float64 if x.dtype == torch.float64 else torch.float32
        nchw = x.permute(0, 3, 1, 2).contiguous().to(up)  # [B, C, h, w]
        if mode == "area":
            r = F.adaptive_avg_pool2d(nchw, (H, W))
        else:
            r = F.interpolate(nchw, size=(H, W), mode="bilinear", align_corners=False)
        tok = r.flatten(2).transpose(1, 2)  # [B, H*W, C]
        if norm is not None:
            wt, bs = norm
            tok = F.layer_norm(tok, (C,), None if wt is None else wt.to(up),
                               None if bs is None else bs.to(up), eps)
        outs.append(tok.to(x.dtype))
    return torch.cat(outs, dim=-1 if layout == "channel" else 1)


def naive_pyramid_pool(tokens: torch.Tensor, grid: Tuple[int, int],
                       levels: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """One ``F.adaptive_avg_pool2d`` per level on an NCHW copy, then ``torch.cat``."""
    B, _, C = tokens.shape
    H, W = grid
    up = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    nchw = tokens.transpose(1, 2).reshape(B, C, H, W).to(up)
    outs = [F.adaptive_avg_pool2d(nchw, lv).flatten(2).transpose(1, 2) for lv in levels]
    return torch.cat(outs, dim=1).to(tokens.dtype)
