"""Compile every Triton launch the presets make, for sm_80, sm_86 and sm_90, without a GPU.

For each preset (and variant: S2 scales, levels, token reduction, sequence layout,
trainable encoders) the tower's geometry is read by building each encoder once with
random weights; the workloads below turn it into the kernel calls the tower makes
(``grid_merge`` forward and backward, ``pyramid_pool`` for levels and S2, ``reduce_to``'s
bipartite kernels, ``window_attention`` for ``combine: sva``), each op module's ``compile_launches`` turns a call into the exact
:class:`~fusion.kernels._launch.Launch` records its launcher would run on a device with
that many SMs, and ``compile_aot.compile_launch`` compiles them with Triton's own binder
and reads ptxas' registers and spills and Triton's shared memory. The launch plans depend
on the batch and the SM count, so every batch from 1 to the SM count is planned and every
distinct compiled configuration is compiled (what a GPU can pick is in the table); the
table reports programs at B = 1 and B = 16 against each target's SMs.

    python benchmarks/compile_report.py                       # full matrix -> benchmarks/results/
    python benchmarks/compile_report.py --subset              # the default test's subset
    python benchmarks/compile_report.py --presets tiny --targets 90 --dtypes float16

A row fails on a compile error, shared memory over the target's per-block limit, a block
whose registers exceed an SM's register file (it cannot launch), or spills over
``SPILL_LIMIT`` bytes per thread; ``--check`` exits 1 on any failing row.
Needs TRITON_INTERPRET unset. Adding a kernel: give its module ``compile_launches`` and
add a workload function to ``WORKLOADS`` (see the README's kernel section).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Tuple

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_report.py compiles real kernels: run it with TRITON_INTERPRET unset")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_aot import Compiled, compile_launch, key as compile_key  # noqa: E402

import fusion.kernels  # noqa: E402,F401

GM = sys.modules["fusion.kernels.grid_merge"]
PP = sys.modules["fusion.kernels.pyramid_pool"]
BM = sys.modules["fusion.kernels.bipartite_merge"]
WA = sys.modules["fusion.kernels.window_attention"]

SPILL_LIMIT = 64  # bytes per thread (stores + loads) a launch may spill; the bound
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Target:
    """A GPU generation: its most common data-centre part sets the SM count."""
    arch: int
    device: str
    sms: int
    smem_per_block: int   # the opt-in maximum of dynamic shared memory per block, bytes
    max_threads_per_sm: int
    max_blocks_per_sm: int
    l2_bytes: int         # L2 cache: launches whose bytes fit in half of it are planned for SMs filled
    regs_per_sm: int = 65536


TARGETS = {
    80: Target(80, "A100 (sm_80)", 108, 163 * 1024, 2048, 32, 40 << 20),
    86: Target(86, "A10 / RTX 30 / A40 (sm_86)", 72, 99 * 1024, 1536, 16, 6 << 20),
    90: Target(90, "H100 SXM (sm_90)", 132, 227 * 1024, 2048, 32, 50 << 20),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LOW_PRECISION = ("float16", "bfloat16")  # what towers run the fixed merge's kernels in
REPORT_BATCHES = (1, 16)


# --------------------------------------------------------------------------------------
# Workloads: a tower config's geometry -> kernel calls
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Call:
    """One op call of a workload: ``fn(**kwargs, dtype=, batch=, sms=, l2=)`` returns its launches.
    ``dtypes``: the dtypes it is compiled in (those of them ``--dtypes`` asks for)."""
    workload: str
    op: str
    fn: Callable = field(compare=False)
    kwargs: Tuple = ()
    dtypes: Tuple[str, ...] = LOW_PRECISION

    def launches(self, dtype, batch: int, sms: int, l2: int = 0):
        return self.fn(**dict(self.kwargs), dtype=dtype, batch=batch, sms=sms, l2=l2)


def _kw(**kw) -> Tuple:
    return tuple(sorted(kw.items()))


def _gm(specs, size, mode, norm, layout, need_dx, dtype, batch, sms, l2):
    return GM.compile_launches(list(specs), size, mode, norm, layout, dtype, batch, sms, need_dx=need_dx,
                               backward=norm == "affine" or need_dx, l2=l2)


def _pp(grid, C, levels, dtype, batch, sms, l2):
    return PP.compile_launches(grid, C, list(levels), dtype, batch)


def _bp(N, C, Cm, keep, dtype, batch, sms, l2):
    return BM.compile_launches(N, C, Cm, keep, dtype, batch)


def _wa(size, grids, heads, head_dim, dtype, batch, sms, l2):
    return WA.compile_launches(size, grids, heads, head_dim, dtype, batch)


def merge_calls(name: str, cfg, geo: Dict[str, Tuple[int, int, int]], trainable: bool) -> List[Call]:
    """The ``grid_merge`` of the tower: every encoder's grid to the fused grid."""
    f = cfg.fusion
    if f.combine == "sva":
        return []  # the aggregator attends to the encoder grids themselves (sva_calls)
    layout = "channel" if f.combine == "channel_concat" else "sequence"
    specs = tuple((h, w, f.width if (layout == "sequence" and f.width) else c) for h, w, c in geo.values())
    norm = "affine" if f.norm == "layernorm" else "none"
    return [Call(name, "grid_merge", _gm, _kw(specs=specs, size=(f.grid, f.grid), mode=f.resample, norm=norm,
                                               layout=layout, need_dx=trainable))]


