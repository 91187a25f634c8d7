"""The launch plan of ``window_attention``: bands of query rows, key chunks, tiles and seams.

A pure function of the shapes and the dtype (:func:`window_plan`), shared by the launchers
and the compile report. Layouts and the kernels' contract: :mod:`.window_attention`.

Pipeline stages (``STAGES``): 2 (the next key / value chunk's load overlaps this chunk's
dots), except the fp32 backward, which runs 1. With 2 it needed 255 registers (the cap)
and spilled 16 B/thread on sm_90 over vsre's four grids (24 <- 24, 27, 64, 24; 16 heads x
64; 244 registers over dinosiglip's two); with 1 every fp32 backward of the compile report
compiles without spills in 147-252 registers on sm_80/86/90 (vsre 216-226; every one still
spill-free under a 232-register cap) and 4 KiB less shared memory (one chunk buffer fewer). The
alternative of 16 warps x 128 registers at 2 stages is spill-free too, but only at exactly
that cap (120 spills 16 B on sm_90), so it was not taken. Cost: that pass's key / value loads
are no longer prefetched a chunk ahead, a price not yet timed on a GPU.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from ._plan import DOT_MIN, next_pow2
from .windows import WindowTable, area_windows

# Left to itself, ptxas trims a kernel to 80 or 128 registers to fit more programs per SM
# and spills the rest (dinosiglip, tiny shapes); one program of 8 warps per SM is plenty
# here (the kernels are bandwidth-bound), so they may use the whole register file.
MAX_REGISTERS = 255
# (query cells per program, keys per chunk, warps) per pass and operand width: the largest
# tiles that ptxas compiles without spills for sm_80, sm_86 and sm_90 at the vsre shapes
# (benchmarks/compile_report.py). fp32 operands multiply on CUDA cores, whose dot layouts hold
# whole operand rows per thread, hence the smaller key chunks; the backward holds q, dO,
# dq and p, ds, dk, dv per chunk, hence the smaller query tile.
TILES = {("fwd", 2): (128, 32, 8), ("fwd", 4): (64, 16, 8),
         ("bwd", 2): (64, 32, 8), ("bwd", 4): (64, 16, 8)}
# num_stages per pass and operand width (see the module docstring: the fp32 backward's spills)
STAGES = {("fwd", 2): 2, ("fwd", 4): 2, ("bwd", 2): 2, ("bwd", 4): 1}


@dataclass(frozen=True)
class PassPlan:
    """Bands and chunks of one pass (forward or backward)."""
    BY: int                                 # query rows per band (one program per band, batch item, head)
    BM: int                                 # query tile rows (pow2 >= BY * Gw)
    n_bands: int
    chunks: Tuple[Tuple[int, int], ...]     # per encoder: (rows BR, columns BCW) of a key chunk
    warps: int
    stages: int                             # num_stages (STAGES)


@dataclass(frozen=True)
class WindowPlan:
    """Block sizes of one ``window_attention`` shape and dtype (see :func:`window_plan`)."""
    BD: int                       # head-dim tile (pow2 >= d)
    fwd: PassPlan
    bwd: PassPlan
    seam_rows: Tuple[int, ...]    # per encoder: key rows a backward band shares with the previous one (max)
    seam_offsets: Tuple[int, ...]  # per encoder: its first seam token
    seam_tokens: int              # seam tokens per batch item, all encoders
    maxnreg: int                  # registers ptxas may use per thread (see MAX_REGISTERS)


def _band_rows(win: WindowTable, i: int, BY: int) -> List[Tuple[int, int]]:
    """Key rows ``[rs, re)`` of grid ``i`` each band of ``BY`` query rows needs."""
    Gh = win.size[0]
    return [(win.rows[i][y0][0], win.rows[i][min(y0 + BY, Gh) - 1][1]) for y0 in range(0, Gh, BY)]


def _bands_ok(win: WindowTable, BY: int) -> bool:
    """No key row is needed by two bands that are not neighbours (the seam scheme's premise)."""
    for i in range(len(win.grids)):
        need = _band_rows(win, i, BY)
        if any(need[p - 1][1] > need[p + 1][0] for p in range(1, len(need) - 1)):
            return False
    return True


def _chunk(w: int, rows_per_band: Sequence[int], keys: int) -> Tuple[int, int]:
    """``(BR, BCW)`` with ``BR * BCW == keys``: the chunk shape with the fewest padded key slots
    over the bands' rows (ties: wider chunks, fewer loop steps)."""
    best = None
    for bcw in sorted({min(next_pow2(w), keys)} | {c for c in (16, 32, 64) if c <= keys}):
        br = keys // bcw
        slots = sum(-(-r // br) * br for r in rows_per_band) * (-(-w // bcw) * bcw)
        if best is None or (slots, -bcw) < best[0]:
            best = ((slots, -bcw), (br, bcw))
    return best[1]


def _pass(win: WindowTable, query_tile: int, keys: int, warps: int, stages: int) -> PassPlan:
    """Bands of ``query_tile // Gw`` query rows (all columns), more rows when enlarging windows
    would share a key row between non-neighbouring bands."""
    Gh, Gw = win.size
    BY = max(1, min(Gh, query_tile // Gw))
    while BY < Gh and not _bands_ok(win, BY):
        BY += 1
    chunks = tuple(_chunk(w, [re - rs for rs, re in _band_rows(win, i, BY)], keys)
                   for i, (_, w) in enumerate(win.grids))
    return PassPlan(BY, max(DOT_MIN, next_pow2(BY * Gw)), -(-Gh // BY), chunks, warps, stages)


@functools.lru_cache(maxsize=256)
def window_plan(size: Tuple[int, int], grids: Tuple[Tuple[int, int], ...], head_dim: int,
                dtype: torch.dtype = torch.float16) -> WindowPlan:
    """Block sizes for query grid ``size`` over ``grids``, head dimension ``head_dim``, inputs of
    ``dtype`` (tiles from ``TILES``, stages from ``STAGES``; the seam slots of the backward's bands)."""
    win = area_windows(grids, size)
    width = 4 if dtype == torch.float32 else 2
    fwd = _pass(win, *TILES[("fwd", width)], STAGES[("fwd", width)])
    bwd = _pass(win, *TILES[("bwd", width)], STAGES[("bwd", width)])
    seam_rows, seam_off, off = [], [], 0
    for i, (_, w) in enumerate(grids):
        need = _band_rows(win, i, bwd.BY)
        sr = max([max(0, need[p - 1][1] - need[p][0]) for p in range(1, bwd.n_bands)], default=0)
        seam_rows.append(sr)
        seam_off.append(off)
        off += (bwd.n_bands - 1) * sr * w
    return WindowPlan(max(DOT_MIN, next_pow2(head_dim)), fwd, bwd, tuple(seam_rows), tuple(seam_off), off,
                      maxnreg=MAX_REGISTERS)
