"""Exact attention for SAM's image-encoder blocks without the full score matrix.

segment_anything's ``Attention.forward`` computes, per head, the score matrix
``(q * scale) @ k^T`` ``[B*heads, L, L]`` (``L = h*w``: 4096 for a global block at 1024
px), adds the decomposed relative-position bias (``add_decomposed_rel_pos``: one more
``[B*heads, L, L]`` tensor), takes the softmax (a third) and multiplies by ``v``. At
batch 4 that is three 3.2 GB fp32 tensors alive at once in each global block.

:class:`RelPosSdpaAttention` computes the same function with the same parameters:

- the bias is *decomposed*: ``bias[q, k] = rel_h[q, k_row] + rel_w[q, k_col]`` with
  ``rel_h [B*heads, q_h, q_w, k_h]`` and ``rel_w [B*heads, q_h, q_w, k_w]`` computed
  exactly as segment_anything does (its own ``get_rel_pos`` and einsums), which is
  ``O(L * (k_h + k_w))`` instead of ``O(L^2)``;
- queries are taken in chunks (rows of the query grid, and groups of heads) so that the
  bias of one chunk, ``[heads', rows * q_w, L]``, holds at most :data:`MASK_ELEMENTS`
  elements; each chunk runs ``torch.nn.functional.scaled_dot_product_attention`` with
  that bias as its additive ``attn_mask`` (PyTorch's fused kernels: the flash kernel on
  the CPU, the memory-efficient kernel on CUDA), which never holds the chunk's scores
  and softmax at once either.

Softmax is per query row, so chunking the queries changes nothing but the order of
floating-point operations: the result equals segment_anything's to ~1e-6 relative in
fp32 (``tests/test_sam_attention.py`` compares whole image encoders against
segment_anything's own forward, run in a process that never imports this module).

Chunked SDPA beat query-chunked eager attention, a bias folded into wider queries/keys and
FlexAttention on time and memory (figures: README, "Where the time and memory go").

:func:`install` swaps this module in on the ``Attention`` instances of one
``ImageEncoderViT`` (the adapter's own model): the upstream class is never patched,
and the new module adopts the instance's parameters under the same names, so state
dicts, checkpoints and FSDP units are unchanged.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, get_rel_pos
from torch import nn

# Elements of the additive bias (and of the fused kernel's per-chunk work) per SDPA call:
# 2**24 fp32 = 64 MiB. Smaller chunks cost time in per-call overhead (2**22 was ~15%
# slower on the CPU); larger ones only cost memory.
MASK_ELEMENTS = 2**24


def decomposed_rel_pos(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                       q_size: Tuple[int, int], k_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two factors of segment_anything's ``add_decomposed_rel_pos`` bias.

    ``q``: ``[BH, q_h*q_w, C]`` (unscaled queries). Returns ``rel_h [BH, q_h, q_w, k_h]``
    and ``rel_w [BH, q_h, q_w, k_w]``; the bias of query ``(i, j)`` on key ``(r, c)`` is
    ``rel_h[:, i, j, r] + rel_w[:, i, j, c]``. Same helper and einsums as upstream.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h)  # [q_h, k_h, C]
    Rw = get_rel_pos(q_w, k_w, rel_pos_w)  # [q_w, k_w, C]
    r_q = q.reshape(q.shape[0], q_h, q_w, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    return rel_h, rel_w


def _chunks(heads: int, q_h: int, q_w: int, keys: int, budget: int) -> Iterator[Tuple[slice, int, int]]:
    """``(head slice, first query row, end query row)`` covering ``[heads, q_h]`` so that each
    chunk's bias ``[heads', rows * q_w, keys]`` has at most ``budget`` elements (at least one
    query row of one head)."""
    rows = max(1, min(q_h, budget // max(1, q_w * keys)))
    group = max(1, min(heads, budget // max(1, rows * q_w * keys)))
    for h0 in range(0, heads, group):
        for r0 in range(0, q_h, rows):
            yield slice(h0, min(heads, h0 + group)), r0, min(q_h, r0 + rows)


def rel_pos_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                      rel_w: torch.Tensor, scale: float, budget: int = MASK_ELEMENTS) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` with the decomposed bias, chunked over queries.

    ``q``, ``k``, ``v``: ``[BH, L, C]`` with ``L = q_h*q_w`` (queries) and ``k_h*k_w``
    (keys); ``rel_h [BH, q_h, q_w, k_h]``, ``rel_w [BH, q_h, q_w, k_w]`` from
    :func:`decomposed_rel_pos`. Returns ``[BH, q_h*q_w, C]``.
    """
    heads, q_h, q_w, k_h = rel_h.shape
    k_w = rel_w.shape[-1]
    keys = k_h * k_w
    chunks = list(_chunks(heads, q_h, q_w, keys, budget))
    if len(chunks) == 1:  # one call: no output buffer to fill
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(heads, q_h * q_w, keys)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=v.dtype, device=v.device)
    for h, r0, r1 in chunks:
        rows = slice(r0 * q_w, r1 * q_w)
        # [heads', rows, q_w, k_h, 1] + [heads', rows, q_w, 1, k_w] -> [heads', rows*q_w, keys]
        bias = (rel_h[h, r0:r1, :, :, None] + rel_w[h, r0:r1, :, None, :]).reshape(-1, (r1 - r0) * q_w, keys)
        out[h, rows] = F.scaled_dot_product_attention(q[h, rows], k[h], v[h], attn_mask=bias, scale=scale)
    return out


class RelPosSdpaAttention(nn.Module):
    """segment_anything's ``Attention`` (same parameters, same function) without the full
    score matrix: see the module docstring.

    ``forward(x)``: ``[B, H, W, dim]`` (a window or the whole grid) -> ``[B, H, W, dim]``.
    """

    def __init__(self, upstream: Attention):
        super().__init__()
        if not isinstance(upstream, Attention):
            raise TypeError(f"upstream: expected segment_anything's image_encoder.Attention, "
                            f"got {type(upstream).__name__}")
        self.num_heads = upstream.num_heads
        self.scale = upstream.scale
        self.use_rel_pos = upstream.use_rel_pos
        # registration order as upstream's: state_dict keys and order are unchanged
        self.qkv = upstream.qkv
        self.proj = upstream.proj
        if self.use_rel_pos:
            self.rel_pos_h = upstream.rel_pos_h
            self.rel_pos_w = upstream.rel_pos_w
        self.budget = MASK_ELEMENTS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        # qkv with shape (3, B * nHead, H * W, C), as upstream
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        if self.use_rel_pos:
            rel_h, rel_w = decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
            out = rel_pos_attention(q, k, v, rel_h, rel_w, self.scale, self.budget)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        # [B*nHead, H*W, C] -> [B, H, W, nHead*C]
        out = out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(out)


def install(encoder: ImageEncoderViT) -> int:
    """Swap :class:`RelPosSdpaAttention` in for every block's ``attn`` of ``encoder`` (this
    instance only); returns how many were swapped. Parameters are adopted, not copied."""
    if not isinstance(encoder, ImageEncoderViT):
        raise TypeError(f"encoder: expected segment_anything's ImageEncoderViT, got {type(encoder).__name__}")
    swapped = 0
    for block in encoder.blocks:
        if isinstance(block.attn, Attention):
            block.attn = RelPosSdpaAttention(block.attn)
            swapped += 1
    return swapped