def level_calls(name: str, cfg, geo, trainable: bool) -> List[Call]:
    f = cfg.fusion
    levels = f.extra_levels()
    if not levels:
        return []
    k = 1 if f.combine == "channel_concat" else len(geo)
    C = sum(c for _, _, c in geo.values()) if k == 1 else (f.width or next(iter(geo.values()))[2])
    return [Call(name, "pyramid_pool", _pp, _kw(grid=(f.grid, f.grid), C=C, levels=tuple((lv, lv) for lv in levels)))]


def s2_calls(name: str, cfg, geo, trainable: bool) -> List[Call]:
    """S2: each scale above 1 stitched to ``s*h x s*w`` and area-pooled back to ``h x w``."""
    calls = []
    for enc_name, enc in cfg.encoders.items():
        h, w, c = geo[enc_name]
        scales = list(enc.scales or [1])
        dim = c // len(scales)
        for s in scales:
            if s != 1:
                calls.append(Call(name, "pyramid_pool", _pp, _kw(grid=(s * h, s * w), C=dim, levels=((h, w),))))
    return calls


def reduce_calls(name: str, cfg, geo, trainable: bool) -> List[Call]:
    f = cfg.fusion
    if f.reduce is None:
        return []
    N = f.grid * f.grid
    C = sum(c for _, _, c in geo.values())
    Cm = None if f.reduce.metric == "fused" else geo[f.reduce.metric][2]
    calls = [Call(name, "bipartite", _bp, _kw(N=N, C=C, Cm=Cm, keep=int(f.reduce.keep)))]
    if Cm is not None:  # the metric encoder's grid aligned to the fused grid, no LayerNorm
        h, w, c = geo[f.reduce.metric]
        calls.append(Call(name, "grid_merge", _gm, _kw(specs=((h, w, c),), size=(f.grid, f.grid), mode=f.resample,
                                                       norm="none", layout="channel", need_dx=False)))
    return calls


