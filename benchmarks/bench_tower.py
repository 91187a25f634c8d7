"""Tower benchmark: images/s, peak memory and a per-stage time breakdown, fusion vs a naive tower.

    python benchmarks/bench_tower.py                                  # llava15, dinosiglip, vsre, tiny
    python benchmarks/bench_tower.py --presets tiny,llava15 --batch-size 4 --iters 3
    python benchmarks/bench_tower.py --presets vsre --batch-size 1 --iters 1 --out benchmarks/results

Every preset is built with random weights (no downloads) and run twice per iteration on
the same batch of PIL images (the example images, cycled to ``--batch-size``), the two
towers interleaved so that both see the same machine load:

- ``fusion``: ``tower.image_processor`` on the host (one float resize per image to the
  shared square), then on the device each encoder's resize + normalise
  (``EncoderInputs``, once per distinct request), the encoders, ``tower.fuse``
  (``fusion.kernels.grid_merge``: resample, LayerNorm, concatenate in one pass on CUDA),
  the projector.
- ``naive``: the same encoder, LayerNorm and projector *modules*, assembled the way
  Eagle's multi-backbone tower is: each encoder's own PIL transform per image
  (expand-to-square with its mean colour, PIL resize to its input size with its
  interpolation, to tensor, normalise), each encoder, then per encoder an fp32
  ``F.interpolate`` to the fused grid (``area`` or ``bilinear`` as the preset says),
  LayerNorm, ``torch.cat``, the projector. (Levels, token reduction and position
  embeddings are not part of the naive tower; none of the four presets uses them.)

Stages: ``preprocess`` (everything from PIL images to each encoder's normalised input),
``enc:<name>`` (each encoder's forward), ``merge``, ``projector``; each is timed with
the device synchronised around it. ``images/s`` is ``batch / total`` where ``total`` is
a separate end-to-end run without the stage synchronisation. ``peak MB`` is the peak
memory of one batch above what was resident before it (the weights): on CUDA
``torch.cuda.max_memory_allocated``; on the CPU the resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs`` before each run, after
``malloc_trim`` has returned freed heap pages). Times are the minimum over ``--iters``
after one warm-up (the least-disturbed run: machines are shared and noisy; the stage
times come from the synchronised runs, so they need not add up to ``total``); compare
the two towers within one run, not absolute numbers across machines.

Writes ``bench_tower.csv`` (one row per preset and tower), ``bench_tower_stages.csv``
(one row per stage), ``bench_tower.md`` (the printed table) and ``bench_tower.png``
(stacked per-stage bars; needs matplotlib: ``pip install fusion-tower[bench]``) to
``--out``; ``--plot-only`` redraws the table and plot from the CSVs there.
"""
from __future__ import annotations

import argparse
import ctypes
import csv
import gc
import platform
import re
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import fusion
from fusion.multiscale import is_multiscale

PRESETS = ("llava15", "dinosiglip", "vsre", "tiny")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


# ----------------------------------------------------------------------------- timing


