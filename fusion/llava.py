"""LLaVA's own code (haotian-liu/LLaVA): the tower behind LLaVA's vision-tower interface.

:func:`build_vision_tower` has the signature of LLaVA's
``llava/model/multimodal_encoder/builder.py``; the one-line change in ``llava_arch.py`` is
``from fusion.llava import build_vision_tower``, then ``--vision_tower vsre`` (a preset or a
config file, optionally with overrides: ``--vision_tower "vsre fusion.grid=16"``).

:class:`FusionVisionTower` mirrors ``CLIPVisionTower(vision_tower, args, delay_load)``:
``is_loaded``, ``load_model``, ``vision_tower``, ``image_processor``, ``select_layer``,
``select_feature``, ``hidden_size``, ``num_patches``, ``num_patches_per_side``, ``dtype``,
``device``, ``dummy_feature``, ``config``; ``forward(images)``: ``[B, 3, S, S]`` or a list of
``[3, S, S]`` -> features in the images' dtype. LLaVA's arguments:

- ``mm_vision_select_layer`` sets ``layer`` of every CLIP encoder (same meaning); other
  encoders keep their config's layer.
- ``mm_vision_select_feature``: ``"patch"`` drops nothing (there is no CLS);
  ``"cls_patch"`` is a ``ValueError``.
- ``delay_load=True`` reads only the config; ``unfreeze_mm_vision_tower=True`` loads at
  once and unfreezes every encoder.
- anyres (LLaVA-1.6): ``config.image_size`` is the tile side ``S``, ``config.patch_size``
  ``S // num_patches_per_side``; ``spatial`` / ``spatial_unpad`` need ``g * g`` tokens
  (see :mod:`fusion.anyres`).
- LLaVA's ``mm_projector`` is what LLaVA trains, so the tower's projector is dropped
  (``projector.type: none``) unless ``keep_projector=True``.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import warnings
from typing import Any, Callable, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from .anyres import check_token_grid, parse_pinpoints
from .config import TowerConfig, load_config
from .geometry import config_geometry
from .tower import MultiEncoderTower

SELECT_FEATURES = ("patch", "cls_patch")
SELECT_LAYER_TYPES = ("clip",)


def parse_tower_name(name: Any) -> Tuple[str, List[str]]:
    """``"vsre fusion.grid=16"`` -> ``("vsre", ["fusion.grid=16"])`` (shell-style quoting for paths)."""
    if isinstance(name, os.PathLike):
        return os.fspath(name), []
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"mm_vision_tower: expected a preset name or a config file, optionally followed by "
                         f"key=value overrides, got {name!r}")
    parts = shlex.split(name)
    source, overrides = parts[0], parts[1:]
    bad = [p for p in overrides if "=" not in p]
    if bad:
        raise ValueError(f"mm_vision_tower: {name!r}: after the preset or config file only key=value overrides "
                         f"may follow, got {bad}")
    return source, overrides


def llava_tower_config(vision_tower: Any, select_layer: Optional[int] = None, unfreeze: bool = False,
                       keep_projector: bool = False) -> TowerConfig:
    """The tower config LLaVA's arguments ask for (see the module docstring for the mapping)."""
    source, overrides = parse_tower_name(vision_tower)
    config = load_config(source, overrides)
    changes = {}
    if select_layer is not None:
        if isinstance(select_layer, bool) or not isinstance(select_layer, int):
            raise ValueError(f"mm_vision_select_layer: expected an int (-2: the second-to-last block), "
                             f"got {select_layer!r}")
        if select_layer == 0:
            raise ValueError("mm_vision_select_layer: 0 is CLIP's embedding output, which the tower does not "
                             "offer; use -k (k-th block from the end) or k >= 1 (k-th block)")
        for name, enc in config.encoders.items():
            if enc.type in SELECT_LAYER_TYPES:
                changes[f"encoders.{name}.layer"] = select_layer
    if unfreeze:
        changes.update({f"encoders.{name}.freeze": False for name in config.encoders})
    if not keep_projector:
        changes.update({"projector.type": "none", "projector.out_dim": None})
    return load_config(config, changes)


class Geometry(NamedTuple):
    """What LLaVA asks a tower before and after loading: token width, tokens per image, input side ``S``."""

    hidden_size: int
    num_patches: int
    image_size: int


class LlavaTowerConfig(TowerConfig):
    """``vision_tower.config`` as LLaVA reads it: the :class:`~fusion.TowerConfig` (every field,
    equal to the plain config), plus CLIP's ``image_size`` (``S``: the side of the images, and
    of each anyres tile, the tower takes) and ``patch_size`` (``S // num_patches_per_side``).
    Both are computed on first use (before ``load_model`` that builds a random-weight probe)."""

    def __init__(self, config: TowerConfig, geometry: Callable[[], Geometry]):
        super().__init__(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TowerConfig)})
        self._geometry = geometry

    @property
    def image_size(self) -> int:
        return self._geometry().image_size

    @property
    def patch_size(self) -> int:
        return max(1, self.image_size // self.fusion.grid)

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, TowerConfig) and self.to_dict() == other.to_dict()

    __hash__ = None


