"""Projectors: map fused tokens ``[B, N, C]`` to the language model's width ``[B, N, D]``.

Each projector type is a builder in ``PROJECTORS``; the config names it by ``projector.type``.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import nn

from .config import ProjectorConfig


def _none(in_dim: int, out_dim: Optional[int]) -> nn.Module:
    if out_dim is not None and out_dim != in_dim:
        raise ValueError(
            f"projector.out_dim: projector.type 'none' keeps the fused width {in_dim}, "
            f"but out_dim is {out_dim}; set out_dim to null or {in_dim}, or choose 'linear'/'mlp2x_gelu'/'fused_gelu_mlp'"
        )
    return nn.Identity()


def _linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Linear(in_dim, out_dim)


def _mlp2x_gelu(in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA-1.5's projector: Linear(C, D) -> GELU -> Linear(D, D)."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def _fused_gelu_mlp(in_dim: int, out_dim: int) -> nn.Module:
    """Prismatic's ``fused-gelu-mlp`` (its projector for fused encoders, e.g. DINO-SigLIP):
    Linear(C, 4C) -> GELU -> Linear(4C, D) -> GELU -> Linear(D, D).

    The layers sit at the same indices (0, 2, 4) as in Prismatic's ``FusedMLPProjector.projector``,
    so a Prism checkpoint's projector weights load by name (see :mod:`fusion.prismatic`).
    """
    hidden = 4 * in_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim), nn.GELU(),
                         nn.Linear(out_dim, out_dim))


PROJECTORS: Dict[str, Callable[[int, Optional[int]], nn.Module]] = {
    "none": _none,
    "linear": _linear,
    "mlp2x_gelu": _mlp2x_gelu,
    "fused_gelu_mlp": _fused_gelu_mlp,
}


def build_projector(cfg: ProjectorConfig, in_dim: int) -> nn.Module:
    """The projector for ``cfg``; its output width is :func:`projector_out_dim`."""
    return PROJECTORS[cfg.type](in_dim, cfg.out_dim)


def projector_out_dim(cfg: ProjectorConfig, in_dim: int) -> int:
    """``out_dim`` when set, else the fused width (projector ``none``)."""
    return in_dim if cfg.out_dim is None else int(cfg.out_dim)
