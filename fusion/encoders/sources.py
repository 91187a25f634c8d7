"""What ``encoders.<name>.pretrained`` names, and the record of what an encoder loaded.

``pretrained`` is one of:

- ``random``: random initialisation on purpose (the tower seeds it, see
  ``MultiEncoderTower``). ``null`` (or leaving the key out) means the same only when the
  tower is built with ``weights="random"``; under ``weights="pretrained"`` it is an
  error, so no encoder runs random weights by accident.
- an upstream tag (open_clip ``openai``, timm ``lvd142m``, SAM ``sa1b``): the checkpoint
  file is fetched into the upstream's own download cache (see :mod:`.fetch`).
- a local file: ``.safetensors`` or ``.pt`` / ``.pth`` / ``.bin`` (``torch.load(
  weights_only=True)``) in the format the upstream library's own loader takes.
- a local Hugging Face model folder (``config.json`` + ``model.safetensors`` /
  ``pytorch_model.bin``, sharded or not) or ``hf:<repo id>`` (resolved through
  ``huggingface_hub``'s cache): converted by an explicit key map (see :mod:`.hf_checkpoint`).

A source only brings tensors: the architecture is the config's. A source whose own
metadata disagrees with the config (a tag trained with QuickGELU, a ``config.json`` with
another layer count) is an error naming both values.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

from ..config import EncoderConfig
from ..suggest import did_you_mean

RANDOM = "random"
HF_SCHEME = "hf:"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
HF_CONFIG = "config.json"
KINDS = ("random", "tag", "file", "hf")
# How many tags a message lists before "...".
SHOWN_TAGS = 5
# Hex digits of a checkpoint's sha256 shown in reports.
SHA_DIGITS = 12


class WeightsUnavailable(RuntimeError):
    """A checkpoint is neither in its upstream cache nor downloadable (offline, missing, bad checksum)."""


@dataclass(frozen=True)
class WeightSource:
    """What ``pretrained`` resolved to.

    ``kind``: ``"random"``, ``"tag"``, ``"file"`` or ``"hf"`` (a local Hugging Face folder
    when ``value`` is a path, a hub repo when ``repo`` is set). ``value``: the tag, the
    path (``~`` expanded) or the folder; ``None`` for random. ``load`` is False when the
    encoder is built with ``load_weights=False``: nothing is read or downloaded then.
    """

    kind: str
    value: Optional[str]
    key: str
    load: bool
    repo: Optional[str] = None

    @property
    def load_file(self) -> bool:
        return self.load and self.kind == "file"

    @property
    def load_tag(self) -> bool:
        return self.load and self.kind == "tag"

    @property
    def load_hf(self) -> bool:
        return self.load and self.kind == "hf"


@dataclass
class LoadedWeights:
    """Where an encoder's weights came from (``Encoder.loaded_weights``).

    ``kind``: ``"random"``, ``"tag"``, ``"file"`` or ``"hf"``; ``pretrained``: the config
    value; ``library``: whose cache or format (``open_clip``, ``timm``,
    ``segment_anything``, ``huggingface``); ``files``: the weight files read, in order
    (for a Hugging Face checkpoint its ``folder`` holds them and ``config.json``);
    ``notes``: what the loader did beyond copying tensors (resampled position embeddings,
    a projection head the checkpoint lacks).
    """

    kind: str
    pretrained: Optional[str]
    library: str = ""
    files: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = field(default_factory=tuple)
    folder: Optional[str] = None

    def report(self) -> Dict[str, Any]:
        """A JSON-able dict: source, pretrained, library, (folder,) files, sha256 (prefix), notes."""
        out: Dict[str, Any] = {"source": self.kind, "pretrained": self.pretrained}
        if self.files:
            out["library"] = self.library
            if self.folder:
                out["folder"] = self.folder
            out.update(files=list(self.files), sha256=files_sha256(self.files))
        if self.notes:
            out["notes"] = list(self.notes)
        return out


def resolve_pretrained(
    cfg: EncoderConfig,
    tags: Sequence[str],
    load_weights: bool,
    library: str,
    tag_help: str = "",
) -> WeightSource:
    """Decide what ``cfg.pretrained`` means for an adapter whose upstream knows ``tags``.

    ``library`` names the upstream in messages; ``tag_help`` is appended to the error for
    an unknown value. With ``load_weights`` a missing (``null``) value is an error.
    """
    key = f"encoders.{cfg.name}.pretrained"
    value = cfg.pretrained
    if value is None or value == RANDOM:
        if value is None and load_weights:
            raise ValueError(_null_message(key, cfg, tags, library))
        return WeightSource("random", None, key, load_weights)
    if value in tags:
        return WeightSource("tag", value, key, load_weights)
    if value.startswith(HF_SCHEME):
        return WeightSource("hf", value, key, load_weights, repo=_hf_repo(value, key))
    path = os.path.expanduser(value)
    if not load_weights:
        return WeightSource("hf" if os.path.isdir(path) else "file", path, key, False)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, HF_CONFIG)):
            raise ValueError(f"{key}: the folder {value!r} has no {HF_CONFIG}; a folder must be a Hugging Face "
                             f"model folder (config.json + model.safetensors or pytorch_model.bin)")
        return WeightSource("hf", path, key, True)
    if os.path.isfile(path):
        check_suffix(path, key)
        return WeightSource("file", path, key, True)
    if _looks_like_path(value):
        raise ValueError(f"{key}: the file {value!r} does not exist; give an existing "
                         f"{'/'.join(CHECKPOINT_SUFFIXES)} file, a Hugging Face model folder, "
                         f"hf:<repo id>, a {library} tag, or {RANDOM!r}")
    hint = did_you_mean(value, tags)
    known = f"{library} tags for {cfg.model!r} are {list(tags)}" if tags else f"{library} has no tags for {cfg.model!r}"
    raise ValueError(f"{key}: {value!r} is neither a known tag{hint} nor an existing file or folder; {known}. "
                     f"A local {'/'.join(CHECKPOINT_SUFFIXES)} file, a Hugging Face model folder, hf:<repo id> "
                     f"or {RANDOM!r} (random init on purpose) also work."
                     + (f" {tag_help}" if tag_help else ""))


def _null_message(key: str, cfg: EncoderConfig, tags: Sequence[str], library: str) -> str:
    shown = ", ".join(map(repr, list(tags)[:SHOWN_TAGS])) + (", ..." if len(tags) > SHOWN_TAGS else "")
    tag_text = f"one of the {library} tags ({shown})" if tags else f"a {library} checkpoint"
    return (f"{key}: not set (null) while the tower loads pretrained weights; name the weights of "
            f"{cfg.model!r}: {tag_text}, a local {'/'.join(CHECKPOINT_SUFFIXES)} file, a Hugging Face model "
            f"folder or hf:<repo id>. To run this encoder with random weights on purpose, write "
            f"{key}: {RANDOM} (or build the whole tower with weights='random' / --weights random).")


def _hf_repo(value: str, key: str) -> str:
    repo = value[len(HF_SCHEME):].strip()
    parts = repo.split("/")
    if not repo or len(parts) > 2 or not all(parts):
        raise ValueError(f"{key}: {value!r} is not a Hugging Face repo reference; write hf:<org>/<name>, "
                         f"e.g. hf:openai/clip-vit-large-patch14-336")
    return repo


def _looks_like_path(value: str) -> bool:
    return (os.sep in value or "/" in value or value.startswith(("~", "."))
            or value.lower().endswith(CHECKPOINT_SUFFIXES))


def check_suffix(path: str, key: str) -> None:
    if not path.lower().endswith(CHECKPOINT_SUFFIXES):
        raise ValueError(f"{key}: {path!r} has an unsupported extension; accepted are "
                         f"{list(CHECKPOINT_SUFFIXES)} (.safetensors, or a torch.save'd state dict)")


# ----------------------------------------------------------------------------- reports


def encoder_report(encoder: Any, weights: str, seed: int, encoder_seed: int) -> Dict[str, Any]:
    """One encoder's entry of ``tower.weights_report()`` (JSON-able).

    ``source``: ``tag`` / ``file`` / ``hf`` (with ``library``, ``files``, ``sha256``: the
    first :data:`SHA_DIGITS` hex digits, ``notes``), or ``random`` (with the tower's
    ``seed`` and the ``encoder_seed`` it derives for this encoder). ``pretrained`` is the
    config's value. Under ``weights="random"`` every encoder is random, whatever it names.
    """
    pretrained = encoder.cfg.pretrained
    loaded = getattr(encoder, "loaded_weights", None)
    if weights == "random" or (loaded is not None and loaded.kind == "random"):
        out: Dict[str, Any] = {"source": "random", "pretrained": pretrained, "seed": seed,
                               "encoder_seed": encoder_seed}
        if weights == "random" and pretrained not in (None, RANDOM):
            out["notes"] = [f"weights='random': {pretrained!r} is not loaded"]
        return out
    if loaded is None:
        return {"source": "unreported", "pretrained": pretrained,
                "notes": [f"the {type(encoder).__name__} adapter does not report its weights (loaded_weights)"]}
    return loaded.report()


def describe(entry: Dict[str, Any]) -> str:
    """A one-line description of a :func:`encoder_report` entry."""
    if entry["source"] == "random":
        return f"random (seed {entry['seed']}, encoder seed {entry['encoder_seed']})"
    if entry["source"] == "unreported":
        return f"unreported (pretrained: {entry['pretrained']!r})"
    what = {"tag": f"tag {entry['pretrained']!r} from {entry.get('library')}'s cache",
            "file": "file", "hf": f"Hugging Face {entry['pretrained']!r}"}[entry["source"]]
    files = entry.get("files") or []
    if not files:  # a planned source (fusion-tower info) whose files are not on this machine yet
        return f"{what} (not on this machine)"
    where = files[0] if len(files) == 1 else f"{entry.get('folder') or os.path.dirname(files[0])} ({len(files)} shards)"
    return f"{what}: {where} sha256 {entry.get('sha256')}"


# ----------------------------------------------------------------------------- checksums

_SHA_CACHE: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """The full sha256 hex digest of ``path``; remembered per (path, size, mtime)."""
    stat = os.stat(path)
    token = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if token not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _SHA_CACHE[token] = digest.hexdigest()
    return _SHA_CACHE[token]


def files_sha256(paths: Sequence[str], digits: int = SHA_DIGITS) -> str:
    """sha256 prefix of one file (for a hub file: the sha256 the hub lists for it), or of the
    files' hex digests, concatenated in order, for a sharded checkpoint."""
    if len(paths) == 1:
        return file_sha256(paths[0])[:digits]
    combined = hashlib.sha256("".join(file_sha256(p) for p in paths).encode()).hexdigest()
    return combined[:digits]


def file_md5(path: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
