"""What every adapter's constructor shares: building the upstream model, ``arch``-key and
model-name errors naming the config key, and the final dtype cast / freeze."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..config import EncoderConfig
from ..suggest import did_you_mean


def create_upstream(create: Callable[[], Any], cfg: EncoderConfig, prefix: str, library: str) -> Any:
    """Run the upstream constructor ``create()`` (which never loads weights); its failure is a
    ValueError naming ``{prefix}.arch``: the upstream rejected the architecture."""
    try:
        return create()
    except Exception as err:
        raise ValueError(f"{prefix}.arch: {library} could not build {cfg.model!r} with arch {cfg.arch}: "
                         f"{type(err).__name__}: {err}") from err


def check_keys(given: Iterable[str], allowed: Iterable[str], key: str, hint: str = "") -> None:
    """Every name in ``given`` must be in ``allowed``; otherwise a ValueError naming ``key.<name>``."""
    allowed = sorted(allowed)
    for name in given:
        if name not in allowed:
            raise ValueError(f"{key}.{name}: unknown key{did_you_mean(name, allowed)}; valid keys here are "
                             f"{allowed}" + (f". {hint}" if hint else ""))


def unknown_model(key: str, value: str, valid: Sequence[str], library: str) -> ValueError:
    """The error for a ``model`` name the upstream library does not have."""
    return ValueError(f"{key}: unknown {library} model {value!r}{did_you_mean(value, valid, n=3)}; "
                      f"valid names are {list(valid)}")


def finalize(module: nn.Module, cfg: EncoderConfig) -> None:
    """Cast ``module`` to ``cfg.dtype`` (if set); if ``cfg.freeze``, stop its gradients and eval() it."""
    if cfg.dtype is not None:
        module.to(getattr(torch, cfg.dtype))
    if cfg.freeze:
        module.requires_grad_(False)
        module.eval()
