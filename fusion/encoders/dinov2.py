"""DINOv2 (with or without registers): timm's own VisionTransformer.

``timm.create_model(cfg.model, img_size=image_size, **arch)`` builds one of
``timm.list_models('*dinov2*')``; ``arch`` takes timm ``VisionTransformer`` constructor
arguments (``depth``, ``embed_dim``, ``num_heads``, ``reg_tokens``, ...), so tests build
a 2-block, 48-wide DINOv2 in milliseconds. ``image_size`` is any multiple of the patch
size (default: the model's, 518 for DINOv2); position embeddings are resampled by timm.

``pretrained``: a timm tag (``lvd142m`` means ``<model>.lvd142m``), fetched by timm's
own download cache; or a local file holding the timm model's state dict (timm's
checkpoint filter adapts it, as timm's pretrained loader does: position-embedding
resampling, Meta's original DINOv2 key layout). Loading is strict.

``forward`` returns the output of the selected block, before the final norm, with the
prefix tokens (CLS and registers) removed: ``[B, h, w, embed_dim]``. After loading, timm's
own ``prune_intermediate_layers`` drops the blocks after the selected one, the final norm
and the head, which that output never uses (``depth`` stays the unpruned block count).
"""
from __future__ import annotations

import inspect

import timm
import torch
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ..config import EncoderConfig
from .base import Encoder
from .registry import register_encoder
from .weights import (
    block_index,
    check_keys,
    check_pixels,
    create_upstream,
    finalize,
    load_strict,
    param_dtype,
    read_checkpoint,
    resolve_pretrained,
    unknown_model,
    upstream_label,
)

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

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True):
        super().__init__(cfg, load_weights)
        prefix = f"encoders.{cfg.name}"
        valid = timm.list_models("*dinov2*")
        if cfg.model not in valid:
            raise unknown_model(f"{prefix}.model", cfg.model, valid, "timm DINOv2")
        check_keys(cfg.arch, _ARCH_KEYS, f"{prefix}.arch", "the input size is encoders.<name>.image_size")
        tags = [name.split(".", 1)[1] for name in timm.list_pretrained(f"{cfg.model}.*")]
        source = resolve_pretrained(cfg, tags, load_weights, "timm")
        self.pretrained_tag = source.value if source.kind == "tag" else None
        self.tag_weights_loaded = source.load_tag

        self.model = self._create(cfg, source, prefix)
        embed = self.model.patch_embed
        self.patch_size = int(embed.patch_size[0])
        self.image_size = int(embed.img_size[0])
        if embed.img_size[0] != embed.img_size[1] or self.image_size % self.patch_size:
            lower = self.image_size // self.patch_size * self.patch_size
            raise ValueError(f"{prefix}.image_size: got {self.image_size}; {cfg.model} takes square inputs whose side "
                             f"is a multiple of its patch size {self.patch_size} (e.g. {lower} or "
                             f"{lower + self.patch_size})")
        if source.load_file:
            state = checkpoint_filter_fn(read_checkpoint(source.value, source.key), self.model)
            load_strict(self.model, state, source.key, source.value,
                        f"the timm state dict of {cfg.model!r} with arch {cfg.arch or {}}")
        self.grid = (int(embed.grid_size[0]), int(embed.grid_size[1]))
        self.dim = int(self.model.embed_dim)
        self.depth = len(self.model.blocks)
        self.num_prefix_tokens = int(self.model.num_prefix_tokens)
        self.block = block_index(cfg.layer, self.depth, f"{prefix}.layer")
        # keep only what runs: blocks 0..block (no final norm, no head); depth stays the full count
        self.model.prune_intermediate_layers([self.block], prune_norm=True, prune_head=True)
        pretrained_cfg = self.model.pretrained_cfg
        self.mean = tuple(float(v) for v in pretrained_cfg["mean"])
        self.std = tuple(float(v) for v in pretrained_cfg["std"])
        self.interpolation = pretrained_cfg.get("interpolation") if pretrained_cfg.get("interpolation") in (
            "bicubic", "bilinear") else "bicubic"
        finalize(self.model, cfg)

    @staticmethod
    def _create(cfg: EncoderConfig, source, prefix: str) -> VisionTransformer:
        """``timm.create_model``; a tag names the pretrained cfg even when nothing is downloaded."""
        name = f"{cfg.model}.{source.value}" if source.kind == "tag" else cfg.model
        kwargs = dict(cfg.arch)
        if cfg.image_size is not None:
            kwargs["img_size"] = cfg.image_size
        return create_upstream(lambda: timm.create_model(name, pretrained=source.load_tag, **kwargs),
                               cfg, source, prefix, "timm", f"timm weights {name!r}",
                               f"the timm state dict of {cfg.model!r}")

    def upstream_name(self) -> str:
        return upstream_label("timm", self.cfg.model, self.pretrained_tag, self.tag_weights_loaded)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised pixels -> ``[B, h, w, C]`` output of block ``self.block``."""
        check_pixels(pixels, self.image_size, self.name)
        tokens = self.model.forward_intermediates(
            pixels.to(param_dtype(self.model)),
            indices=[self.block],
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )[0]  # [B, h*w, C], CLS and registers already split off
        h, w = self.grid
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).contiguous()
