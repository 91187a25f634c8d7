"""Tower weights that a transformers checkpoint did not hold: set from what the config says.

transformers' ``from_pretrained`` builds the model without initialising it, loads the
checkpoint, marks every tensor it loaded (``_is_hf_initialized``, the flag its own
``transformers.initialization`` functions check), gives every other tensor fresh
uninitialised memory (``torch.empty``), and then asks the model to initialise the
unmarked ones. A checkpoint may lack some or all of the tower (a language-model
checkpoint under a fusion Llava config, renamed keys, ``ignore_mismatched_sizes``), so
:func:`fill_unloaded` gives each unmarked tensor the value the tower config gives it:

- an encoder with an unloaded parameter (or persistent buffer) is rebuilt with
  :func:`fusion.tower.build_encoder` under the config's ``weights`` mode: its
  ``pretrained`` source under ``"pretrained"`` (downloaded or read as fusion always does;
  an encoder without one, and every encoder under ``"random"``, gets the seeded random
  initialisation, the same values :class:`fusion.MultiEncoderTower` gives it);
- an encoder with only non-persistent buffers unloaded (constants no checkpoint holds)
  is rebuilt without reading any weights (the buffers do not depend on them);
- the merge and the projector likewise, with
  :func:`fusion.tower.build_merge_and_projector`.

Only the unmarked tensors are written: whatever the checkpoint held stays. The
normalisation constants (``EncoderInputs``) are recomputed by their own module.
"""
from __future__ import annotations

import itertools
from typing import Dict, List

import torch
from torch import nn

from .tower import MultiEncoderTower, build_encoder, build_merge_and_projector


def unloaded_tensors(module: nn.Module) -> Dict[str, torch.Tensor]:
    """``module``'s parameters and buffers (by name) that transformers did not mark as loaded."""
    named = itertools.chain(module.named_parameters(), module.named_buffers())
    return {name: t for name, t in named if not getattr(t, "_is_hf_initialized", False)}


def _needs_weights(module: nn.Module, names) -> bool:
    """Whether any of ``names`` is a parameter or persistent buffer (a tensor a checkpoint holds)."""
    return any(name in module.state_dict(keep_vars=True) for name in names)


@torch.no_grad()
def _copy_into(targets: Dict[str, torch.Tensor], fresh: nn.Module, prefix: str) -> List[str]:
    values = dict(itertools.chain(fresh.named_parameters(), fresh.named_buffers()))
    for name, tensor in targets.items():
        tensor.copy_(values[name])
    return [f"{prefix}{name}" for name in targets]


def fill_unloaded(tower: MultiEncoderTower, weights: str, seed: int) -> List[str]:
    """Set every tensor of ``tower`` a checkpoint load left unmarked to its config value (see the
    module docstring). Returns the names written (``encoders.clip.model.conv1.weight``, ...)."""
    written = []
    for name, enc in tower.encoders.items():
        targets = unloaded_tensors(enc)
        if targets:
            load = weights == "pretrained" and _needs_weights(enc, targets)
            fresh = build_encoder(name, tower.config.encoders[name], load, seed)
            written += _copy_into(targets, fresh, f"encoders.{name}.")
    head = {"merge": unloaded_tensors(tower.merge), "projector": unloaded_tensors(tower.projector)}
    if any(head.values()):
        merge, projector = build_merge_and_projector(tower.encoders, tower.config, seed)
        written += _copy_into(head["merge"], merge, "merge.") + _copy_into(head["projector"], projector, "projector.")
    return written


__all__ = ["fill_unloaded", "unloaded_tensors"]
