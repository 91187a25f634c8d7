"""DINOv2 (with or without registers): timm's own VisionTransformer.

``timm.create_model(cfg.model, img_size=image_size, **arch)`` builds one of
``timm.list_models('*dinov2*')``; ``arch`` takes timm ``VisionTransformer`` constructor
arguments (``depth``, ``embed_dim``, ``num_heads``, ``reg_tokens``, ...), so tests build
a 2-block, 48-wide DINOv2 in milliseconds. ``image_size`` is any square size timm
builds (default: the model's, 518 for DINOv2), with timm's own edge behaviour: the
stride-14 patch embedding covers ``image_size // 14`` patches per side and ignores the
remaining pixels (384 px gives 27x27 and drops the last 6 rows and columns, as
Prismatic's DINO-SigLIP does); position embeddings are resampled by timm.

``pretrained`` (see :mod:`.sources`): a timm tag (``lvd142m`` means ``<model>.lvd142m``),
whose file is fetched into timm's own cache (the Hugging Face hub cache, or PyTorch's hub
cache for URL-only tags); a local file holding the timm model's state dict; a Hugging
Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` checkpoint (:mod:`.hf_maps`); or
``random``. The model is always built from its name and ``arch`` (a tag selects only a
file); every source then goes through timm's checkpoint filter, as timm's pretrained
loader does (position-embedding resampling, Meta's original DINOv2 key layout), and is
loaded strictly.

``forward`` returns the output of the selected block, before the final norm, with the
prefix tokens (CLS and registers) removed: ``[B, h, w, embed_dim]``. After loading, timm's
own ``prune_intermediate_layers`` drops the blocks after the selected one, the final norm
and the head, which that output never uses (``depth`` stays the unpruned block count).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import replace
from typing import Sequence

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..config import EncoderConfig
from .base import Encoder, block_index
from .registry import register_encoder
from .fetch import Remote
from .loading import locate, read_source
from .weights import (
    LoadedWeights,
    load_strict,
    prune_unused,
    resolve_pretrained,
)
from .adapter import check_keys, create_upstream, finalize, unknown_model

# timm's file names on the Hugging Face hub, in the order its loader tries them.
_TIMM_HF_FILES = ("model.safetensors", "pytorch_model.bin")
# VisionTransformer arguments arch may set: the input size has its own config key, and
# device/dtype are the tower's business.
_ARCH_KEYS = set(inspect.signature(VisionTransformer).parameters) - {"self", "img_size", "device", "dtype"}


@register_encoder("dinov2")
class Dinov2Encoder(Encoder):
    """DINOv2 through timm.

    Attributes (besides the :class:`Encoder` contract): ``model`` (the timm
    ``VisionTransformer``), ``depth``, ``block`` (0-based index of the returned block),
    ``num_prefix_tokens`` (CLS + registers, removed from the output), ``pretrained_tag``.
    """

    resize = "squash"
    library = "timm"

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True):
        super().__init__(cfg, load_weights)
        prefix = f"encoders.{cfg.name}"
        valid = timm.list_models("*dinov2*")
        if cfg.model not in valid:
            raise unknown_model(f"{prefix}.model", cfg.model, valid, "timm DINOv2")
        check_keys(cfg.arch, _ARCH_KEYS, f"{prefix}.arch", "the input size is encoders.<name>.image_size")
        source = resolve_pretrained(cfg, self.pretrained_tags(cfg), load_weights, self.library)
        self.pretrained_tag = source.value if source.kind == "tag" else None
        path = locate(source, lambda: self.tag_checkpoint(cfg, source.value))  # fetched before building

        self.model = self._create(cfg, prefix)
        embed = self.model.patch_embed
        self.patch_size = int(embed.patch_size[0])
        self.image_size = int(embed.img_size[0])
        if self.image_size < self.patch_size:
            raise ValueError(f"{prefix}.image_size: got {self.image_size}; {cfg.model} needs at least one "
                             f"{self.patch_size}x{self.patch_size} patch (image_size >= {self.patch_size})")
        self.loaded_weights = LoadedWeights("random", cfg.pretrained)
        if path is not None:
            self._load(source, path)
        self.grid = (int(embed.grid_size[0]), int(embed.grid_size[1]))
        self.dim = int(self.model.embed_dim)
        self.depth = len(self.model.blocks)
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        self.block = block_index(cfg.layer, self.depth, f"{prefix}.layer")
        # keep only what runs: blocks 0..block (no final norm, no head); depth stays the full count
        self.pruned = prune_unused(self.model, lambda: self.model.prune_intermediate_layers(
            [self.block], prune_norm=True, prune_head=True))
        pretrained_cfg = self.model.pretrained_cfg
        self.mean = tuple(float(v) for v in pretrained_cfg["mean"])
        self.std = tuple(float(v) for v in pretrained_cfg["std"])
        self.interpolation = pretrained_cfg.get("interpolation") if pretrained_cfg.get("interpolation") in (
            "bicubic", "bilinear") else "bicubic"
        finalize(self.model, cfg)

    @staticmethod
    def _create(cfg: EncoderConfig, prefix: str) -> VisionTransformer:
        """``timm.create_model`` from the model name and ``arch`` alone (random init; never downloads)."""
        kwargs = dict(cfg.arch)
        if cfg.image_size is not None:
            kwargs["img_size"] = cfg.image_size
        return create_upstream(lambda: timm.create_model(cfg.model, pretrained=False, **kwargs), cfg, prefix, "timm")

    def _load(self, source, path: str) -> None:
        """Read ``source`` (tag, file or Hugging Face) from ``path``, pass it through timm's checkpoint
        filter (position-embedding resampling), load strictly."""
        got = read_source(source, path, self.library, self, self.model)
        before = got.state.get("pos_embed")
        state = checkpoint_filter_fn(got.state, self.model)
        load_strict(self.model, state, source.key, got.path,
                    f"the timm state dict of {self.cfg.model!r} with arch {self.cfg.arch or {}}")
        after = state.get("pos_embed")
        notes = got.loaded.notes
        if before is not None and after is not None and before.shape != after.shape:
            notes += (f"position embeddings resampled from {before.shape[1]} to {after.shape[1]} tokens",)
        self.loaded_weights = replace(got.loaded, notes=notes)

    @classmethod
    def pretrained_tags(cls, cfg: EncoderConfig) -> Sequence[str]:
        return [name.split(".", 1)[1] for name in timm.list_pretrained(f"{cfg.model}.*")]

    @classmethod
    def tag_checkpoint(cls, cfg: EncoderConfig, tag: str) -> Remote:
        """The file of timm tag ``tag``: on the Hugging Face hub (timm's preference, ``.safetensors``
        first) or at a URL cached in PyTorch's hub cache, as timm's own loader fetches it."""
        pc = timm.models.get_pretrained_cfg(f"{cfg.model}.{tag}")
        what, file_format = f"timm weights {cfg.model}.{tag}", f"the timm state dict of {cfg.model!r}"
        if pc.hf_hub_id:
            repo, _, revision = pc.hf_hub_id.partition("@")
            files = (pc.hf_hub_filename,) if pc.hf_hub_filename else _TIMM_HF_FILES
            return Remote("timm", what, file_format, hf_repo=repo, hf_files=files, hf_revision=revision or None)
        if not pc.url:
            raise ValueError(f"encoders.{cfg.name}.pretrained: timm gives no download location for {what}")
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(pc.url))
        return Remote("PyTorch hub", what, file_format, url=pc.url, cache_file=cache)

    def upstream_name(self) -> str:
        return f"timm:{self.cfg.model}"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised pixels -> ``[B, h, w, C]`` output of block ``self.block``."""
        return self.block_grid(pixels, lambda x, indices: self.model.forward_intermediates(
            x, indices=indices, norm=False, stop_early=True, output_fmt="NLC", intermediates_only=True)[0])
