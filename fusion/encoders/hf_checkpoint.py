"""Hugging Face model folders: reading them, checking ``config.json``, strict key maps.

A folder holds ``config.json`` and the weights as ``model.safetensors``,
``pytorch_model.bin`` (``torch.load(weights_only=True)``) or a sharded layout
(``*.index.json`` naming the shards). ``config.json`` is read with ``transformers``'
own config classes (so absent fields take transformers' defaults, as they do when
transformers loads the model): install ``fusion-tower[hf]``.

Conversion is explicit and strict: a family map (:mod:`.hf_maps`) asks a
:class:`KeyTaker` for every tensor by its Hugging Face name; a name asked for but absent
is a missing key, a tensor never asked for (and not declared as another part of the
model, like a CLIPModel's text tower) is an unexpected key, and both are listed in one
``ValueError``. The result is a state dict in the upstream module's names, which the
adapter then loads with :func:`.weights.load_strict` (every key, every shape).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .sources import HF_CONFIG

# Keys a weight map may name, in the order transformers prefers them.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# Hugging Face activation names that compute the same function.
_ACT_ALIASES = {"gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh", "gelu_python": "gelu"}
SHOWN = 5


@dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint read from a folder.

    ``model_type`` / ``architectures``: from ``config.json``; ``config``: the transformers
    config object (the whole model's); ``state``: every tensor of the weight files;
    ``files``: ``config.json`` and the weight files, in reading order.
    """

    folder: str
    model_type: str
    architectures: List[str]
    config: Any
    state: Dict[str, torch.Tensor]
    files: List[str]


