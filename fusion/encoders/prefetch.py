"""``fusion-tower download``: fetch every checkpoint a config names into the upstream caches.

Nothing is built: each encoder's ``pretrained`` is resolved as the adapter would resolve
it, and a tag's file (open_clip / timm: Hugging Face hub cache; SAM: PyTorch's hub cache)
or an ``hf:<repo>`` folder is fetched with the same functions the adapters use
(:mod:`.fetch`). A login node with network fills the caches; offline compute nodes then
read them (``HF_HUB_OFFLINE=1``). A second run finds every file cached and fetches nothing
(a cached file with a published MD5, SAM's, is checked against it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..config import EncoderConfig
from .fetch import cached_file, fetch, hf_repo_folder
from .registry import get_encoder_class
from .sources import RANDOM, file_md5, files_sha256, resolve_pretrained


@dataclass
class Prefetched:
    """One encoder's checkpoint: ``status`` is ``downloaded``, ``cached``, ``local`` (a file or
    folder given by path), ``random`` (nothing to fetch) or ``error`` (``detail`` says why)."""

    encoder: str
    source: str
    status: str
    paths: List[str]
    size: int = 0
    detail: str = ""


def prefetch(cfg: EncoderConfig) -> Prefetched:
    """Fetch (or find cached) the checkpoint ``cfg.pretrained`` names; errors are reported, not raised."""
    cls = get_encoder_class(cfg.type, key=f"encoders.{cfg.name}.type")
    text = str(cfg.pretrained)
    try:
        source = resolve_pretrained(cfg, cls.pretrained_tags(cfg), True, getattr(cls, "library", cls.__name__))
        if source.kind == "random":
            return Prefetched(cfg.name, text, "random", [], detail="random weights: nothing to fetch")
        if source.kind == "tag":
            remote = cls.tag_checkpoint(cfg, source.value)
            path, downloaded = fetch(remote, source.key)
            if remote.md5 and not downloaded and file_md5(path) != remote.md5:  # a download is checked as it lands
                raise ValueError(f"{source.key}: the cached {path!r} does not have the MD5 {remote.md5} of the "
                                 f"{remote.what}; delete it and run fusion-tower download again")
            return _done(cfg.name, text, "downloaded" if downloaded else "cached", [path])
        if source.repo:
            folder, files, downloaded = hf_repo_folder(source.repo, source.key)
            return _done(cfg.name, text, "downloaded" if downloaded else "cached", files)
        paths = _local_files(source.value)
        return _done(cfg.name, text, "local", paths)
    except (ValueError, RuntimeError, OSError) as err:
        return Prefetched(cfg.name, text, "error", [], detail=str(err))


def _done(encoder: str, source: str, status: str, paths: List[str]) -> Prefetched:
    return Prefetched(encoder, source, status, paths, sum(os.path.getsize(p) for p in paths))


def _local_files(path: Optional[str]) -> List[str]:
    if path and os.path.isdir(path):
        return sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    return [path] if path else []


def planned_source(cfg: EncoderConfig, weights: str, seed: int, encoder_seed: int) -> Dict[str, Any]:
    """Where encoder ``cfg`` would take its weights from, found without building, reading a
    model or downloading anything (``fusion-tower info``), in the shape of a
    ``tower.weights_report()`` entry: ``random`` (``seed``, ``encoder_seed``), or ``tag`` /
    ``file`` / ``hf`` with the ``files`` already on this machine and their ``sha256`` prefix;
    a tag or hub repo that is not cached yet says so in ``notes``."""
    text = cfg.pretrained
    if weights == "random" or text in (None, RANDOM):
        out: Dict[str, Any] = {"source": "random", "pretrained": text, "seed": seed, "encoder_seed": encoder_seed}
        if text not in (None, RANDOM):
            out["notes"] = [f"weights='random': {text!r} is not loaded"]
        return out
    cls = get_encoder_class(cfg.type, key=f"encoders.{cfg.name}.type")
    library = getattr(cls, "library", cls.__name__)
    source = resolve_pretrained(cfg, cls.pretrained_tags(cfg), True, library)
    out = {"source": source.kind, "pretrained": text, "library": library}
    if source.kind == "tag":
        remote = cls.tag_checkpoint(cfg, source.value)
        path = cached_file(remote)
        paths = [path] if path else []
        missing = f"not in {remote.library}'s cache yet ({remote.cache_location()}); `fusion-tower download` fetches it"
    elif source.repo:
        paths, missing = [], f"resolved from the Hugging Face hub cache ({source.repo}) when the tower is built"
    else:
        paths, missing = _local_files(source.value), "no files at that path"
        if source.kind == "hf":
            out["folder"] = source.value
    if paths:
        out.update(files=paths, sha256=files_sha256(paths))
    else:
        out["notes"] = [missing]
    return out
