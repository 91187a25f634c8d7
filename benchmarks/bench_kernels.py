"""Benchmark fusion.kernels: Triton vs eager reference vs naive PyTorch vs torch.compile.

On a GPU: ``triton.testing.do_bench`` medians for forward, backward and both, batch
1/4/16/64, fp16 and bf16, on the vsre grids (CLIP 24x24x1024, SigLIP 27x27x1152, SAM
64x64x256, DINOv2 37x37x1024 -> 24x24 with LayerNorm; pyramid 24x24x3456 -> 12/6/3/1).
Reports GB/s on the *minimal* bytes (each input read once, each output written once),
% of the measured device copy bandwidth, and speedups; writes a CSV and one PNG per op
(labelled with the device name) to ``--out``.

On a CPU: the reference path (what CPU users run) against the naive sequence on the
same grids, B=16, fp32, with this machine's copy bandwidth measured in the same run.

    python benchmarks/bench_kernels.py              # full run for this device
    python benchmarks/bench_kernels.py --check      # GPU: first check every op against the
                                                     # reference at the benchmark shapes
    python benchmarks/bench_kernels.py --quick      # a fast sanity run
    python benchmarks/bench_kernels.py --compile    # CPU: add torch.compile(reference) (slow)
    python benchmarks/bench_kernels.py --threads 1  # CPU: one thread (steadier on a busy machine)

Registers, spills and shared memory of every launch, compiled for sm_80/86/90 without a
GPU: ``benchmarks/compile_report.py``.
"""
import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from fusion.kernels import (grid_merge, grid_merge_reference, naive_grid_merge, naive_pyramid_pool,
                            pyramid_pool, pyramid_pool_reference)

VSRE = [(24, 1024), (27, 1152), (64, 256), (37, 1024)]
TARGET, LEVELS = 24, [(12, 12), (6, 6), (3, 3), (1, 1)]


# --------------------------------------------------------------------------------------
# Workloads: inputs, the four implementations, minimal bytes per pass
# --------------------------------------------------------------------------------------

def merge_case(B, dtype, device, grids=VSRE):
    xs = [torch.randn(B, h, h, c, device=device).to(dtype).requires_grad_() for h, c in grids]
    norms = [(torch.randn(c, device=device, requires_grad=True), torch.randn(c, device=device, requires_grad=True))
             for _, c in grids]
    inputs = xs + [p for n in norms for p in n]
    es = xs[0].element_size()
    read = sum(B * h * h * c for h, c in grids) * es
    out = B * TARGET * TARGET * sum(c for _, c in grids) * es
    minimal = {"fwd": read + out, "bwd": 2 * read + out}
    minimal["both"] = minimal["fwd"] + minimal["bwd"]
    compiled = torch.compile(grid_merge_reference)
    impls = {
        "triton": lambda: grid_merge(xs, TARGET, "area", norms, backend="triton"),
        "eager": lambda: grid_merge(xs, TARGET, "area", norms, backend="torch"),
        "naive": lambda: naive_grid_merge(xs, (TARGET, TARGET), "area", norms),
        "compile": lambda: compiled(xs, (TARGET, TARGET), "area", norms, 1e-5, "channel"),
    }
    return impls, inputs, minimal


def pyramid_case(B, dtype, device, C=sum(c for _, c in VSRE)):
    t = torch.randn(B, TARGET * TARGET, C, device=device).to(dtype).requires_grad_()
    es = t.element_size()
    n_out = sum(a * b for a, b in LEVELS)
    one = (TARGET * TARGET + n_out) * C * es * B
    minimal = {"fwd": one, "bwd": one, "both": 2 * one}
    compiled = torch.compile(pyramid_pool_reference)
    impls = {
        "triton": lambda: pyramid_pool(t, TARGET, LEVELS, backend="triton"),
        "eager": lambda: pyramid_pool(t, TARGET, LEVELS, backend="torch"),
        "naive": lambda: naive_pyramid_pool(t, (TARGET, TARGET), LEVELS),
        "compile": lambda: compiled(t, (TARGET, TARGET), LEVELS),
    }
    return impls, [t], minimal


CASES = {"grid_merge": merge_case, "pyramid_pool": pyramid_case}


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------

def _passes(fn, inputs):
    """Callables for forward, backward (graph kept) and forward + backward."""
    out = fn()
    go = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            fn()

    def bwd():
        torch.autograd.grad(out, inputs, go, retain_graph=True)

    def both():
        torch.autograd.grad(fn(), inputs, go)

    return {"fwd": fwd, "bwd": bwd, "both": both}


