"""MultiEncoderTower: the drop-in vision tower.

``tower(pixel_values)`` with ``pixel_values`` ``[B, 3, S, S]`` in [0, 1] (from
``tower.image_processor``) returns fused, projected tokens ``[B, N, D]``. Per encoder,
on the device: resize + normalise -> ``Encoder.forward`` -> ``[B, h, w, C]``; then
the merge (``fusion.merge``) and the projector (``fusion.projector``).

It also satisfies LLaVA's vision-tower contract (``hidden_size``, ``num_patches``,
``num_patches_per_side``, ``dtype``, ``device``, ``dummy_feature``, ``is_loaded``,
``load_model()``, ``config``, ``image_processor``).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .config import ConfigSource, Overrides, TowerConfig, load_config
from .encoders.base import Encoder
from .encoders.registry import get_encoder_class
from .merge import FusionMerge, GridSpec, Segment
from .preprocess import EncoderInputs, ImageProcessor
from .projector import build_projector, projector_out_dim

WEIGHT_MODES = ("pretrained", "random")


@dataclass
class TowerOutput:
    """What ``tower(pixel_values, return_dict=True)`` returns.

    - ``tokens``: ``[B, N, D]`` fused, projected tokens.
    - ``encoder_grids``: encoder name -> ``[B, h, w, C]`` (the encoder's selected layer).
    - ``token_boxes``: ``[N, 4]`` normalised xyxy image region of each token.
    - ``segments``: ``(label, start, end)`` slices of the token sequence.
    - ``hidden_states``: each encoder's grid flattened ``[B, h*w, C]`` (encoder order),
      then the fused tokens before the projector ``[B, N, C_fused]``, then ``tokens``.
    """

    tokens: torch.Tensor
    encoder_grids: Dict[str, torch.Tensor]
    token_boxes: torch.Tensor
    segments: List[Segment]
    hidden_states: Tuple[torch.Tensor, ...] = field(default_factory=tuple)


def _encoder_seed(seed: int, name: str) -> int:
    """A per-encoder seed, so dropping one encoder leaves the others' weights unchanged."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


class MultiEncoderTower(nn.Module):
    """Several vision encoders, merged and projected into one token sequence."""

    def __init__(self, config: TowerConfig, weights: str = "pretrained", seed: int = 0):
        super().__init__()
        if not isinstance(config, TowerConfig):
            raise TypeError(f"config: expected a TowerConfig (see fusion.load_config), got {type(config).__name__}")
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights: got {weights!r}; accepted values are {list(WEIGHT_MODES)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {seed!r}")
        self.config = config
        self.weights = weights
        self.seed = seed
        load_weights = weights == "pretrained"
        encoders = {}
        for name, enc_cfg in config.encoders.items():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_encoder_seed(seed, name))
                encoders[name] = get_encoder_class(enc_cfg.type, key=f"encoders.{name}.type")(enc_cfg, load_weights)
        self.encoders = nn.ModuleDict(encoders)
        self.encoder_inputs = EncoderInputs(list(self.encoders.values()))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_encoder_seed(seed, "merge+projector"))
            specs = [GridSpec(name, tuple(enc.grid), enc.dim) for name, enc in self.encoders.items()]
            self.merge = FusionMerge(specs, config.fusion)
            self.projector = build_projector(config.projector, self.merge.out_dim)
        size = config.processor.size or max(enc.image_size for enc in self.encoders.values())
        first = next(iter(self.encoders.values()))
        self.image_processor = ImageProcessor(size, mode=config.processor.mode, image_mean=first.mean,
                                              image_std=first.std)
        self.is_loaded = True

    # ------------------------------------------------------------------ LLaVA contract

    def load_model(self, device_map=None) -> None:
        """LLaVA calls this for delayed loading; the encoders are built in ``__init__``."""
        self.is_loaded = True

    @property
    def hidden_size(self) -> int:
        """Width ``D`` of the output tokens."""
        return projector_out_dim(self.config.projector, self.merge.out_dim)

    @property
    def num_patches(self) -> int:
        """Number of output tokens ``N`` per image."""
        return self.merge.num_tokens

    @property
    def num_patches_per_side(self) -> int:
        return self.config.fusion.grid

    @property
    def dtype(self) -> torch.dtype:
        return self._reference_param().dtype

    @property
    def device(self) -> torch.device:
        return self._reference_param().device

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    def _reference_param(self) -> torch.Tensor:
        for module in (self.projector, self.merge, self.encoders):
            for p in module.parameters():
                return p
        return torch.empty(0)

    # ------------------------------------------------------------------ training mode

    def train(self, mode: bool = True) -> "MultiEncoderTower":
        """Like ``nn.Module.train``, but frozen encoders always stay in eval mode."""
        super().train(mode)
        for enc in self.encoders.values():
            if enc.frozen:
                enc.eval()
        return self

    # ------------------------------------------------------------------ forward

    def encode(self, pixel_values: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Each encoder's grid: name -> ``[B, h, w, C]``. Frozen encoders run without autograd."""
        pixel_values = self._check_pixels(pixel_values)
        inputs = self.encoder_inputs(pixel_values)
        grids = {}
        for name, enc in self.encoders.items():
            x = inputs[name].to(self._encoder_dtype(enc))
            if enc.frozen:
                with torch.no_grad():
                    grids[name] = enc(x)
            else:
                grids[name] = enc(x)
        return grids

    def merge_and_project(self, encoder_grids: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The merge and the projector on precomputed encoder grids: ``[B, N, D]``."""
        return self.projector(self.merge(encoder_grids))

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = False,
                ) -> Union[torch.Tensor, TowerOutput]:
        grids = self.encode(pixel_values)
        fused = self.merge(grids)
        tokens = self.projector(fused)
        if not return_dict:
            return tokens
        hidden = tuple(g.flatten(1, 2) for g in grids.values()) + (fused, tokens)
        return TowerOutput(tokens=tokens, encoder_grids=grids, token_boxes=self.merge.token_boxes(),
                           segments=self.merge.segments(), hidden_states=hidden)

    def _encoder_dtype(self, enc: Encoder) -> torch.dtype:
        for p in enc.parameters():
            return p.dtype
        return torch.float32

    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values: expected a torch.Tensor [B, 3, H, W] in [0, 1], got "
                            f"{type(pixel_values).__name__}; use tower.image_processor(images) for images")
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values: expected shape [B, 3, H, W], got {list(pixel_values.shape)}")
        if pixel_values.shape[0] == 0 or pixel_values.shape[2] == 0 or pixel_values.shape[3] == 0:
            raise ValueError(f"pixel_values: empty tensor of shape {list(pixel_values.shape)}")
        if pixel_values.dtype == torch.uint8:
            pixel_values = pixel_values.float() / 255.0
        elif not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values: expected a float tensor in [0, 1] (or uint8 in [0, 255]), "
                            f"got dtype {pixel_values.dtype}")
        if pixel_values.device != self.device:
            pixel_values = pixel_values.to(self.device, non_blocking=True)
        pixel_values = pixel_values.float()
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values: contains NaN or infinite values")
        return pixel_values

    # ------------------------------------------------------------------ persistence

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``config.yaml``, ``tower.json`` and the trainable weights (safetensors)."""
        from .checkpoint import save_tower

        save_tower(self, directory)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], weights: Optional[str] = None,
                        ) -> "MultiEncoderTower":
        """Rebuild a tower saved by :meth:`save_pretrained` (``weights`` overrides the saved mode)."""
        from .checkpoint import load_tower

        return load_tower(cls, directory, weights=weights)


def build_tower(source: ConfigSource, overrides: Overrides = None, weights: str = "pretrained",
                seed: int = 0) -> MultiEncoderTower:
    """Build a tower from a preset name, a config file, a dict or a :class:`TowerConfig`.

    ``weights="random"`` initialises every encoder from ``seed`` (no downloads), so two
    runs or two processes give the same features.
    """
    return MultiEncoderTower(load_config(source, overrides), weights=weights, seed=seed)
