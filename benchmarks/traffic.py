"""Count the bytes each Triton kernel of fusion.kernels loads and stores.

Runs the kernels in the Triton interpreter (on CPU, no GPU needed) with its masked load
and store hooks wrapped, attributes every access to the kernel argument it touches,
and prints the totals beside the *minimal* bytes (read each input once, write each
output once). A kernel that re-reads inputs (e.g. gathers overlapping windows for a
non-integer ratio such as 27 -> 24) shows up as a ratio well above 1: this is the
hardware-independent check the CI runs (tests/test_traffic.py).

    python benchmarks/traffic.py                   # vsre grids, B=1, fp16
    python benchmarks/traffic.py --sms 132         # the row bands an H100 uses for B=16
    python benchmarks/traffic.py --json out.json   # also write the rows

Shapes: the vsre grids (CLIP 24x24x1024, SigLIP 27x27x1152, SAM 64x64x256, DINOv2
24x24x1024 at 336 px) and DINOv2 at 518 px (37x37x1024, a ratio with no clean split)
merged to 24x24 with per-grid LayerNorm, then pooled to 12/6/3/1. ``grid_merge``'s
backward is counted twice: with the grid's gradient (trainable encoders) and without it
(frozen encoders, the presets' default: LayerNorm gradients only). Batch 1 (traffic
scales linearly with the batch: programs never share a batch item). Index tables,
column weights, LayerNorm parameters and dweight/dbias partial sums are counted too (as
"other").

Two counts per row: ``ratio``, every byte the programs request, and ``dram``, the bytes a
GPU whose L2 holds the launch moves from and to DRAM: each address's first load (unless the
op stored it before: a colour reading back what another wrote) and each address stored,
once per op. ``--l2-mb`` plans like a GPU with that much L2, on which a launch that fits in
half of it takes more programs at the price of requests that are L2 hits
(see kernels/_merge_plan.py).
"""
import argparse
import json
import os
import sys
import dataclasses
from collections import defaultdict
from contextlib import contextmanager

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from triton.runtime import interpreter as _interp  # noqa: E402

import fusion.kernels  # noqa: E402,F401

GM = sys.modules["fusion.kernels.grid_merge"]
MP = sys.modules["fusion.kernels._merge_plan"]
PP = sys.modules["fusion.kernels.pyramid_pool"]

VSRE = [("clip", 24, 1024), ("siglip", 27, 1152), ("sam", 64, 256), ("dino", 24, 1024), ("dino@518", 37, 1024)]
TARGET, LEVELS = 24, [(12, 12), (6, 6), (3, 3), (1, 1)]
LIMIT = 1.10


class _Counter:
    def __init__(self):
        self.regions = []  # (start, end, arg name)
        self.bytes = defaultdict(lambda: [0, 0])  # arg name -> [loaded, stored]
        self.maps = {}  # (start, end) -> (bytes stored, bytes first loaded from DRAM): bool per byte
        self.dram_names = {}  # (start, end) -> arg name

    def region_of(self, addr):
        for start, end, name in self.regions:
            if start <= addr < end:
                return start, end, name
        return None, None, "?"

    def add(self, ptrs, mask, itemsize, slot):
        m = mask.astype(bool) if mask.shape == ptrs.shape else mask.astype(bool) & (ptrs == ptrs)
        n = int(m.sum())
        if not n:
            return
        addrs = ptrs[m].ravel().astype(np.int64)
        start, end, name = self.region_of(int(addrs[0]))
        self.bytes[name][slot] += n * itemsize
        if start is None:
            return
        if (start, end) not in self.maps:
            self.maps[start, end] = (np.zeros(end - start, bool), np.zeros(end - start, bool))
            self.dram_names[start, end] = name
        stored, loaded = self.maps[start, end]
        offs = addrs - start
        if slot == 0:
            offs = offs[~stored[offs]]  # read back after a store of this op: an L2 hit
        for k in range(itemsize):
            (loaded if slot == 0 else stored)[offs + k] = True

    def dram(self):
        """arg name -> bytes a GPU moves to and from DRAM when L2 holds the op (see the module doc)."""
        out = defaultdict(int)
        for key, (stored, loaded) in self.maps.items():
            out[self.dram_names[key]] += int(stored.sum()) + int(loaded.sum())
        return out


_ACTIVE = []