def cpu_time(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def gpu_time(fn, reps):
    import triton.testing
    return triton.testing.do_bench(fn, rep=reps, return_mode="median")


def copy_bandwidth(device, nbytes, timer, reps):
    """GB/s of ``dst.copy_(src)`` counting the read and the write."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / ms / 1e6


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------

def fresh_write_bandwidth(nbytes, reps):
    """GB/s of writing a freshly allocated buffer (page faults included), as every op
    does for its output; on small VMs this, not the copy bandwidth, bounds the CPU path."""
    n = nbytes // 4
    ms = cpu_time(lambda: torch.empty(n).fill_(1.0), reps)
    return n * 4 / ms / 1e6


def run_gpu(args):
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    batches = [4] if args.quick else [1, 4, 16, 64]
    dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16]
    reps = 20 if args.quick else 100
    copy = copy_bandwidth(dev, 1 << 30, gpu_time, reps)
    print(f"device: {name}; measured copy bandwidth {copy:.0f} GB/s")
    rows = []
    for op, make in CASES.items():
        for dtype in dtypes:
            for B in batches:
                impls, inputs, minimal = make(B, dtype, dev)
                times = {}
                for impl, fn in impls.items():
                    for p, call in _passes(fn, inputs).items():
                        times[impl, p] = gpu_time(call, reps)
                for (impl, p), ms in times.items():
                    gbs = minimal[p] / ms / 1e6
                    rows.append(dict(device=name, op=op, dtype=str(dtype).split(".")[-1], B=B, pass_=p, impl=impl,
                                     ms=ms, GBps=gbs, pct_copy=100 * gbs / copy,
                                     x_naive=times["naive", p] / ms, x_eager=times["eager", p] / ms,
                                     x_compile=times["compile", p] / ms))
                    print(f"{op:<13} {rows[-1]['dtype']:<9} B={B:<3} {p:<5} {impl:<8} {ms:8.3f} ms "
                          f"{gbs:7.0f} GB/s {rows[-1]['pct_copy']:5.1f}% copy  x{rows[-1]['x_naive']:.2f} naive "
                          f"x{rows[-1]['x_compile']:.2f} compile", flush=True)
    write_csv(rows, args.out, "gpu")
    plot(rows, args.out, name, copy)


def run_cpu(args):
    dev = torch.device("cpu")
    B = 2 if args.quick else 16
    reps = 3 if args.quick else 7
    impls = ["eager", "naive"] + (["compile"] if args.compile else [])
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1"
    print(f"CPU: {torch.get_num_threads()} threads; vsre grids -> {TARGET}x{TARGET}, B={B}, float32; "
          + ("huge pages on (THP_MEM_ALLOC_ENABLE=1)" if thp else
             "huge pages off (run with THP_MEM_ALLOC_ENABLE=1 to allocate large buffers on 2 MiB pages, "
             "as fusion-tower does)"))
    rows = []
    copy = copy_bandwidth(dev, 512 << 20, cpu_time, reps)
    fresh = fresh_write_bandwidth(256 << 20, reps)
    print(f"copy bandwidth {copy:.2f} GB/s (read + write, warm buffers); writing a fresh allocation "
          f"{fresh:.2f} GB/s (page faults)")
    for op, make in CASES.items():
        cases, inputs, minimal = make(B, torch.float32, dev)
        for p in ("fwd", "both"):
            times = {}
            for impl in impls:
                times[impl] = cpu_time(_passes(cases[impl], inputs)[p], reps)
            # the copy bandwidth again, in the same run (shared machines drift)
            copy = (copy + copy_bandwidth(dev, 512 << 20, cpu_time, reps)) / 2
            for impl, ms in times.items():
                gbs = minimal[p] / ms / 1e6
                rows.append(dict(device="cpu", op=op, dtype="float32", B=B, pass_=p, impl=impl, ms=ms, GBps=gbs,
                                 pct_copy=100 * gbs / copy, x_naive=times["naive"] / ms, x_eager=times["eager"] / ms,
                                 x_compile=times["compile"] / ms if "compile" in times else float("nan")))
                print(f"{op:<13} {p:<5} {impl:<8} {ms:9.1f} ms {gbs:6.2f} GB/s on {minimal[p] / 1e6:7.1f} MB minimal"
                      f" = {rows[-1]['pct_copy']:5.1f}% of copy ({copy:.2f} GB/s)   x{rows[-1]['x_naive']:.2f} vs naive",
                      flush=True)
    write_csv(rows, args.out, "cpu")
    _, _, minimal = merge_case(B, torch.float32, dev)
    out_bytes = B * TARGET * TARGET * sum(c for _, c in VSRE) * 4
    floor = out_bytes / fresh / 1e6 + (minimal["fwd"] - out_bytes) / copy / 1e6
    print(f"bound: any grid_merge forward that writes a fresh output needs >= {floor:.0f} ms here "
          f"(= {100 * minimal['fwd'] / floor / 1e6 / copy:.0f}% of copy bandwidth on the minimal bytes)")


def write_csv(rows, out, tag):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_kernels_{tag}.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")


def plot(rows, out, device_name, copy):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plots (pip install matplotlib)")
        return
    for op in sorted({r["op"] for r in rows}):
        dtypes = sorted({r["dtype"] for r in rows if r["op"] == op})
        fig, axes = plt.subplots(len(dtypes), 3, figsize=(14, 4 * len(dtypes)), squeeze=False)
        for i, dt in enumerate(dtypes):
            for j, p in enumerate(("fwd", "bwd", "both")):
                ax = axes[i][j]
                for impl in ("triton", "eager", "naive", "compile"):
                    pts = sorted((r["B"], r["GBps"]) for r in rows
                                 if (r["op"], r["dtype"], r["pass_"], r["impl"]) == (op, dt, p, impl))
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=impl)
                ax.axhline(copy, color="grey", linestyle="--", label="copy")
                ax.set_xscale("log", base=2)
                ax.set_title(f"{op} {p} {dt}")
                ax.set_xlabel("batch")
                ax.set_ylabel("GB/s on minimal bytes")
                ax.legend()
        fig.suptitle(f"{op} on {device_name}")
        fig.tight_layout()
        path = Path(out) / f"bench_{op}_{device_name.replace(' ', '_')}.png"
        fig.savefig(path, dpi=100)
        print(f"wrote {path}")


CHECK_TOL = {torch.float16: 2e-2, torch.bfloat16: 2e-2, torch.float32: 1e-4}


def _worst(got, want):
    """Worst |got - want| relative to max(1, |want|) (the kernel tests' measure)."""
    return ((got.double() - want.double()).abs().max() / max(1.0, want.double().abs().max().item())).item()


def check_op(op, B, dtype, device):
    """Triton forward and backward of ``op`` at the benchmark shapes against its reference
    (PyTorch, fp32 math on the same inputs): ``[(what, worst, tolerance)]``."""
    impls, inputs, _ = CASES[op](B, dtype, device)
    out = impls["triton"]()
    ref = CHECK_REF[op](inputs)
    go = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, go)
    want = torch.autograd.grad(ref, inputs, go.float())
    tol = CHECK_TOL[dtype]
    res = [(f"{op} fwd", _worst(out, ref), tol)]
    res += [(f"{op} grad {i}", _worst(a, b), tol) for i, (a, b) in enumerate(zip(got, want))]
    return res


def _merge_ref(inputs):
    xs, params = inputs[:len(VSRE)], inputs[len(VSRE):]
    norms = [(params[2 * i].float(), params[2 * i + 1].float()) for i in range(len(VSRE))]
    return grid_merge_reference([x.float() for x in xs], (TARGET, TARGET), "area", norms, 1e-5, "channel")


def _pyramid_ref(inputs):
    return pyramid_pool_reference(inputs[0].float(), (TARGET, TARGET), LEVELS)


CHECK_REF = {"grid_merge": _merge_ref, "pyramid_pool": _pyramid_ref}


def check_bipartite(B, dtype, device, N=TARGET * TARGET, C=sum(c for _, c in VSRE)):
    """ToMe reduction to N/4 tokens: each output equals the size-weighted mean of the inputs
    the Triton assignment sends there (fp32), and the gradient the rule ``g[a(i)] s_i / S``."""
    from fusion.kernels import reduce_to

    x = torch.randn(B, N, C, device=device).to(dtype).requires_grad_()
    merged, sizes, asg = reduce_to(x, x, N // 4, backend="triton")
    idx = asg[..., None].expand(B, N, C)
    want = torch.zeros(B, N // 4, C, device=device).scatter_add_(1, idx, x.detach().float()) / sizes[..., None]
    go = torch.randn_like(merged)
    gx, = torch.autograd.grad(merged, x, go)
    gwant = go.float().gather(1, idx) / sizes.gather(1, asg)[..., None]
    tol = CHECK_TOL[dtype]
    return [("bipartite reduce_to fwd", _worst(merged, want), tol), ("bipartite reduce_to grad", _worst(gx, gwant), tol)]


def run_checks(device, batches, dtypes) -> bool:
    """Every op against its reference at the benchmark shapes; prints the worst mismatches."""
    ok = True
    for dtype in dtypes:
        for B in batches:
            rows = [r for op in CASES for r in check_op(op, B, dtype, device)] + check_bipartite(B, dtype, device)
            for what, worst, tol in rows:
                flag = "ok" if worst <= tol else "FAIL"
                ok &= worst <= tol
                print(f"check {str(dtype).split('.')[-1]:<9} B={B:<3} {what:<26} worst {worst:.2e} (tol {tol:g}) {flag}")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    ap.add_argument("--compile", action="store_true", help="CPU: also time torch.compile(reference)")
    ap.add_argument("--out", default="bench_results", help="folder for the CSV and plots")
    ap.add_argument("--check", action="store_true",
                    help="first compare every op with its reference at the benchmark shapes (exit 1 on a mismatch)")
    ap.add_argument("--threads", type=int, help="CPU: torch.set_num_threads (1 is steadier on a busy machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        if torch.cuda.is_available():
            device, batches = torch.device("cuda"), ([4] if args.quick else [1, 16])
        elif os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter: slow, B=1 only
            device, batches = torch.device("cpu"), [1]
        else:
            sys.exit("--check runs the Triton kernels: on a GPU, or on the CPU with TRITON_INTERPRET=1")
        dtypes = [torch.float16] if args.quick else [torch.float16, torch.bfloat16]
        if not run_checks(device, batches, dtypes):
            sys.exit("check failed: a Triton op differs from its reference; not timing it")
        if device.type == "cpu":
            return 0
    if torch.cuda.is_available():
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
