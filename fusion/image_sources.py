"""Where extraction's images come from, and the key each one's features are stored under.

- :func:`collect_images` (``--images PATHS``): files (key: the file name) and folders,
  searched recursively (key: the path relative to the folder given, with ``/``), so
  ``a/cat.jpg`` and ``b/cat.jpg`` are two images;
- :func:`images_from_list` (``--images-from LIST``): a text file with one path per line,
  or a LLaVA-style JSON list ``[{"image": "rel/path.jpg", ...}, ...]`` (``.json``); the key
  is the path exactly as the list writes it, so a LLaVA data file's images map to its own
  ``image`` values. Relative paths are under ``--image-root`` (default: the list's folder).
  An image named several times (LLaVA lists one per conversation) is encoded once;
  entries without an image are skipped; a listed file that is missing is recorded as
  failed, like an unreadable image.

Both return :class:`ImageItem` s sorted by key (the shard order); two files with one key
are a ``ValueError`` naming the option.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
LIST_COMMENT = "#"  # text lists: lines starting with it are ignored, as blank lines are


@dataclass(frozen=True)
class ImageItem:
    """One image to encode: ``key`` (the features' name in the shards and manifest) and ``path``."""

    key: str
    path: Path


def collect_images(paths: Sequence[str]) -> List[ImageItem]:
    """``--images``: image files and folders (searched recursively), sorted by key."""
    if not paths:
        raise ValueError("--images: no paths given; pass image files or folders of images")
    items: List[ImageItem] = []
    for text in paths:
        p = Path(text)
        if p.is_dir():
            found = [q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()]
            items.extend(ImageItem(q.relative_to(p).as_posix(), q) for q in found)
        elif p.is_file():
            items.append(ImageItem(p.name, p))
        else:
            raise FileNotFoundError(f"--images: {text!r} is neither a file nor a folder")
    if not items:
        raise ValueError(f"--images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {list(paths)}")
    return _unique_sorted(items, "--images", "the file name (a file) or the path relative to the folder given")


def images_from_list(list_path: str, image_root: Optional[str] = None) -> List[ImageItem]:
    """``--images-from``: a text list of paths or a LLaVA-style ``.json`` list, sorted by key."""
    path = Path(list_path)
    if not path.is_file():
        raise FileNotFoundError(f"--images-from: {list_path!r} is not a file")
    root = Path(image_root) if image_root is not None else path.parent
    if image_root is not None and not root.is_dir():
        raise FileNotFoundError(f"--image-root: {image_root!r} is not a folder")
    keys = _json_keys(path) if path.suffix.lower() == ".json" else _text_keys(path)
    items = {k: ImageItem(k, root / k) for k in keys}  # repeated keys: one image (Path / absolute = absolute)
    if not items:
        raise ValueError(f"--images-from: {list_path!r} names no images")
    return _unique_sorted(items.values(), "--images-from", "the path as the list writes it")


def _text_keys(path: Path) -> List[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith(LIST_COMMENT)]


def _json_keys(path: Path) -> List[str]:
    """The ``image`` values of a LLaVA data file (a string, or a list of them, per entry)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"--images-from: {str(path)!r} is not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise ValueError(f"--images-from: {str(path)!r} holds a JSON {type(data).__name__}; expected a LLaVA-style "
                         f"list of entries like {{\"image\": \"folder/file.jpg\", ...}}")
    keys = []
    for i, entry in enumerate(data):
        value = entry.get("image") if isinstance(entry, dict) else None
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None and not isinstance(entry, dict):
                raise ValueError(f"--images-from: {str(path)!r} entry {i} is a {type(entry).__name__}; expected "
                                 f"an object with an \"image\" path")
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise ValueError(f"--images-from: {str(path)!r} entry {i} has image {v!r}; expected a path string")
            if v is not None:
                keys.append(v.strip())
    return keys


def _unique_sorted(items: Iterable[ImageItem], option: str, key_rule: str) -> List[ImageItem]:
    by_key: Dict[str, ImageItem] = {}
    for item in items:
        other = by_key.get(item.key)
        if other is not None and os.path.realpath(other.path) != os.path.realpath(item.path):
            raise ValueError(f"{option}: two images have the key {item.key!r} ({other.path} and {item.path}); "
                             f"features are keyed by {key_rule}, so keys must be unique")
        by_key[item.key] = item
    return [by_key[k] for k in sorted(by_key)]