def sva_calls(name: str, cfg, geo, trainable: bool) -> List[Call]:
    """``combine: sva``: each of ``fusion.sva.layers`` layers makes one ``window_attention`` call
    (all alike), forward and backward (the aggregator trains), in fp32 too (its weights' dtype)."""
    f = cfg.fusion
    if f.combine != "sva":
        return []
    grids = tuple((h, w) for h, w, _ in geo.values())
    return [Call(name, "window_attention", _wa, _kw(size=(f.grid, f.grid), grids=grids, heads=f.sva.heads,
                                                     head_dim=f.sva.dim // f.sva.heads), tuple(DTYPES))]


# A tower config -> its kernel calls. To put a new op in the report, add its function here.
WORKLOADS = [merge_calls, level_calls, s2_calls, reduce_calls, sva_calls]

# Variants of every preset: (label, overrides, trainable encoders)
VARIANTS = [
    ("", [], False),
    ("trainable", [], True),
    ("s2", "scales", False),
    ("levels", "levels", False),
    ("reduce", "reduce", False),
    ("sequence", ["fusion.combine=sequence_concat", "fusion.width=1024"], False),
    ("sva", ["fusion.combine=sva"], False),   # heads and dim: fusion.sva's defaults
]
REDUCE_N = (576, 729, 1024, 2304, 4096)


def _variant_overrides(kind, cfg) -> List[str]:
    if kind == "scales":
        return [f"encoders.{n}.scales=[1, 2]" for n in cfg.encoders]
    if kind == "levels":
        g = cfg.fusion.grid
        return [f"fusion.levels={sorted({max(1, g // 2), max(1, g // 4), 1}, reverse=True)}"]
    if kind == "reduce":
        return [f"fusion.reduce={{method: bipartite, keep: {max(1, cfg.fusion.grid ** 2 // 4)}, metric: fused}}"]
    return list(kind)


GEOMETRY_CACHE = RESULTS / "encoder_geometry.json"


def _build_geometry(enc_json: str) -> List[int]:
    """``[h, w, dim]`` of one encoder config, built on the CPU with random, uninitialised weights."""
    from transformers.initialization import no_init_weights

    from fusion.config import load_config
    from fusion.encoders.registry import get_encoder_class

    ec = load_config({"encoders": {"e": json.loads(enc_json)}, "projector": {"type": "none"}}).encoders["e"]
    with torch.device("cpu"), no_init_weights():
        enc = get_encoder_class(ec.type)(ec, False)
    return [enc.grid[0], enc.grid[1], enc.dim]


class Geometry:
    """Encoder config -> ``(h, w, dim)``, cached in ``encoder_geometry.json`` by the whole
    encoder config (a changed preset misses the cache and is built again). Building the
    real encoders takes a few GB and ~10 s each; the cache keeps the report and its test
    from doing it every time."""

    def __init__(self, path: Path = GEOMETRY_CACHE):
        self.path = path
        self.table = json.loads(path.read_text()) if path.exists() else {}
        self.dirty = False

    def __call__(self, cfg) -> Dict[str, Tuple[int, int, int]]:
        """Encoder name -> ``(h, w, C)`` of its (multi-scale) grid in the tower ``cfg``."""
        geo = {}
        for name, ec in cfg.encoders.items():
            raw = {k: v for k, v in ec.__dict__.items() if k not in ("name", "scales") and v is not None}
            key = json.dumps(raw, sort_keys=True, default=list)
            if key not in self.table:
                self.table[key], self.dirty = _build_geometry(key), True
            h, w, d = self.table[key]
            geo[name] = (h, w, d * len(ec.scales or [1]))
        return geo

    def save(self) -> None:
        if self.dirty:
            _atomic_write(self.path, json.dumps(self.table, indent=1, sort_keys=True) + "\n")


def preset_calls(presets: Iterable[str], geometry: "Geometry") -> List[Call]:
    from fusion.config import load_config

    calls = []
    for preset in presets:
        base = load_config(preset)
        for label, kind, trainable in VARIANTS:
            cfg = load_config(preset, _variant_overrides(kind, base))
            name = preset + (f"/{label}" if label else "")
            geo = geometry(cfg)
            for fn in WORKLOADS:
                calls += fn(name, cfg, geo, trainable)
        C = sum(c for _, _, c in geometry(base).values())
        for N in REDUCE_N:
            calls.append(Call(f"{preset}/reduce N={N}", "bipartite", _bp, _kw(N=N, C=C, Cm=None, keep=max(1, N // 4))))
    return calls


def subset_calls() -> List[Call]:
    """The default test's representative subset, no encoders built (compiled at B = 1, where a
    launch that fits in L2 takes the plan that fills the SMs, and at B = 16): each
    kernel once, ``grid_merge`` on both of its resampling paths: SigLIP's 27x27x1152 with a
    trainable LayerNorm and encoder (column-by-column FMAs, two channel parts, two backward
    colours) and SAM's 64x64x256 (``tl.dot``); vsre's fused width pooled to 12/6/3/1; ToMe
    reduction of 576 tokens; the SVA's window attention over vsre's grids (24 <- 24, 27, 64, 24),
16 heads x 64."""
    g = "subset"
    return [
        Call(g, "grid_merge", _gm, _kw(specs=((27, 27, 1152), (64, 64, 256)), size=(24, 24), mode="area",
                                        norm="affine", layout="channel", need_dx=True)),
        Call(g, "pyramid_pool", _pp, _kw(grid=(24, 24), C=3456, levels=((12, 12), (6, 6), (3, 3), (1, 1)))),
        Call(g, "bipartite", _bp, _kw(N=576, C=3456, Cm=None, keep=288)),
        Call(g, "window_attention", _wa, _kw(size=(24, 24), grids=((24, 24), (27, 27), (64, 64), (24, 24)),
                                              heads=16, head_dim=64)),
    ]


# --------------------------------------------------------------------------------------
# Compiling and reporting
# --------------------------------------------------------------------------------------

def block_registers(c: Compiled) -> int:
    """Registers one block takes from the SM's register file (allocated per warp in units of 256)."""
    return -(-max(c.regs, 1) * 32 // 256) * 256 * c.num_warps


def resident_blocks(c: Compiled, t: Target) -> int:
    """Blocks one SM holds at once (registers in 256-register warp units, shared memory, threads)."""
    threads = 32 * c.num_warps
    by_regs = t.regs_per_sm // block_registers(c)
    by_smem = (t.smem_per_block // c.shared) if c.shared else t.max_blocks_per_sm
    return max(0, min(by_regs, by_smem, t.max_threads_per_sm // threads, t.max_blocks_per_sm))


def failure(c: Compiled, t: Target) -> str:
    if c.error:
        return "compile error: " + c.error
    if c.shared > t.smem_per_block:
        return f"shared memory {c.shared} B > {t.smem_per_block} B"
    if block_registers(c) > t.regs_per_sm:  # the launch cannot run (too many resources requested)
        return (f"registers {c.regs}/thread x {32 * c.num_warps} threads = {block_registers(c)} "
                f"> the {t.regs_per_sm}-register file of an SM")
    if c.spills > SPILL_LIMIT:
        return f"spills {c.spills} B/thread > {SPILL_LIMIT}"
    return ""


# The constexprs that tell one build of a kernel from another in the table (per kernel name prefix)
_VARIANT_KEYS = {
    "window_attention": ("NE", "BY", "BM", "BD") + tuple(f"{k}{i}" for i in range(4) for k in ("BR", "BC")),
    "": ("R", "BC1", "BC2", "NORM", "HAS_W", "NEED_DX", "TWO_SLOTS", "KP", "BJ", "BC", "BLOCK_A", "BLOCK_M",
         "BLOCK_C"),
}


def _variant(launch) -> str:
    keep = next(v for k, v in _VARIANT_KEYS.items() if launch.label.startswith(k))
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in launch.constexprs.items() if k in keep)


def run(calls: List[Call], targets: List[Target], dtypes: List[str], all_batches: bool, log=print,
        report: Tuple[int, ...] = REPORT_BATCHES) -> List[dict]:
    """One row per (call, launch, dtype, target, reported batch), plus one for each
    configuration a GPU picks only at another batch (so its failures count); each distinct
    binary compiled once."""
    compiled: Dict[str, Compiled] = {}
    reported = set()  # keys with a row: batches 1 and 16, plus the first batch of any other
    rows = []
    for t in targets:
        batches = sorted(set(report) | (set(range(1, t.sms + 1)) if all_batches else set()))
        for dname in dtypes:
            for call in calls:
                if dname not in call.dtypes:
                    continue
                for B in batches:
                    for i, launch in enumerate(call.launches(DTYPES[dname], B, t.sms, t.l2_bytes)):
                        k = compile_key(launch, t.arch)
                        if k not in compiled:
                            t0 = time.perf_counter()
                            compiled[k] = compile_launch(launch, t.arch)
                            c = compiled[k]
                            log(f"sm_{t.arch} {dname:<8} {launch.label:<26} {_variant(launch):<60} regs {c.regs:>3} "
                                f"spill {c.spills:>4} smem {c.shared:>6} warps {c.num_warps} "
                                f"({time.perf_counter() - t0:.1f} s){'  ' + failure(c, t) if failure(c, t) else ''}")
                        if B not in report and k in reported:
                            continue  # a configuration already in the table
                        reported.add(k)
                        c = compiled[k]
                        rows.append(dict(
                            workload=call.workload, op=call.op, kernel=launch.label, variant=_variant(launch),
                            launch=i, dtype=dname, arch=f"sm_{t.arch}", batch=B,
                            regs=c.regs, spill_bytes=c.spills, stack_bytes=c.stack, smem_bytes=c.shared,
                            smem_limit=t.smem_per_block, warps=c.num_warps, stages=c.num_stages,
                            programs=launch.programs(), sms=t.sms, blocks_per_sm=round(launch.programs() / t.sms, 2),
                            resident_per_sm=resident_blocks(c, t), failure=failure(c, t)))
    return rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write(rows: List[dict], out: Path, tag: str) -> Tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    csv_path, md_path = out / f"compile_report{tag}.csv", out / f"compile_report{tag}.md"
    _atomic_write(csv_path, buf.getvalue())
    _atomic_write(md_path, summary(rows))
    return csv_path, md_path


def summary(rows: List[dict]) -> str:
    """Markdown: per kernel, variant, dtype and target the worst case over the workloads."""
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["variant"], r["dtype"], r["arch"]), []).append(r)
    lines = ["| kernel | variant | dtype | target | regs | spill B | smem B / limit | warps | stages | "
             "blocks/SM B=1 | blocks/SM B=16 | resident/SM | workloads | status |",
             "|" + " --- |" * 14]
    for (kern, var, dt, arch), rs in sorted(groups.items()):
        r0 = rs[0]
        b1 = sorted({r["blocks_per_sm"] for r in rs if r["batch"] == 1})
        b16 = sorted({r["blocks_per_sm"] for r in rs if r["batch"] == 16})
        rng = lambda v: "-" if not v else f"{v[0]}" if len(v) == 1 else f"{v[0]}-{v[-1]}"  # noqa: E731
        fails = sorted({r["failure"] for r in rs if r["failure"]})
        wl = sorted({r["workload"] for r in rs})
        lines.append(f"| {kern} | {var} | {dt} | {arch} | {r0['regs']} | {r0['spill_bytes']} | "
                     f"{r0['smem_bytes']} / {r0['smem_limit']} | {r0['warps']} | {r0['stages']} | {rng(b1)} | "
                     f"{rng(b16)} | {r0['resident_per_sm']} | {len(wl)} | {'; '.join(fails) or 'ok'} |")
    bad = sum(1 for r in rows if r["failure"])
    head = (f"# Compile report\n\n{len(rows)} launches ({len(groups)} distinct kernel builds x targets); "
            f"{bad} failing (compile error, shared memory over the per-block limit, registers over the SM's "
            f"register file, or spills over "
            f"{SPILL_LIMIT} B/thread). Per-launch rows: the CSV beside this file.\n\n")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="vsre,dinosiglip,llava15,tiny")
    ap.add_argument("--subset", action="store_true", help="the default test's representative subset (no presets)")
    ap.add_argument("--targets", default="80,86,90")
    ap.add_argument("--dtypes", default="float16,bfloat16,float32",
                    help="float32 applies to the ops that run in it (window_attention); the rest are fp16 / bf16")
    ap.add_argument("--all-batches", action="store_true",
                    help="also compile what every batch 1..SMs plans (every configuration a GPU may pick)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="suffix of the output file names")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--check", action="store_true", help="exit 1 if any launch fails")
    args = ap.parse_args(argv)
    targets = [TARGETS[int(a)] for a in args.targets.split(",")]
    dtypes = args.dtypes.split(",")
    geometry = Geometry()
    calls = subset_calls() if args.subset else preset_calls(args.presets.split(","), geometry)
    geometry.save()
    t0 = time.perf_counter()
    rows = run(calls, targets, dtypes, args.all_batches, report=REPORT_BATCHES)
    csv_path, md_path = write(rows, Path(args.out), args.tag)
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    bad = [r for r in rows if r["failure"]]
    print(f"{len(rows)} launches, {len(bad)} failing, {time.perf_counter() - t0:.0f} s; wrote {csv_path} and {md_path}")
    for r in bad[:20]:
        print(f"FAIL {r['arch']} {r['dtype']} {r['workload']} {r['kernel']} {r['variant']}: {r['failure']}")
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
