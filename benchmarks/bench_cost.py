"""Where the time and memory go, measured in one run against a baseline commit.

    python benchmarks/bench_cost.py                                # everything, baseline c0d6b8c
    python benchmarks/bench_cost.py --only startup,workers         # the quick parts
    python benchmarks/bench_cost.py --baseline HEAD~5 --only extract

Three parts (``--only``), each written as rows of ``bench_cost.csv`` / ``bench_cost.md`` in
``--out``:

- ``startup``: ``fusion-tower --help``, ``python -c "import fusion"`` and ``fusion-tower info
  vsre --weights random``, for this checkout and for the baseline;
- ``extract``: ``fusion-tower extract vsre --weights random`` on 8 images (the 4 example
  images and 4 generated ones) at the default batch size, for this checkout and for the
  baseline; the baseline also at ``--baseline-batch-size`` (at the default batch size of 8
  it needs more than this 24 GB machine has);
- ``workers``: ``extract`` of the ``tiny`` tower on 256 generated JPEG/PNG images with
  ``--workers 2`` against ``--workers 0``, in this process (the extraction only, not the
  build, after a warm-up run), the two alternating ``--worker-iters`` times.

Commands run as ``/usr/bin/time -v`` would report them (wall time, user + system CPU time
and maximum resident set size of the process, from ``os.wait4``), each in a fresh process
(the extract commands interleaved iteration by iteration), under an address-space
limit of ``--memory-cap-gb`` so that a run that would exhaust the machine fails instead
(it is then reported as failed, with the time until it failed). The baseline is
``git archive <baseline>`` unpacked in a temporary folder and run with ``PYTHONPATH``
pointing there (and from there, so this checkout is not on its path); this checkout runs
as installed. Times are minima over the iterations (``--startup-iters``, ``--iters`` for
extract, ``--worker-iters``), memory maxima. Compare within one run:
machines are shared and noisy.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "images"
DEFAULT_BASELINE = "c0d6b8c"  # the last commit before issue 13's work
PARTS = ("startup", "extract", "workers")


# ----------------------------------------------------------------------------- running commands


def run_measured(argv: Sequence[str], env: Dict[str, str], cwd: Path, cap_gb: float) -> Dict[str, object]:
    """Run ``argv``: wall seconds, peak RSS (GB, ``ru_maxrss`` as ``/usr/bin/time -v``), exit status."""
    def limit():
        cap = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    t0 = time.perf_counter()
    proc = subprocess.Popen(list(argv), env=env, cwd=str(cwd), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, preexec_fn=limit)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": seconds, "cpu_s": usage.ru_utime + usage.ru_stime, "rss_gb": usage.ru_maxrss / 2**20,
            "exit": proc.returncode,
            "error": stderr.decode(errors="replace").strip().splitlines()[-1:] if proc.returncode not in (0,) else []}


def snapshot(rev: str, into: Path) -> Path:
    """``git archive rev`` unpacked under ``into``, with ``fusion/kernels`` pointing at ``kernels/``
    (what setup.py's package_dir does for an install)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    if not (into / "fusion" / "kernels").exists():
        (into / "fusion" / "kernels").symlink_to(into / "kernels", target_is_directory=True)
    return into


def environment(code: Optional[Path]) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    return env


# ----------------------------------------------------------------------------- inputs


def generated_images(folder: Path, count: int, sizes=((640, 480), (480, 640), (1024, 768), (500, 500))) -> Path:
    """``count`` random images (JPEG and PNG, several sizes), deterministic."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        base = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish content, like photos
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        if i % 4 == 3:
            img.save(folder / f"gen{i:04d}.png")
        else:
            img.save(folder / f"gen{i:04d}.jpg", quality=90)
    return folder


def eight_images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for p in sorted(EXAMPLES.iterdir()):
        shutil.copy(p, folder / p.name)
    generated_images(folder, 4)
    return folder


# ----------------------------------------------------------------------------- parts


def part_startup(args, codes: Dict[str, Optional[Path]], tmp: Path) -> List[dict]:
    commands = {
        "fusion-tower --help": [sys.executable, "-m", "fusion", "--help"],
        "import fusion": [sys.executable, "-c", "import fusion"],
        "fusion-tower info vsre --weights random": [sys.executable, "-m", "fusion", "info", "vsre", "--weights",
                                                    "random"],
    }
    rows = []
    for what, argv in commands.items():
        runs = {name: [] for name in codes}
        for _ in range(args.startup_iters):
            for name, code in codes.items():
                r = run_measured(argv, environment(code), tmp, args.memory_cap_gb)
                runs[name].append(r)
                print(f"  {what:42s} {name:8s} {r['seconds']:6.2f} s {r['rss_gb']:6.2f} GB exit {r['exit']}",
                      flush=True)
        rows += [summarise("startup", what, name, rs) for name, rs in runs.items()]
    return rows


def part_extract(args, codes: Dict[str, Optional[Path]], tmp: Path) -> List[dict]:
    images = eight_images(tmp / "img8")
    plan = [("this", codes["this"], None)]
    if "baseline" in codes:
        plan = [("baseline", codes["baseline"], None), ("baseline", codes["baseline"], args.baseline_batch_size),
                *plan]
    runs: Dict[int, List[dict]] = {i: [] for i in range(len(plan))}
    for it in range(args.iters):  # interleaved, so that each command sees the same machine load
        for i, (name, code, batch) in enumerate(plan):
            if it and name == "baseline" and batch is None and all(r["exit"] for r in runs[i]):
                continue  # the baseline at the default batch size failed already: once is enough
            out = tmp / f"feat-{name}-{batch}-{it}"
            argv = [sys.executable, "-m", "fusion", "extract", "vsre", "--weights", "random", "--images",
                    str(images), "--out", str(out), "--no-progress"] + (["--batch-size", str(batch)] if batch else [])
            r = run_measured(argv, environment(code), tmp, args.memory_cap_gb)
            runs[i].append(r)
            shutil.rmtree(out, ignore_errors=True)
            print(f"  extract vsre 8 images {name:8s} batch {batch or 'default'}: {r['seconds']:7.1f} s "
                  f"(cpu {r['cpu_s']:.0f} s) {r['rss_gb']:6.2f} GB exit {r['exit']} {' '.join(r['error'])}",
                  flush=True)
    return [summarise("extract", f"extract vsre, 8 images, batch {batch or 'default (8)'}", name, runs[i])
            for i, (name, code, batch) in enumerate(plan)]


def part_workers(args, tmp: Path) -> List[dict]:
    import torch

    from fusion import build_tower
    from fusion.extract import extract_features
    from fusion.image_sources import collect_images

    images = collect_images([str(generated_images(tmp / "img256", args.worker_images))])
    if args.threads:
        torch.set_num_threads(args.threads)
    tower = build_tower("tiny", weights="random")
    extract_features(tower, images[:16], tmp / "warm-up", progress=False)  # first calls: allocator, kernels
    times: Dict[int, List[float]] = {0: [], args.workers: []}
    for it in range(args.worker_iters):
        for workers in times:
            out = tmp / f"w{workers}-{it}"
            t0 = time.perf_counter()
            extract_features(tower, images, out, progress=False, workers=workers)
            times[workers].append(time.perf_counter() - t0)
            shutil.rmtree(out)
            print(f"  tiny, {len(images)} images, --workers {workers}: {times[workers][-1]:.2f} s", flush=True)
    rows = []
    for workers, ts in times.items():
        rows.append({"part": "workers", "what": f"extract tiny, {len(images)} generated images, "
                                                f"torch threads {torch.get_num_threads()}",
                     "code": f"--workers {workers}", "seconds": min(ts), "cpu_s": float("nan"),
                     "rss_gb": float("nan"),
                     "images_per_s": len(images) / min(ts), "status": "ok"})
    return rows


def summarise(part: str, what: str, code: str, runs: List[dict]) -> dict:
    ok = [r for r in runs if r["exit"] in (0,)]
    status = "ok" if ok else f"failed (exit {runs[0]['exit']}: {' '.join(runs[0]['error'])[:120]})"
    pick = ok or runs
    return {"part": part, "what": what, "code": code, "seconds": min(r["seconds"] for r in pick),
            "cpu_s": min(r["cpu_s"] for r in pick), "rss_gb": max(r["rss_gb"] for r in pick),
            "images_per_s": float("nan"), "status": status}


# ----------------------------------------------------------------------------- output


def write(rows: List[dict], args, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["part", "what", "code", "seconds", "cpu_s", "rss_gb", "images_per_s", "status"]
    tmp = out / "bench_cost.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4g}" if isinstance(r[k], float) else r[k]) for k in fields})
    tmp.replace(out / "bench_cost.csv")
    lines = [f"CPU {platform.machine()}, {os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.1f} at the end; baseline = `{args.baseline}`, this = the checkout; "
             f"minimum time and maximum peak RSS over the iterations (startup {args.startup_iters}, extract "
             f"{args.iters}, workers {args.worker_iters}); address space capped at {args.memory_cap_gb:g} GB.", "",
             "| part | what | code | seconds | CPU seconds | peak RSS GB | images/s | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ips = "" if r["images_per_s"] != r["images_per_s"] else f"{r['images_per_s']:.1f}"
        rss = "" if r["rss_gb"] != r["rss_gb"] else f"{r['rss_gb']:.2f}"
        cpu = "" if r["cpu_s"] != r["cpu_s"] else f"{r['cpu_s']:.1f}"
        lines.append(f"| {r['part']} | {r['what']} | {r['code']} | {r['seconds']:.2f} | {cpu} | {rss} | {ips} | "
                     f"{r['status']} |")
    text = "\n".join(lines) + "\n"
    tmp = out / "bench_cost.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "bench_cost.md")
    return text


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {list(PARTS)}")
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with ('none': skip)")
    p.add_argument("--baseline-batch-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=1, help="runs of each extract command (default 1)")
    p.add_argument("--startup-iters", type=int, default=3, help="runs of each startup command (default 3)")
    p.add_argument("--worker-iters", type=int, default=3, help="runs of each workers setting (default 3)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--worker-images", type=int, default=256)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the main process in the workers part (default: torch's)")
    p.add_argument("--memory-cap-gb", type=float, default=20.0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = p.parse_args(argv)
    parts = [x for x in args.only.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown parts {unknown}; choose from {list(PARTS)}")
    rows: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp_name:
        tmp = Path(tmp_name)
        codes: Dict[str, Optional[Path]] = {"this": None}
        if args.baseline != "none":
            codes = {"baseline": snapshot(args.baseline, tmp / "baseline"), "this": None}
        if "startup" in parts:
            rows += part_startup(args, codes, tmp)
        if "extract" in parts:
            rows += part_extract(args, codes, tmp)
        if "workers" in parts:
            rows += part_workers(args, tmp)
    print(write(rows, args, Path(args.out)))


if __name__ == "__main__":
    main()
