"""MultiEncoderTower: the drop-in vision tower.

``tower(pixel_values)`` with ``pixel_values`` ``[B, 3, S, S]`` in [0, 1] (from
``tower.image_processor``) returns fused, projected tokens ``[B, N, D]``. Per encoder,
on the device: resize + normalise -> ``Encoder.forward`` -> ``[B, h, w, C]``; then
the merge (``fusion.merge``), the granularity steps (``fusion.sequence``) and the
projector (``fusion.projector``).

It also satisfies LLaVA's vision-tower contract (``hidden_size``, ``num_patches``,
``num_patches_per_side``, ``dtype``, ``device``, ``dummy_feature``, ``is_loaded``,
``load_model()``, ``config``, ``image_processor``).
"""
from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .boxes import BoxLike, tokens_in
from .config import DTYPES, ConfigSource, EncoderConfig, Overrides, TowerConfig, load_config
from .encoders.base import Encoder
from .encoders.registry import get_encoder_class
from .letterbox import check_image_sizes, choose_pad_colors, pad_weights, roi_pad_weights
from .merge import FusionMerge, GridSpec
from .multiscale import MultiScaleEncoder
from .pixels import NONFINITE, as_pixels
from .encoder_inputs import EncoderInputs
from .preprocess import ImageProcessor
from .projector import build_projector, projector_out_dim
from .roi import RoiBatch, check_roi_inputs
from .sequence import MergedTokens, Segment, TokenSequence

WEIGHT_MODES = ("pretrained", "random")
NONFINITE_PIXELS = f"pixel_values: {NONFINITE}"


@dataclass
class TowerOutput:
    """What ``tower(pixel_values, return_dict=True)`` returns.

    - ``tokens``: ``[B, N, D]`` fused, projected tokens.
    - ``encoder_grids``: encoder name -> ``[B, h, w, C]`` (the encoder's selected layer;
      ``C × len(scales)`` channels for a multi-scale encoder).
    - ``token_boxes``: normalised xyxy image region of each token: ``[N, 4]`` when every
      image has the same layout, ``[B, N, 4]`` when it differs per image
      (``fusion.reduce`` on, or ROI crops given).
    - ``segments``: ``(label, start, end)`` slices of the token sequence: ``fused`` (one
      per encoder for ``sequence_concat``), ``level<l>``, ``roi<k>``.
    - ``hidden_states``: the Hugging Face view (what Llava's ``vision_feature_layer``
      indexes): each encoder's grid flattened ``[B, h*w, C]`` (encoder order), then
      :attr:`merged_tokens`, then ``tokens``. Python code reads the named fields.
    - ``token_sizes``: ``None`` without ``fusion.reduce``; else ``[B, N]``, how many fused
      grid tokens each token merges (1 for level and ROI tokens).
    """

    tokens: torch.Tensor
    encoder_grids: Dict[str, torch.Tensor]
    token_boxes: torch.Tensor
    segments: List[Segment]
    hidden_states: Tuple[torch.Tensor, ...] = field(default_factory=tuple)
    token_sizes: Optional[torch.Tensor] = None

    @property
    def merged_tokens(self) -> torch.Tensor:
        """``[B, N, C_fused]``: the merge stage's tokens, before the projector (``hidden_states[-2]``)."""
        return self.hidden_states[-2]

    def tokens_in(self, box: BoxLike, min_overlap: float = 0.0) -> Union[torch.Tensor, List[torch.Tensor]]:
        """Indices of the tokens whose region overlaps ``box`` (normalised xyxy, a tensor ``[4]``
        or box text).

        Rule: the token's box and ``box`` intersect with positive area (touching edges do
        not count) and the intersection covers at least ``min_overlap`` of the token's own
        area (``1.0``: tokens entirely inside ``box``). Returns an int64 tensor of indices
        into the sequence, or a list of ``B`` of them when ``token_boxes`` is per image.
        """
        return tokens_in(self.token_boxes, box, min_overlap)


