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
from typing import List, Optional

from ..config import EncoderConfig
from .fetch import fetch, hf_repo_folder
from .registry import get_encoder_class
from .sources import file_md5, resolve_pretrained


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
