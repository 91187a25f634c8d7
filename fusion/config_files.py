"""Reading config files: YAML (safe, plain data only) and JSON, refusing repeated keys.

``read_config_file(path)`` returns the top-level mapping; every error is a ``ValueError``
(or ``FileNotFoundError``) naming the ``source`` argument and the file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Tuple

import yaml


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a repeated mapping key (PyYAML silently keeps the last:
    a second ``clip:`` under ``encoders`` would replace the first)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    seen: Dict[Any, int] = {}
    for key_node, _ in node.value:  # the keys written here (merged `<<` keys may be overridden)
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r} (first on line {seen[key] + 1}); keys must be unique",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        except TypeError:  # unhashable: construct_mapping reports it
            continue
    loader.flatten_mapping(node)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _unique_json_object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"found duplicate key {key!r}; keys must be unique")
        out[key] = value
    return out


def read_config_file(path: Path) -> Dict[str, Any]:
    if path.is_dir():
        raise ValueError(f"source: {str(path)!r} is a folder; expected a .yaml/.yml/.json config file")
    if not path.is_file():
        raise FileNotFoundError(f"source: config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"source: cannot read config file {str(path)!r}: {err}") from err
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_unique_json_object)
        else:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        hint = ("; configs are plain YAML (mappings, lists, strings, numbers, true/false, null): "
                "python tags like !!python/object are refused, never run"
                if "python/" in str(err) else "")
        raise ValueError(f"source: {str(path)!r} is not valid {path.suffix[1:].upper()}: {err}{hint}") from err
    if not isinstance(data, dict):
        raise ValueError(f"source: {str(path)!r} must hold a mapping at the top, got {type(data).__name__}")
    return data