def resolve_dtype(dtype: Union[str, torch.dtype, None], key: str) -> Optional[torch.dtype]:
    """``None``, a torch floating dtype or its name (``"bfloat16"``) -> ``None`` or the dtype;
    anything else is an error naming ``key``."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype in DTYPES:
        return getattr(torch, dtype)
    if isinstance(dtype, torch.dtype) and str(dtype).split(".")[-1] in DTYPES:
        return dtype
    raise (TypeError if not isinstance(dtype, (str, torch.dtype)) else ValueError)(
        f"{key}: got {dtype!r}; accepted values are {list(DTYPES)} (or the torch dtypes), or None")


def encoder_seed(seed: int, name: str) -> int:
    """A per-encoder seed, so dropping one encoder leaves the others' weights unchanged."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def build_encoder(name: str, cfg: EncoderConfig, load_weights: bool, seed: int, kernels: str = "auto") -> Encoder:
    """Encoder ``name`` as :class:`MultiEncoderTower` builds it: its ``pretrained`` weights when
    ``load_weights``, else the upstream initialisation seeded from ``seed`` and ``name``; wrapped
    in a :class:`fusion.multiscale.MultiScaleEncoder` (pooling with ``kernels``) when
    ``cfg.scales`` is not ``[1]``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(encoder_seed(seed, name))
        enc = get_encoder_class(cfg.type, key=f"encoders.{name}.type")(cfg, load_weights)
    return enc if list(cfg.scales) == [1] else MultiScaleEncoder(enc, cfg.scales, backend=kernels)


def build_merge_and_projector(encoders: Dict[str, Encoder], config: TowerConfig,
                              seed: int) -> Tuple[FusionMerge, nn.Module]:
    """The merge and the projector for ``encoders`` (name -> encoder, in channel order), seeded from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(encoder_seed(seed, "merge+projector"))
        specs = [GridSpec(name, tuple(enc.grid), enc.dim) for name, enc in encoders.items()]
        merge = FusionMerge(specs, config.fusion)
        return merge, build_projector(config.projector, merge.out_dim)


