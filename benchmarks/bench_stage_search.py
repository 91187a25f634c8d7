"""Stage search benchmark: the cached search (image encoded once) against the naive loop.

    python benchmarks/bench_stage_search.py                       # N = 2, 4, 8 on the tiny model
    python benchmarks/bench_stage_search.py --n 2,4 --judge loglik --threads 1 --out /tmp/bench

Both searches run LLaVA-CoT's four stages on the tiny fusion Llava of
``examples/llava_cot.py`` (random weights, built offline) with the same seed:

- ``cached``: :func:`fusion.hf.generate_stages` (one prefill of image + prompt, candidates
  decoded N wide from a copy of its cache, judge calls from the cached prefix);
- ``naive``: :func:`fusion.stage_naive.generate_stages_naive` (every candidate is a
  ``model.generate`` with the image, every judge call a forward with the image).

Before anything is reported the two results are checked to be the same (every
candidate's tokens, the chosen candidates, the answer). Per search it reports the judge's
duels (only candidates that closed their tag are judged), the vision tower's forward
calls and the images it encoded, the time spent inside the tower, the token positions the
language model processed (prefills included) and the wall time. One warm-up search of
each kind runs first (not reported); then each search runs ``--repeats`` times, the two
kinds interleaved, and the least-disturbed (minimum) wall time is kept. The speedup is
naive wall time / cached wall time within this one run (shared machines are noisy:
compare the two rows, not absolute times across machines). On a real tower (``vsre``:
four encoders at 336-1024 px) the tower's share of the naive time is far larger than on
``tiny``.

Writes ``bench_stage_search.csv`` and ``bench_stage_search.md`` to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from PIL import Image

import fusion.hf as fhf
from fusion.atomic import atomic_write_text
from fusion.stage_naive import generate_stages_naive

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llava_cot.py"
SEARCHES = {"cached": fhf.generate_stages, "naive": generate_stages_naive}
COLUMNS = ("n", "search", "duels", "tower_calls", "images_encoded", "tower_s", "lm_token_positions", "wall_s", "speedup")


def load_example():
    """``examples/llava_cot.py`` as a module (its tiny model builder and prompt)."""
    spec = importlib.util.spec_from_file_location("llava_cot_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Meter:
    """Counts the vision tower's calls, images and time, and the language model's token positions."""

    def __init__(self, model):
        self.tower_calls = self.images = self.lm_positions = 0
        self.tower_s = 0.0
        self._start = 0.0
        tower = model.model.vision_tower
        tower.register_forward_pre_hook(self._tower_in)
        tower.register_forward_hook(self._tower_out)
        model.model.language_model.register_forward_pre_hook(self._lm_in, with_kwargs=True)

    def reset(self) -> None:
        self.tower_calls = self.images = self.lm_positions = 0
        self.tower_s = 0.0

    def _tower_in(self, module, args):
        self._start = time.perf_counter()

    def _tower_out(self, module, args, out):
        self.tower_s += time.perf_counter() - self._start
        self.tower_calls += 1
        self.images += len(args[0])

    def _lm_in(self, module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        self.lm_positions += embeds.shape[0] * embeds.shape[1]


def same_result(a, b) -> bool:
    """Every candidate's tokens, every choice and the answer agree."""
    return a.token_ids == b.token_ids and all(
        x.chosen == y.chosen and [c.token_ids for c in x.candidates] == [c.token_ids for c in y.candidates]
        for x, y in zip(a.stages, b.stages))


def bench(model, processor, image, prompt, ns: List[int], repeats: int, kwargs: Dict) -> List[dict]:
    meter = Meter(model)
    for search in SEARCHES.values():  # warm-up (first calls allocate, load kernels, fill caches)
        search(model, processor, image, prompt, n=2, **kwargs)
    rows = []
    for n in ns:
        results, row = {}, {}
        for _ in range(repeats):
            for name, search in SEARCHES.items():
                meter.reset()
                start = time.perf_counter()
                results[name] = search(model, processor, image, prompt, n=n, **kwargs)
                wall = time.perf_counter() - start
                if name in row and row[name]["wall_s"] <= wall:
                    continue
                duels = sum(len(r.duels) for r in results[name].stages)
                row[name] = {"n": n, "search": name, "duels": duels, "tower_calls": meter.tower_calls,
                             "images_encoded": meter.images, "tower_s": round(meter.tower_s, 4),
                             "lm_token_positions": meter.lm_positions, "wall_s": round(wall, 3), "speedup": ""}
        if not same_result(results["cached"], results["naive"]):
            raise RuntimeError(f"n={n}: the cached search and the naive loop disagree; not reporting timings")
        row["cached"]["speedup"] = f"{row['naive']['wall_s'] / row['cached']['wall_s']:.2f}x"
        rows += [row["cached"], row["naive"]]
    return rows


def table(rows: List[dict]) -> str:
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS}
    line = lambda values: "| " + " | ".join(str(v).ljust(widths[c]) for c, v in zip(COLUMNS, values)) + " |"
    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (widths[c] + 2) for c in COLUMNS) + "|"]
                     + [line([r[c] for c in COLUMNS]) for r in rows])


def write(rows: List[dict], text: str, settings: str, out: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "bench_stage_search.csv", buffer.getvalue())
    atomic_write_text(out / "bench_stage_search.md", f"{settings}\n\n{text}\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="2,4,8", help="candidates per stage, comma-separated (default 2,4,8)")
    ap.add_argument("--judge", default="pairwise", choices=("pairwise", "loglik"))
    ap.add_argument("--max-new-tokens", type=int, default=16, help="per stage (default 16)")
    ap.add_argument("--repeats", type=int, default=3, help="searches of each kind per N; the fastest is kept")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ns = [int(v) for v in args.n.split(",")]
    example = load_example()
    model, processor = example.tiny_llava_cot(args.seed)
    prompt = example.build_prompt(processor, "what is in the picture ?")
    with Image.open(ROOT / "examples" / "images" / "house.jpg") as im:
        image = im.convert("RGB")
    kwargs = dict(judge=args.judge, max_new_tokens=args.max_new_tokens, seed=args.seed)  # LLaVA-CoT sampling: 0.6, 0.9
    rows = bench(model, processor, image, prompt, ns, args.repeats, kwargs)
    settings = (f"Device: CPU {platform.machine()} x{torch.get_num_threads()} threads; tiny fusion Llava "
                f"(examples/llava_cot.py, random weights); 4 stages, judge {args.judge}, max_new_tokens "
                f"{args.max_new_tokens}, temperature 0.6, top_p 0.9, seed {args.seed}; minimum wall time of "
                f"{args.repeats} searches of each kind after a warm-up. Results checked equal before timing. "
                f"`speedup` = naive wall / cached wall.")
    text = table(rows)
    print(settings + "\n\n" + text)
    write(rows, text, settings, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
