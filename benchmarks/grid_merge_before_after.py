"""grid_merge before / after its redesign: registers, spills, shared memory, blocks per SM.

Compiles, for sm_90 (H100, 132 SMs) without a GPU, the launches ``grid_merge`` makes for
the vsre grids (and wider ones) at B = 1 and B = 16, in this checkout and in a git revision
before the redesign (``--before``, default c0d6b8c). The old kernels are extracted with
``git show`` into a temporary package (their custom ops renamed so both can load) and
their launches recorded by intercepting ``JITFunction.run``; the new launches come from
``grid_merge.compile_launches``. Both go through ``compile_aot.compile_launch`` (Triton's
binder, ptxas' report). Writes ``benchmarks/results/grid_merge_before_after.md``.

    python benchmarks/grid_merge_before_after.py [--before REV] [--arch 90] [--dtype float16]
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("grid_merge_before_after.py compiles real kernels: run it with TRITON_INTERPRET unset")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_aot import compile_launch  # noqa: E402
from compile_report import TARGETS, resident_blocks  # noqa: E402

SHAPES = [("CLIP / DINO", 24, 1024), ("SigLIP", 27, 1152), ("SAM", 64, 256), ("DINO @518", 37, 1024),
          ("SigLIP S2", 27, 2304), ("SigLIP x4 scales", 27, 4608)]
TARGET = 24


def old_package(rev: str, where: Path):
    """The ``kernels/`` of ``rev`` as package ``fusion_old.kernels`` (ops ``fusion_old::``)."""
    files = subprocess.run(["git", "ls-tree", "--name-only", rev, "kernels/"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    pkg = where / "fusion_old" / "kernels"
    pkg.mkdir(parents=True)
    (where / "fusion_old" / "__init__.py").write_text("")
    for f in files:
        if f.endswith(".py"):
            text = subprocess.run(["git", "show", f"{rev}:{f}"], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout
            text = text.replace('"fusion::', '"fusion_old::').replace('"fusion.kernels"', '"fusion_old.kernels"')
            (pkg / Path(f).name).write_text(text)
    sys.path.insert(0, str(where))
    return importlib.import_module("fusion_old.kernels")


def recorded(kernels, fn):
    """Run ``fn`` with the given JIT kernels recording their launches instead of running them."""
    from fusion.kernels._launch import Launch

    calls = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kw):
            warps, stages = kw.pop("num_warps", 4), kw.pop("num_stages", 3)
            calls.append(Launch(kernel.fn.__name__, kernel, tuple(grid), args, kw, warps, stages))
        return run

    for k in kernels:
        k.run = recorder(k)
    try:
        fn()
    finally:
        for k in kernels:
            del k.run
    return calls


def old_launches(old, h, C, B, sms, dtype):
    gm, plan = sys.modules["fusion_old.kernels.grid_merge"], sys.modules["fusion_old.kernels._plan"]
    x = torch.empty(B, h, h, C, dtype=dtype)
    w = torch.empty(C)
    base = plan.merge_plan(h, h, TARGET, TARGET, C, "area")
    bands = plan.band_counts(h, TARGET, B, base.n_cb, len(base.bwd_cols), sms)
    kernels = [gm._grid_merge_fwd_kernel, gm._grid_merge_bwd_kernel]
    fwd = recorded(kernels, lambda: gm.grid_merge_forward([x], [w], [w], [True], TARGET, TARGET, "area", 1e-5,
                                                          "channel", row_blocks=bands))
    g = torch.empty(B, TARGET * TARGET, C, dtype=dtype)
    bwd = recorded(kernels, lambda: gm.grid_merge_backward(g, [x], [w], [w], [True], [True], TARGET, TARGET,
                                                           "area", 1e-5, "channel", row_blocks=bands))
    return fwd + bwd


def new_launches(h, C, B, target, dtype):
    from fusion.kernels import grid_merge  # noqa: F401
    gm = sys.modules["fusion.kernels.grid_merge"]
    return gm.compile_launches([(h, h, C)], (TARGET, TARGET), "area", "affine", "channel", dtype, B, target.sms,
                               l2=target.l2_bytes)


def describe(launches, arch):
    """Per direction: worst registers / spills / shared memory over the launches, programs."""
    t = TARGETS[arch]
    out = {}
    for d in ("fwd", "bwd"):
        ls = [launch for launch in launches if d in launch.label]
        cs = [compile_launch(launch, arch) for launch in ls]
        worst = max(cs, key=lambda c: (c.spills, c.regs))
        out[d] = dict(regs=worst.regs, spills=max(c.spills for c in cs), shared=max(c.shared for c in cs),
                      warps=worst.num_warps, programs=max(launch.programs() for launch in ls),
                      resident=min(resident_blocks(c, t) for c in cs), error=worst.error)
    return out


def table(rows, arch) -> str:
    t = TARGETS[arch]
    head = (f"grid_merge on {t.device}: {t.sms} SMs, {t.smem_per_block // 1024} KiB shared memory per block; "
            f"area to {TARGET}x{TARGET} with an affine LayerNorm; backward writes the grid's gradient too. "
            "regs / spill = per thread (ptxas); smem = Triton's shared memory per block; blocks/SM = "
            "programs launched / SMs (largest launch); resident = blocks one SM holds at once.\n\n")
    lines = ["| grid | dir | before: regs | spill B | smem KiB | warps | blocks/SM B=1 | B=16 | "
             "after: regs | spill B | smem KiB | warps | blocks/SM B=1 | B=16 |", "|" + " --- |" * 14]
    for name, h, C, before, after in rows:
        for d in ("fwd", "bwd"):
            cells = []
            for side in (before, after):
                b1, b16 = side[1][d], side[16][d]
                if b1["error"]:
                    cells.append(f"error: {b1['error'][:60]} | | | | | ")
                    continue
                cells.append(f"{b1['regs']} | {b1['spills']} | {b1['shared'] / 1024:.1f} | {b1['warps']} | "
                             f"{b1['programs'] / t.sms:.2f} | {b16['programs'] / t.sms:.2f}")
            lines.append(f"| {name} {h}x{h}x{C} | {d} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", default="c0d6b8c")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "grid_merge_before_after.md"))
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    sms = TARGETS[args.arch].sms
    with tempfile.TemporaryDirectory() as tmp:
        old = old_package(args.before, Path(tmp))
        rows = []
        for name, h, C in SHAPES:
            before = {B: describe(old_launches(old, h, C, B, sms, dtype), args.arch) for B in (1, 16)}
            after = {B: describe(new_launches(h, C, B, TARGETS[args.arch], dtype), args.arch) for B in (1, 16)}
            rows.append((name, h, C, before, after))
            print(name, h, C, before[16], after[16], flush=True)
    text = table(rows, args.arch)
    out = Path(args.out)
    tmp_out = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp_out.write_text(f"# grid_merge before ({args.before}) and after, {args.dtype}\n\n" + text)
    os.replace(tmp_out, out)
    print(text)


if __name__ == "__main__":
    main()