class MultiEncoderTower(nn.Module):
    """Several vision encoders, merged and projected into one token sequence."""

    def __init__(self, config: TowerConfig, weights: str = "pretrained", seed: int = 0,
                 dtype: Union[str, torch.dtype, None] = None):
        super().__init__()
        self.build_dtype = resolve_dtype(dtype, "dtype")
        if not isinstance(config, TowerConfig):
            raise TypeError(f"config: expected a TowerConfig (see fusion.load_config), got {type(config).__name__}")
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights: got {weights!r}; accepted values are {list(WEIGHT_MODES)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {seed!r}")
        self.config = config
        self._weights = weights
        self.seed = seed
        load_weights = weights == "pretrained"
        self.encoders = nn.ModuleDict({name: build_encoder(name, enc_cfg, load_weights, seed, config.fusion.kernels)
                                       for name, enc_cfg in config.encoders.items()})
        self._build_preprocessing(config)
        self.merge, self.projector = build_merge_and_projector(self.encoders, config, seed)
        self.sequence = TokenSequence(config.fusion, list(self.encoders))  # the granularity steps after the merge
        if self.build_dtype is not None:  # the whole tower in that dtype; an encoder's own `dtype` wins
            for enc in self.encoders.values():
                if enc.cfg.dtype is None:
                    enc.to(self.build_dtype)
            self.merge.to(self.build_dtype)
            self.projector.to(self.build_dtype)
        self.is_loaded = True

    def _build_preprocessing(self, config: TowerConfig) -> None:
        """The host ``image_processor`` and the on-device ``encoder_inputs``, with the letterbox
        colours of ``processor.pad_color`` (:mod:`fusion.letterbox`): ``pixel_values`` are padded
        with the frame colour (``per_encoder``: the mean colour of ``processor.mean_from``, by
        default the first encoder, whose mean ``image_mean`` reports as LLaVA expects); in ``pad``
        mode, with ``image_sizes``, each encoder's input is recoloured to its own colour."""
        specs = {name: enc.input_specs() for name, enc in self.encoders.items()}  # multi-scale: one per scale
        self._input_names = {name: tuple(spec.name for spec in own) for name, own in specs.items()}
        extra = {spec.name: name for name, own in specs.items() for spec in own if spec.name != name}
        colors = choose_pad_colors(config.processor.pad_color, self.encoders, extra, config.processor.mean_from)
        pad_mode = config.processor.mode == "pad"
        self.encoder_inputs = EncoderInputs([spec for own in specs.values() for spec in own],
                                            pad_colors=colors.inputs if pad_mode else None, frame_color=colors.frame)
        size = config.processor.size or max(enc.image_size for enc in self.encoders.values())
        source = self.encoders[colors.source]
        self.image_processor = ImageProcessor(size, mode=config.processor.mode, image_mean=source.mean,
                                              image_std=source.std, pad_color=colors.frame)

    @property
    def weights(self) -> str:
        """``"pretrained"`` or ``"random"``: what the weights are (``save_pretrained`` and
        :meth:`weights_report` say it)."""
        return self._weights

    def set_weights_mode(self, weights: str) -> None:
        """Record that the weights are now those of ``weights`` mode, after something else loaded
        them into a tower built another way (``fusion.hf`` builds with ``"random"`` without
        initialising, then transformers loads the checkpoint)."""
        if weights not in WEIGHT_MODES:
            raise ValueError(f"weights: got {weights!r}; accepted values are {list(WEIGHT_MODES)}")
        self._weights = weights

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
        """Number of output tokens ``N`` per image: the fused grid (or ``fusion.reduce.keep``)
        plus ``fusion.levels``; each ROI crop passed to ``forward`` adds ``sequence.grid_tokens``."""
        return self.sequence.num_tokens

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

    def encode(self, pixel_values: torch.Tensor, image_sizes: Optional[torch.Tensor] = None,
               ) -> Dict[str, torch.Tensor]:
        """Each encoder's grid: name -> ``[B, h, w, C]`` (``C`` is ``enc.dim``: ``× len(scales)`` for
        a multi-scale encoder, see :mod:`fusion.multiscale`). Frozen encoders run without autograd.
        ``image_sizes [B, 2]`` (from the image processor): see :meth:`forward`."""
        pixel_values = self._check_pixels(pixel_values)
        return self._encode(pixel_values, self._pad_weight(image_sizes, pixel_values))

    def _pad_weight(self, image_sizes: Optional[torch.Tensor], pixel_values: torch.Tensor) -> Optional[torch.Tensor]:
        """``[B, 1, H, W]`` padding fraction of each pixel (:func:`fusion.letterbox.pad_weights`);
        None without ``image_sizes``, outside ``pad`` mode, or when no image was padded."""
        if image_sizes is None:
            return None
        sizes = check_image_sizes(image_sizes, pixel_values.shape[0])
        if self.config.processor.mode != "pad":
            return None
        return pad_weights(sizes, tuple(pixel_values.shape[-2:]), pixel_values.device)

    def _roi_pad_weight(self, image_sizes: torch.Tensor, rois) -> Optional[torch.Tensor]:
        """``[R, 1, H, W]`` padding fraction of the ROI crops (their box parts outside the image)."""
        B, r = rois.order.shape
        images = torch.empty(B * r, dtype=torch.int64)
        images[rois.order.flatten().cpu()] = torch.arange(B).repeat_interleave(r)  # each crop's image
        return roi_pad_weights(check_image_sizes(image_sizes, B), rois.boxes.cpu(), images,
                               tuple(rois.pixel_values.shape[-2:]), rois.pixel_values.device)

    def _encode(self, pixel_values: torch.Tensor, pad_weight: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
        inputs = self.encoder_inputs(pixel_values, pad_weight)
        grids = {}
        for name, enc in self.encoders.items():
            dtype = self._encoder_dtype(enc)
            with torch.no_grad() if enc.frozen else contextlib.nullcontext():
                grids[name] = enc(*(inputs[key].to(dtype) for key in self._input_names[name]))
        return grids

    def encoder_grid_shapes(self) -> Dict[str, Tuple[int, int, int]]:
        """Encoder name -> ``(h, w, C)`` of the grid :meth:`encode` returns for it (channel order)."""
        return {spec.name: (spec.grid[0], spec.grid[1], spec.dim) for spec in self.merge.specs}

    def fuse(self, encoder_grids: Dict[str, torch.Tensor], rois: Optional[RoiBatch] = None,
             roi_grids: Optional[Dict[str, torch.Tensor]] = None) -> MergedTokens:
        """The tokens before the projector (a :class:`fusion.sequence.MergedTokens`: tokens
        ``[B, N, C]``, boxes, segments, sizes) from encoder grids (name -> ``[B, h, w, C]``, as
        :meth:`encode` returns them): the merge, then the granularity steps of
        :attr:`sequence` (reduction, levels, the ROI crops' grids ``roi_grids`` placed by
        ``rois``, position embedding)."""
        return self._fuse(self._check_grids(encoder_grids), rois, roi_grids)

    def _fuse(self, grids: Dict[str, torch.Tensor], rois: Optional[RoiBatch] = None,
              roi_grids: Optional[Dict[str, torch.Tensor]] = None) -> MergedTokens:
        fused = self.merge(grids)  # [B, N0, C]
        if rois is None:
            return self.sequence(fused, grids)
        return self.sequence(fused, grids, self.merge(roi_grids), rois.boxes, rois.order)

    def merge_and_project(self, encoder_grids: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The merge (with levels, reduction, position embedding) and the projector on
        precomputed encoder grids: ``[B, N, D]``. ``encoder_grids``: encoder name ->
        ``[B, h, w, C]``, as :meth:`encode` returns them (or a
        :class:`fusion.feature_cache.FeatureCache` holds them); moved to the tower's device."""
        return self.projector(self.fuse(encoder_grids).tokens)

    def _check_grids(self, grids: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """One float ``[B, h, w, C]`` grid per encoder, each of its encoder's shape, on the tower's device."""
        if not isinstance(grids, dict):
            raise TypeError(f"encoder_grids: expected a dict of encoder name -> [B, h, w, C] tensor, "
                            f"got {type(grids).__name__}")
        missing = [name for name in self.encoders if name not in grids]
        unexpected = [name for name in grids if name not in self.encoders]
        if missing or unexpected:
            raise ValueError(f"encoder_grids: expected one grid per encoder {list(self.encoders)}; "
                             f"missing {missing}, unexpected {unexpected}")
        device, batch, out = self.device, None, {}
        for name, shape in self.encoder_grid_shapes().items():
            g = grids[name]
            if not isinstance(g, torch.Tensor) or g.dim() != 4 or tuple(g.shape[1:]) != shape:
                got = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"encoder_grids[{name!r}]: expected [B, {', '.join(map(str, shape))}], got {got}")
            if not g.is_floating_point():
                raise TypeError(f"encoder_grids[{name!r}]: expected a float tensor, got dtype {g.dtype}")
            if batch is not None and g.shape[0] != batch:
                raise ValueError(f"encoder_grids[{name!r}]: batch size {g.shape[0]} differs from the "
                                 f"other grids' {batch}")
            batch = g.shape[0]
            out[name] = g if g.device == device else g.to(device)
        return out

    def forward(self, pixel_values: torch.Tensor, return_dict: bool = False,
                roi_pixel_values: Optional[torch.Tensor] = None, roi_boxes: Optional[torch.Tensor] = None,
                roi_image_index: Optional[torch.Tensor] = None, image_sizes: Optional[torch.Tensor] = None,
                ) -> Union[torch.Tensor, TowerOutput]:
        """``pixel_values [B, 3, H, W]`` -> tokens ``[B, N, D]`` (or a :class:`TowerOutput`).

        ``image_sizes [B, 2]``: each original image's ``(height, width)``, as the image
        processor returns it. In ``pad`` mode it tells each encoder where the padding is, so
        that each is letterboxed with its own colour (``processor.pad_color``, see
        :mod:`fusion.letterbox`); without it every encoder sees ``pixel_values``' padding
        (the first encoder's mean colour). Other modes ignore it.

        ROI crops (Chain-of-Spot, :mod:`fusion.roi`): ``roi_pixel_values [R, 3, S, S]``,
        ``roi_boxes [R, 4]`` and ``roi_image_index [R]`` as returned by
        ``tower.image_processor(images, rois=...)`` (so ``tower(**batch)`` works). Every
        encoder encodes the crops; each image gets its crops' fused tokens appended after
        its own (segments ``roi0``, ``roi1``, ...). Every image needs the same number of
        crops ``r``; then ``N = num_patches + r * sequence.grid_tokens``.
        """
        pixel_values = self._check_pixels(pixel_values)
        rois = check_roi_inputs(roi_pixel_values, roi_boxes, roi_image_index, pixel_values.shape[0], self.device)
        grids, roi_grids = self._encode_images_and_crops(pixel_values, rois, image_sizes)
        merged = self._fuse(grids, rois, roi_grids)
        tokens = self.projector(merged.tokens)
        if not return_dict:
            return tokens
        hidden = tuple(g.flatten(1, 2) for g in grids.values()) + (merged.tokens, tokens)
        return TowerOutput(tokens=tokens, encoder_grids=grids, token_boxes=merged.boxes,
                           segments=merged.segments, hidden_states=hidden, token_sizes=merged.sizes)

    def _encode_images_and_crops(self, pixel_values: torch.Tensor, rois: Optional[RoiBatch],
                                 image_sizes: Optional[torch.Tensor]):
        """``(grids, roi_grids)``: the images' encoder grids and the ROI crops' (``None`` without
        crops); one encoder batch for both when the crops have the images' size."""
        B = pixel_values.shape[0]
        weight = self._pad_weight(image_sizes, pixel_values)
        if rois is None:
            return self._encode(pixel_values, weight), None
        roi_weight = None if weight is None else self._roi_pad_weight(image_sizes, rois)
        if rois.pixel_values.shape[2:] != pixel_values.shape[2:]:
            return self._encode(pixel_values, weight), self._encode(rois.pixel_values, roi_weight)
        both = self._encode(torch.cat([pixel_values, rois.pixel_values]), _cat_weights(
            weight, roi_weight, (B, rois.pixel_values.shape[0]), pixel_values))
        return {name: g[:B] for name, g in both.items()}, {name: g[B:] for name, g in both.items()}

    def _encoder_dtype(self, enc: Encoder) -> torch.dtype:
        for p in enc.parameters():
            return p.dtype
        return torch.float32

    def _check_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = as_pixels(pixel_values, "pixel_values",
                                 hint="; use tower.image_processor(images) for images")
        return pixel_values.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ distributed

    def fsdp_units(self) -> List[nn.Module]:
        """Modules to shard with FSDP, innermost first: every encoder block, each encoder, the
        projector (see :mod:`fusion.distributed`; ``fusion.distributed.shard_tower`` applies FSDP2)."""
        from .distributed import fsdp_units

        return fsdp_units(self)

    # ------------------------------------------------------------------ weights

    def weights_report(self) -> Dict[str, Dict[str, Any]]:
        """Where each encoder's weights came from, encoder name -> a JSON-able dict.

        ``source`` is ``tag`` / ``file`` / ``hf`` (then ``pretrained``, ``library``, the
        ``files`` read, for ``hf`` the ``folder``, ``sha256``: the first 12 hex digits of the
        checkpoint's sha256, and ``notes``) or ``random`` (then ``seed`` and the
        ``encoder_seed`` derived from it). ``save_pretrained`` and ``fusion-tower extract``
        record it; ``fusion-tower info`` prints it.
        """
        from .encoders.sources import encoder_report

        return {name: encoder_report(enc, self.weights, self.seed, encoder_seed(self.seed, name))
                for name, enc in self.encoders.items()}

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


def _cat_weights(weight: Optional[torch.Tensor], roi_weight: Optional[torch.Tensor], counts: Tuple[int, int],
                 pixel_values: torch.Tensor) -> Optional[torch.Tensor]:
    """The pad weights of images and crops encoded as one batch (zeros for the side that has none)."""
    if weight is None and roi_weight is None:
        return None
    frame = (1, *pixel_values.shape[-2:])
    parts = [w if w is not None else pixel_values.new_zeros(n, *frame) for w, n in zip((weight, roi_weight), counts)]
    return torch.cat(parts)


def build_tower(source: ConfigSource, overrides: Overrides = None, weights: str = "pretrained",
                seed: int = 0, dtype: Union[str, torch.dtype, None] = None) -> MultiEncoderTower:
    """Build a tower from a preset name, a config file, a dict or a :class:`TowerConfig`.

    ``weights="random"`` initialises every encoder from ``seed`` (no downloads), so two
    runs or two processes give the same features. ``dtype`` (``"float32"``, ``"float16"``,
    ``"bfloat16"`` or a torch dtype) runs the whole tower in that dtype; an encoder whose
    config sets its own ``dtype`` keeps it.
    """
    return MultiEncoderTower(load_config(source, overrides), weights=weights, seed=seed, dtype=dtype)
