"""Launch plans of ``grid_merge``: register tiles, programs, and the bytes each plan moves.

A program holds ``R`` output positions x all their channels in fp32 registers (the
LayerNorm needs every channel of a position at once). Channels are two power-of-two
parts, ``BC1 = pow2_floor(C)`` and ``BC2 = next_pow2(C - BC1)`` (1152 = 1024 + 128), so a
tile wastes at most a little padding instead of rounding 1152 up to 2048. Without a
LayerNorm channels are independent and a program takes a ``BC1 = 128`` channel tile.

``R >= 16`` programs resample with ``tl.dot`` (``[R, 16] @ [16, BC]``, tensor cores; every
tile dimension then needs 16, so channel parts are at least 16); narrower ones add one
input column at a time into their positions with FMAs, which needs no ``[16, BC]``
input tile in registers.

Rules (documented here instead of an autotuner, so a GPU uses them on day one and the
interpreter, CPU tests and compile report see the same launches):

- Register budget: ``REG_BUDGET = 40960`` fp32 values per program (160 registers per thread
  at 8 warps) for its ``[R, BC1 + BC2]`` tiles and its per-channel vectors (LayerNorm
  weight, bias; ``dweight`` / ``dbias`` partial sums). The forward keeps 3 tiles (output
  row, cached input row, input row being resampled; 4 with two cached rows), the
  backward 3 with a LayerNorm (cached row, recomputed row, gradient) plus 1 when it writes
  the input gradient (the pending input row) and 2 more with two slots; without a
  LayerNorm 3 / 1-2. A non-power-of-two ``C`` holds its rest flat (see
  :mod:`._resample_jit`): kept as an ``[R, 128]`` tile, the rest put warps along ``R`` and
  Triton converted the ``[R, 1024]`` tiles into that layout for the LayerNorm backward,
  through shared memory; SigLIP's trainable backward (1152 channels) then spilled
  232-312 B/thread at ``R = 8`` and had to keep ``R = 4``, whose segments of 4 cut 27 -> 24
  windows (1.14x the minimal bytes).
  Measured (trainable backward, 8 warps, 255-register cap, fp16/bf16, sm_90/86/80,
  ``benchmarks/compile_report.py``): 1024 channels at ``R = 8`` take 223-239 registers,
  1152 = 1024 + 128 at ``R = 8`` 254-255, no spill in either. That 1152-channel launch is
  at the edge of the register file, and three choices keep it there: int32 offsets within
  a batch item (``IDX64`` when an item reaches 2**31 elements), column weights as
  ``R`` consecutive floats of a per-segment table (no per-position offset vector), and
  part-1 channel runs of :attr:`Tile.contig` (all positions of a channel in one thread).
  More warps do not help: at 16 warps ptxas took 239-247 registers x 512 threads, more
  than an SM's register file.
  The ``tl.dot`` path counts two tiles more (its ``[16, BC]`` input tile and the copies
  of the product in the mma layout).
  ``R`` is the largest power of two within the budget, so registers do not grow with
  ``C``: a wider grid gets fewer positions per program. LayerNorm grids fit up to
  ``MAX_NORM_CHANNELS = 5120`` channels (4352 = 4096 + 256 for a bilinear enlargement whose
  grid needs a gradient: two more tiles); :func:`fits` says which, and the PyTorch path takes the
  others.
- Warps: 8 from 1024 values a tile (ptxas spilled a few bytes of 4-warp tiles of 1024
  values and more, with registers to spare), else 4.
- Stages: ``num_stages = 2`` (loads of the next input column overlap the arithmetic).
- ``MAXNREG = 255``: without a cap ptxas aims at fewer registers than a program needs
  (it spilled 184 bytes at 128 registers for 2 x 1024-channel tiles); the cap lets it use
  what the budget above allows.
- Programs: a forward program owns ``s <= R`` output columns of a band of output rows;
  a backward program owns ``s`` output columns of a band of input rows. The planner
  tries every segment width and band count, computes the bytes each moves (the same
  count ``benchmarks/traffic.py`` measures in the interpreter) and takes, among plans
  within ``PLAN_LIMIT = 1.08`` x the minimal bytes, the one that comes closest to one
  program per SM (all batch items together; ties: fewer bytes, then fewer programs). The
  bytes include each program's LayerNorm parameters and ``dweight`` / ``dbias`` partial
  sums (``C`` floats each), which make many small programs costly.
  On the CPU (no SM count) that is the plan with the fewest bytes.
- Small launches: when a launch's whole footprint (its minimal bytes, all batch items) fits
  in ``L2_SHARE`` of the device's L2 cache (B = 1 of every vsre grid on an A100 or H100),
  a re-read byte is an L2 hit, not a DRAM byte. There the planner bounds the *DRAM* bytes
  (``unique``: every input and output byte once, the LayerNorm parameters once, each
  program's ``dweight`` / ``dbias`` partials) by ``PLAN_LIMIT`` and the *requested* bytes
  (``ratio``, what the programs load and store) by ``L2_REQUEST_LIMIT``, and takes the plan
  nearest one program per SM: at B = 1 a launch is bound by how many SMs work, not by
  DRAM. The forward then fills the SMs at B = 1. The backward cannot within the limit: its
  partial sums cost ``8 C`` bytes a program (two fp32 vectors; no atomics, deterministic),
  and a 24 x 24 grid of frozen-encoder LayerNorm gradients has ``576 x 4 C`` bytes to
  move, so more than ~23 programs would pass 1.08x.

Overlap. Area windows of a non-integer ratio (27->24, 37->24, 64->24) share their boundary
row or column with the next window. A program streams its input rows once, carrying the
last width-resampled row to the next output row, so shared rows cost nothing inside a
band; shared columns at a segment edge are read by both segments. In the backward a
shared input column receives gradient from two segments: the segments are coloured
(``s % m``, ``m`` = most segments sharing a column) and launched colour by colour; the
first colour to touch a column writes it, later colours read it back and add. No two
programs of one launch write the same element (no atomics), and the order of the sums is
fixed (deterministic).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Tuple

from ._plan import _covering, next_pow2, pow2_floor, two_slots
from ._weights import tap_ranges

REG_BUDGET = 40960
REGS_PER_THREAD = 160
NO_NORM_BC = 128
DOT_MIN = 16  # tl.dot needs every dimension >= 16; also the columns per dot step
MAX_NORM_CHANNELS = 5120
PLAN_LIMIT = 1.08
L2_SHARE = 0.5         # a launch whose minimal bytes fit in this share of L2 re-reads from L2
L2_REQUEST_LIMIT = 2.0  # requested bytes / minimal bytes allowed for such a launch
NUM_STAGES = 2
MAXNREG = 255


def _tiles(direction: str, norm: bool, two: bool, need_dx: bool) -> int:
    """``[R, C]`` fp32 tiles a program keeps live (see the module docstring)."""
    if direction == "fwd":
        return 4 if two else 3
    if not norm:
        return 2 if two else 1
    return 3 + (1 + (2 if two else 0) if need_dx else 0)


@dataclass(frozen=True)
class Tile:
    """Per-program register tile ``[R, BC1]`` (+ ``[R, BC2]`` when ``has_rest``)."""
    R: int
    BC1: int
    BC2: int
    has_rest: bool
    n_ct: int      # channel tiles (programs along the channels; 1 with a LayerNorm)
    warps: int

    @property
    def use_dot(self) -> bool:
        return self.R >= DOT_MIN

    @property
    def BJ(self) -> int:
        """Columns per ``tl.dot`` step (and per vectorised zero fill)."""
        return DOT_MIN

    @property
    def contig(self) -> int:
        """Channels a thread loads at once in part 1 when there is a rest (0: Triton's choice).
        At most ``BC1 / threads``, all ``R`` positions of a channel stay in one thread, the
        layout the flat rest matches; Triton's 16-byte fp16 loads would put two of 8 warps
        along ``R`` of a 1024-channel part. Half of that bound: at ``BC1 / threads`` ptxas
        spilled 8 B/thread of SigLIP's trainable ``R = 8`` backward on sm_90 (fp16), at half
        nothing on sm_80/86/90 (a warp still loads 128 contiguous bytes a row)."""
        return max(1, self.BC1 // (64 * self.warps)) if self.has_rest else 0


@dataclass(frozen=True)
class FwdPlan:
    tile: Tile
    progs: Tuple[Tuple[int, int, int, int], ...]  # (x0, x1, y0, y1): output columns and rows
    ratio: float                                  # bytes moved / minimal bytes

    @property
    def seg(self) -> int:
        """Output columns a segment spans (every ``x0`` is a multiple; the last may be short)."""
        return self.progs[0][1] - self.progs[0][0]


@dataclass(frozen=True)
class BwdPlan:
    tile: Tile
    # per colour: (x0, x1, e0, e1, r0, r1, ya, yb, slot): output columns, input-gradient
    # columns written, owned input rows, output rows read, dweight/dbias partial row
    launches: Tuple[Tuple[Tuple[int, ...], ...], ...]
    first: Tuple[int, ...]   # per input column: the colour that writes it first
    n_slots: int
    ratio: float

    @property
    def seg(self) -> int:
        """Output columns a segment spans (every ``x0`` is a multiple; the last may be short)."""
        return self.launches[0][0][1] - self.launches[0][0][0]


def channel_parts(C: int, norm: bool) -> Tuple[int, int, bool, int]:
    """``(BC1, BC2, has_rest, n_ct)``: LayerNorm grids hold all channels as two power-of-two
    parts; other grids take ``NO_NORM_BC``-channel tiles."""
    if not norm:
        bc = max(DOT_MIN, min(next_pow2(C), NO_NORM_BC))
        return bc, 1, False, -(-C // bc)
    if C <= 2 * DOT_MIN:
        return max(DOT_MIN, next_pow2(C)), 1, False, 1
    bc1 = pow2_floor(C)
    rest = C - bc1
    return bc1, (max(DOT_MIN, next_pow2(rest)) if rest else 1), rest > 0, 1


def max_positions(C: int, norm: bool, direction: str, two: bool, need_dx: bool, n_vec: int) -> int:
    """Largest power-of-two ``R`` whose tiles and ``n_vec`` channel vectors fit ``REG_BUDGET``
    (0: too wide)."""
    bc1, bc2, rest, _ = channel_parts(C, norm)
    ceff = bc1 + (bc2 if rest else 0)
    tiles = _tiles(direction, norm, two, need_dx)
    room = REG_BUDGET // ceff - n_vec
    r = pow2_floor(room // tiles) if room >= tiles else 0
    if r >= DOT_MIN:  # the tl.dot path also holds its [16, BC] input tile and mma-layout copies
        r = max(DOT_MIN // 2, pow2_floor(room // (tiles + 2)))
    return r


def fits(h: int, H: int, C: int, mode: str, norm: bool, need_dx: bool, n_vec_fwd: int, n_vec_bwd: int) -> bool:
    """Whether both kernels hold at least one position of ``C`` channels (see the budget)."""
    two = two_slots(h, H, mode)
    return (max_positions(C, norm, "fwd", two, False, n_vec_fwd) >= 1
            and max_positions(C, norm, "bwd", two, need_dx, n_vec_bwd) >= 1)


def make_tile(C: int, norm: bool, direction: str, s: int) -> Tile:
    bc1, bc2, rest, n_ct = channel_parts(C, norm)
    R = next_pow2(s)
    ceff = bc1 + (bc2 if rest else 0)
    return Tile(R, bc1, bc2, rest, n_ct, 4 if R * ceff < 1024 else 8)


def _segments(n: int, s: int) -> Tuple[Tuple[int, int], ...]:
    return tuple((a, min(a + s, n)) for a in range(0, n, s))


def _bands(n: int, k: int) -> Tuple[Tuple[int, int], ...]:
    return tuple((n * i // k, n * (i + 1) // k) for i in range(k))


def _span(rng, a: int, b: int) -> int:
    """Inputs read for outputs ``[a, b)`` (their taps' union; windows are monotone)."""
    return rng[b - 1][1] - rng[a][0] if b > a else 0


def _table_share(s: int, width: int, C: int, es: int) -> float:
    """Bytes of FMA-path column weights per byte of the column they weigh (0 with tl.dot)."""
    return 0.0 if next_pow2(s) >= DOT_MIN else 4.0 * width / (C * es)


class Candidate(NamedTuple):
    """One launch plan: programs (per batch item, per launch), requested bytes and DRAM bytes
    (both / minimal bytes), and what it is (segment width, bands)."""
    programs: int
    ratio: float
    unique: float
    payload: Tuple[int, int]


def _pick(cands, target: int, resident: bool = False):
    """Among plans within the byte limits (else the least bytes): the one nearest ``target``
    programs (from below), then fewer bytes, then fewer programs. ``resident``: the launch
    fits in L2, so the DRAM bytes are held to PLAN_LIMIT and the requested ones to
    L2_REQUEST_LIMIT (see the module docstring)."""
    if resident:
        ok = [c for c in cands if c.unique <= PLAN_LIMIT and c.ratio <= L2_REQUEST_LIMIT]
    else:
        ok = [c for c in cands if c.ratio <= PLAN_LIMIT]
    ok = ok or [min(cands, key=lambda c: c.ratio)]
    return min(ok, key=lambda c: (-min(c.programs, target), round(c.ratio, 6), c.programs))


def _resident(minimal: int, C: int, es: int, batch: int, l2: int) -> bool:
    """Whether a launch's minimal bytes fit in ``L2_SHARE`` of an L2 of ``l2`` bytes."""
    return l2 > 0 and minimal * C * es * batch <= L2_SHARE * l2


def _bwd_minimal(h: int, w: int, H: int, W: int, norm: bool, need_dx: bool) -> int:
    """Positions a backward must move: the grid (LayerNorm recompute), the output gradient,
    the grid's gradient."""
    return (h * w if norm else 0) + H * W + (h * w if need_dx else 0)


def _touched(rng) -> int:
    """Inputs any output reads (the union of the taps)."""
    return len({j for lo, hi in rng for j in range(lo, hi)})


def _too_wide(C: int) -> ValueError:
    return ValueError(f"grid_merge: {C} channels with a LayerNorm exceed what the Triton kernel holds "
                      f"(up to {MAX_NORM_CHANNELS}, see kernels/_merge_plan.py); use backend='torch'")


@functools.lru_cache(maxsize=1024)
def _fwd_candidates(h: int, w: int, H: int, W: int, C: int, mode: str, norm: bool, n_vec: int, es: int):
    """Every plan as a :class:`Candidate` (programs per batch item)."""
    r_max = max_positions(C, norm, "fwd", two_slots(h, H, mode), False, n_vec)
    if r_max < 1:
        raise _too_wide(C)
    cols, rows = tap_ranges(w, W, mode), tap_ranges(h, H, mode)
    n_ct = channel_parts(C, norm)[3]
    minimal = h * w + H * W
    unique = (_touched(rows) * _touched(cols) + H * W + n_vec * 4 / es) / minimal  # parameters once
    row_cost = [sum(_span(rows, a, b) for a, b in _bands(H, k)) for k in range(1, H + 1)]
    cands = []
    for s in range(1, min(r_max, W) + 1):
        segs = _segments(W, s)
        col_cost = sum(_span(cols, a, b) * (1 + _table_share(s, b - a, C, es)) for a, b in segs)
        for k in range(1, H + 1):
            progs = len(segs) * k
            moved = col_cost * row_cost[k - 1] + H * W + progs * n_vec * 4 / es  # + LayerNorm parameters
            cands.append(Candidate(progs * n_ct, moved / minimal, unique, (s, k)))
    return tuple(cands)


def fwd_plan(h: int, w: int, H: int, W: int, C: int, mode: str, norm: bool, batch: int, sms: int,
             n_vec: int = 2, es: int = 2, l2: int = 0) -> FwdPlan:
    """The forward launch for ``[B, h, w, C] -> [B, H, W, C]`` on a device with ``sms`` SMs
    and ``l2`` bytes of L2 cache (0: unknown / CPU); ``n_vec``: LayerNorm weight and bias
    vectors present; ``es``: bytes per element (the FMA path's column weights, 4 bytes per
    position and column, count against the grid's)."""
    cands = _fwd_candidates(h, w, H, W, C, mode, norm, n_vec, es)
    resident = _resident(h * w + H * W, C, es, batch, l2)
    _, ratio, _, (s, k) = _pick([c._replace(programs=c.programs * batch) for c in cands], max(1, sms), resident)
    table = tuple((a, b, y0, y1) for y0, y1 in _bands(H, k) for a, b in _segments(W, s))
    return FwdPlan(make_tile(C, norm, "fwd", s), table, ratio)


@functools.lru_cache(maxsize=4096)
def _colours(w: int, W: int, mode: str, s: int) -> Tuple[Tuple[int, ...], Tuple[Tuple[int, int], ...], int]:
    """For segments of ``s`` output columns: per input column the first colour writing it,
    each segment's written input columns, and the number of colours."""
    cols = tap_ranges(w, W, mode)
    spans = [(cols[a][0], cols[b - 1][1]) for a, b in _segments(W, s)]
    touching = [[i for i, (lo, hi) in enumerate(spans) if lo <= j < hi] for j in range(w)]
    m = max(1, max(len(t) for t in touching))
    # columns no output reads (bilinear skips) go to the nearest segment on their left
    emit, prev_end = [], 0
    for i, (lo, hi) in enumerate(spans):
        end = w if i == len(spans) - 1 else hi
        emit.append((min(lo, prev_end), max(hi, end)))
        prev_end = max(prev_end, hi)
    owner = [[i for i, (a, b) in enumerate(emit) if a <= j < b] for j in range(w)]
    first = tuple(min(i % m for i in o) for o in owner)
    return first, tuple(emit), m


@functools.lru_cache(maxsize=1024)
def _bwd_candidates(h: int, w: int, H: int, W: int, C: int, mode: str, norm: bool, need_dx: bool,
                    n_vec: int, es: int):
    """As :func:`_fwd_candidates`, programs counted per launch (colour); the DRAM bytes count
    each program's partial sums (its ``n_vec`` vectors but the weight, read once)."""
    r_max = max_positions(C, norm, "bwd", two_slots(h, H, mode), need_dx, n_vec)
    if r_max < 1:
        raise _too_wide(C)
    cols, rows = tap_ranges(w, W, mode), tap_ranges(h, H, mode)
    n_ct = channel_parts(C, norm)[3]
    minimal = _bwd_minimal(h, w, H, W, norm, need_dx)
    has_w = n_vec >= 2  # n_vec = 2 * has_w + has_b
    once = (_touched(rows) * _touched(cols) if norm else 0) + H * W + (h * w if need_dx else 0) + has_w * 4 / es
    band_rows = []
    for k in range(1, h + 1):
        cov = [_covering(h, H, mode, r0, r1) for r0, r1 in _bands(h, k)]
        band_rows.append((sum(_span(rows, a, b) for a, b in cov), sum(b - a for a, b in cov)))
    cands = []
    for s in range(1, min(r_max, W) + 1):
        segs = _segments(W, s)
        first, emit, m = _colours(w, W, mode, s)
        x_cols = sum(_span(cols, a, b) * (1 + _table_share(s, b - a, C, es)) for a, b in segs) if norm else 0
        dx_cols = sum((e1 - e0) * (1 + _table_share(s, b - a, C, es)) + sum(first[j] != i % m for j in range(e0, e1))
                      for i, ((e0, e1), (a, b)) in enumerate(zip(emit, segs))) if need_dx else 0
        per_launch = min(sum(1 for i in range(len(segs)) if i % m == c) for c in range(m))
        for k in range(1, h + 1):
            xr, gr = band_rows[k - 1]
            params = len(segs) * k * n_vec * 4 / es  # LayerNorm weight in, dweight / dbias partials out
            partials = len(segs) * k * (n_vec - has_w) * 4 / es
            cands.append(Candidate(per_launch * k * n_ct, (x_cols * xr + gr * W + dx_cols * h + params) / minimal,
                                   (once + partials) / minimal, (s, k)))
    return tuple(cands)


def bwd_plan(h: int, w: int, H: int, W: int, C: int, mode: str, norm: bool, need_dx: bool,
             batch: int, sms: int, n_vec: int = 3, es: int = 2, l2: int = 0) -> BwdPlan:
    """The backward launches (one per colour) for the grid of :func:`fwd_plan`; ``n_vec``:
    LayerNorm weight, its gradient's and the bias gradient's partial sums present; ``l2``:
    as in :func:`fwd_plan`."""
    cands = _bwd_candidates(h, w, H, W, C, mode, norm, need_dx, n_vec, es)
    resident = _resident(_bwd_minimal(h, w, H, W, norm, need_dx), C, es, batch, l2)
    _, ratio, _, (s, k) = _pick([c._replace(programs=c.programs * batch) for c in cands], max(1, sms), resident)
    segs = _segments(W, s)
    first, emit, m = _colours(w, W, mode, s)
    bands = [(r0, r1) + _covering(h, H, mode, r0, r1) for r0, r1 in _bands(h, k)]
    launches, slot = [], 0
    for c in range(m):
        progs = []
        for r0, r1, ya, yb in bands:
            for i, ((x0, x1), (e0, e1)) in enumerate(zip(segs, emit)):
                if i % m == c:
                    progs.append((x0, x1, e0, e1, r0, r1, ya, yb, slot))
                    slot += 1
        launches.append(tuple(progs))
    return BwdPlan(make_tile(C, norm, "bwd", s), tuple(launches), first, slot, ratio)