def read_hf_folder(folder: str, key: str) -> HFCheckpoint:
    """Read ``config.json`` and the weights of a Hugging Face model folder."""
    from .weights import read_checkpoint

    config_path = os.path.join(folder, HF_CONFIG)
    raw = _read_json(config_path, key)
    weights = next((os.path.join(folder, f) for f in HF_WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
    if weights is None:
        raise ValueError(f"{key}: the Hugging Face folder {folder!r} has no weights; expected one of "
                         f"{list(HF_WEIGHT_FILES)} next to {HF_CONFIG}")
    paths = ([os.path.join(folder, s) for s in shard_names(weights, key)] if weights.endswith(".index.json")
             else [weights])
    state: Dict[str, torch.Tensor] = {}
    for path in paths:
        state.update(read_checkpoint(path, key))
    return HFCheckpoint(folder=folder, model_type=str(raw.get("model_type", "")),
                        architectures=list(raw.get("architectures") or []), config=_hf_config(folder, key),
                        state=state, files=[config_path, *paths])


def shard_names(index_path: str, key: str) -> List[str]:
    """The shard files a ``*.index.json`` names (its ``weight_map`` values), sorted."""
    index = _read_json(index_path, key)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise ValueError(f"{key}: {index_path!r} has no 'weight_map' (tensor name -> shard file)")
    return sorted(set(str(v) for v in weight_map.values()))


def _read_json(path: str, key: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{key}: cannot read {path!r} ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{key}: {path!r} holds a {type(data).__name__}, not a JSON object")
    return data


def _hf_config(folder: str, key: str) -> Any:
    try:
        from transformers import AutoConfig
    except ImportError as err:
        raise ValueError(f"{key}: reading the Hugging Face checkpoint {folder!r} needs transformers for its "
                         f"config.json (pip install 'fusion-tower[hf]')") from err
    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as err:
        raise ValueError(f"{key}: transformers cannot read {os.path.join(folder, HF_CONFIG)!r} "
                         f"({type(err).__name__}: {err})") from err


# ----------------------------------------------------------------------------- strict key maps


class KeyTaker:
    """Hands out a checkpoint's tensors by name, each at most once.

    ``take(name)`` returns the tensor (``None`` and a recorded missing key if absent);
    ``optional(name)`` returns ``None`` without recording; ``finish()`` raises a
    ``ValueError`` listing the missing keys and every tensor never taken.
    """

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self._left = dict(state)
        self.missing: List[str] = []

    def take(self, name: str) -> Optional[torch.Tensor]:
        if name in self._left:
            return self._left.pop(name)
        self.missing.append(name)
        return None

    def optional(self, name: str) -> Optional[torch.Tensor]:
        return self._left.pop(name, None)

    def has(self, name: str) -> bool:
        return name in self._left

    def cat(self, names: Sequence[str]) -> Optional[torch.Tensor]:
        """The named tensors concatenated on dim 0 (q, k, v -> one qkv projection)."""
        parts = [self.take(n) for n in names]
        return None if any(p is None for p in parts) else torch.cat(parts, dim=0)

    def rename(self, pairs: Mapping[str, str], out: Dict[str, torch.Tensor],
               suffixes: Sequence[str] = ("weight", "bias")) -> None:
        """``out[dst.suffix] = take(src.suffix)`` for every pair and suffix."""
        for src, dst in pairs.items():
            for suffix in suffixes:
                tensor = self.take(f"{src}.{suffix}")
                if tensor is not None:
                    out[f"{dst}.{suffix}"] = tensor

    def discard(self, prefixes: Sequence[str]) -> None:
        """Drop every remaining key that equals or starts with one of ``prefixes``."""
        for name in [k for k in self._left if any(k == p or k.startswith(p) for p in prefixes)]:
            del self._left[name]

    def finish(self, key: str, path: str, what: str) -> None:
        if not self.missing and not self._left:
            return
        parts = []
        if self.missing:
            parts.append(_listing("missing key", self.missing))
        if self._left:
            parts.append(_listing("unexpected key", sorted(self._left)))
        raise ValueError(f"{key}: {path!r} does not fit the key map: {'; '.join(parts)}. It should hold {what}.")


def _listing(what: str, items: List[str]) -> str:
    more = f", ... ({len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return f"{len(items)} {what}{'s' if len(items) != 1 else ''} ({', '.join(map(repr, items[:SHOWN]))}{more})"


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Keys under ``prefix`` lose it; the others (another part of the model) stay as they are."""
    return {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v for k, v in state.items()}


# ----------------------------------------------------------------------------- config checks


def check_config(hf_config: Any, facts: Mapping[str, Any], hints: Mapping[str, str], key: str, path: str,
                 absent: Mapping[str, Any] = {}) -> None:
    """Compare ``config.json`` fields with the fusion side's ``facts`` (same field names).

    ``absent``: what a field the config class lacks means (a plain ``Dinov2Config`` has no
    ``num_register_tokens``: 0). Every disagreement is listed in one ``ValueError`` with
    both values and, from ``hints``, the fusion config key that sets the value.
    """
    wrong: List[Tuple[str, Any, Any]] = []
    for name, ours in facts.items():
        theirs = getattr(hf_config, name, absent.get(name))
        if not _same(theirs, ours):
            wrong.append((name, theirs, ours))
    if wrong:
        listed = "; ".join(f"{name}: config.json {theirs!r} vs fusion {ours!r}"
                           + (f" (set by {hints[name]})" if name in hints else "") for name, theirs, ours in wrong)
        raise ValueError(f"{key}: {path!r} disagrees with the fusion config: {listed}. The architecture is the "
                         f"fusion config's; a checkpoint only brings tensors: change the config to match the "
                         f"checkpoint, or use a checkpoint of this architecture.")


def canonical_act(name: Any) -> Any:
    return _ACT_ALIASES.get(name, name) if isinstance(name, str) else name


def _same(theirs: Any, ours: Any) -> bool:
    if isinstance(ours, float) or isinstance(theirs, float):
        return isinstance(theirs, (int, float)) and math.isclose(float(theirs), float(ours), rel_tol=1e-6)
    if isinstance(ours, (list, tuple)):
        return isinstance(theirs, (list, tuple)) and list(theirs) == list(ours)
    return canonical_act(theirs) == canonical_act(ours)