@contextmanager
def counting():
    """Count loads/stores of every interpreted kernel launched inside the block."""
    ctr = _Counter()
    B = _interp.InterpreterBuilder
    orig_load, orig_store, orig_call = B.create_masked_load, B.create_masked_store, _interp.GridExecutor.__call__

    def load(self, ptrs, mask, other, *a):
        ret = orig_load(self, ptrs, mask, other, *a)
        ctr.add(ptrs.data, mask.data, ret.data.dtype.itemsize, 0)
        return ret

    def store(self, ptrs, value, mask, *a):
        ctr.add(ptrs.data, mask.data, value.data.dtype.itemsize, 1)
        return orig_store(self, ptrs, value, mask, *a)

    def call(self, *args, **kwargs):
        names = list(self.arg_names)
        for name, arg in list(zip(names, args)) + list(kwargs.items()):
            if isinstance(arg, torch.Tensor) and arg.numel():
                st = arg.untyped_storage()
                ctr.regions.append((st.data_ptr(), st.data_ptr() + st.nbytes(), name))
        return orig_call(self, *args, **kwargs)

    B.create_masked_load, B.create_masked_store, _interp.GridExecutor.__call__ = load, store, call
    try:
        yield ctr
    finally:
        B.create_masked_load, B.create_masked_store, _interp.GridExecutor.__call__ = orig_load, orig_store, orig_call


DATA_ARGS = {"x_ptr", "out_ptr", "g_ptr", "dx_ptr"}


def _row(op, what, ctr, minimal):
    data = sum(sum(v) for k, v in ctr.bytes.items() if k in DATA_ARGS)
    other = sum(sum(v) for k, v in ctr.bytes.items() if k not in DATA_ARGS)
    total = data + other
    dram = sum(ctr.dram().values())
    return dict(op=op, grid=what, loaded=sum(v[0] for v in ctr.bytes.values()),
                stored=sum(v[1] for v in ctr.bytes.values()), other=other,
                total=total, minimal=minimal, ratio=total / minimal, dram=dram / minimal,
                per_arg={k: list(v) for k, v in ctr.bytes.items()})


@contextmanager
def planned(div, policy_batch):
    """Launch ``grid_merge`` with the plans of the real channel count (``C * div``) and, on a
    GPU plan (``sms > 0``), of a batch of ``policy_batch``.

    The interpreter's cost grows with the channel count but the traffic *ratio* does not,
    as long as the launch geometry (segments, bands, positions per program, resampling
    path) is the one the real channel count gets: only the channel tile is shrunk.
    """
    orig_f, orig_b = GM.fwd_plan, GM.bwd_plan

    def shrunk(tile, C, norm):
        bc1, bc2, rest, n_ct = MP.channel_parts(C, norm)
        return dataclasses.replace(tile, BC1=bc1, BC2=bc2, has_rest=rest, n_ct=n_ct)

    def fwd(h, w, H, W, C, mode, norm, batch, sms, *a):
        real = orig_f(h, w, H, W, C * div, mode, norm, policy_batch if sms else batch, sms, *a)
        return dataclasses.replace(real, tile=shrunk(real.tile, C, norm))

    def bwd(h, w, H, W, C, mode, norm, need_dx, batch, sms, *a):
        real = orig_b(h, w, H, W, C * div, mode, norm, need_dx, policy_batch if sms else batch, sms, *a)
        return dataclasses.replace(real, tile=shrunk(real.tile, C, norm))

    GM.fwd_plan, GM.bwd_plan = fwd, bwd
    try:
        yield
    finally:
        GM.fwd_plan, GM.bwd_plan = orig_f, orig_b


