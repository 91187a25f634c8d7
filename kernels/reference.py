"""The PyTorch path of :func:`grid_merge` and :func:`pyramid_pool`: what CPU users run (and
``backend="torch"``, and ``"auto"`` where the kernels cannot take a call).

``grid_merge_reference`` / ``pyramid_pool_reference``: grids stay channels-last and go
through ATen's channels-last pooling / bilinear kernels (one pass, no transposes), the
LayerNorm runs on the ``[B, H*W, C]`` result, each grid is written into its slice of the
output, identity resizes cost nothing. The independent test oracles are in :mod:`.naive`.

Arguments are assumed validated (the public functions in ``fusion.kernels`` do that).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


Norm = Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resample_grid(x: torch.Tensor, size: Tuple[int, int], mode: str) -> torch.Tensor:
    """``[B, h, w, C]`` (any strides, any float dtype) -> ``[B, H, W, C]`` in fp32 (fp64 stays).

    A contiguous ``[B, h, w, C]`` grid *is* a channels-last NCHW tensor, so its permuted
    view goes straight into ATen's channels-last pooling / bilinear kernels: one pass
    over the input, no transposes. (Two separable ``[W, w]`` / ``[H, h]`` matrix
    products, the other natural choice, take two passes and a large intermediate:
    about 2x slower on CPU for the vsre grids.) Identity resizes cost nothing.
    """
    H, W = size
    x = x.to(_compute_dtype(x.dtype))
    if tuple(x.shape[1:3]) == (H, W):
        return x
    nchw = x.permute(0, 3, 1, 2)
    if mode == "area":
        r = F.adaptive_avg_pool2d(nchw, (H, W))
    else:
        r = F.interpolate(nchw, size=(H, W), mode="bilinear", align_corners=False)
    return r.permute(0, 2, 3, 1)


def _layer_norm(y: torch.Tensor, norm: Norm, eps: float) -> torch.Tensor:
    if norm is None:
        return y
    weight, bias = norm
    weight = None if weight is None else weight.to(y.dtype)
    bias = None if bias is None else bias.to(y.dtype)
    return F.layer_norm(y, (y.shape[-1],), weight, bias, eps)


# Bytes (in the compute dtype) of one step of the inference path: small enough that the resampled grid
# and its LayerNorm stay in cache (and the allocator reuses the same blocks step after
# step instead of faulting in fresh pages), large enough that per-call overhead is noise.
STEP_BYTES = 4 << 20


def _needs_grad(grids: Sequence[torch.Tensor], norms: Sequence[Norm]) -> bool:
    params = [p for nm in norms if nm is not None for p in nm if p is not None]
    return torch.is_grad_enabled() and any(t.requires_grad for t in list(grids) + params)


def grid_merge_reference(grids: Sequence[torch.Tensor], size: Tuple[int, int], mode: str = "area",
                         norms: Optional[Sequence[Norm]] = None, eps: float = 1e-5,
                         layout: str = "channel") -> torch.Tensor:
    """Resample each ``[B, h_i, w_i, C_i]`` grid to ``size``, LayerNorm it, concatenate.

    Returns ``[B, H*W, sum C_i]`` (``layout="channel"``) or ``[B, n*H*W, C]``
    (``"sequence"``) in the grids' dtype; computes in fp32 (fp64 for fp64 grids).

    Without autograd (inference, frozen encoders) each grid goes through in batch steps
    of about :data:`STEP_BYTES` written straight into its slice of the output, so the
    fp32 intermediates never leave the cache; the output is the only fresh memory. With
    autograd the grid is done whole (per-step writes into one output would make
    autograd copy the full gradient once per step).
    """
    H, W = size
    norms = [None] * len(grids) if norms is None else norms
    B, n, x0 = grids[0].shape[0], len(grids), grids[0]
    sizes = [g.shape[-1] for g in grids]
    stepped = not _needs_grad(grids, norms)
    if n == 1 and not stepped:
        y = resample_grid(x0, (H, W), mode).reshape(B, H * W, sizes[0])
        return _layer_norm(y, norms[0], eps).to(x0.dtype)
    if layout == "channel":
        out = x0.new_empty(B, H * W, sum(sizes))
    else:
        out = x0.new_empty(B, n * H * W, sizes[0])
    # writing each grid into its slice is one copy; torch.cat over the channel axis
    # is several times slower on CPU. (Slices are taken as they are written: a view made
    # before an earlier slice's write would be a stale leaf to autograd.)
    off = 0
    for i, (x, norm) in enumerate(zip(grids, norms)):
        C = x.shape[-1]
        step = max(1, STEP_BYTES // (H * W * C * _compute_dtype(x.dtype).itemsize)) if stepped else B
        for b0 in range(0, B, step):
            y = resample_grid(x[b0:b0 + step], (H, W), mode).reshape(-1, H * W, C)
            y = _layer_norm(y, norm, eps)
            if layout == "channel":
                out[b0:b0 + step, :, off:off + C] = y
            else:
                out[b0:b0 + step, i * H * W:(i + 1) * H * W] = y
        off += C
    return out


def pyramid_pool_reference(tokens: torch.Tensor, grid: Tuple[int, int],
                           levels: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """``[B, H*W, C]`` on ``grid`` -> ``[B, sum l_h*l_w, C]``: area pooling to each level.

    Channels-last pooling (see :func:`resample_grid`). A level whose size divides an
    exactly-pooled finer level (e.g. 24 -> 12 -> 6 -> 3 -> 1) is pooled from that level
    instead of the input: block means of equal blocks are exact, and only the first
    level reads the whole input.
    """
    B, _, C = tokens.shape
    H, W = grid
    x = tokens.to(_compute_dtype(tokens.dtype)).reshape(B, H, W, C)
    done = {}  # (lh, lw) -> [B, lh, lw, C] for levels that are exact block means of x
    outs = {}
    for lh, lw in sorted(set(levels), key=lambda lv: -lv[0] * lv[1]):
        src = x
        for (sh, sw), t in sorted(done.items(), key=lambda kv: kv[0][0] * kv[0][1]):
            if sh % lh == 0 and sw % lw == 0:
                src = t
                break
        lvl = resample_grid(src, (lh, lw), "area")
        if H % lh == 0 and W % lw == 0:
            done[(lh, lw)] = lvl
        outs[(lh, lw)] = lvl
    parts = [outs[lv].reshape(B, lv[0] * lv[1], C) for lv in levels]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return out.to(tokens.dtype)
