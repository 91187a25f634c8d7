"""Compile the window_attention kernels ahead of time for sm_80 / sm_86 / sm_90 (no GPU needed).

For the launches ``combine: sva`` makes at the ``vsre`` shapes (query grid 24x24 over the
CLIP 24, SigLIP 27, SAM 64 and DINOv2 (336 px) 24 grids, 16 heads of 64 channels, any batch:
the batch is a grid axis, not a specialisation), every kernel variant
(:func:`fusion.kernels.window_attention.compile_specs`) is compiled with Triton's own
compiler, down to the cubin by the ``ptxas`` Triton ships with Triton's own flags; the
table gives registers and spills from that ptxas run and shared memory against each
target's limit. Exit status 1 if any variant spills or overflows.

    python benchmarks/compile_sva.py                       # vsre shapes, bf16 + fp16 + fp32
    python benchmarks/compile_sva.py --grid 27 --grids 27,27 --out results/compile_sva.md
"""
import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile real kernels
# a fresh cache: a cached kernel skips the ptxas run whose log gives registers and spills
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile-sva-")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import fusion.kernels  # noqa: E402,F401

WA = sys.modules["fusion.kernels.window_attention"]
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}  # bytes per block (opt-in maximum)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def compile_one(spec: dict, cc: int) -> dict:
    """Compile ``spec`` for ``sm_<cc>`` and read registers and spill bytes from the log of the
    ``ptxas`` run Triton itself makes (its own flags), shared memory from the metadata."""
    src = ASTSource(fn=spec["kernel"], signature=spec["signature"], constexprs=spec["constexprs"])
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                               options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    finally:
        knobs.nvidia.dump_ptxas_log = False
    regs = spills = None
    for line in log.getvalue().splitlines():
        if "Used" in line and "registers" in line:
            regs = int(line.split("Used")[1].split("registers")[0])
        if "spill stores" in line:
            words = line.replace(",", "").split()
            spills = int(words[words.index("spill") - 2]) + int(words[words.index("loads") - 3])
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas statistics in the compile log of {spec['name']} for sm_{cc}:\n{log.getvalue()}")
    return dict(regs=regs, spills=spills, smem=int(k.metadata.shared))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", type=int, default=24, help="query grid side (fusion.grid)")
    ap.add_argument("--grids", default="24,27,64,24", help="encoder grid sides (vsre: CLIP 24, SigLIP 27, SAM 64, DINOv2@336 24)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--cc", default="80,86,90")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    grids = tuple((int(g), int(g)) for g in args.grids.split(","))
    size = (args.grid, args.grid)
    lines = [f"window_attention, query grid {size}, encoder grids {[g[0] for g in grids]}, "
             f"{args.heads} heads x {args.head_dim}", "",
             "| target | dtype | kernel | warps | stages | registers | spill bytes | shared memory | limit | ok |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    bad = 0
    for cc in (int(c) for c in args.cc.split(",")):
        for dt in args.dtypes.split(","):
            for spec in WA.compile_specs(size, grids, args.heads, args.head_dim, DTYPES[dt]):
                r = compile_one(spec, cc)
                ok = r["spills"] == 0 and r["smem"] <= SMEM_LIMIT[cc]
                bad += not ok
                lines.append(f"| sm_{cc} | {dt} | {spec['name']} | {spec['num_warps']} | {spec['num_stages']} | "
                             f"{r['regs']} | {r['spills']} | {r['smem'] / 1024:.1f} KB | "
                             f"{SMEM_LIMIT[cc] / 1024:.0f} KB | {'yes' if ok else 'NO'} |")
                print(lines[-1], flush=True)
    plan = WA.window_plan(size, grids, args.head_dim, torch.bfloat16)
    lines += ["", f"plan: {plan}"]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(args.out)
    print(f"plan: {plan}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
