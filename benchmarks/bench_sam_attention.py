"""SAM's image encoder: fusion's adapter (exact attention without the score matrix) against
segment_anything's own forward, and the attention variants that were considered.

    python benchmarks/bench_sam_attention.py                        # vit_b, 1024 px, batch 4, 2 iterations
    python benchmarks/bench_sam_attention.py --batch-size 1 --iters 1 --variants-only

**Encoder** (``bench_sam_attention.md``, first table): the same random weights (seed 0) and
the same batch go through

- ``segment_anything``: ``ImageEncoderViT`` built and run by segment_anything alone, in a
  process that never imports fusion;
- ``fusion``: the ``sam`` adapter (``fusion.encoders.sam.SamEncoder``) loading those weights,
  with :class:`fusion.encoders.sam_attention.RelPosSdpaAttention` in every block.

Each forward runs in its own fresh process (the two alternate, ``--iters`` times each), so
its peak resident memory is its own: ``peak MB`` is ``VmHWM`` during the forward minus the
resident set before it (weights and input loaded, freed heap returned with
``malloc_trim``, ``VmHWM`` reset through ``/proc/self/clear_refs``). Times are the minimum
over the iterations. The outputs are compared first (relative max error must be <= 1e-5).

**Variants** (second table): one global-attention block's attention (``[B*12, 4096, 64]``
queries, keys and values, decomposed relative-position bias of a 64x64 grid) computed by
segment_anything's score-matrix path, by query-chunked eager attention, by chunked SDPA with
the bias as its mask (what fusion uses), and by SDPA on queries/keys widened with the bias
factors (no mask); each in its own process, same measurements.

Writes ``bench_sam_attention.csv`` and ``bench_sam_attention.md`` to ``--out``. Needs
``/proc`` (Linux) for the memory figures. Compare within one run: machines are shared.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

ENCODER_KINDS = ("segment_anything", "fusion")
VARIANTS = ("upstream", "chunked_eager", "chunked_sdpa", "widened_sdpa")
PARITY = 1e-5


# ----------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure(fn) -> Dict[str, float]:
    """Run ``fn()`` once: wall seconds and peak resident MB above the resident set before it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": (_status_kib("VmHWM") - base) / 1024, "out": out}


# ----------------------------------------------------------------------------- workers (fresh processes)


