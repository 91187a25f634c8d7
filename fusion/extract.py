"""Feature extraction to safetensors shards, resumable and split across ranks.

The image list (sorted) is cut into shards of ``shard_size`` images; shard ``i`` is
done by rank ``i % world_size``. Each shard is written as
``shard-<i>.safetensors`` (image file name -> ``[N, D]`` tokens) and then its
manifest entry ``manifest/shard-<i>.json``, both atomically; a shard whose entry
exists is skipped, so a killed run resumes where it stopped. An image that cannot be
read is recorded in its shard's entry with the reason instead of stopping the run.
``manifest.json`` (all entries together) is written at the end by rank 0 / a single
process.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import save_file

from .atomic import atomic_write, atomic_write_text

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MANIFEST_DIR = "manifest"


@dataclass
class ExtractResult:
    written: List[str] = field(default_factory=list)  # shard files written by this run
    skipped_shards: List[str] = field(default_factory=list)  # already complete
    failed: Dict[str, str] = field(default_factory=dict)  # image name -> reason
    images: int = 0  # images encoded by this run


def collect_images(paths: Sequence[str]) -> List[Path]:
    """Image files named by ``paths`` (files, or folders searched one level deep), sorted by name."""
    if not paths:
        raise ValueError("--images: no paths given; pass image files or folders of images")
    found: List[Path] = []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            found.extend(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise FileNotFoundError(f"--images: {text!r} is neither a file nor a folder")
    if not found:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {list(paths)}")
    names: Dict[str, Path] = {}
    for p in found:
        if p.name in names and names[p.name] != p:
            raise ValueError(f"--images: two images share the file name {p.name!r} ({names[p.name]} and {p}); "
                             f"features are keyed by file name, so names must be unique")
        names[p.name] = p
    return [names[n] for n in sorted(names)]


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def extract_features(tower, image_paths: Sequence[Path], out_dir, batch_size: int = 8, shard_size: int = 64,
                     rank: int = 0, world_size: int = 1, progress: bool = True) -> ExtractResult:
    """Encode every image with ``tower`` into shards under ``out_dir`` (see the module docstring)."""
    from PIL import Image
    from tqdm import tqdm

    for arg, value in (("batch_size", batch_size), ("shard_size", shard_size), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    out = Path(out_dir)
    (out / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
    shards = [list(image_paths[i:i + shard_size]) for i in range(0, len(image_paths), shard_size)]
    mine = [i for i in range(len(shards)) if i % world_size == rank]
    result = ExtractResult()
    bar = tqdm(total=sum(len(shards[i]) for i in mine), unit="img", disable=not progress)
    tower.eval()
    for index in mine:
        name = shard_name(index)
        entry_path = out / MANIFEST_DIR / f"{name}.json"
        if entry_path.is_file():
            result.skipped_shards.append(name)
            bar.update(len(shards[index]))
            continue
        features: Dict[str, torch.Tensor] = {}
        failed: Dict[str, str] = {}
        for start in range(0, len(shards[index]), batch_size):
            batch_paths = shards[index][start:start + batch_size]
            images, keys = [], []
            for path in batch_paths:
                try:
                    with Image.open(path) as im:
                        im.load()
                        images.append(im.convert("RGB"))
                    keys.append(path.name)
                except Exception as err:  # any unreadable image is recorded, not fatal
                    failed[path.name] = f"{type(err).__name__}: {err}"
            if images:
                pixels = tower.image_processor(images)["pixel_values"]
                with torch.inference_mode():
                    tokens = tower(pixels).float().cpu()
                features.update({k: t.contiguous() for k, t in zip(keys, tokens)})
            bar.update(len(batch_paths))
        if features:
            atomic_write(out / f"{name}.safetensors", lambda tmp: save_file(features, str(tmp)))
            result.written.append(f"{name}.safetensors")
        entry = {"shard": f"{name}.safetensors" if features else None, "images": sorted(features),
                 "failed": failed}
        atomic_write_text(entry_path, json.dumps(entry, indent=1))
        result.failed.update(failed)
        result.images += len(features)
    bar.close()
    return result


def write_manifest(out_dir, info: Optional[dict] = None) -> dict:
    """Gather every shard entry into ``manifest.json``; returns the manifest."""
    out = Path(out_dir)
    shards, failed = {}, {}
    for entry_path in sorted((out / MANIFEST_DIR).glob("shard-*.json")):
        entry = json.loads(entry_path.read_text(encoding="utf-8"))
        if entry["shard"]:
            shards[entry["shard"]] = entry["images"]
        failed.update(entry["failed"])
    manifest = {**(info or {}), "shards": shards, "failed": failed,
                "num_images": sum(len(v) for v in shards.values())}
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest
