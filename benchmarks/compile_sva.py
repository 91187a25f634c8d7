"""Compile the window_attention kernels ahead of time for sm_80 / sm_86 / sm_90 (no GPU needed).

For the launches ``combine: sva`` makes at each preset's shapes (``vsre``: query grid 24x24
over the CLIP 24, SigLIP 27, SAM 64 and DINOv2 (336 px) 24 grids; ``dinosiglip``,
``llava15``, ``tiny``), 16 heads of 64 channels (any batch: the batch is a grid axis, not
a specialisation), every kernel variant (:func:`fusion.kernels.window_attention.compile_specs`)
is compiled with Triton's own compiler, down to the cubin by the ``ptxas`` Triton ships,
with Triton's own flags; the table gives registers and spills from that ptxas run and
shared memory against each target's limit. Exit status 1 if any variant spills or overflows.

    python benchmarks/compile_sva.py                                  # vsre, bf16 + fp16 + fp32
    python benchmarks/compile_sva.py --presets all --out benchmarks/results/compile_sva.md
    python benchmarks/compile_sva.py --grid 27 --grids 27,27 --dtypes bf16
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
# (fusion.grid, encoder grid sides) of each preset with combine: sva, as `fusion-tower info` lists them
PRESETS = {"vsre": (24, (24, 27, 64, 24)), "dinosiglip": (27, (27, 27)), "llava15": (24, (24,)),
           "tiny": (4, (4, 5, 6, 7))}


def compile_one(spec: dict, cc: int) -> dict:
    """Compile ``spec`` for ``sm_<cc>`` and read registers and spill bytes from the log of the
    ``ptxas`` run Triton itself makes (its own flags), shared memory from the metadata."""
    src = ASTSource(fn=spec["kernel"], signature=spec["signature"], constexprs=spec["constexprs"])
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                               options={k: spec[k] for k in ("num_warps", "num_stages", "maxnreg")})
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
    ap.add_argument("--presets", default="vsre", help=f"comma-separated shapes of {list(PRESETS)}, or 'all'")
    ap.add_argument("--grid", type=int, help="query grid side (fusion.grid), instead of --presets")
    ap.add_argument("--grids", help="encoder grid sides, e.g. 24,27,64,24 (with --grid)")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--cc", default="80,86,90")
    ap.add_argument("--out", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    if args.grid is not None:
        shapes = {f"grid {args.grid}": (args.grid, tuple(int(g) for g in args.grids.split(",")))}
    else:
        names = list(PRESETS) if args.presets == "all" else args.presets.split(",")
        shapes = {n: PRESETS[n] for n in names}
    lines = [f"window_attention kernels, {args.heads} heads x {args.head_dim} (fusion.sva defaults), every "
             f"variant compiled by Triton {triton.__version__} and its ptxas", "",
             "| shape | target | dtype | kernel | warps | stages | registers (max) | spill bytes | shared memory "
             "| limit | ok |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    bad = 0
    for shape, (G, sides) in shapes.items():
        grids = tuple((g, g) for g in sides)
        for cc in (int(c) for c in args.cc.split(",")):
            for dt in args.dtypes.split(","):
                for spec in WA.compile_specs((G, G), grids, args.heads, args.head_dim, DTYPES[dt]):
                    r = compile_one(spec, cc)
                    ok = r["spills"] == 0 and r["smem"] <= SMEM_LIMIT[cc]
                    bad += not ok
                    lines.append(f"| {shape} {G}<-{list(sides)} | sm_{cc} | {dt} | {spec['name']} | "
                                 f"{spec['num_warps']} | {spec['num_stages']} | {r['regs']} ({spec['maxnreg']}) | "
                                 f"{r['spills']} | {r['smem'] / 1024:.1f} KB | {SMEM_LIMIT[cc] / 1024:.0f} KB | "
                                 f"{'yes' if ok else 'NO'} |")
                    print(lines[-1], flush=True)
    lines += ["", f"{bad} variant(s) spill or overflow shared memory"]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(args.out)
    print(lines[-1])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