def sam_kwargs(model: str, image_size: int) -> dict:
    """segment_anything's own ImageEncoderViT arguments for ``model`` (what its builder passes)."""
    from functools import partial

    sizes = {"vit_b": (768, 12, 12, (2, 5, 8, 11)), "vit_l": (1024, 24, 16, (5, 11, 17, 23)),
             "vit_h": (1280, 32, 16, (7, 15, 23, 31))}
    dim, depth, heads, glob = sizes[model]
    return dict(img_size=image_size, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4,
                qkv_bias=True, use_rel_pos=True, window_size=14, out_chans=256, global_attn_indexes=glob,
                norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


def worker_encoder(kind: str, job: dict) -> dict:
    """One forward of the whole image encoder, ``kind`` in :data:`ENCODER_KINDS`."""
    from safetensors.torch import load_file

    x = load_file(job["input"])["x"]
    if kind == "segment_anything":
        from segment_anything.modeling import ImageEncoderViT

        model = ImageEncoderViT(**sam_kwargs(job["model"], job["image_size"])).eval()
        state = {k[len("image_encoder."):]: v for k, v in load_file(job["weights"]).items()}
        model.load_state_dict(state, strict=True)
        del state
        forward = model
    else:
        from fusion.config import EncoderConfig
        from fusion.encoders.sam import SamEncoder

        cfg = EncoderConfig(name="sam", type="sam", model=job["model"], image_size=job["image_size"],
                            pretrained=job["weights"])
        enc = SamEncoder(cfg, load_weights=True)

        def forward(pixels):
            return enc(pixels).permute(0, 3, 1, 2)  # [B, h, w, C] -> segment_anything's [B, C, h, w]
    loaded = [m for m in sys.modules if m == "fusion" or m.startswith("fusion.")]
    with torch.no_grad():
        result = measure(lambda: forward(x))
    return {**result, "fusion_modules_loaded": len(loaded)}


def worker_variant(name: str, job: dict) -> dict:
    """One global block's attention by variant ``name`` (see the module docstring)."""
    import torch.nn.functional as F
    from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

    g = torch.Generator().manual_seed(0)
    B, heads, side, C = job["batch_size"], 12, job["image_size"] // 16, 64
    L = side * side
    q, k, v = (torch.randn(B * heads, L, C, generator=g) for _ in range(3))
    rel_pos_h, rel_pos_w = (torch.randn(2 * side - 1, C, generator=g) * 0.1 for _ in range(2))
    scale = C ** -0.5

    def upstream():
        attn = add_decomposed_rel_pos((q * scale) @ k.transpose(-2, -1), q, rel_pos_h, rel_pos_w,
                                      (side, side), (side, side))
        return attn.softmax(dim=-1) @ v

    def chunked_sdpa():
        from fusion.encoders.sam_attention import decomposed_rel_pos, rel_pos_attention

        rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, (side, side), (side, side))
        return rel_pos_attention(q, k, v, rel_h, rel_w, scale)

    def chunked_eager(rows: int = 16):
        from fusion.encoders.sam_attention import decomposed_rel_pos

        rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, (side, side), (side, side))
        out = torch.empty_like(v)
        for r0 in range(0, side, rows):
            r1, sl = min(side, r0 + rows), slice(r0 * side, min(side, r0 + rows) * side)
            s = (q[:, sl] * scale) @ k.transpose(-2, -1)
            s.view(-1, r1 - r0, side, side, side).add_(rel_h[:, r0:r1, :, :, None]).add_(rel_w[:, r0:r1, :, None, :])
            out[:, sl] = s.softmax(dim=-1) @ v
        return out

    def widened_sdpa():
        from fusion.encoders.sam_attention import decomposed_rel_pos

        rel_h, rel_w = decomposed_rel_pos(q, rel_pos_h, rel_pos_w, (side, side), (side, side))
        rows = torch.eye(side).repeat_interleave(side, 0)  # key (r, c) -> one-hot r
        cols = torch.eye(side).repeat(side, 1)  # key (r, c) -> one-hot c
        qw = torch.cat([q * scale, rel_h.reshape(-1, L, side), rel_w.reshape(-1, L, side)], dim=-1)
        kw = torch.cat([k, rows.expand(k.shape[0], L, side), cols.expand(k.shape[0], L, side)], dim=-1)
        return F.scaled_dot_product_attention(qw, kw, v, scale=1.0)

    fn = {"upstream": upstream, "chunked_eager": chunked_eager, "chunked_sdpa": chunked_sdpa,
          "widened_sdpa": widened_sdpa}[name]
    with torch.no_grad():
        result = measure(fn)
        if name != "upstream":
            ref = upstream()
            result["rel_err"] = ((result["out"] - ref).abs().max() / ref.abs().max()).item()
    result["out"] = None
    return result


def worker_main(argv: List[str]) -> None:
    """``--worker KIND JOB.json RESULT.json``: run one measurement, write its result."""
    kind, job_path, result_path = argv
    job = json.loads(Path(job_path).read_text())
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    if kind.startswith("variant:"):
        result = worker_variant(kind.split(":", 1)[1], job)
    else:
        result = worker_encoder(kind, job)
        if job.get("save_output"):
            from safetensors.torch import save_file

            save_file({"out": result["out"].contiguous()}, job["save_output"])
    result["out"] = None
    Path(result_path).write_text(json.dumps(result))


# ----------------------------------------------------------------------------- driver


