"""save_pretrained / from_pretrained for :class:`~fusion.tower.MultiEncoderTower`.

A saved tower is a folder with:

- ``config.yaml``: the full tower config (``TowerConfig.to_dict``).
- ``tower.json``: how the encoders were built (``weights`` mode and ``seed``) and the
  names of the saved tensors.
- ``model.safetensors``: the trainable weights only (merge norms and adapters, the
  projector, and any encoder with ``freeze: false``). Frozen encoders are rebuilt from
  their own ``pretrained`` source (or the seed), so a saved tower stays small.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

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
    meta = {"weights": tower.weights, "seed": tower.seed, "format": 1, "tensors": sorted(state)}
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
    return tower