class FusionVisionTower(nn.Module):
    """LLaVA's ``CLIPVisionTower`` interface around a :class:`~fusion.MultiEncoderTower`."""

    def __init__(self, vision_tower: Any, args: Any = None, delay_load: bool = False, weights: str = "pretrained",
                 seed: int = 0, keep_projector: bool = False):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.select_layer = getattr(args, "mm_vision_select_layer", None)
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"mm_vision_select_feature: got {self.select_feature!r}; accepted values are "
                             f"{list(SELECT_FEATURES)}")
        if self.select_feature == "cls_patch":
            raise ValueError("mm_vision_select_feature: 'cls_patch' keeps CLIP's CLS token, but the fused tokens "
                             "have none (every token is a patch token); use 'patch'")
        self.unfreeze = bool(getattr(args, "unfreeze_mm_vision_tower", False))
        self.weights = weights
        self.seed = seed
        # cfg_only, as in LLaVA: the config without the encoders (cheap: no model is built).
        self.cfg_only = llava_tower_config(vision_tower, self.select_layer, self.unfreeze, keep_projector)
        merge_type = getattr(args, "mm_patch_merge_type", None) or "flat"
        if merge_type.startswith("spatial"):
            check_token_grid(self.cfg_only, f"mm_patch_merge_type={merge_type!r}")
        # LLaVA-1.6 tiles (a saved config carries them; training sets them after building the tower)
        self.grid_pinpoints = (getattr(args, "image_grid_pinpoints", None)
                               if getattr(args, "image_aspect_ratio", None) == "anyres" else None)
        self.vision_tower: Optional[MultiEncoderTower] = None
        self.image_processor = None
        self._probe: Optional[Geometry] = None  # the geometry before load_model
        self._llava_config = LlavaTowerConfig(self.cfg_only, self._sizes)
        if not delay_load or self.unfreeze:
            self.load_model()

    def load_model(self, device_map: Any = None) -> None:
        """Build the encoders (downloading/reading their weights); a second call does nothing."""
        if self.is_loaded:
            warnings.warn(f"{self.vision_tower_name} is already loaded, `load_model` called again, skipping.")
            return
        tower = MultiEncoderTower(self.cfg_only, weights=self.weights, seed=self.seed)
        if not self.unfreeze:
            tower.requires_grad_(False)  # as LLaVA: the tower is frozen, mm_projector trains
        device = _device_from_map(device_map)
        if device is not None:
            tower.to(device)
        if self.grid_pinpoints is not None:
            parse_pinpoints(self.grid_pinpoints, tower.image_processor.image_size)
        self.vision_tower = tower
        self.image_processor = tower.image_processor
        self.is_loaded = True

    def feature_select(self, tokens: torch.Tensor) -> torch.Tensor:
        """LLaVA's ``feature_select``: ``"patch"`` keeps every fused token (none is a CLS token)."""
        return tokens

    def forward(self, images: Union[torch.Tensor, List[torch.Tensor]]) -> Union[torch.Tensor, List[torch.Tensor]]:
        """``[B, 3, S, S]`` -> ``[B, N, hidden_size]``; a list of ``[3, S, S]`` -> a list of
        ``[1, N, hidden_size]``. Features come back in the images' dtype (as LLaVA's tower)."""
        if not self.is_loaded:
            raise RuntimeError(f"vision tower {self.vision_tower_name!r} was built with delay_load=True; "
                               f"call load_model() before forward")
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(grad):
            if isinstance(images, (list, tuple)):
                return [self.feature_select(self.vision_tower(im.unsqueeze(0))).to(im.dtype) for im in images]
            return self.feature_select(self.vision_tower(images)).to(images.dtype)

    # ------------------------------------------------------------------ LLaVA's properties

    @property
    def config(self) -> LlavaTowerConfig:
        """The tower config with LLaVA's ``image_size`` and ``patch_size`` (see :class:`LlavaTowerConfig`)."""
        return self._llava_config

    def _sizes(self) -> Geometry:
        """The tower's geometry; before load_model it comes from the config through
        :func:`fusion.geometry.config_geometry` (a meta-device build: no weights are made, as
        LLaVA's ``cfg_only`` answers it unloaded)."""
        if self.is_loaded:
            tower = self.vision_tower
            return Geometry(tower.hidden_size, tower.num_patches, tower.image_processor.image_size)
        if self._probe is None:
            geo = config_geometry(self.cfg_only)
            self._probe = Geometry(geo.hidden_size, geo.num_patches, geo.image_size)
        return self._probe

    @property
    def hidden_size(self) -> int:
        return self._sizes().hidden_size

    @property
    def num_patches(self) -> int:
        return self._sizes().num_patches

    @property
    def num_patches_per_side(self) -> int:
        return self.cfg_only.fusion.grid

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.dtype if self.is_loaded else torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        return self.vision_tower.device if self.is_loaded else torch.device("cpu")

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)


def _device_from_map(device_map: Any) -> Optional[torch.device]:
    """LLaVA passes ``device_map`` as ``"auto"``, a device, or ``{"": device}``."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map: the tower goes on one device; expected a device or {{'': device}}, "
                             f"got {device_map!r}")
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    return torch.device(device_map)


def build_vision_tower(vision_tower_cfg: Any, **kwargs) -> FusionVisionTower:
    """Drop-in for LLaVA's ``build_vision_tower(vision_tower_cfg, **kwargs)``.

    Reads ``mm_vision_tower`` (or ``vision_tower``, as LLaVA's ``ModelArguments`` name it)
    from ``vision_tower_cfg``; ``kwargs`` (``delay_load``, and fusion's ``weights``,
    ``seed``, ``keep_projector``) go to :class:`FusionVisionTower`.
    """
    name = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if name is None:
        raise ValueError("mm_vision_tower: the config names no vision tower (neither mm_vision_tower nor "
                         "vision_tower is set)")
    return FusionVisionTower(name, args=vision_tower_cfg, **kwargs)


__all__ = ["FusionVisionTower", "Geometry", "LlavaTowerConfig", "build_vision_tower", "llava_tower_config",
           "parse_tower_name"]