def run_worker(kind: str, job: dict, tmp: Path) -> dict:
    job_path, result_path = tmp / "job.json", tmp / "result.json"
    job_path.write_text(json.dumps(job))
    result_path.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, str(job_path), str(result_path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(result_path.read_text())


def prepare(args, tmp: Path) -> dict:
    """Random SAM weights (seed 0, a full SAM checkpoint's image_encoder.* keys) and one batch."""
    from safetensors.torch import save_file
    from segment_anything.modeling import ImageEncoderViT

    torch.manual_seed(0)
    model = ImageEncoderViT(**sam_kwargs(args.model, args.image_size))
    for block in model.blocks:  # segment_anything initialises these to zero; make the bias matter
        torch.nn.init.normal_(block.attn.rel_pos_h, std=0.02)
        torch.nn.init.normal_(block.attn.rel_pos_w, std=0.02)
    weights, inputs = tmp / "sam.safetensors", tmp / "input.safetensors"
    save_file({f"image_encoder.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    save_file({"x": torch.randn(args.batch_size, 3, args.image_size, args.image_size)}, str(inputs))
    return {"weights": str(weights), "input": str(inputs), "model": args.model, "image_size": args.image_size,
            "batch_size": args.batch_size, "threads": args.threads}


def bench_encoder(args, tmp: Path) -> List[dict]:
    from safetensors.torch import load_file

    job = prepare(args, tmp)
    runs: Dict[str, List[dict]] = {k: [] for k in ENCODER_KINDS}
    outputs = {}
    for it in range(args.iters):
        for kind in ENCODER_KINDS:
            save = str(tmp / f"{kind}.out.safetensors") if it == 0 else None
            r = run_worker(kind, {**job, "save_output": save}, tmp)
            if kind == "segment_anything" and r["fusion_modules_loaded"]:
                raise RuntimeError("the segment_anything worker imported fusion")
            runs[kind].append(r)
            if save:
                outputs[kind] = load_file(save)["out"]
            print(f"  {kind:16s} iter {it}: {r['seconds']:.1f} s, peak {r['peak_mb']:.0f} MB", flush=True)
    ref, got = outputs["segment_anything"].double(), outputs["fusion"].double()
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    if not err <= PARITY:
        raise RuntimeError(f"fusion's SAM output differs from segment_anything's: relative error {err:.3g}")
    rows = []
    for kind in ENCODER_KINDS:
        rows.append({"table": "encoder", "name": kind, "batch": args.batch_size, "image_size": args.image_size,
                     "seconds": min(r["seconds"] for r in runs[kind]),
                     "peak_mb": max(r["peak_mb"] for r in runs[kind]), "rel_err": err if kind == "fusion" else 0.0})
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["memory_ratio"] = r["peak_mb"] / base["peak_mb"]
    return rows


def bench_variants(args, tmp: Path) -> List[dict]:
    job = {"batch_size": args.variant_batch_size, "image_size": args.image_size, "threads": args.threads}
    runs: Dict[str, List[dict]] = {v: [] for v in VARIANTS}
    for it in range(args.iters):
        for name in VARIANTS:
            r = run_worker(f"variant:{name}", job, tmp)
            runs[name].append(r)
            print(f"  {name:16s} iter {it}: {r['seconds']:.2f} s, peak {r['peak_mb']:.0f} MB", flush=True)
    rows = []
    for name in VARIANTS:
        rows.append({"table": "variant", "name": name, "batch": args.variant_batch_size,
                     "image_size": args.image_size, "seconds": min(r["seconds"] for r in runs[name]),
                     "peak_mb": max(r["peak_mb"] for r in runs[name]), "rel_err": runs[name][0].get("rel_err", 0.0)})
    for r in rows:
        r["time_ratio"] = r["seconds"] / rows[0]["seconds"]
        r["memory_ratio"] = r["peak_mb"] / rows[0]["peak_mb"]
    return rows


def write_results(rows: List[dict], args, out: Path) -> str:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["table", "name", "batch", "image_size", "seconds", "peak_mb", "time_ratio", "memory_ratio", "rel_err"]
    with open(out / "bench_sam_attention.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4g}" if isinstance(r[k], float) else r[k]) for k in fields})
    threads = args.threads or torch.get_num_threads()
    lines = [f"Device: CPU {platform.machine()}, {threads} torch threads, {os.cpu_count()} cores; SAM "
             f"{args.model} at {args.image_size} px, random weights; each forward in its own process, minimum time "
             f"and maximum peak over {args.iters} iterations. Ratios are to segment_anything's own (first row).", ""]
    for table, title in (("encoder", f"Whole image encoder, batch {args.batch_size}"),
                         ("variant", f"One global block's attention, batch {args.variant_batch_size}")):
        part = [r for r in rows if r["table"] == table]
        if not part:
            continue
        lines += [f"**{title}**", "", "| implementation | seconds | peak MB | time ratio | memory ratio | rel. error |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | {r['time_ratio']:.2f} | "
                  f"{r['memory_ratio']:.3f} | {r['rel_err']:.1e} |" for r in part]
        lines.append("")
    text = "\n".join(lines)
    tmp = out / "bench_sam_attention.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "bench_sam_attention.md")
    return text


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b", choices=("vit_b", "vit_l", "vit_h"))
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--variant-batch-size", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (default: torch's)")
    p.add_argument("--variants-only", action="store_true")
    p.add_argument("--encoder-only", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    rows: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-sam-") as tmp:
        if not args.variants_only:
            print(f"whole encoder, batch {args.batch_size}:", flush=True)
            rows += bench_encoder(args, Path(tmp))
        if not args.encoder_only:
            print(f"one global block, batch {args.variant_batch_size}:", flush=True)
            rows += bench_variants(args, Path(tmp))
    print(write_results(rows, args, Path(args.out)))


if __name__ == "__main__":
    main()
