"""save_pretrained / from_pretrained for :class:`~fusion.tower.MultiEncoderTower`.

A saved tower is a folder with:

- ``config.yaml``: the full tower config (``TowerConfig.to_dict``).
- ``tower.json``: how the encoders were built (``weights`` mode and ``seed``), the
  names of the saved tensors, and ``weight_sources``: ``tower.weights_report()`` (where
  each encoder's weights came from, with the checkpoint's sha256 prefix).
- ``model.safetensors``: the trainable weights only (merge norms and adapters, the
  projector, and any encoder with ``freeze: false``). Frozen encoders are rebuilt from
  their own ``pretrained`` source (or the seed), so a saved tower stays small; loading
  checks that each source still holds the checkpoint it held (same sha256 prefix), so a
  replaced file is an error instead of a silently different tower.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_write, atomic_write_text
from .config import load_config

CONFIG_FILE = "config.yaml"
META_FILE = "tower.json"
WEIGHTS_FILE = "model.safetensors"


def trainable_state_dict(tower) -> Dict[str, torch.Tensor]:
    """The state of every module that is not a frozen encoder, by its state-dict name."""
    frozen_prefixes = tuple(f"encoders.{name}." for name, enc in tower.encoders.items() if enc.frozen)
    return {k: v.detach().contiguous() for k, v in tower.state_dict().items()
            if not k.startswith(frozen_prefixes)}


def save_tower(tower, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = trainable_state_dict(tower)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    meta = {"weights": tower.weights, "seed": tower.seed, "format": 1, "tensors": sorted(state),
            "weight_sources": tower.weights_report()}
    if getattr(tower, "build_dtype", None) is not None:  # build_tower(..., dtype=...)
        meta["dtype"] = str(tower.build_dtype).split(".")[-1]
    atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2))
    atomic_write_text(directory / CONFIG_FILE, tower.config.to_yaml())


def load_tower(cls, directory, weights: Optional[str] = None):
    directory = Path(directory)
    for name in (CONFIG_FILE, META_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"directory: {str(directory)!r} has no {name}; expected a folder "
                                    f"written by MultiEncoderTower.save_pretrained")
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    config = load_config(directory / CONFIG_FILE)
    tower = cls(config, weights=weights or meta["weights"], seed=int(meta["seed"]), dtype=meta.get("dtype"))
    state = load_file(str(directory / WEIGHTS_FILE))
    expected = trainable_state_dict(tower)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"directory: {str(directory / WEIGHTS_FILE)!r} does not match the config: "
                         f"missing {missing[:8]} ({len(missing)}), unexpected {unexpected[:8]} ({len(unexpected)})")
    tower.load_state_dict(state, strict=False)
    if tower.weights == meta["weights"]:
        _check_sources(tower, meta.get("weight_sources") or {}, directory)
    for name, enc in tower.encoders.items():
        if not enc.frozen and enc.loaded_weights is not None:  # its weights are the saved ones now
            enc.loaded_weights = replace(enc.loaded_weights, notes=tuple(enc.loaded_weights.notes) + (
                f"trainable encoder: then loaded from {str(directory / WEIGHTS_FILE)!r}",))
    return tower


def _check_sources(tower, recorded: Dict[str, Any], directory: Path) -> None:
    """Each frozen encoder is rebuilt from its source: it must hold the checkpoint it held at save time."""
    now = tower.weights_report()
    for name, enc in tower.encoders.items():
        before, after = recorded.get(name) or {}, now[name]
        if enc.frozen and before.get("sha256") and before.get("sha256") != after.get("sha256"):
            raise ValueError(f"encoders.{name}.pretrained: {str(directory)!r} was saved with weights sha256 "
                             f"{before['sha256']} ({before.get('files')}), but {after.get('pretrained')!r} now gives "
                             f"{after.get('sha256')} ({after.get('files')}); point it at the checkpoint the tower "
                             f"was saved with")
