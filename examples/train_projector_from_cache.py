"""Stage-1 projector training from an encoder cache: the encoders never run.

    python examples/train_projector_from_cache.py                  # tiny preset, random weights, examples/images
    python examples/train_projector_from_cache.py --cache feats/   # a cache made by `extract --cache-encoders`

Without ``--cache``, it first runs ``fusion-tower extract tiny --weights random
--cache-encoders`` on ``examples/images`` into a temporary folder. Then it trains the
tower's trainable part (the merge norms and the projector; the encoders are frozen)
for a few steps on the cached grids via ``tower.merge_and_project(grids)``, and prints
the loss, which falls.

The objective is a stand-in for the language model's loss of LLaVA's stage 1: match a
fixed "teacher" projector (same type, other random weights) applied to the same fused
tokens, so the student learns a real function of the images. In a VLM, replace
``loss_fn`` with the language model's captioning loss on the projected tokens.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Callable, List, Optional

import torch

import fusion
from fusion.cli import main as fusion_tower
from fusion.feature_cache import FeatureCache

IMAGES = Path(__file__).with_name("images")


def teacher_loss(tower, seed: int = 1234) -> Callable:
    """``loss_fn(tokens, grids)``: MSE to a frozen copy of the merge followed by a projector of the
    same type with weights drawn from ``seed``."""
    teacher_merge = copy.deepcopy(tower.merge).requires_grad_(False)
    teacher_proj = copy.deepcopy(tower.projector).requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in teacher_proj.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    teacher = torch.nn.ModuleDict({"merge": teacher_merge, "projector": teacher_proj}).eval()

    def loss_fn(tokens: torch.Tensor, grids) -> torch.Tensor:
        with torch.no_grad():
            fused = teacher["merge"](grids)  # [B, N0, C]; then the tower's granularity steps
            target = teacher["projector"](tower.sequence(fused, grids).tokens)
        return torch.nn.functional.mse_loss(tokens, target)

    return loss_fn


def train_projector(tower, cache: FeatureCache, steps: int = 30, batch_size: int = 2, lr: float = 3e-3,
                    seed: int = 0, loss_fn: Optional[Callable] = None, log: Callable = print) -> List[float]:
    """Train the tower's trainable parameters from ``cache`` for ``steps`` steps; returns the losses.

    The encoders are never called (checked with forward hooks)."""
    cache.check(tower)
    loss_fn = loss_fn or teacher_loss(tower)
    params = [p for p in tower.parameters() if p.requires_grad]  # frozen encoders have none
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    calls = []
    hooks = [enc.register_forward_hook(lambda *a: calls.append(1)) for enc in tower.encoders.values()]
    tower.train()
    losses: List[float] = []
    epoch = 0
    try:
        while len(losses) < steps:
            for names, grids in cache.batches(batch_size, shuffle=True, seed=seed + epoch):
                tokens = tower.merge_and_project(grids)
                loss = loss_fn(tokens, grids)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                if log and (len(losses) == 1 or len(losses) % 10 == 0):
                    log(f"step {len(losses):4d}  loss {losses[-1]:.5f}")
                if len(losses) == steps:
                    break
            epoch += 1
    finally:
        for h in hooks:
            h.remove()
    if calls:
        raise RuntimeError(f"an encoder ran {len(calls)} times; training from the cache should never run one")
    return losses


def make_cache(out: Path, source: str = "tiny", weights: str = "random", images: Path = IMAGES,
               overrides: Optional[List[str]] = None) -> Path:
    """``fusion-tower extract SOURCE --cache-encoders`` on ``images`` into ``out``."""
    code = fusion_tower(["extract", source, *(overrides or []), "--weights", weights, "--images", str(images),
                         "--out", str(out), "--cache-encoders", "--no-progress"])
    if code != 0:
        raise SystemExit(f"extract failed with exit code {code}")
    return out


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="a folder written by `fusion-tower extract ... --cache-encoders` "
                                        "(default: make one from examples/images)")
    parser.add_argument("--source", default="tiny", help="the tower config the cache was made with")
    parser.add_argument("--weights", default="random", choices=("pretrained", "random"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    tower = fusion.build_tower(args.source, weights=args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(args.cache) if args.cache else make_cache(Path(tmp) / "cache", args.source, args.weights)
        cache = FeatureCache(cache_dir)
        print(f"{len(cache)} images cached; encoders {cache.encoders}")
        losses = train_projector(tower, cache, steps=args.steps, batch_size=args.batch_size, lr=args.lr)
    print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f} in {len(losses)} steps")


if __name__ == "__main__":
    main()
