"""The ``fusion-tower`` command (also ``python -m fusion``).

- ``fusion-tower info SOURCE [key=value ...] [--weights random]``: a table per encoder,
  where each encoder's weights come from (tag / file / Hugging Face folder and its path, or
  random with the seed; the sha256 prefix of checkpoint files already on this machine), the
  fused token count and width; from a weightless build, nothing read or downloaded.
- ``fusion-tower download SOURCE [key=value ...]``: fetch every checkpoint the config
  names into the upstream caches (open_clip / timm / Hugging Face hub / PyTorch hub) and
  print where each went and its size; a second run finds them cached.
- ``fusion-tower extract SOURCE (--images PATHS | --images-from LIST [--image-root DIR])
  --out DIR [--weights random] [--batch-size N] [--workers N] [--dtype D] [--store-dtype D]
  [--seed S] [--cache-encoders] [key=value ...]``: fused tokens as
  safetensors shards (and, with ``--cache-encoders``, each encoder's grid). Under
  ``torchrun --nproc_per_node N -m fusion extract ...`` the ranks split the shards.
- ``fusion-tower show SOURCE IMAGE --out picture.png [--rois BOX ...] [--weights random]``:
  the image, each encoder's feature grid and the fused tokens as PCA-coloured maps.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .config import DTYPES, load_config


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="preset name (see `fusion-tower presets`), .yaml/.json file")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. fusion.grid=16 encoders.sam=null")
    p.add_argument("--weights", choices=("pretrained", "random"), default="pretrained",
                   help="'random' initialises every encoder from --seed (no downloads)")
    p.add_argument("--seed", type=int, default=0, help="seed for --weights random (default 0)")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The ``fusion-tower`` parser. ``command`` is the subcommand about to run: the ``show``
    subcommand's own options (whose module imports torch) are only added when it is ``show``,
    so ``fusion-tower --help`` and the other commands' parsing import nothing heavy."""
    parser = argparse.ArgumentParser(prog="fusion-tower", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a tower: encoders, grids, channels, tokens")
    _add_source_args(info)
    ext = sub.add_parser("extract", help="encode images to safetensors shards")
    _add_source_args(ext)
    where = ext.add_mutually_exclusive_group(required=True)
    where.add_argument("--images", nargs="+", help="image files (key: the file name) or folders, searched "
                                                   "recursively (key: the path relative to the folder)")
    where.add_argument("--images-from", metavar="LIST",
                       help="a text file of image paths (one per line) or a LLaVA-style .json list "
                            "([{\"image\": \"rel/path.jpg\", ...}]); key: the path as written there")
    ext.add_argument("--image-root", default=None, help="folder that relative --images-from paths are under "
                                                        "(default: the list's folder)")
    ext.add_argument("--out", required=True, help="output folder")
    ext.add_argument("--batch-size", type=int, default=8)
    ext.add_argument("--workers", type=int, default=0,
                     help="DataLoader processes decoding and preprocessing images while the tower encodes "
                          "(default 0: in the main process; the features are the same)")
    ext.add_argument("--dtype", choices=DTYPES, default=None,
                     help="run the whole tower in this dtype (an encoder's own `dtype` wins; default: float32)")
    ext.add_argument("--store-dtype", choices=DTYPES, default="float32",
                     help="dtype of the stored features (float16/bfloat16: half the disk; default float32)")
    ext.add_argument("--shard-size", type=int, default=64, help="images per safetensors shard")
    ext.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    ext.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ext.add_argument("--cache-encoders", action="store_true",
                     help="also store each encoder's grid (before the merge) per image, for "
                          "tower.merge_and_project / fusion.feature_cache.FeatureCache")
    ext.add_argument("--barrier-timeout", type=float, default=24.0, metavar="HOURS",
                     help="under torchrun: how long rank 0 waits for the other ranks before writing "
                          "manifest.json (default 24)")
    down = sub.add_parser("download", help="fetch every checkpoint a config needs into the upstream caches")
    down.add_argument("source", help="preset name (see `fusion-tower presets`), .yaml/.json file")
    down.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    sub.add_parser("presets", help="list the shipped presets")
    _add_show_parser(sub, full=command == "show")
    return parser


def _build(args):
    from .tower import MultiEncoderTower

    config = load_config(args.source, args.overrides)
    return MultiEncoderTower(config, weights=args.weights, seed=args.seed, dtype=getattr(args, "dtype", None))


def cmd_info(args) -> int:
    """The table comes from a weightless build on the meta device (fusion.geometry) and the
    weight sources from the config and the caches (nothing is initialised, read or downloaded);
    ``params`` counts what the tower keeps (after pruning)."""
    from .encoders.prefetch import planned_source
    from .encoders.sources import describe
    from .geometry import tower_geometry
    from .tower import encoder_seed

    config = load_config(args.source, args.overrides)
    geo = tower_geometry(config, weights=args.weights)
    report = {name: planned_source(cfg, args.weights, args.seed, encoder_seed(args.seed, name))
              for name, cfg in config.encoders.items()}
    rows = [("encoder", "upstream", "weights", "input", "grid", "channels", "params", "layer", "frozen")]
    for enc in geo.encoders:
        rows.append((enc.name, enc.upstream, report[enc.name]["source"], f"{enc.image_size}px",
                     f"{enc.grid[0]}x{enc.grid[1]}", str(enc.dim), f"{enc.params / 1e6:.2f}M", str(enc.layer),
                     str(enc.frozen)))
    print(_table(rows))
    print("\nweights:")
    for name, entry in report.items():
        print(f"  {name}: {describe(entry)}")
        for note in entry.get("notes", []):
            print(f"    {note}")
    fusion = config.fusion
    print(f"\nfusion: grid {fusion.grid}x{fusion.grid}, {fusion.resample}, norm {fusion.norm}, {fusion.combine}")
    print(f"projector: {config.projector.type}")
    print(f"tokens: {geo.num_patches} x {geo.hidden_size} (fused width {geo.fused_dim})")
    return 0


def cmd_download(args) -> int:
    """Fetch each encoder's checkpoint into its upstream cache; exit 1 if any could not be fetched."""
    from .encoders.prefetch import prefetch

    config = load_config(args.source, args.overrides)
    results = [prefetch(enc) for enc in config.encoders.values()]
    rows = [("encoder", "pretrained", "status", "size", "where")]
    for r in results:
        where = (r.paths[0] if len(r.paths) == 1 else f"{os.path.dirname(r.paths[0])} ({len(r.paths)} files)"
                 if r.paths else "(see below)" if r.status == "error" else r.detail)
        rows.append((r.encoder, r.source, r.status, f"{r.size / 2**20:.1f} MiB" if r.paths else "-", where))
    print(_table(rows))
    errors = [r for r in results if r.status == "error"]
    for r in errors:
        print(f"fusion-tower download: error: {r.detail}", file=sys.stderr)
    fetched = sum(r.status == "downloaded" for r in results)
    print(f"\n{fetched} downloaded, {sum(r.status == 'cached' for r in results)} already cached, {len(errors)} failed")
    return 1 if errors else 0


def cmd_extract(args) -> int:
    """Extract features; under ``torchrun`` every rank takes its shards (``RANK``/``WORLD_SIZE``
    from the environment, across nodes too) and rank 0 writes ``manifest.json`` after a barrier."""
    import datetime
    from pathlib import Path

    import torch

    from .distributed import barrier, dist_env, init_coordination
    from .extract import check_writable, extract_features, write_manifest
    from .image_sources import collect_images, images_from_list

    env = dist_env()
    if not args.barrier_timeout > 0:
        raise ValueError(f"--barrier-timeout: expected a positive number of hours, got {args.barrier_timeout}")
    if args.workers < 0:
        raise ValueError(f"--workers: expected a number >= 0 (0: decode in the main process), got {args.workers}")
    if args.image_root is not None and args.images_from is None:
        raise ValueError("--image-root: only applies to --images-from (paths in --images are used as given)")
    images = images_from_list(args.images_from, args.image_root) if args.images_from else collect_images(args.images)
    check_writable(Path(args.out))  # before loading the encoders: an unwritable --out fails at once
    tower = _build(args)
    sources = tower.weights_report()  # where the weights came from: recorded, and a resume must match it
    identity = {name: {k: e.get(k) for k in ("source", "pretrained", "sha256", "encoder_seed")}
                for name, e in sources.items()}
    device = args.device
    if device is None:
        device = f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu"
    tower.to(device)
    created = init_coordination(env, datetime.timedelta(hours=args.barrier_timeout))
    try:
        result = extract_features(tower, images, args.out, batch_size=args.batch_size, shard_size=args.shard_size,
                                  rank=env.rank, world_size=env.world_size,
                                  progress=not args.no_progress and env.rank == 0,
                                  cache_encoders=args.cache_encoders, workers=args.workers,
                                  store_dtype=getattr(torch, args.store_dtype),
                                  settings={"config": tower.config.to_dict(), "weights": args.weights,
                                            "seed": args.seed, "weight_sources": identity, "dtype": args.dtype,
                                            "store_dtype": args.store_dtype})
        if env.distributed:
            print(f"rank {env.rank}/{env.world_size}: encoded {result.images} images into {len(result.written)} "
                  f"shards, {len(result.skipped_shards)} shards already done", file=sys.stderr)
        barrier()  # every rank's shards are complete before rank 0 gathers them
        if env.rank != 0:
            return 0
        info = {"source": str(args.source), "overrides": list(args.overrides), "weights": args.weights,
                "seed": args.seed, "tokens": [tower.num_patches, tower.hidden_size], "weight_sources": sources,
                "dtype": args.dtype, "store_dtype": args.store_dtype}
        if args.cache_encoders:
            info["encoders"] = {name: list(shape) for name, shape in tower.encoder_grid_shapes().items()}
        manifest = write_manifest(args.out, info)
    finally:
        if created:
            torch.distributed.destroy_process_group()
    print(f"wrote {manifest['num_images']} images ({tower.num_patches} x {tower.hidden_size} tokens each) "
          f"to {args.out}; {len(result.skipped_shards)} shards already done, {len(manifest['failed'])} skipped")
    for name, reason in manifest["failed"].items():
        print(f"  skipped {name}: {reason}", file=sys.stderr)
    return 1 if manifest["failed"] else 0


def _add_show_parser(sub, full: bool) -> None:
    show = sub.add_parser("show", help="picture: the image, each encoder's features and the fused tokens "
                                       "(PCA colours), ROI crops")
    if full:
        from .show import add_arguments

        add_arguments(show)


def cmd_show(args) -> int:
    from .show import run

    return run(args)


def cmd_presets(args) -> int:
    from .config import list_presets

    print("\n".join(list_presets()))
    return 0


def _table(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


COMMANDS = {"info": cmd_info, "extract": cmd_extract, "download": cmd_download, "presets": cmd_presets,
            "show": cmd_show}


def main(argv: Optional[List[str]] = None) -> int:
    # Large CPU tensors on 2 MiB pages: PyTorch's CPU allocator reads this at its first large
    # allocation, which comes later than this line. Writing fresh buffers (every op's output)
    # then faults 512x fewer pages: the CPU merge runs ~1.5x faster (see the Benchmarks section
    # of the README). THP_MEM_ALLOC_ENABLE=0 in the environment opts out.
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in args_list if not a.startswith("-")), None))
    # overrides may stand after options too (`info tiny --weights random fusion.grid=3`)
    args, extra = parser.parse_known_args(args_list)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    # `--rois BOX ...` takes every word after it; a key=value among them is an override
    # (a box never holds "=")
    rois = getattr(args, "rois", None) or []
    extra = [r for r in rois if "=" in r] + extra
    if rois:
        args.rois = [r for r in rois if "=" not in r]
    if extra:
        args.overrides = list(getattr(args, "overrides", [])) + extra
    from .encoders.sources import WeightsUnavailable

    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, OSError, WeightsUnavailable) as err:  # OSError: unwritable --out, disk full
        print(f"fusion-tower {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
