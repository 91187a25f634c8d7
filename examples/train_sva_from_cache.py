"""Train the SVA connector (``fusion.combine: sva``) from an encoder cache, against the fixed merge.

    python examples/train_sva_from_cache.py                 # tiny preset, random weights, 160 images
    python examples/train_sva_from_cache.py --steps 600 --cache feats/ --source my.yaml

Without ``--cache`` it draws 160 images from ``examples/images`` (random crops, flips and
quarter turns), runs ``fusion-tower extract SOURCE --weights random --cache-encoders`` on
them into a temporary folder, and holds out the last 16 for evaluation.

The target is one the fixed merge cannot express: in every cell of the fused grid,
attention pooling of the finest encoder's tokens inside the cell's area window, weighted
by a softmax over a fixed random direction (``beta * <u, x_t>``), then a fixed random
linear map. Area pooling keeps only each window's mean, which loses which token the
softmax picks; cross-attention over the window (what the SVA does) can learn the
selection.

Two connectors learn it from the same cached grids, for the same steps, batch, learning
rate and seed, with the same number of trainable parameters:

- ``sva``: the tower with ``combine: sva`` (input projections, learned queries, window
  cross-attention layers) and its ``mlp2x_gelu`` projector;
- ``concat``: the fixed merge (area resampling, LayerNorm, channel concat) followed by a
  two-layer GELU MLP whose hidden width makes the parameter count equal.

It prints both training curves and the held-out losses; the SVA ends lower.
"""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from PIL import Image, ImageOps
from torch import nn

import fusion
from fusion.feature_cache import FeatureCache
from fusion.kernels import area_windows

IMAGES = Path(__file__).with_name("images")
SVA = ["fusion.combine=sva", "fusion.sva.dim=32", "fusion.sva.heads=4", "fusion.sva.layers=2"]


def make_images(out: Path, n: int = 160, seed: int = 0) -> Path:
    """``n`` images drawn from ``examples/images``: random crops (40-100% of the side), flips, quarter turns."""
    rng = random.Random(seed)
    sources = []
    for p in sorted(IMAGES.iterdir()):
        with Image.open(p) as im:
            sources.append(im.convert("RGB"))
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = sources[i % len(sources)]
        s = rng.uniform(0.4, 1.0)
        w, h = max(8, int(im.width * s)), max(8, int(im.height * s))
        x, y = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
        crop = im.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            crop = ImageOps.mirror(crop)
        crop = crop.rotate(90 * rng.randint(0, 3), expand=True)
        crop.save(out / f"img{i:03d}.png")
    return out


def make_cache(out: Path, source: str, images: Path) -> Path:
    from fusion.cli import main as fusion_tower

    code = fusion_tower(["extract", source, "--weights", "random", "--images", str(images), "--out", str(out),
                         "--cache-encoders", "--no-progress"])
    if code != 0:
        raise SystemExit(f"extract failed with exit code {code}")
    return out


class AttentionPoolTarget:
    """Per fused-grid cell: softmax(beta * <u, x_t>)-weighted mean of encoder ``name``'s tokens in
    the cell's area window, then ``@ proj``; ``[B, G*G, out_dim]``, scaled to unit variance."""

    def __init__(self, name: str, grid_hw, channels: int, G: int, out_dim: int, beta: float = 4.0, seed: int = 1):
        gen = torch.Generator().manual_seed(seed)
        self.name, self.beta = name, beta
        self.u = torch.randn(channels, generator=gen)
        self.u /= self.u.norm()
        self.proj = torch.randn(channels, out_dim, generator=gen) / channels ** 0.5
        self.idx, self.valid = area_windows([grid_hw], G).gather_index(0, "cpu")
        self.scale = None

    def __call__(self, grids: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = grids[self.name].float()
        x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)  # per-token standardised features
        tokens = x.flatten(1, 2)[:, self.idx]                           # [B, G*G, L, C]
        scores = (self.beta * tokens @ self.u).masked_fill(~self.valid, float("-inf"))
        pooled = (scores.softmax(-1).unsqueeze(-1) * tokens).sum(2)      # [B, G*G, C]
        y = pooled @ self.proj
        if self.scale is None:
            self.scale = y.std().item()
        return y / self.scale


def count(params) -> int:
    return sum(p.numel() for p in params)