class Clock:
    """Stage timer: ``with clock("merge"): ...`` adds the synchronised wall time to ``merge``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: Dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, stage: str):
        clock = self

        class _Span:
            def __enter__(self):
                clock.sync()
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                clock.sync()
                clock.times[stage] += time.perf_counter() - self.t0

        return _Span()


class PeakMemory:
    """Peak memory (MB) of a block above what was in use when it started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb = float("nan")

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()  # give freed heap pages back, or the next run reuses them unseen
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self.base = _status_kib("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.base is not None:
            self.mb = (_status_kib("VmHWM") - self.base) / 1024


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


# ----------------------------------------------------------------------------- the two towers


def run_fusion(tower, images: List[Image.Image], clock: Clock) -> torch.Tensor:
    """The fused tower, stage by stage (the same calls ``tower.forward`` makes without ROIs)."""
    dev = tower.device
    with clock("preprocess"):
        pixels = tower.image_processor(images)["pixel_values"].to(dev)
        inputs = tower.encoder_inputs(pixels)
    grids = {}
    if any(is_multiscale(enc) for enc in tower.encoders.values()):  # S2 scales: the tower's own loop
        with clock("enc:all"):
            grids = tower.encode(pixels)
    for name, enc in tower.encoders.items():
        if name not in grids:
            with clock(f"enc:{name}"):
                grids[name] = enc(inputs[name].to(tower._encoder_dtype(enc)))
    with clock("merge"):
        fused = tower.fuse(grids).tokens
    with clock("projector"):
        return tower.projector(fused)


def fusion_end_to_end(tower, images: List[Image.Image]) -> torch.Tensor:
    return tower(tower.image_processor(images)["pixel_values"].to(tower.device))


def _expand2square(img: Image.Image, colour) -> Image.Image:
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), colour)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def naive_encoder_input(img: Image.Image, enc) -> torch.Tensor:
    """One encoder's own PIL transform of one image -> ``[3, S, S]`` normalised float32."""
    colour = tuple(int(m * 255) for m in enc.mean)
    square = _expand2square(img, colour).resize((enc.image_size, enc.image_size),
                                                PIL_FILTERS.get(enc.interpolation, Image.BICUBIC))
    x = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, S, S]
    mean = torch.tensor(enc.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(enc.std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def run_naive(tower, images: List[Image.Image], clock: Clock) -> torch.Tensor:
    """Eagle-style: per-encoder PIL transforms, the encoders, fp32 interpolate + LayerNorm + cat."""
    dev = tower.device
    cfg = tower.config.fusion
    with clock("preprocess"):
        inputs = {name: torch.stack([naive_encoder_input(im, enc) for im in images]).to(dev)
                  for name, enc in tower.encoders.items()}
    grids = {}
    for name, enc in tower.encoders.items():
        with clock(f"enc:{name}"):
            grids[name] = enc(inputs[name].to(tower._encoder_dtype(enc)))
    with clock("merge"):
        parts = []
        for name, g in grids.items():
            x = g.permute(0, 3, 1, 2).float()  # [B, C, h, w]
            if cfg.resample == "area":
                x = F.interpolate(x, size=(cfg.grid, cfg.grid), mode="area")
            else:
                x = F.interpolate(x, size=(cfg.grid, cfg.grid), mode="bilinear", align_corners=False)
            x = x.flatten(2).transpose(1, 2)  # [B, G*G, C]
            if name in tower.merge.adapters:
                x = tower.merge.adapters[name](x)
            if name in tower.merge.norms:
                x = tower.merge.norms[name](x)
            parts.append(x)
        fused = torch.cat(parts, dim=-1 if cfg.combine == "channel_concat" else 1)
    with clock("projector"):
        return tower.projector(fused)


def naive_end_to_end(tower, images: List[Image.Image]) -> torch.Tensor:
    return run_naive(tower, images, Clock(torch.device("cpu")))  # a CPU clock never synchronises


# ----------------------------------------------------------------------------- one preset


def load_images(batch: int) -> List[Image.Image]:
    files = sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    images = []
    for p in files:
        with Image.open(p) as im:
            images.append(im.convert("RGB"))
    return [images[i % len(images)] for i in range(batch)]


def bench_preset(preset: str, batch: int, iters: int, device: torch.device, seed: int) -> List[dict]:
    t0 = time.perf_counter()
    tower = fusion.build_tower(preset, weights="random", seed=seed).eval().to(device)
    build_s = time.perf_counter() - t0
    images = load_images(batch)
    towers: Dict[str, Callable] = {"fusion": run_fusion, "naive": run_naive}
    end_to_end = {"fusion": fusion_end_to_end, "naive": naive_end_to_end}
    stages: Dict[str, Dict[str, List[float]]] = {k: defaultdict(list) for k in towers}
    totals: Dict[str, List[float]] = {k: [] for k in towers}
    peaks: Dict[str, List[float]] = {k: [] for k in towers}
    with torch.inference_mode():
        for name in towers:  # warm-up (lazy initialisation, allocator, BLAS threads)
            towers[name](tower, images, Clock(device))
        for _ in range(iters):
            for name, run in towers.items():
                clock = Clock(device)
                with PeakMemory(device) as peak:
                    run(tower, images, clock)
                peaks[name].append(peak.mb)
                for stage, seconds in clock.times.items():
                    stages[name][stage].append(seconds)
                clock.sync()
                t = time.perf_counter()
                end_to_end[name](tower, images)
                clock.sync()
                totals[name].append(time.perf_counter() - t)
    rows = []
    for name in towers:
        total = min(totals[name])
        row = {"preset": preset, "tower": name, "device": device_name(device), "batch": batch, "iters": iters,
               "images_per_s": batch / total, "total_ms": 1e3 * total, "peak_mb": statistics.median(peaks[name]),
               "build_s": build_s, "stages": {s: 1e3 * min(v) for s, v in stages[name].items()}}
        rows.append(row)
    fused_total = rows[0]["total_ms"]
    for row in rows:
        row["speedup_vs_naive"] = rows[1]["total_ms"] / fused_total if row["tower"] == "fusion" else 1.0
    del tower
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} x{torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------- output


def print_table(rows: List[dict]) -> str:
    head = ("preset", "tower", "img/s", "speedup", "peak MB", "total ms", "preprocess", "encoders", "merge",
            "projector")
    lines = []
    for r in rows:
        st = r["stages"]
        enc = sum(v for k, v in st.items() if k.startswith("enc:"))
        lines.append((r["preset"], r["tower"], f"{r['images_per_s']:.3g}",
                      f"{r['speedup_vs_naive']:.2f}x" if r["tower"] == "fusion" else "",
                      f"{r['peak_mb']:.0f}", f"{r['total_ms']:.1f}", f"{st.get('preprocess', 0):.1f}",
                      f"{enc:.1f}", f"{st.get('merge', 0):.2f}", f"{st.get('projector', 0):.2f}"))
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(l, widths)) + " |" for l in lines]
    text = "\n".join(out)
    print(text)
    return text