def measure(dtype=torch.float16, batch=1, sms=0, policy_batch=16, grids=VSRE, target=TARGET, levels=LEVELS,
            mode="area", channel_div=1, l2=0):
    """Rows of counted vs minimal bytes for both ops, forward and backward, per grid.

    ``sms > 0`` launches with the plan a GPU with that many SMs and ``l2`` bytes of L2 would
    use for a batch of ``policy_batch`` (0: the CPU plan, fewest bytes). ``channel_div > 1`` divides every
    channel count (for speed) but keeps the launch geometry of the real channel counts
    (see :func:`planned`).
    """
    es = torch.tensor([], dtype=dtype).element_size()
    rows = []
    T = target
    torch.manual_seed(0)
    grids = [(n, h, C // channel_div) for n, h, C in grids]
    with planned(channel_div, policy_batch):
        rows += _merge_rows(dtype, es, batch, sms, grids, T, mode, l2)
    C = sum(c for _, _, c in grids)
    n_out = sum(lh * lw for lh, lw in levels)
    t = torch.randn(batch, T * T, C).to(dtype)
    lv = "/".join(str(lh) for lh, _ in levels)
    with counting() as ctr:
        PP.pyramid_pool_forward(t, T, T, levels)
    rows.append(_row("pyramid_pool fwd", f"{T}x{T}x{C} -> {lv}", ctr, (T * T + n_out) * C * es * batch))
    g = torch.randn(batch, n_out, C).to(dtype)
    with counting() as ctr:
        PP.pyramid_pool_backward(g, T, T, levels)
    rows.append(_row("pyramid_pool bwd", f"{T}x{T}x{C} -> {lv}", ctr, (T * T + n_out) * C * es * batch))
    return rows


def _merge_rows(dtype, es, batch, sms, grids, T, mode, l2):
    rows = []
    for name, h, C in grids:
        x = torch.randn(batch, h, h, C).to(dtype)
        w, b = torch.randn(C), torch.randn(C)
        with counting() as ctr:
            GM.grid_merge_forward([x], [w], [b], [True], T, T, mode, 1e-5, "channel", sms=sms, l2=l2)
        name = f"{name} {h}x{h}x{C}"
        rows.append(_row("grid_merge fwd", name, ctr, (h * h + T * T) * C * es * batch))
        g = torch.randn(batch, T * T, C).to(dtype)
        for need_dx, op, minimal in ((True, "grid_merge bwd", 2 * h * h + T * T),
                                     (False, "grid_merge bwd frozen", h * h + T * T)):
            with counting() as ctr:
                GM.grid_merge_backward(g, [x], [w], [b], [True], [need_dx], T, T, mode, 1e-5, "channel", sms=sms,
                                       l2=l2)
            rows.append(_row(op, name, ctr, minimal * C * es * batch))
    return rows


def print_rows(rows, title, key="ratio"):
    print(title)
    print(f"{'op':<22} {'grid':<29} {'loaded MB':>10} {'stored MB':>10} {'other kB':>9} "
          f"{'minimal MB':>11} {'ratio':>6} {'dram':>6}")
    for r in rows:
        flag = "" if r[key] <= LIMIT else f"  {key} > {LIMIT}"
        print(f"{r['op']:<22} {r['grid']:<29} {r['loaded'] / 1e6:>10.3f} {r['stored'] / 1e6:>10.3f} "
              f"{r['other'] / 1e3:>9.1f} {r['minimal'] / 1e6:>11.3f} {r['ratio']:>6.3f} {r['dram']:>6.3f}{flag}")
    tot = sum(r["total"] for r in rows)
    mn = sum(r["minimal"] for r in rows)
    print(f"{'all':<52} {'':>21} {'':>9} {mn / 1e6:>11.3f} {tot / mn:>6.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--sms", type=int, default=0,
                    help="launch with the row bands of a GPU with this many SMs (0: CPU plan, one band)")
    ap.add_argument("--policy-batch", type=int, default=16, help="the batch the GPU plan is chosen for")
    ap.add_argument("--l2-mb", type=float, default=0.0,
                    help="and the L2 cache of that GPU in MiB (50: H100; 0: plan as if none)")
    ap.add_argument("--mode", default="area", choices=["area", "bilinear"])
    ap.add_argument("--channel-div", type=int, default=1,
                    help="divide channel counts by this (faster) keeping the real launch geometry")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--check", action="store_true",
                    help=f"exit 1 if a ratio (with --l2-mb: a dram ratio) exceeds {LIMIT}")
    args = ap.parse_args(argv)
    rows = measure(getattr(torch, args.dtype), args.batch, args.sms, args.policy_batch, mode=args.mode,
                   channel_div=args.channel_div, l2=int(args.l2_mb * 2**20))
    div = f", channels / {args.channel_div} (real launch geometry)" if args.channel_div > 1 else ""
    key = "dram" if args.l2_mb else "ratio"
    print_rows(rows, f"Triton kernel traffic (interpreter), vsre grids -> {TARGET}x{TARGET}, "
                     f"B={args.batch}, {args.dtype}, {args.mode}, "
                     + (f"GPU plan for B={args.policy_batch} on {args.sms} SMs, {args.l2_mb:g} MiB L2"
                        if args.sms else "one row band")
                     + div, key)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.check and any(r[key] > LIMIT for r in rows):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
