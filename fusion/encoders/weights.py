"""Strict loading and the setup every adapter shares.

Where weights come from (``pretrained``: random, a tag, a local file, a Hugging Face
folder or ``hf:<repo>``) is :mod:`.sources`; fetching tags into the upstream caches is
:mod:`.fetch`; reading any source is :mod:`.loading`. This module reads local checkpoint
files (:func:`read_checkpoint`: ``.safetensors`` with safetensors, ``.pt`` / ``.pth`` /
``.bin`` with ``torch.load(weights_only=True)``, which refuses pickles that would run
code) and loads strictly: :func:`load_strict` raises a ``ValueError`` listing missing
keys, unexpected keys and shape mismatches, naming the config key.

What every adapter's constructor shares besides weights (building the upstream model,
``arch``-key and model-name errors, the final cast / freeze) is :mod:`.adapter`; the
forward contract (pixel layout, layer indexing) is :mod:`.base`.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
from torch import nn

from .sources import (  # noqa: F401  (re-exported: the adapters' one import point)
    CHECKPOINT_SUFFIXES,
    RANDOM,
    LoadedWeights,
    WeightSource,
    check_suffix,
    resolve_pretrained,
)

# Training checkpoints often wrap the weights; both open_clip's and timm's loaders unwrap these.
WRAPPER_KEYS = ("state_dict", "model")
# How many offending keys an error message shows before it only gives the count.
SHOWN_KEYS = 5


# ----------------------------------------------------------------------------- reading


def read_checkpoint(path: str, key: str) -> Dict[str, torch.Tensor]:
    """Read a local checkpoint into a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` goes through safetensors; ``.pt/.pth/.bin`` through
    ``torch.load(weights_only=True)``. A top-level ``state_dict`` / ``model`` wrapper
    is unwrapped and a DDP ``module.`` prefix (on every key) stripped. Anything else
    than a dict of tensors is a ``ValueError`` naming ``key``.
    """
    check_suffix(path, key)
    if not os.path.isfile(path):
        raise ValueError(f"{key}: the file {path!r} does not exist")
    if path.lower().endswith(".safetensors"):
        obj = _read_safetensors(path, key)
    else:
        obj = _read_torch(path, key)
    return _as_state_dict(obj, path, key)


def _read_safetensors(path: str, key: str) -> Any:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise ValueError(f"{key}: {path!r} is not a readable .safetensors file ({type(err).__name__}: {err})") from err


def _read_torch(path: str, key: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" not in str(err).lower():  # not a refused import: the bytes are not a pickle at all
            raise ValueError(f"{key}: {path!r} is not a readable torch checkpoint "
                             f"(UnpicklingError: {_gist(err)})") from err
        raise ValueError(
            f"{key}: torch.load(weights_only=True) refused {path!r}: it holds Python objects other "
            f"than tensors and plain containers (a pickle like that can run code when loaded). "
            f"Save only the state dict (torch.save(model.state_dict(), ...)) or use .safetensors. "
            f"Details: {err}"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{key}: {path!r} is not a readable torch checkpoint ({type(err).__name__}: {err})") from err


def _gist(err: BaseException) -> str:
    """The informative line of torch's long unpickling message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "Unsupported" in line), lines[0] if lines else type(err).__name__)


def _as_state_dict(obj: Any, path: str, key: str) -> Dict[str, torch.Tensor]:
    for wrapper in WRAPPER_KEYS:
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{key}: {path!r} holds a {type(obj).__name__}, not a state dict "
                         f"(a mapping of parameter names to tensors)")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{key}: {path!r} is not a state dict of tensors: {len(bad)} entries are not "
                         f"name -> tensor, e.g. {', '.join(bad[:SHOWN_KEYS])}")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def take_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries under ``prefix`` (``"visual."``, ``"image_encoder."``) with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- strict loading


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], key: str, path: str, expected: str,
                pruned: Optional[Mapping[str, torch.Size]] = None) -> None:
    """Load ``state`` into ``module``; any missing/unexpected key or shape mismatch is a ValueError.

    ``expected`` says what the file should hold (e.g. "the full open_clip state dict of
    ViT-B-16"), for the message. ``pruned``: the parameters the module had before
    :func:`prune_unused` dropped them (name -> shape); a checkpoint of the whole upstream
    model holds them, so they are checked against those shapes and skipped.
    """
    if pruned:
        bad = [f"{k!r}: file {list(v.shape)} vs model {list(pruned[k])}" for k, v in state.items()
               if k in pruned and v.shape != pruned[k]]
        if bad:
            raise ValueError(f"{key}: {path!r} does not fit the model: {_listing('shape mismatch', bad, quote=False)}."
                             f" The file should hold {expected}.")
        state = {k: v for k, v in state.items() if k not in pruned}
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k!r}: file {list(state[k].shape)} vs model {list(v.shape)}"
                  for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(_listing("missing key", missing))
        if unexpected:
            parts.append(_listing("unexpected key", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatch", mismatched, quote=False))
        raise ValueError(f"{key}: {path!r} does not fit the model: {'; '.join(parts)}. "
                         f"The file should hold {expected}.")
    module.load_state_dict(dict(state), strict=True)


def prune_unused(module: nn.Module, prune: Callable[[], None]) -> Dict[str, torch.Size]:
    """Run ``prune()`` (which drops the parts of ``module`` the tower never runs: blocks after
    the selected layer, final norms, heads) and return what it dropped: state-dict name ->
    shape, so a checkpoint of the whole upstream model still loads strictly (``load_strict``'s
    ``pruned``)."""
    before = {k: v.shape for k, v in module.state_dict().items()}
    prune()
    after = module.state_dict()
    return {k: shape for k, shape in before.items() if k not in after}


def _listing(what: str, items: List[str], quote: bool = True) -> str:
    shown = [repr(i) if quote else i for i in items[:SHOWN_KEYS]]
    more = f", ... ({len(items) - SHOWN_KEYS} more)" if len(items) > SHOWN_KEYS else ""
    plural = "s" if len(items) != 1 else ""
    return f"{len(items)} {what}{plural} ({', '.join(shown)}{more})"


# ----------------------------------------------------------------------------- moved names

# Adapter helpers that lived here before they moved to the module whose job they are; the
# old import path still works, with a DeprecationWarning.
_MOVED = {"block_index": "base", "check_pixels": "base", "param_dtype": "base",
          "check_keys": "adapter", "create_upstream": "adapter", "finalize": "adapter", "unknown_model": "adapter"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib
        import warnings

        module = f"{__package__}.{_MOVED[name]}"
        warnings.warn(f"fusion.encoders.weights.{name} moved to {module}.{name}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