def write_markdown(rows: List[dict], table: str, out: Path) -> None:
    """``bench_tower.md``: the table with the device and settings it was measured with."""
    r = rows[0]
    (out / "bench_tower.md").write_text(
        f"Device: {r['device']}; batch {r['batch']}, minimum of {r['iters']} iterations after a warm-up; random "
        f"weights. Times in ms per batch; `speedup` is naive total / fusion total. The encoders and the "
        f"projector are the same modules in both towers, so on a shared, noisy machine compare the stages "
        f"that differ (preprocess, merge) rather than totals dominated by the encoders.\n\n{table}\n")


def write_csv(rows: List[dict], out: Path) -> None:
    summary = ["preset", "tower", "device", "batch", "iters", "images_per_s", "speedup_vs_naive", "peak_mb",
               "total_ms", "preprocess_ms", "encoders_ms", "merge_ms", "projector_ms", "build_s"]
    with open(out / "bench_tower.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(summary)
        for r in rows:
            st = r["stages"]
            enc = sum(v for k, v in st.items() if k.startswith("enc:"))
            w.writerow([r["preset"], r["tower"], r["device"], r["batch"], r["iters"], f"{r['images_per_s']:.4g}",
                        f"{r['speedup_vs_naive']:.3f}", f"{r['peak_mb']:.1f}", f"{r['total_ms']:.2f}",
                        f"{st.get('preprocess', 0):.2f}", f"{enc:.2f}", f"{st.get('merge', 0):.3f}",
                        f"{st.get('projector', 0):.3f}", f"{r['build_s']:.1f}"])
    with open(out / "bench_tower_stages.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["preset", "tower", "device", "batch", "stage", "min_ms"])
        for r in rows:
            for stage, ms in r["stages"].items():
                w.writerow([r["preset"], r["tower"], r["device"], r["batch"], stage, f"{ms:.3f}"])


def plot(rows: List[dict], out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping bench_tower.png (pip install fusion-tower[bench])")
        return False
    presets = list(dict.fromkeys(r["preset"] for r in rows))
    fig, axes = plt.subplots(len(presets), 1, figsize=(9, 1.9 * len(presets) + 0.8), squeeze=False)
    palette = plt.get_cmap("tab10")
    colour_of: Dict[str, tuple] = {}
    for ax, preset in zip(axes[:, 0], presets):
        pr = [r for r in rows if r["preset"] == preset]
        for y, r in enumerate(pr):
            left = 0.0
            for stage, ms in r["stages"].items():
                if stage not in colour_of:
                    colour_of[stage] = palette(len(colour_of) % 10)
                ax.barh(y, ms, left=left, color=colour_of[stage], edgecolor="white", linewidth=0.5,
                        label=stage)
                left += ms
            ax.text(left, y, f"  {r['images_per_s']:.2f} img/s, {r['peak_mb']:.0f} MB", va="center", fontsize=8)
        ax.set_yticks(range(len(pr)), [r["tower"] for r in pr])
        ax.invert_yaxis()
        ax.set_title(f"{preset} (batch {pr[0]['batch']})", fontsize=10, loc="left")
        ax.set_xlabel("ms per batch (minimum over iterations)", fontsize=8)
        ax.set_xlim(0, 1.45 * max(sum(r["stages"].values()) for r in pr))  # room for the labels
    handles, labels = [], []
    for ax in axes[:, 0]:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(f"fusion tower vs naive Eagle-style tower, random weights — {rows[0]['device']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) > 6), 1, 0.97))
    fig.savefig(out / "bench_tower.png", dpi=110)
    plt.close(fig)
    return True


def read_csv(out: Path) -> List[dict]:
    """The rows of an earlier run, from its two CSVs (for ``--plot-only``)."""
    with open(out / "bench_tower_stages.csv", newline="") as f:
        stages = list(csv.DictReader(f))
    rows = []
    with open(out / "bench_tower.csv", newline="") as f:
        for r in csv.DictReader(f):
            rows.append({"preset": r["preset"], "tower": r["tower"], "device": r["device"], "batch": int(r["batch"]),
                         "iters": int(r["iters"]), "images_per_s": float(r["images_per_s"]),
                         "speedup_vs_naive": float(r["speedup_vs_naive"]), "peak_mb": float(r["peak_mb"]),
                         "total_ms": float(r["total_ms"]), "build_s": float(r["build_s"]),
                         "stages": {x["stage"]: float(x["min_ms"]) for x in stages
                                    if x["preset"] == r["preset"] and x["tower"] == r["tower"]}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated (default {','.join(PRESETS)})")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up (default 3)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_results", help="folder for the CSVs and the plot")
    ap.add_argument("--plot-only", action="store_true", help="redraw the table and plot from the CSVs in --out")
    args = ap.parse_args(argv)
    if args.plot_only:
        rows = read_csv(Path(args.out))
        write_markdown(rows, print_table(rows), Path(args.out))
        return 0 if plot(rows, Path(args.out)) else 1
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in fusion.list_presets()]
    if unknown:
        ap.error(f"--presets: unknown {unknown}; presets are {fusion.list_presets()}")
    if args.batch_size < 1 or args.iters < 1:
        ap.error("--batch-size and --iters must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"device: {device_name(device)}; torch {torch.__version__}; batch {args.batch_size}, {args.iters} iters")
    rows: List[dict] = []
    for preset in presets:
        t = time.perf_counter()
        rows += bench_preset(preset, args.batch_size, args.iters, device, args.seed)
        print(f"  {preset}: {time.perf_counter() - t:.0f} s", file=sys.stderr)
    write_markdown(rows, print_table(rows), out)
    write_csv(rows, out)
    plotted = plot(rows, out)
    print(f"wrote {out / 'bench_tower.csv'}, {out / 'bench_tower_stages.csv'}"
          + (f", {out / 'bench_tower.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
