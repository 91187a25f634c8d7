"""Windows: which tokens of each encoder grid a cell of a query grid attends to.

A query grid ``(Gh, Gw)`` laid over encoder grids ``(h_i, w_i)``: query cell ``(y, x)``
sees, in encoder ``i``, the rows ``[lo, hi)`` x columns ``[lo, hi)`` of its *area
window*: the input run adaptive average pooling ``(h_i, w_i) -> (Gh, Gw)`` averages for
output cell ``(y, x)``. The runs are the area tap tables of ``grid_merge``
(:func:`._plan.axis_tables`, from :func:`._weights.tap_ranges`):
``[floor(y*h/Gh), ceil((y+1)*h/Gh))``.

- ``h_i`` a multiple ``k*Gh``: windows are the disjoint ``k x k`` blocks Cambrian's
  Spatial Vision Aggregator reshapes the grid into.
- otherwise (SigLIP 27, DINOv2 37, SAM 64 onto 24) windows have varying sizes (27 -> 24:
  2; 64 -> 24: 3 or 4) and neighbours share their boundary row / column.

Each token also has a *primary* window: that of the query cell containing the token's
centre, ``y = floor((r + 0.5) * Gh / h)``; the token lies inside it. Its position in that
window, ``(r - lo) * max_cols + (c - lo)``, indexes a window position embedding; for
divisible grids it is Cambrian's position ``(r % k) * k + c % k``.

Tokens of every grid are row-major: token ``r * w + c`` is row ``r``, column ``c``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import torch

from ._plan import axis_tables
from ._validate import check_size
from ._weights import tap_ranges

Runs = Tuple[Tuple[int, int], ...]


@dataclass(frozen=True)
class WindowTable:
    """The area windows of a query grid ``size = (Gh, Gw)`` in each encoder grid of ``grids``.

    ``rows[i][y] = (lo, hi)``: the input rows query row ``y`` sees in grid ``i``;
    ``cols[i][x]`` likewise for columns. Build it with :func:`area_windows`.
    """

    size: Tuple[int, int]
    grids: Tuple[Tuple[int, int], ...]
    rows: Tuple[Runs, ...]
    cols: Tuple[Runs, ...]

    @property
    def num_queries(self) -> int:
        return self.size[0] * self.size[1]

    def tokens(self, i: int) -> int:
        """Tokens ``h_i * w_i`` of grid ``i``."""
        return self.grids[i][0] * self.grids[i][1]

    def max_window(self, i: int) -> Tuple[int, int]:
        """``(rows, cols)`` of the largest window in grid ``i``."""
        return (max(hi - lo for lo, hi in self.rows[i]), max(hi - lo for lo, hi in self.cols[i]))

    def runs_table(self, device) -> torch.Tensor:
        """int32 ``[E, Gh + Gw, 2]``: per grid, the row runs then the column runs (what the
        Triton kernels read), assembled from ``grid_merge``'s own area tables."""
        return _runs_table(self, str(device))

    def gather_index(self, i: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(index int64 [Gh*Gw, L], valid bool [Gh*Gw, L])``: the tokens of each query cell's
        window in grid ``i`` (row-major inside the window), padded to ``L`` = the largest
        window's size with token 0 and ``valid`` False."""
        return _gather_index(self, i, str(device))

    def positions(self, i: int, device) -> torch.Tensor:
        """int64 ``[h_i * w_i]``: each token's position in its primary window,
        ``(r - lo) * max_cols + (c - lo)`` (see the module docstring)."""
        return _positions(self, i, str(device))


def _primary(n_in: int, n_out: int, runs: Runs) -> Tuple[int, ...]:
    """Per input index, its offset in the window of the output cell containing its centre."""
    out = []
    for r in range(n_in):
        y = ((2 * r + 1) * n_out) // (2 * n_in)
        lo, hi = runs[y]
        assert lo <= r < hi, (n_in, n_out, r)  # area windows contain their cell's centres
        out.append(r - lo)
    return tuple(out)


def area_windows(grids: Sequence, size) -> WindowTable:
    """The :class:`WindowTable` of query grid ``size`` (an int or ``(Gh, Gw)``) over ``grids``,
    a list of encoder grid sizes (ints or ``(h, w)`` pairs)."""
    if isinstance(grids, (str, bytes)) or not isinstance(grids, (list, tuple)) or not grids:
        raise TypeError(f"grids={grids!r} must be a non-empty list of encoder grid sizes (ints or (h, w) pairs)")
    pairs = tuple(check_size(f"grids[{i}]", g) for i, g in enumerate(grids))
    return _area_windows(pairs, check_size("size", size))


@functools.lru_cache(maxsize=256)
def _area_windows(grids: Tuple[Tuple[int, int], ...], size: Tuple[int, int]) -> WindowTable:
    Gh, Gw = size
    rows = tuple(tap_ranges(h, Gh, "area") for h, _ in grids)
    cols = tuple(tap_ranges(w, Gw, "area") for _, w in grids)
    return WindowTable(size=(Gh, Gw), grids=tuple(grids), rows=rows, cols=cols)


_CACHE: Dict[tuple, object] = {}


def _runs_table(win: WindowTable, device: str) -> torch.Tensor:
    key = ("runs", win, device)
    if key not in _CACHE:
        Gh, Gw = win.size
        parts = [torch.cat([axis_tables(h, Gh, "area", device)[0], axis_tables(w, Gw, "area", device)[0]])
                 for h, w in win.grids]
        _CACHE[key] = torch.stack(parts).contiguous()  # [E, Gh + Gw, 2]
    return _CACHE[key]


def _gather_index(win: WindowTable, i: int, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    key = ("gather", win, i, device)
    if key not in _CACHE:
        _, w = win.grids[i]
        mh, mw = win.max_window(i)
        idx, valid = [], []
        for rlo, rhi in win.rows[i]:
            for clo, chi in win.cols[i]:
                cell = [r * w + c for r in range(rlo, rhi) for c in range(clo, chi)]
                pad = mh * mw - len(cell)
                idx.append(cell + [0] * pad)
                valid.append([True] * len(cell) + [False] * pad)
        _CACHE[key] = (torch.tensor(idx, dtype=torch.int64, device=device),
                       torch.tensor(valid, dtype=torch.bool, device=device))
    return _CACHE[key]


def _positions(win: WindowTable, i: int, device: str) -> torch.Tensor:
    key = ("pos", win, i, device)
    if key not in _CACHE:
        (h, w), (Gh, Gw) = win.grids[i], win.size
        pr, pc = _primary(h, Gh, win.rows[i]), _primary(w, Gw, win.cols[i])
        mw = win.max_window(i)[1]
        _CACHE[key] = torch.tensor([pr[r] * mw + pc[c] for r in range(h) for c in range(w)],
                                   dtype=torch.int64, device=device)
    return _CACHE[key]


def check_windows(windows) -> WindowTable:
    """``windows`` must be a :class:`WindowTable` (from :func:`area_windows`)."""
    if not isinstance(windows, WindowTable):
        raise TypeError(f"windows must be a WindowTable (fusion.kernels.area_windows(grids, size)), "
                        f"got {type(windows).__name__}")
    return windows
