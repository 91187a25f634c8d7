"""A tower's geometry without its weights: grids, channels, token count, widths, parameter counts.

:func:`tower_geometry` builds the tower on PyTorch's ``meta`` device: every module is the
real one (the same adapters, upstream constructors, pruning, merge and projector code as
:class:`fusion.MultiEncoderTower`), but no parameter gets storage, nothing is initialised,
read or downloaded. Building ``vsre`` this way takes about a second (plus importing the
upstream libraries) and no memory for its 1.1 B parameters, where a random-weight build
takes ~30 s and ~5 GB.

``fusion-tower info``, the Hugging Face config (:meth:`fusion.hf.FusionVisionConfig.resolve_geometry`)
and LLaVA's unloaded tower (``FusionVisionTower(..., delay_load=True)``) all read their
numbers here, so they cannot disagree with the tower that will be built.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

from .config import ConfigSource, Overrides, TowerConfig, load_config

WEIGHT_MODES = ("pretrained", "random")  # as fusion.tower.WEIGHT_MODES (not imported: that imports torch)


@dataclass(frozen=True)
class EncoderGeometry:
    """One encoder: ``grid`` ``(h, w)`` of its ``[B, h, w, dim]`` output at ``image_size`` px
    input, ``params`` parameters kept (after pruning), ``depth`` blocks in the unpruned model
    (``None`` if the adapter does not say), the selected ``layer``, ``scales`` (S2: the merge
    sees ``dim * len(scales)`` channels)."""

    name: str
    type: str
    upstream: str
    image_size: int
    patch_size: int
    grid: Tuple[int, int]
    dim: int
    params: int
    layer: Optional[int]
    frozen: bool
    depth: Optional[int]
    scales: Tuple[int, ...]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]


@dataclass(frozen=True)
class TowerGeometry:
    """The whole tower: per-encoder geometry (config order), the fused grid side ``grid``,
    tokens per image ``num_patches``, output width ``hidden_size``, fused width ``fused_dim``
    (before the projector), and the image processor's square side and statistics."""

    encoders: Tuple[EncoderGeometry, ...]
    grid: int
    num_patches: int
    hidden_size: int
    fused_dim: int
    image_size: int
    image_mean: Tuple[float, float, float]
    image_std: Tuple[float, float, float]

    @property
    def num_patches_per_side(self) -> int:
        return self.grid

    @property
    def params(self) -> int:
        return sum(e.params for e in self.encoders)


def tower_geometry(source: ConfigSource, overrides: Overrides = None, weights: str = "pretrained") -> TowerGeometry:
    """The geometry of ``build_tower(source, overrides, weights)``, from a ``meta``-device build.

    ``weights`` only changes how the upstream column names its source (a tag that would be
    loaded, or its config with random weights); nothing is ever loaded. Results are cached
    per resolved config.
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights: got {weights!r}; accepted values are {list(WEIGHT_MODES)}")
    config = load_config(source, overrides)
    return _meta_geometry(config.to_yaml(), weights)


@functools.lru_cache(maxsize=32)
def _meta_geometry(config_yaml: str, weights: str) -> TowerGeometry:
    import yaml

    from .config import parse_config
    from .tower import MultiEncoderTower

    config = parse_config(yaml.safe_load(config_yaml))
    with _meta_build():
        tower = MultiEncoderTower(config, weights="random")  # random: read and download nothing
    return geometry_of(tower, tags_loaded=weights == "pretrained")


def _meta_build():
    """Like ``with torch.device("meta")``, except that ``torch.linspace``/``arange``/``logspace``
    stay on the CPU: upstream constructors read such ranges as Python numbers while they build
    (timm before 1.0.21 computes its drop-path schedule as
    ``[x.item() for x in torch.linspace(0, rate, depth)]``, which a meta tensor cannot answer).
    They are index-sized, so nothing of the model's size is ever allocated."""
    import torch
    from torch.utils._device import DeviceContext

    ranges = (torch.linspace, torch.arange, torch.logspace)

    class _MetaExceptRanges(DeviceContext):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in ranges:
                return func(*args, **(kwargs or {}))
            return super().__torch_function__(func, types, args, kwargs)

    return _MetaExceptRanges(torch.device("meta"))


def geometry_of(tower, tags_loaded: Optional[bool] = None) -> TowerGeometry:
    """The geometry of a built :class:`fusion.MultiEncoderTower` (on any device, meta included).

    ``tags_loaded`` overrides whether an upstream tag's weights count as loaded in the
    ``upstream`` labels (a meta build loads none, but describes a tower that would)."""
    encoders = []
    for name, enc in tower.encoders.items():
        encoders.append(EncoderGeometry(
            name=name, type=enc.cfg.type, upstream=_upstream(enc, tags_loaded), image_size=int(enc.image_size),
            patch_size=int(enc.patch_size), grid=(int(enc.grid[0]), int(enc.grid[1])),
            dim=int(enc.dim) // len(enc.scales),
            params=int(enc.num_parameters()), layer=enc.layer, frozen=bool(enc.frozen),
            depth=getattr(enc, "depth", None), scales=tuple(enc.scales),
            mean=tuple(float(v) for v in enc.mean), std=tuple(float(v) for v in enc.std)))
    proc = tower.image_processor
    return TowerGeometry(encoders=tuple(encoders), grid=int(tower.num_patches_per_side),
                         num_patches=int(tower.num_patches), hidden_size=int(tower.hidden_size),
                         fused_dim=int(tower.merge.out_dim), image_size=int(proc.image_size),
                         image_mean=tuple(float(v) for v in proc.image_mean),
                         image_std=tuple(float(v) for v in proc.image_std))


def _upstream(enc, tags_loaded: Optional[bool]) -> str:
    """``enc.upstream_name()``, as if its tag's weights were (not) loaded when ``tags_loaded`` says."""
    if tags_loaded is None or not hasattr(enc, "tag_weights_loaded"):
        return enc.upstream_name()
    actual = enc.tag_weights_loaded
    try:
        enc.tag_weights_loaded = tags_loaded
        return enc.upstream_name()
    finally:
        enc.tag_weights_loaded = actual


def config_geometry(config: TowerConfig) -> TowerGeometry:
    """:func:`tower_geometry` of an already resolved :class:`TowerConfig` (random-weight labels)."""
    return _meta_geometry(config.to_yaml(), "random")
