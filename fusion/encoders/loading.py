"""Read any weight source into a state dict: the one path every built-in adapter takes.

- a tag: its :class:`.fetch.Remote` file is taken from (or downloaded into) the upstream's
  cache, then read like a local file;
- a local file: :func:`.weights.read_checkpoint` (safetensors, or ``torch.load(weights_only=True)``);
- a Hugging Face folder or ``hf:<repo>``: read, ``config.json`` checked against the fusion
  side's architecture, converted by the family's key map (:mod:`.hf_maps`).

The adapter then turns a tag's or file's state (the upstream library's own format) into
its module's names, resamples position embeddings where its upstream loader would, and
loads strictly (:func:`.weights.load_strict`). Tag and file therefore share every step
after the read, so the same tensors give the same model bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from .fetch import Remote, fetch, hf_repo_folder
from .hf_checkpoint import KeyTaker, check_config, read_hf_folder, strip_prefix
from .hf_maps import FAMILIES
from .sources import HF_CONFIG, LoadedWeights, WeightSource


@dataclass
class SourceState:
    """A source's tensors. ``converted``: already in the upstream module's names (Hugging Face
    sources); otherwise in the upstream library's own checkpoint format. ``loaded``: the record
    for the weights report; ``path``: what error messages name."""

    state: Dict[str, torch.Tensor]
    converted: bool
    loaded: LoadedWeights
    path: str


def locate(source: WeightSource, remote: Callable[[], Remote]) -> Optional[str]:
    """The local path to read ``source`` from, fetching a tag's file or an ``hf:`` repo into its
    cache first; ``None`` when nothing is loaded (random, or ``load_weights=False``). Adapters
    call it before building their model, so an offline machine fails at once, not after
    allocating a ViT-L."""
    if not source.load or source.kind == "random":
        return None
    if source.kind == "tag":
        return fetch(remote(), source.key)[0]
    if source.repo:
        return hf_repo_folder(source.repo, source.key)[0]
    return source.value


def read_source(source: WeightSource, path: str, library: str, encoder: Any, module: nn.Module) -> SourceState:
    """Read ``source`` from ``path`` (what :func:`locate` returned) for ``encoder``'s ``module``."""
    from .weights import read_checkpoint

    if source.kind == "hf":
        return _read_hf(source, path, encoder, module)
    return SourceState(read_checkpoint(path, source.key), False,
                       LoadedWeights(source.kind, source.value, library, (path,)), path)


def _read_hf(source: WeightSource, folder: str, encoder: Any, module: nn.Module) -> SourceState:
    key = source.key
    family = FAMILIES.get(encoder.encoder_type)
    if family is None:
        raise ValueError(f"{key}: encoder type {encoder.encoder_type!r} has no Hugging Face key map; "
                         f"types that read Hugging Face checkpoints are {sorted(FAMILIES)}")
    ckpt = read_hf_folder(folder, key)
    if ckpt.model_type not in family.model_types:
        raise ValueError(f"{key}: {folder!r} holds a {ckpt.model_type!r} model ({', '.join(ckpt.architectures)}); "
                         f"encoders.{encoder.name}.type {encoder.encoder_type!r} reads {family.label} checkpoints "
                         f"with model_type {sorted(family.model_types)}")
    attr = family.model_types[ckpt.model_type]
    vision_config = getattr(ckpt.config, attr) if attr else ckpt.config
    prefix = f"encoders.{encoder.name}"
    check_config(vision_config, family.facts(encoder), {k: v.format(p=prefix) for k, v in family.hints.items()},
                 key, os.path.join(folder, HF_CONFIG), family.absent)
    taker = KeyTaker(strip_prefix(ckpt.state, family.prefix))
    taker.discard(family.other_parts + tuple(family.unused))
    state = family.convert(taker, vision_config, module)
    taker.finish(key, folder, family.expected)
    notes: List[str] = []
    if family.head_prefix and not any(k.startswith(family.head_prefix) for k in state):
        family.drop_head(module)
        notes.append(f"the checkpoint has no {family.label} projection/pooling head ({family.head_prefix}); "
                     f"fusion never runs it, so it was removed from the upstream module")
    value = source.value if source.repo is None else f"hf:{source.repo}"
    weights = tuple(f for f in ckpt.files if os.path.basename(f) != HF_CONFIG)
    return SourceState(state, True, LoadedWeights("hf", value, "huggingface", weights, tuple(notes), folder), folder)
