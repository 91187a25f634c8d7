"""The ``fusion-tower`` command (also ``python -m fusion``).

- ``fusion-tower info SOURCE [key=value ...] [--weights random]``: a table per encoder
  and the fused token count and width.
- ``fusion-tower extract SOURCE --images PATHS --out DIR [--weights random]
  [--batch-size N] [--seed S] [key=value ...]``: fused tokens as safetensors shards.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .config import load_config


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="preset name (see `fusion-tower presets`), .yaml/.json file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. fusion.grid=16 encoders.sam=null")
    p.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                   help="'random' initialises every encoder from --seed (no downloads)")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-tower", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a tower: encoders, grids, channels, tokens")
    _add_source_args(info)
    ext = sub.add_parser("extract", help="encode images to safetensors shards")
    _add_source_args(ext)
    ext.add_argument("--images", nargs="+", required=True, help="image files or folders")
    ext.add_argument("--out", required=True, help="output folder")
    ext.add_argument("--batch-size", type=int, default=8)
    ext.add_argument("--shard-size", type=int, default=64, help="images per safetensors shard")
    ext.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ext.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sub.add_parser("presets", help="list the shipped presets")
    return parser


def _build(args):
    from .tower import MultiEncoderTower

    config = load_config(args.source, args.overrides)
    return MultiEncoderTower(config, weights=args.weights, seed=args.seed)


def cmd_info(args) -> int:
    tower = _build(args)
    rows = [("encoder", "upstream", "input", "grid", "channels", "params", "layer", "frozen")]
    for name, enc in tower.encoders.items():
        rows.append((name, enc.upstream_name(), f"{enc.image_size}px", f"{enc.grid[0]}x{enc.grid[1]}",
                     str(enc.dim), f"{enc.num_parameters() / 1e6:.2f}M", str(enc.layer), str(enc.frozen)))
    print(_table(rows))
    fusion = tower.config.fusion
    print(f"\nfusion: grid {fusion.grid}x{fusion.grid}, {fusion.resample}, norm {fusion.norm}, {fusion.combine}")
    print(f"projector: {tower.config.projector.type}")
    print(f"tokens: {tower.num_patches} x {tower.hidden_size} (fused width {tower.merge.out_dim})")
    return 0


def cmd_extract(args) -> int:
    import torch

    from .extract import collect_images, extract_features, write_manifest

    images = collect_images(args.images)
    tower = _build(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tower.to(device)
    result = extract_features(tower, images, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                              progress=not args.no_progress)
    manifest = write_manifest(args.out, {"source": str(args.source), "overrides": list(args.overrides),
                                         "weights": args.weights, "seed": args.seed,
                                         "tokens": [tower.num_patches, tower.hidden_size]})
    print(f"wrote {manifest['num_images']} images ({tower.num_patches} x {tower.hidden_size} tokens each) "
          f"to {args.out}; {len(result.skipped_shards)} shards already done, {len(manifest['failed'])} skipped")
    for name, reason in manifest["failed"].items():
        print(f"  skipped {name}: {reason}", file=sys.stderr)
    return 1 if manifest["failed"] else 0


def cmd_presets(args) -> int:
    from .config import list_presets

    print("\n".join(list_presets()))
    return 0


def _table(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


COMMANDS = {"info": cmd_info, "extract": cmd_extract, "presets": cmd_presets}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # overrides may stand after options too (`info tiny --weights random fusion.grid=3`)
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"fusion-tower {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
