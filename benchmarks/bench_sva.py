"""Benchmark ``combine: sva``: fusion's SVA against Cambrian's reshape-and-SDPA, and kernel traffic.

Speed and memory (default): :class:`fusion.sva.SpatialVisionAggregator` (window
attention: keys / values projected once per token, windows read in place) against
:class:`fusion.sva_reference.CambrianSVA` (every cell's window copied into
``[B*G*G, window, dim]`` rows, position embedding, LayerNorm and projections on every
copy, SDPA with a padding mask) with identical weights, at the vsre grids (CLIP 24x24x1024,
SigLIP 27x27x1152, SAM 64x64x256, DINOv2 24x24x1024 onto 24x24), in one run: outputs
checked first, then forward and forward + backward times (the fastest of ``--iters`` runs,
interleaved between the two so that other jobs on a shared machine hit both alike) and
peak memory above the inputs (CUDA: ``max_memory_allocated``; CPU: the resident-set high-water mark).
CPU: fp32, threads as set; CUDA: bf16 (``--dtype``).

    python benchmarks/bench_sva.py                        # B=16, dim 512, 8 heads, 3 layers
    python benchmarks/bench_sva.py --dim 1024 --heads 16  # Cambrian-1's width (~20 GB on a CPU)
    python benchmarks/bench_sva.py --traffic              # kernel bytes vs minimal (interpreter)

Traffic (``--traffic``): the bytes the Triton kernels load and store, counted in the
Triton interpreter (``benchmarks/traffic.py``'s hooks), against the minimal bytes
(forward: q, every key and value once, the output and log-sum-exp; backward: q, out, dO,
lse, keys, values once, dq, dk, dv once). The seam partials the backward writes are
counted; their addition into dk / dv (PyTorch, outside the kernels) is listed apart.
Shapes: vsre grids, 2 heads of 64 (``--traffic-heads``; the ratio does not depend on it), B=1.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VSRE = [("clip", 24, 1024), ("siglip", 27, 1152), ("sam", 64, 256), ("dino", 24, 1024)]
LIMIT = 1.2


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--traffic", action="store_true", help="count kernel bytes in the Triton interpreter")
    ap.add_argument("--check", action="store_true", help=f"--traffic: exit 1 if a ratio exceeds {LIMIT}")
    ap.add_argument("--traffic-dtypes", default="float16,float32", help="--traffic: dtypes to count")
    ap.add_argument("--traffic-heads", type=int, default=2, help="--traffic: heads of 64 channels")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--grid", type=int, default=24)
    ap.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for bench_sva.md")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------

def traffic_rows(dtype, heads=2, d=64, grid=24, grids=VSRE, batch=1):
    import torch

    from traffic import counting  # benchmarks/traffic.py: the interpreter's load/store hooks

    WA = sys.modules["fusion.kernels.window_attention"]
    win = WA.area_windows([(h, h) for _, h, _ in grids], grid)
    HD, M, es = heads * d, win.num_queries, torch.tensor([], dtype=dtype).element_size()
    q = torch.randn(batch, M, HD).to(dtype)
    ks = [torch.randn(batch, win.tokens(i), HD).to(dtype) for i in range(len(grids))]
    vs = [torch.randn(batch, win.tokens(i), HD).to(dtype) for i in range(len(grids))]
    kv = sum(win.tokens(i) for i in range(len(grids))) * HD * es * batch
    qb, lse = M * HD * es * batch, M * heads * 4 * batch
    with counting() as ctr:
        out, lse_t = WA.window_attention_forward(q, ks, vs, win, heads, d ** -0.5)
    rows = [_row("window_attention fwd", ctr, 2 * qb + 2 * kv + lse)]
    g = torch.randn_like(out)
    with counting() as ctr:
        WA.window_attention_backward(g, q, ks, vs, out, lse_t, win, heads, d ** -0.5)
    plan = WA.window_plan(win.size, win.grids, d, dtype)
    seam = sum(len(WA._seam_index(win, plan, i, "cpu")[0]) for i in range(len(grids))) * HD * es * batch
    rows.append(_row("window_attention bwd", ctr, 4 * qb + lse + 4 * kv))
    rows[-1]["seam_add_bytes"] = 2 * 3 * seam  # dk and dv: read the partial, read and write the row
    return rows


def _row(op, ctr, minimal):
    loaded = sum(v[0] for v in ctr.bytes.values())
    stored = sum(v[1] for v in ctr.bytes.values())
    return dict(op=op, loaded=loaded, stored=stored, minimal=minimal, ratio=(loaded + stored) / minimal,
                per_arg={k: list(v) for k, v in ctr.bytes.items()})


def run_traffic(args):
    import torch

    rows = []
    for dt in (getattr(torch, n) for n in args.traffic_dtypes.split(",")):
        for r in traffic_rows(dt, heads=args.traffic_heads, grid=args.grid):
            r["dtype"] = str(dt).replace("torch.", "")
            rows.append(r)
    print(f"window_attention traffic (interpreter), vsre grids {[h for _, h, _ in VSRE]} -> {args.grid}, "
          f"{args.traffic_heads} heads x 64, B=1")
    print(f"{'op':<22} {'dtype':<8} {'loaded MB':>10} {'stored MB':>10} {'minimal MB':>11} {'ratio':>6}")
    for r in rows:
        seam = f"   (+ seam add in PyTorch {r['seam_add_bytes'] / 1e6:.3f} MB)" if "seam_add_bytes" in r else ""
        print(f"{r['op']:<22} {r['dtype']:<8} {r['loaded'] / 1e6:>10.3f} {r['stored'] / 1e6:>10.3f} "
              f"{r['minimal'] / 1e6:>11.3f} {r['ratio']:>6.3f}{seam}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if args.check and any(r["ratio"] > LIMIT for r in rows) else 0


# --------------------------------------------------------------------------------------
# Speed and memory
# --------------------------------------------------------------------------------------

def build_pair(args, device, dtype):
    import torch

    from fusion.config import SVAConfig
    from fusion.sva import SpatialVisionAggregator
    from fusion.sva_reference import CambrianSVA, load_from_sva

    torch.manual_seed(0)
    specs = [(n, (h, h), c) for n, h, c in VSRE]
    ours = SpatialVisionAggregator(specs, args.grid, SVAConfig(args.dim, args.heads, args.layers, "first"))
    ref = CambrianSVA([(h, h) for _, h, _ in VSRE], [c for _, _, c in VSRE], args.grid, args.dim, args.heads,
                      args.layers, queries=args.grid ** 2)
    load_from_sva(ref, ours)
    return ours.to(device, dtype), ref.to(device, dtype)


def measure_once(fn, device, backward):
    """``(seconds, peak MB)`` of one forward (and backward)."""
    import torch

    from bench_tower import PeakMemory

    with PeakMemory(device) as peak:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if backward:
            out.float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        del out
    return seconds, peak.mb


def run_speed(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    ours, ref = build_pair(args, device, dtype)
    gen = torch.Generator().manual_seed(1)
    grids = [torch.randn(args.batch, h, h, c, generator=gen).to(device, dtype) for _, h, c in VSRE]
    with torch.no_grad():  # parity first (a 2-image slice keeps the check cheap)
        a, b = ours([g[:2] for g in grids]), ref([g[:2] for g in grids])
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    if not err <= tol:
        raise SystemExit(f"outputs differ: max relative error {err:.2e} > {tol}")
    models = {"fusion sva (window_attention)": ours, "Cambrian reshape-and-SDPA": ref}
    runs = {(name, bwd): [] for name in models for bwd in (False, True)}
    for _ in range(args.iters):  # interleaved, so that load from other jobs hits both alike
        for bwd in (False, True):
            for name, model in models.items():
                with torch.enable_grad() if bwd else torch.no_grad():
                    runs[(name, bwd)].append(measure_once(lambda: model(grids), device, bwd))
                model.zero_grad(set_to_none=True)
    rows = []
    for name in models:
        fwd, both = runs[(name, False)], runs[(name, True)]
        rows.append(dict(impl=name, fwd_ms=1e3 * min(t for t, _ in fwd), fwd_peak_mb=max(m for _, m in fwd),
                         train_ms=1e3 * min(t for t, _ in both), train_peak_mb=max(m for _, m in both)))
    head = (f"SVA at the vsre grids {[h for _, h, _ in VSRE]} -> {args.grid}x{args.grid}, B={args.batch}, "
            f"dim {args.dim}, {args.heads} heads, {args.layers} layers, {str(dtype).replace('torch.', '')}, "
            f"{device.type} ({torch.get_num_threads()} threads), fastest of {args.iters} interleaved runs (peak "
            f"memory: the largest); max relative "
            f"difference {err:.1e}")
    lines = [head, "", "| implementation | forward ms | forward peak MB | fwd+bwd ms | fwd+bwd peak MB |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['impl']} | {r['fwd_ms']:.0f} | {r['fwd_peak_mb']:.0f} | {r['train_ms']:.0f} | "
                     f"{r['train_peak_mb']:.0f} |")
    o, c = rows
    lines.append(f"| ratio (Cambrian / fusion) | {c['fwd_ms'] / o['fwd_ms']:.2f}x | "
                 f"{c['fwd_peak_mb'] / o['fwd_peak_mb']:.2f}x | {c['train_ms'] / o['train_ms']:.2f}x | "
                 f"{c['train_peak_mb'] / o['train_peak_mb']:.2f}x |")
    print("\n".join(lines))
    out = Path(args.out) / f"bench_sva_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def main(argv=None):
    args = _args(argv)
    if args.traffic:
        os.environ["TRITON_INTERPRET"] = "1"  # before fusion.kernels is imported
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import fusion.kernels  # noqa: F401

    return run_traffic(args) if args.traffic else run_speed(args)


if __name__ == "__main__":
    sys.exit(main())
