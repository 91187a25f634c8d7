"""Blocked vs full-matrix bipartite soft matching (ToMe): extra peak memory and time, in one run.

    python benchmarks/bench_bipartite.py                     # N=4096, C=256, B=8, r=N/2, CPU
    python benchmarks/bench_bipartite.py --n 577 --r 200 --json bench_results/bipartite.json

Compared, on the same inputs (metric = x, as in ToMe's keys-as-metric use):

- ``full``: :func:`bipartite_merge_full`, the straightforward version (normalised metric
  copy, the ``[B, N/2, N/2]`` score matrix, ``x * size``, gathers and ``scatter_reduce``).
- ``blocked``: :func:`bipartite_merge_reference`, the CPU path of ``fusion.kernels``
  (score chunks of 2 MiB with a running max/argmax, chunked merge).
- ``triton`` (CUDA only): :func:`fusion.kernels.bipartite_merge` with ``backend="triton"``.

Extra peak memory is what a call needs beyond its inputs, outputs included:

- CPU: each measurement runs in a fresh subprocess that builds the inputs, warms up on a
  tiny problem (BLAS threads, lazy inits), then reads the resident-set high-water mark
  (``ru_maxrss``) before and after one call. Freshness matters: a high-water mark never
  goes down, so measuring the second implementation in the same process would hide it.
- CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call.

Times are medians of interleaved repeats in this process (machines are shared and noisy:
compare the ratio measured in one run, never absolute milliseconds across runs). Targets
(issue 4): blocked extra peak <= 10% of full, blocked time <= full time.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

IMPLS_CPU = ("full", "blocked")


def _impl(name: str):
    ref = importlib.import_module("fusion.kernels.bipartite_reference")
    if name == "full":
        return ref.bipartite_merge_full
    if name == "blocked":
        return ref.bipartite_merge_reference
    merge = importlib.import_module("fusion.kernels.bipartite_merge").bipartite_merge
    return lambda x, m, r: merge(x, m, r, backend="triton")


def _inputs(b: int, n: int, c: int, device: str, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(b, n, c, device=device, dtype=dtype, generator=g)


def _rss_now_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _child(args) -> None:
    """One measurement in this fresh process: prints {"extra_kib", "out_kib"} as JSON."""
    torch.set_num_threads(args.threads)
    fn = _impl(args.child)
    fn(_inputs(2, 64, 32, "cpu", torch.float32), _inputs(2, 64, 32, "cpu", torch.float32), 16)  # warm-up
    x = _inputs(args.b, args.n, args.c, "cpu", torch.float32)
    gc.collect()
    before = _rss_now_kib()
    hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    out = fn(x, x, args.r)
    hwm_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out_kib = sum(t.numel() * t.element_size() for t in out) // 1024
    # A high-water mark the call did not raise means its peak is only bounded above.
    print(json.dumps({"extra_kib": hwm_after - before, "out_kib": out_kib,
                      "exact": hwm_after > hwm_before}))


def _cpu_memory(args, impl: str) -> dict:
    runs = []
    for _ in range(args.mem_repeats):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--n", str(args.n), "--c", str(args.c),
               "--b", str(args.b), "--r", str(args.r), "--threads", str(args.threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
    extra = statistics.median(r["extra_kib"] for r in runs)
    return {"extra_peak_mib": extra / 1024, "out_mib": runs[0]["out_kib"] / 1024,
            "workspace_mib": (extra - runs[0]["out_kib"]) / 1024,
            "runs_mib": [round(r["extra_kib"] / 1024, 1) for r in runs],
            "exact": all(r["exact"] for r in runs)}


def _cuda_memory(fn, x, r) -> dict:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(x, x, r)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    out_b = sum(t.numel() * t.element_size() for t in out)
    return {"extra_peak_mib": extra / 2**20, "out_mib": out_b / 2**20, "workspace_mib": (extra - out_b) / 2**20}


def _times(fns: dict, x, r, repeats: int, cuda: bool) -> dict:
    for fn in fns.values():  # warm-up (compiles Triton kernels, touches pages)
        fn(x, x, r)
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():  # interleaved: noise hits both alike
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(x, x, r)
            if cuda:
                torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4096, help="tokens N")
    p.add_argument("--c", type=int, default=256, help="channels C (metric = x)")
    p.add_argument("--b", type=int, default=8, help="batch B")
    p.add_argument("--r", type=int, default=None, help="tokens removed (default: N_A = ceil(N/2))")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per implementation")
    p.add_argument("--mem-repeats", type=int, default=3, help="fresh-process memory runs per implementation")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)), help="CPU threads")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.r is None:
        args.r = (args.n + 1) // 2
    if args.child:
        _child(args)
        return 0

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    torch.set_num_threads(args.threads)
    impls = IMPLS_CPU + (("triton",) if cuda else ())
    x = _inputs(args.b, args.n, args.c, args.device, torch.float32)
    if cuda:
        mem = {k: _cuda_memory(_impl(k), x, args.r) for k in impls}
    else:
        mem = {k: _cpu_memory(args, k) for k in impls}
    ms = _times({k: _impl(k) for k in impls}, x, args.r, args.repeats, cuda)

    full_bytes = args.b * ((args.n + 1) // 2) * (args.n // 2) * 4
    print(f"bipartite_merge  B={args.b} N={args.n} C={args.c} r={args.r} device={args.device} "
          f"threads={args.threads}  (the full score matrix alone is {full_bytes / 2**20:.0f} MiB)")
    print(f"{'impl':<8} {'extra peak MiB':>15} {'of which output':>16} {'workspace MiB':>14} {'median ms':>10}")
    for k in impls:
        m = mem[k]
        print(f"{k:<8} {m['extra_peak_mib']:>15.1f} {m['out_mib']:>16.1f} {m['workspace_mib']:>14.1f} {ms[k]:>10.1f}")
    mem_ratio = mem["blocked"]["extra_peak_mib"] / mem["full"]["extra_peak_mib"]
    time_ratio = ms["blocked"] / ms["full"]
    ok_mem, ok_time = mem_ratio <= 0.10, time_ratio <= 1.0
    print(f"blocked / full: extra peak {mem_ratio:.3f} (target <= 0.10: {'ok' if ok_mem else 'MISSED'}), "
          f"time {time_ratio:.3f} (target <= 1.0: {'ok' if ok_time else 'MISSED'})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"config": {k: getattr(args, k) for k in ("b", "n", "c", "r", "device", "threads")},
                       "memory": mem, "median_ms": ms, "mem_ratio": mem_ratio, "time_ratio": time_ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
