"""Checkpoint files that live in an upstream download cache, fetched on demand.

A :class:`Remote` describes one checkpoint file of a tag: a file in a Hugging Face hub
repo (open_clip and timm tags; the first of ``hf_files`` that exists wins, as those
libraries prefer ``.safetensors``), or a URL downloaded into a cache folder (SAM's
official checkpoints into PyTorch's hub cache, ``$TORCH_HOME/hub/checkpoints``, with the
MD5 the file name carries checked before the file is put in place). Nothing here builds
a model: ``fusion-tower download`` uses the same functions to fill the caches that
offline machines then read.

``huggingface_hub`` honours ``HF_HUB_OFFLINE`` (only the cache is read) and
``HF_HUB_CACHE`` / ``HF_HOME``; PyTorch's hub cache follows ``TORCH_HOME``.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from .hf_checkpoint import HF_WEIGHT_FILES, shard_names
from .sources import CHECKPOINT_SUFFIXES, HF_CONFIG, WeightsUnavailable, file_md5


@dataclass(frozen=True)
class Remote:
    """One checkpoint file in an upstream cache.

    ``library``: whose cache (``open_clip``, ``timm``, ``segment_anything``);
    ``what``: e.g. ``"open_clip tag 'openai' of ViT-L-14-336"``; either ``hf_repo`` +
    ``hf_files`` (candidates, first found wins) + ``hf_revision`` (None: main) or ``url`` + ``cache_file`` (+ ``md5``,
    the file's full MD5). ``download``: the upstream's own URL downloader, if it has one
    (it then checks its own hash); else the URL is fetched here with the MD5 check.
    ``file_format``: what a local replacement file must hold, for messages.
    """

    library: str
    what: str
    file_format: str
    hf_repo: Optional[str] = None
    hf_files: Tuple[str, ...] = ()
    hf_revision: Optional[str] = None
    url: Optional[str] = None
    cache_file: Optional[str] = None
    md5: Optional[str] = None
    download: Optional[Callable[[], str]] = None

    def urls(self) -> List[str]:
        if self.hf_repo:
            from huggingface_hub import hf_hub_url

            return [hf_hub_url(self.hf_repo, f, revision=self.hf_revision) for f in self.hf_files]
        return [self.url or ""]

    def cache_location(self) -> str:
        if self.hf_repo:
            from huggingface_hub import constants

            return os.path.join(constants.HF_HUB_CACHE, "models--" + self.hf_repo.replace("/", "--"))
        return self.cache_file or ""


def cached_file(remote: Remote) -> Optional[str]:
    """The local path if the cache already holds the file, else None (no network)."""
    if remote.hf_repo:
        from huggingface_hub import try_to_load_from_cache

        for name in remote.hf_files:
            path = try_to_load_from_cache(remote.hf_repo, name, revision=remote.hf_revision)
            if isinstance(path, str) and os.path.isfile(path):
                return path
        return None
    return remote.cache_file if remote.cache_file and os.path.isfile(remote.cache_file) else None


def fetch(remote: Remote, key: str) -> Tuple[str, bool]:
    """``(local path, downloaded)``: the cached file, or the file fetched into the cache now.

    A failure (offline, no such file, bad checksum) is a :class:`WeightsUnavailable` naming ``key``,
    the URL, the cache path where the file is looked for and the local-file alternative.
    """
    path = cached_file(remote)
    if path is not None:
        return path, False
    try:
        return (_fetch_hub(remote) if remote.hf_repo else _fetch_url(remote)), True
    except Exception as err:
        raise fetch_failure(key, remote, err) from err


def fetch_failure(key: str, remote: Remote, err: BaseException) -> WeightsUnavailable:
    urls = " or ".join(remote.urls())
    return WeightsUnavailable(
        f"{key}: fetching the {remote.what} through {remote.library}'s own download cache failed: it is not in "
        f"the cache ({remote.cache_location()}) and downloading {urls} failed ({type(err).__name__}: {err}). "
        f"On a machine with network, `fusion-tower download` fills that cache for offline use; or download the "
        f"file yourself and set {key} to the local file ({'/'.join(CHECKPOINT_SUFFIXES)}) holding "
        f"{remote.file_format}."
    )


def _fetch_hub(remote: Remote) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    last: Optional[BaseException] = None
    for name in remote.hf_files:
        try:
            return hf_hub_download(remote.hf_repo, name, revision=remote.hf_revision)
        except EntryNotFoundError as err:  # the repo lacks this candidate: try the next one
            last = err
    raise last if last else FileNotFoundError(f"no candidate files for {remote.hf_repo}")


def _fetch_url(remote: Remote) -> str:
    if remote.download is not None:
        return remote.download()
    return download_checked(remote.url, remote.cache_file, remote.md5)


def download_checked(url: str, target: str, md5: Optional[str]) -> str:
    """Download ``url`` with PyTorch's hub downloader next to ``target``, check its MD5, rename it
    into place (a failed or tampered download never appears under ``target``)."""
    from torch.hub import download_url_to_file

    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{os.path.basename(target)}.", suffix=".partial", dir=folder)
    os.close(fd)
    try:
        download_url_to_file(url, partial, progress=True)
        if md5 is not None:
            got = file_md5(partial)
            if got != md5:
                raise ValueError(f"the downloaded file's MD5 is {got}, expected {md5} (the file name carries "
                                 f"its prefix): a corrupted or substituted download, not placed in the cache")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


# ----------------------------------------------------------------------------- Hugging Face repos


def hf_repo_folder(repo: str, key: str) -> Tuple[str, List[str], bool]:
    """``hf:<repo>`` -> ``(snapshot folder, files read from it, downloaded)`` through
    ``huggingface_hub``'s cache: ``config.json`` and the first weight layout of
    :data:`HF_WEIGHT_FILES` the repo has (with every shard of a sharded one)."""
    remote = Remote("huggingface_hub", f"Hugging Face repo {repo!r}", "a Hugging Face model folder", hf_repo=repo,
                    hf_files=(HF_CONFIG,))
    config, got_config = fetch(remote, key)
    weights, got_weights = fetch(Remote("huggingface_hub", f"weights of Hugging Face repo {repo!r}",
                                        "a Hugging Face model folder", hf_repo=repo, hf_files=HF_WEIGHT_FILES), key)
    files, downloaded = [config, weights], got_config or got_weights
    if weights.endswith(".index.json"):
        for shard in shard_names(weights, key):
            path, got = fetch(Remote("huggingface_hub", f"shard {shard!r} of Hugging Face repo {repo!r}",
                                     "a Hugging Face model folder", hf_repo=repo, hf_files=(shard,)), key)
            files.append(path)
            downloaded = downloaded or got
    return os.path.dirname(config), files, downloaded
