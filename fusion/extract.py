"""Feature extraction to safetensors shards, resumable and split across ranks.

The image list (:mod:`fusion.image_sources`: each image's key is its file name, its path
relative to the folder given, or its path as an ``--images-from`` list writes it), sorted
by key, is cut into shards of ``shard_size`` images; shard ``i`` is
done by rank ``i % world_size``. Each shard is written as
``shard-<i>.safetensors`` (image key -> ``[N, D]`` tokens, float32 unless
``store_dtype`` says float16/bfloat16) and then its
manifest entry ``manifest/shard-<i>.json``, both atomically; a shard whose entry
exists is skipped, so a killed run resumes where it stopped. An image that cannot be
read is recorded in its shard's entry with the reason instead of stopping the run.
Images are decoded and preprocessed (the tower's own image processor, one image at a
time) in a ``torch.utils.data.DataLoader``: with ``workers > 0`` in that many processes,
ahead of the encoder (pinned memory on CUDA); the features do not depend on ``workers``.
``manifest.json`` (all entries together) is written at the end by rank 0 / a single
process.

Under ``torchrun`` (see :func:`fusion.cli.cmd_extract`) each process passes its global
``rank`` and ``world_size``, so the ranks write disjoint shards into one folder (on a
filesystem they share when they run on several nodes); rank 0 writes ``manifest.json``
after a barrier. Shard contents do not depend on the number of ranks, so a run may be
resumed with another ``--nproc_per_node``.

``cache_encoders=True`` (``extract --cache-encoders``) also stores each encoder's grid
(the tower's ``encode`` output, before the merge) per image, in
``encoders/shard-<i>.safetensors`` under the key ``"<image>/<encoder>"`` (``[h, w, C]``,
in the encoder's output dtype). :class:`fusion.feature_cache.FeatureCache` reads them
back for ``tower.merge_and_project`` (stage-1 projector training without the encoders).

Before any image is encoded, ``out_dir`` is proven writable (a probe file is written
and removed) and its free space is compared with the bytes still to write; a resumed
run checks that the entries already there list exactly the images it would put in
those shards (same image list and ``shard_size``) and that it uses the settings recorded
in ``manifest/run.json`` by the first run (same tower config, weights and seed). A
write that fails mid-run (disk full) is an ``OSError`` saying that the shards before it
are complete and kept.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from safetensors.torch import save_file

from .atomic import atomic_write, atomic_write_text
from .image_sources import IMAGE_SUFFIXES, ImageItem, collect_images  # noqa: F401 (collect_images: --images)

MANIFEST_DIR = "manifest"
RUN_FILE = "run.json"  # in MANIFEST_DIR: the settings of the run that started the folder
ENCODER_DIR = "encoders"  # per-encoder grids of --cache-encoders
# Free space asked for up front, as a multiple of the feature bytes still to write
# (safetensors headers, the temporary copy of one shard, the manifest).
SPACE_MARGIN = 1.1


@dataclass
class ExtractResult:
    written: List[str] = field(default_factory=list)  # shard files written by this run
    skipped_shards: List[str] = field(default_factory=list)  # already complete
    failed: Dict[str, str] = field(default_factory=dict)  # image name -> reason
    images: int = 0  # images encoded by this run


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def extract_features(tower, images: Sequence[ImageItem], out_dir, batch_size: int = 8, shard_size: int = 64,
                     rank: int = 0, world_size: int = 1, progress: bool = True,
                     cache_encoders: bool = False, settings: Optional[dict] = None, workers: int = 0,
                     store_dtype: Optional[torch.dtype] = None) -> ExtractResult:
    """Encode every image with ``tower`` into shards under ``out_dir`` (see the module docstring).

    ``images``: :class:`fusion.image_sources.ImageItem` s (key, path), in shard order.
    ``rank`` of ``world_size`` does shards ``rank, rank + world_size, ...``;
    ``cache_encoders`` also stores each encoder's grid per image; ``settings`` (JSON-able,
    e.g. the tower config, weights and seed) is recorded by the first run and must match
    on resume (:func:`check_settings`). ``workers``: DataLoader processes that decode and
    preprocess while the tower encodes (0: in this process; the features are the same).
    ``store_dtype``: the dtype the tokens (and cached grids) are written in (default:
    float32 tokens, grids in the encoders' dtype)."""
    from tqdm import tqdm

    for arg, value in (("batch_size", batch_size), ("shard_size", shard_size), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg}: expected a positive int, got {value!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers: expected an int >= 0 (0: decode in this process), got {workers!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected an int in [0, world_size={world_size}), got {rank!r}")
    out = Path(out_dir)
    check_writable(out)
    check_settings(out, settings)
    shards = [list(images[i:i + shard_size]) for i in range(0, len(images), shard_size)]
    mine = [i for i in range(len(shards)) if i % world_size == rank]
    todo = _check_resume(out, shards, mine)
    _check_cache_resume(out, mine, todo, cache_encoders)
    item_bytes = 2 if store_dtype in (torch.float16, torch.bfloat16) else 4
    bytes_per_image = item_bytes * int(getattr(tower, "num_patches", 0)) * int(getattr(tower, "hidden_size", 0))
    if cache_encoders:
        bytes_per_image += sum(4 * h * w * c for h, w, c in tower.encoder_grid_shapes().values())
    check_free_space(out, sum(len(shards[i]) for i in todo) * bytes_per_image)
    result = ExtractResult()
    bar = tqdm(total=sum(len(shards[i]) for i in mine), unit="img", disable=not progress)
    tower.eval()
    for index in mine:
        if index not in todo:
            result.skipped_shards.append(shard_name(index))
            bar.update(len(shards[index]))
    pending = {index: _Shard() for index in mine if index in todo}
    for index, batch in _batches(tower, shards, [i for i in mine if i in todo], batch_size, workers):
        shard = pending[index]
        shard.failed.update(batch.failed)
        if batch.keys:
            _encode(tower, batch, shard, cache_encoders, store_dtype)
        bar.update(len(batch.keys) + len(batch.failed))
        shard.seen += len(batch.keys) + len(batch.failed)
        if shard.seen == len(shards[index]):
            _write_shard(out, index, pending.pop(index), cache_encoders, result)
    bar.close()
    return result


@dataclass
class _Shard:
    """What one shard has gathered so far."""

    features: Dict[str, torch.Tensor] = field(default_factory=dict)  # key -> [N, D]
    grids: Dict[str, torch.Tensor] = field(default_factory=dict)  # "<key>/<encoder>" -> [h, w, C]
    failed: Dict[str, str] = field(default_factory=dict)  # key -> reason
    seen: int = 0


def _encode(tower, batch: "PixelBatch", shard: _Shard, cache_encoders: bool,
            store_dtype: Optional[torch.dtype]) -> None:
    """Encode one batch into ``shard``: tokens in ``store_dtype`` (default float32); with
    ``cache_encoders`` each encoder's grid too (in ``store_dtype`` if given, else its own)."""
    pixels, sizes = batch.pixel_values, batch.image_sizes  # sizes: per-encoder letterbox colours
    # no_grad, not inference_mode: a tensor a module caches during extraction stays
    # usable for autograd later in the same process (extract, then train from the cache)
    with torch.no_grad():
        if cache_encoders:  # the same computation as tower(pixels), keeping the grids
            grids = tower.encode(pixels, image_sizes=sizes)
            tokens = tower.merge_and_project(grids)
            for enc_name, grid in grids.items():
                grid = grid.to(store_dtype) if store_dtype is not None else grid
                shard.grids.update({f"{k}/{enc_name}": g.cpu().contiguous() for k, g in zip(batch.keys, grid)})
        else:
            tokens = tower(pixels, image_sizes=sizes)
    tokens = tokens.to(store_dtype or torch.float32).cpu()
    shard.features.update({k: t.contiguous() for k, t in zip(batch.keys, tokens)})


def _write_shard(out: Path, index: int, shard: _Shard, cache_encoders: bool, result: ExtractResult) -> None:
    """The shard's safetensors files, then its manifest entry (which marks it complete)."""
    name = shard_name(index)
    features, grids_out = shard.features, shard.grids
    entry = {"shard": f"{name}.safetensors" if features else None, "images": sorted(features),
             "failed": shard.failed}
    if cache_encoders:
        entry["encoders"] = f"{ENCODER_DIR}/{name}.safetensors" if features else None
    try:
        if grids_out:  # before the entry, which marks the shard complete
            atomic_write(out / ENCODER_DIR / f"{name}.safetensors", lambda tmp: save_file(grids_out, str(tmp)))
        if features:
            atomic_write(out / f"{name}.safetensors", lambda tmp: save_file(features, str(tmp)))
        atomic_write_text(out / MANIFEST_DIR / f"{name}.json", json.dumps(entry, indent=1))
    except OSError as err:
        raise OSError(err.errno, f"--out: writing {name} to {str(out)!r} failed ({err.strerror or err}); "
                      f"the {len(result.written) + len(result.skipped_shards)} shards before it are complete "
                      f"and kept: fix the cause (free space?) and rerun the same command to resume") from err
    if features:
        result.written.append(f"{name}.safetensors")
    result.failed.update(shard.failed)
    result.images += len(features)


# ----------------------------------------------------------------------------- input pipeline


@dataclass
class PixelBatch:
    """One batch from the loader: ``keys`` of the images that decoded, their ``pixel_values``
    ``[n, 3, S, S]`` and ``image_sizes`` ``[n, 2]`` (None when n = 0), and ``failed`` (key ->
    reason) for the rest."""

    keys: List[str]
    pixel_values: Optional[torch.Tensor]
    image_sizes: Optional[torch.Tensor]
    failed: Dict[str, str]

    def pin_memory(self) -> "PixelBatch":  # DataLoader(pin_memory=True) calls this
        if self.pixel_values is not None:
            self.pixel_values = self.pixel_values.pin_memory()
        return self


class _DecodedImages(torch.utils.data.Dataset):
    """Item ``i``: ``(key, ([3, S, S] pixels, [2] image size) or None, reason or None)``: the
    image decoded with :func:`fusion.image_io.open_image` (bounded memory) and preprocessed by
    the tower's own image processor, one image at a time (what it does for each image of a batch)."""

    def __init__(self, items: Sequence[ImageItem], processor):
        self.items = list(items)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from .image_io import open_image

        item = self.items[i]
        try:
            with open_image(item.path) as im:  # ValueError naming the file
                rgb = im.convert("RGB")
            batch = self.processor(rgb)
            return item.key, (batch["pixel_values"][0], batch["image_sizes"][0]), None
        except Exception as err:  # any unreadable image is recorded, not fatal
            return item.key, None, f"{type(err).__name__}: {err}"


def _collate(samples) -> PixelBatch:
    good = [(k, x) for k, x, _ in samples if x is not None]
    return PixelBatch(keys=[k for k, _ in good],
                      pixel_values=torch.stack([x[0] for _, x in good]) if good else None,
                      image_sizes=torch.stack([x[1] for _, x in good]) if good else None,
                      failed={k: reason for k, x, reason in samples if x is None})


def _batches(tower, shards: List[List[ImageItem]], indexes: List[int], batch_size: int, workers: int):
    """``(shard index, PixelBatch)`` for the shards ``indexes``, in order; batches never span two
    shards. ``workers > 0`` decodes in that many DataLoader processes, ahead of the encoder;
    on CUDA the batches come in pinned memory."""
    items, batch_of = [], []
    for index in indexes:
        first = len(items)
        items.extend(shards[index])
        batch_of.extend((index, list(range(s, min(s + batch_size, len(items)))))
                        for s in range(first, len(items), batch_size))
    if not items:
        return
    loader = torch.utils.data.DataLoader(
        _DecodedImages(items, tower.image_processor), batch_sampler=[b for _, b in batch_of], num_workers=workers,
        collate_fn=_collate, pin_memory=tower.device.type == "cuda")
    for (index, _), batch in zip(batch_of, loader):
        yield index, batch


def check_writable(out: Path) -> None:
    """Create ``out`` (and its manifest folder) and prove it writable by writing and removing a
    probe file, so an unwritable ``--out`` fails before any image is encoded (``OSError`` naming it)."""
    try:
        (out / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=out)
        try:
            os.write(fd, b"probe")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise OSError(err.errno, f"--out: cannot write to {str(out)!r} ({type(err).__name__}: "
                                 f"{err.strerror or err}); choose a writable folder") from err


def check_settings(out: Path, settings: Optional[dict]) -> None:
    """The first run records ``settings`` in ``manifest/run.json``; a resumed run must bring the
    same ones (``ValueError`` naming the first difference), else ``out`` would mix the features of
    two towers. ``None`` skips the check."""
    if settings is None:
        return
    path = out / MANIFEST_DIR / RUN_FILE
    now = json.loads(json.dumps(settings))  # the JSON form: tuples -> lists
    if not path.is_file():
        atomic_write_text(path, json.dumps(now, indent=1, sort_keys=True))
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    if before != now:
        old, new = _flatten(before), _flatten(now)
        key = next(k for k in sorted(set(old) | set(new)) if old.get(k, "<unset>") != new.get(k, "<unset>"))
        raise ValueError(f"--out: {str(out)!r} holds shards of a run with other settings ({key}: "
                         f"{old.get(key, '<unset>')!r} there, {new.get(key, '<unset>')!r} now); resume with the same "
                         f"source, overrides, --weights and --seed, or use a new --out")


def _flatten(d: dict, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_free_space(out: Path, needed: int) -> None:
    """``OSError`` (ENOSPC) before any work when ``out``'s filesystem has less than ``needed`` bytes
    (plus :data:`SPACE_MARGIN`) free."""
    free = shutil.disk_usage(out).free
    if needed and free < needed * SPACE_MARGIN:
        raise OSError(errno.ENOSPC, f"--out: {str(out)!r} has {free / 2**20:.1f} MiB free, but the features "
                                    f"still to write need about {needed * SPACE_MARGIN / 2**20:.1f} MiB; "
                                    f"free some space or choose another --out")


def _check_resume(out: Path, shards: List[List[Path]], mine: List[int]) -> List[int]:
    """This rank's shard indexes still to do. A manifest entry left by an earlier run must list
    exactly the images this run puts in that shard (same image list and --shard-size), else a
    resumed run would miss or duplicate images: that is a ``ValueError``. Temporary files a
    killed run left for this rank's shards are removed."""
    todo = []
    for entry_path in sorted((out / MANIFEST_DIR).glob("shard-*.json")):
        index = int(entry_path.stem.split("-")[1])
        expected = sorted(item.key for item in shards[index]) if index < len(shards) else []
        entry = json.loads(entry_path.read_text(encoding="utf-8"))
        recorded = sorted([*entry.get("images", []), *entry.get("failed", {})])
        if recorded != expected:
            raise ValueError(f"--out: {str(out)!r} holds {entry_path.name} from an earlier run with other images "
                             f"or another --shard-size (it lists {recorded[:3]}{'...' if len(recorded) > 3 else ''}, "
                             f"this run puts {expected[:3]}{'...' if len(expected) > 3 else ''} there); resume with "
                             f"the same --images and --shard-size, or use a new --out")
    if 0 in mine:  # rank 0 (or the only process) writes manifest.json
        for stale in out.glob(".manifest.json.*.tmp"):
            stale.unlink(missing_ok=True)
    for index in mine:
        name = shard_name(index)
        for stale in (*out.glob(f".{name}.safetensors.*.tmp"), *(out / MANIFEST_DIR).glob(f".{name}.json.*.tmp"),
                      *(out / ENCODER_DIR).glob(f".{name}.safetensors.*.tmp")):
            stale.unlink(missing_ok=True)
        if not (out / MANIFEST_DIR / f"{name}.json").is_file():
            todo.append(index)
    return todo


def _check_cache_resume(out: Path, mine: List[int], todo: List[int], cache_encoders: bool) -> None:
    """A shard done by an earlier run must have been written with the same ``cache_encoders``,
    else the encoder cache would miss its images (or hold some and not others)."""
    for index in mine:
        if index in todo:
            continue
        entry_path = out / MANIFEST_DIR / f"{shard_name(index)}.json"
        cached = "encoders" in json.loads(entry_path.read_text(encoding="utf-8"))
        if cached != cache_encoders:
            was, now = ("with", "without") if cached else ("without", "with")
            raise ValueError(f"--cache-encoders: {str(out)!r} holds {entry_path.name} written {was} "
                             f"--cache-encoders, and this run is {now} it; resume with the same setting, "
                             f"or use a new --out")


def write_manifest(out_dir, info: Optional[dict] = None) -> dict:
    """Gather every shard entry into ``manifest.json``; returns the manifest.

    ``encoder_shards`` (present when the shards cache encoder grids) maps each token
    shard to its encoder-grid shard."""
    out = Path(out_dir)
    shards, failed, encoder_shards = {}, {}, {}
    for entry_path in sorted((out / MANIFEST_DIR).glob("shard-*.json")):
        entry = json.loads(entry_path.read_text(encoding="utf-8"))
        if entry["shard"]:
            shards[entry["shard"]] = entry["images"]
            if entry.get("encoders"):
                encoder_shards[entry["shard"]] = entry["encoders"]
        failed.update(entry["failed"])
    manifest = {**(info or {}), "shards": shards, "failed": failed,
                "num_images": sum(len(v) for v in shards.values())}
    if encoder_shards:
        manifest["encoder_shards"] = encoder_shards
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1))
    return manifest