def build_connectors(source: str, seed: int = 0):
    """``{"sva": (forward(grids), params), "concat": (...)}`` with equal trainable parameter counts."""
    sva_tower = fusion.build_tower(source, SVA, weights="random", seed=seed)
    sva_params = [p for p in sva_tower.parameters() if p.requires_grad]
    fixed = fusion.build_tower(source, ["projector.type=none", "projector.out_dim=null"], weights="random",
                               seed=seed)
    width, out_dim = fixed.merge.out_dim, sva_tower.hidden_size
    merge_params = [p for p in fixed.merge.parameters() if p.requires_grad]
    # hidden H: width*H + H + H*out + out + merge norms = the SVA's count
    hidden = round((count(sva_params) - count(merge_params) - out_dim) / (width + 1 + out_dim))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def concat_forward(grids):
        return mlp(fixed.fuse(grids).tokens)

    return {"sva": (sva_tower, sva_tower.merge_and_project, sva_params),
            "concat": (nn.ModuleDict({"merge": fixed.merge, "mlp": mlp}), concat_forward,
                       merge_params + list(mlp.parameters()))}


def train(forward: Callable, params: List[torch.Tensor], module: nn.Module, cache: FeatureCache,
          train_names: List[str], test_names: List[str], target: Callable, steps: int, batch_size: int,
          lr: float, seed: int, log: Optional[Callable] = print, label: str = "") -> Dict[str, List[float]]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = random.Random(seed)
    test_grids = cache.grids(test_names)
    test_target = target(test_grids)
    curve, held_out = [], []
    module.train()
    for step in range(1, steps + 1):
        names = gen.sample(train_names, batch_size)
        grids = cache.grids(names)
        loss = torch.nn.functional.mse_loss(forward(grids), target(grids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
        if step % 50 == 0 or step == steps:
            module.eval()
            with torch.no_grad():
                held_out.append(torch.nn.functional.mse_loss(forward(test_grids), test_target).item())
            module.train()
            if log:
                log(f"{label:>6} step {step:4d}  train {sum(curve[-50:]) / len(curve[-50:]):.4f}  "
                    f"held-out {held_out[-1]:.4f}")
    return {"train": curve, "held_out": held_out}


def run(cache_dir: Path, source: str = "tiny", steps: int = 400, batch_size: int = 8, lr: float = 3e-3,
        seed: int = 0, held_out: int = 16, log: Optional[Callable] = print) -> Dict[str, dict]:
    cache = FeatureCache(cache_dir)
    names = cache.names
    train_names, test_names = names[:-held_out], names[-held_out:]
    connectors = build_connectors(source, seed)
    finest = max(cache.encoders, key=lambda n: cache.encoders[n][0] * cache.encoders[n][1])
    h, w, c = cache.encoders[finest]
    module = connectors["sva"][0]
    target = AttentionPoolTarget(finest, (h, w), c, module.config.fusion.grid, module.hidden_size, seed=seed + 1)
    results = {}
    for label, (mod, forward, params) in connectors.items():
        torch.manual_seed(seed)
        res = train(forward, params, mod, cache, train_names, test_names, target, steps, batch_size, lr, seed,
                    log, label)
        res["params"] = count(params)
        results[label] = res
    return results


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", help="a folder from `fusion-tower extract ... --cache-encoders` (default: make one)")
    ap.add_argument("--source", default="tiny", help="the tower config the cache was made with")
    ap.add_argument("--images", type=int, default=160, help="images to draw when making a cache")
    ap.add_argument("--held-out", type=int, default=16, help="images kept out of training, for evaluation")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        if args.cache:
            cache_dir = Path(args.cache)
        else:
            images = make_images(Path(tmp) / "images", args.images, args.seed)
            cache_dir = make_cache(Path(tmp) / "cache", args.source, images)
        res = run(cache_dir, args.source, args.steps, args.batch_size, args.lr, args.seed, args.held_out)
    print(f"\n{'connector':<8} {'params':>8} {'train (last 50)':>16} {'held-out':>9}")
    for label, r in res.items():
        print(f"{label:<8} {r['params']:>8} {sum(r['train'][-50:]) / 50:>16.4f} {r['held_out'][-1]:>9.4f}")


if __name__ == "__main__":
    main()
