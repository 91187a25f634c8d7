"""CLIP and SigLIP: the vision tower of open_clip's own model.

``open_clip.create_model(cfg.model, ...)`` builds the model named by one of
``open_clip.list_models()``; the adapter keeps ``model.visual`` and drops the rest.
Two kinds of vision tower are supported, both ViTs:

- open_clip's ``VisionTransformer`` (CLIP): a CLS token, then ``ln_pre``, then the blocks;
- open_clip's ``TimmModel`` around a timm ViT (SigLIP): no CLS token (some timm ViTs
  have register tokens).

``arch`` overrides open_clip's model config (the JSON under ``open_clip/model_configs``),
merged key by key: top-level constructor arguments (``embed_dim``, ``quick_gelu``, ...),
and ``vision_cfg`` / ``text_cfg`` mappings merged into the named config's. For example
``{vision_cfg: {layers: 2, width: 64}}`` gives a 2-block, 64-wide ViT. The text tower is
built by open_clip and discarded; a tiny ``text_cfg`` keeps test builds fast.
``encoders.<name>.image_size`` (not ``vision_cfg.image_size``) sets the input size.

``pretrained``: an open_clip tag for the model (``openai``, ``webli``, ...), loaded by
open_clip's own ``create_model``; or a local file holding the full open_clip state dict of
the model (``visual.*`` is loaded strictly, the text tower's keys are ignored); position
embeddings are resampled by the upstream helpers when ``image_size`` differs from the file's.

``forward`` returns the output of the selected block, before the final norm, prefix
tokens removed: ``[B, h, w, width]``.

Only what runs is kept: after the weights are loaded, the blocks after the selected one,
the final norm, the projection and pooling heads are dropped with the upstream's own
``prune_intermediate_layers`` (``visual`` for open_clip's ViT, the timm trunk for a
``TimmModel``; open_clip's attentional pooler and a ``TimmModel``'s projection head,
which that call keeps, are dropped too). ``depth`` stays the unpruned block count.
"""
from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Any, Dict, Mapping, Tuple

import open_clip
import torch
from open_clip.constants import INCEPTION_MEAN, INCEPTION_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, resize_pos_embed
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn

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
    take_prefix,
    unknown_model,
    upstream_label,
)

# Constructor arguments of open_clip's model classes that arch may set (the rest are runtime options).
_NOT_ARCH = {"self", "cast_dtype", "output_dict"}
_ARCH_KEYS = {
    p for cls in (open_clip.CLIP, open_clip.CustomTextCLIP, open_clip.CoCa)
    for p in inspect.signature(cls).parameters
} - _NOT_ARCH
_NESTED_KEYS = {
    "vision_cfg": {f.name for f in fields(CLIPVisionCfg)} - {"image_size"},
    "text_cfg": {f.name for f in fields(CLIPTextCfg)},
}
_INTERPOLATIONS = ("bicubic", "bilinear")


class OpenClipEncoder(Encoder):
    """The vision tower of an open_clip model. Subclasses set the default normalisation.

    Attributes (besides the :class:`Encoder` contract): ``model`` (the open_clip vision
    tower, ``VisionTransformer`` or ``TimmModel``), ``depth`` (number of blocks),
    ``block`` (0-based index of the block whose output is returned), ``pretrained_tag``
    (the open_clip tag, or None).
    """

    default_mean: Tuple[float, float, float] = OPENAI_DATASET_MEAN
    default_std: Tuple[float, float, float] = OPENAI_DATASET_STD
    resize = "squash"

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True):
        super().__init__(cfg, load_weights)
        prefix = f"encoders.{cfg.name}"
        base = open_clip.get_model_config(cfg.model) if cfg.model in open_clip.list_models() else None
        if base is None:
            raise unknown_model(f"{prefix}.model", cfg.model, open_clip.list_models(), "open_clip")
        overrides = _arch_overrides(cfg.arch, base, f"{prefix}.arch")
        source = resolve_pretrained(cfg, open_clip.list_pretrained_tags_by_model(cfg.model), load_weights, "open_clip")
        tag_cfg = open_clip.get_pretrained_cfg(cfg.model, source.value) if source.kind == "tag" else {}
        self.pretrained_tag = source.value if source.kind == "tag" else None
        self.tag_weights_loaded = source.load_tag

        clip_model = self._create(cfg, source, tag_cfg, overrides, prefix)
        visual = clip_model.visual
        self.image_size, self.patch_size, self.grid, self.dim, self.depth = _geometry(visual, cfg, prefix)
        if source.load_file:
            state = _fit_checkpoint(read_checkpoint(source.value, source.key), clip_model, source.key, source.value)
            load_strict(visual, state, source.key, source.value,
                        f"the full open_clip state dict of {cfg.model!r} with arch {cfg.arch or {}}")
        self.model = visual  # the text tower and logit scale go with clip_model
        self.block = block_index(cfg.layer, self.depth, f"{prefix}.layer")
        _prune(visual, self.block)
        self.mean = tuple(float(v) for v in tag_cfg.get("mean", self.default_mean))
        self.std = tuple(float(v) for v in tag_cfg.get("std", self.default_std))
        interpolation = tag_cfg.get("interpolation", "bicubic")
        self.interpolation = interpolation if interpolation in _INTERPOLATIONS else "bicubic"
        finalize(self.model, cfg)

    @staticmethod
    def _create(cfg: EncoderConfig, source, tag_cfg: Mapping[str, Any], overrides: Dict[str, Any], prefix: str):
        """Build the whole open_clip model (downloading a tag's weights through open_clip)."""
        kwargs = dict(overrides)
        if cfg.image_size is not None:
            # force_image_size alone is lost when arch replaces vision_cfg; set both.
            kwargs["vision_cfg"] = {**kwargs.get("vision_cfg", open_clip.get_model_config(cfg.model)["vision_cfg"]),
                                    "image_size": cfg.image_size}
        # A tag trained with QuickGELU (OpenAI's) says so in its config; arch's quick_gelu still wins.
        kwargs["force_quick_gelu"] = bool(tag_cfg.get("quick_gelu", False))
        if cfg.image_size is not None:
            kwargs["force_image_size"] = cfg.image_size
        pretrained = source.value if source.load_tag else None
        # open_clip moves the model to `device` (default "cpu"): pass the current default device,
        # so that a build under `torch.device("meta")` (fusion.geometry) stays on meta
        kwargs["device"] = torch.empty(()).device
        return create_upstream(lambda: open_clip.create_model(cfg.model, pretrained=pretrained, **kwargs),
                               cfg, source, prefix, "open_clip", f"open_clip weights {cfg.model!r} / {source.value!r}",
                               f"the full open_clip state dict of {cfg.model!r}")

    def upstream_name(self) -> str:
        return upstream_label("open_clip", self.cfg.model, self.pretrained_tag, self.tag_weights_loaded)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised pixels -> ``[B, h, w, C]`` output of block ``self.block``."""
        check_pixels(pixels, self.image_size, self.name)
        out = self.model.forward_intermediates(
            pixels.to(param_dtype(self.model)),
            indices=[self.block],
            stop_early=True,
            normalize_intermediates=False,
            intermediates_only=True,
            output_fmt="NLC",
        )
        tokens = out["image_intermediates"][0]  # [B, h*w, C], prefix tokens already split off
        h, w = self.grid
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1]).contiguous()


@register_encoder("clip")
class ClipEncoder(OpenClipEncoder):
    """CLIP through open_clip; without a tag, OpenAI's normalisation."""

    default_mean = OPENAI_DATASET_MEAN
    default_std = OPENAI_DATASET_STD


@register_encoder("siglip")
class SiglipEncoder(OpenClipEncoder):
    """SigLIP through open_clip; without a tag, SigLIP's normalisation (mean = std = 0.5)."""

    default_mean = INCEPTION_MEAN
    default_std = INCEPTION_STD


def _arch_overrides(arch: Mapping[str, Any], base: Mapping[str, Any], key: str) -> Dict[str, Any]:
    """Validate ``arch`` and merge its nested configs into the named model config's."""
    vision_hint = ("Vision-tower settings go under vision_cfg, e.g. {vision_cfg: {layers: 2}}; "
                   "the input size is encoders.<name>.image_size")
    check_keys(arch, _ARCH_KEYS, key, vision_hint)
    out: Dict[str, Any] = {}
    for name, value in arch.items():
        if name in _NESTED_KEYS:
            if not isinstance(value, Mapping):
                raise ValueError(f"{key}.{name}: expected a mapping of open_clip {name} fields, got {value!r}")
            hint = "the input size is encoders.<name>.image_size" if name == "vision_cfg" else ""
            check_keys(value, _NESTED_KEYS[name], f"{key}.{name}", hint)
            out[name] = {**base.get(name, {}), **value}
        else:
            out[name] = value
    return out


def _geometry(visual: torch.nn.Module, cfg: EncoderConfig, prefix: str) -> Tuple[int, int, Tuple[int, int], int, int]:
    """(image_size, patch_size, grid, width, depth) of an open_clip ViT tower."""
    if isinstance(visual, VisionTransformer):
        size, patch, grid = visual.image_size, visual.patch_size, visual.grid_size
        width, depth = visual.transformer.width, len(visual.transformer.resblocks)
    elif isinstance(visual, TimmModel) and hasattr(visual.trunk, "patch_embed") and hasattr(visual.trunk, "blocks"):
        embed = visual.trunk.patch_embed
        size, patch, grid = embed.img_size, embed.patch_size, embed.grid_size
        width, depth = visual.trunk.embed_dim, len(visual.trunk.blocks)
    else:
        raise ValueError(f"{prefix}.model: {cfg.model!r} has a {type(visual).__name__} vision tower; this adapter "
                         f"takes open_clip ViTs (open_clip's VisionTransformer or a timm ViT trunk) that give a "
                         f"token grid")
    if size[0] != size[1]:
        raise ValueError(f"{prefix}.image_size: {cfg.model!r} takes {tuple(size)} inputs; only square inputs are "
                         f"supported, set encoders.{cfg.name}.image_size")
    return int(size[0]), int(patch[0]), (int(grid[0]), int(grid[1])), int(width), int(depth)


def _prune(visual: torch.nn.Module, block: int) -> None:
    """Keep blocks ``0..block`` of ``visual``; drop its final norm and every pooling/projection head
    (``forward_intermediates(..., intermediates_only=True)`` uses none of them)."""
    if isinstance(visual, TimmModel):
        visual.trunk.prune_intermediate_layers([block], prune_norm=True, prune_head=True)
        visual.head = torch.nn.Sequential()  # open_clip's projection after the trunk's pooling
    else:
        visual.prune_intermediate_layers([block], prune_norm=True, prune_head=True)
        for pooler in ("attn_pool", "attn_pool_contrastive"):  # CoCa-style poolers (None on CLIP)
            if getattr(visual, pooler, None) is not None:
                setattr(visual, pooler, None)


def _fit_checkpoint(state: Dict[str, torch.Tensor], clip_model: torch.nn.Module, key: str, path: str
                    ) -> Dict[str, torch.Tensor]:
    """Full open_clip state dict -> the vision tower's, position embeddings resampled to its grid."""
    visual = take_prefix(state, "visual.")
    if not visual:
        raise ValueError(f"{key}: {path!r} has no 'visual.*' keys; it should hold the full open_clip state dict "
                         f"(model.state_dict() of open_clip.create_model(...)), not the vision tower alone")
    if isinstance(clip_model.visual, TimmModel):
        # timm's own checkpoint filter resamples pos_embed (and patch_embed) to the trunk's size.
        trunk = checkpoint_filter_fn(take_prefix(visual, "trunk."), clip_model.visual.trunk)
        visual = {**{k: v for k, v in visual.items() if not k.startswith("trunk.")},
                  **{f"trunk.{k}": v for k, v in trunk.items()}}
    else:
        resized = {"visual.positional_embedding": visual["positional_embedding"]} if "positional_embedding" in visual else {}
        resize_pos_embed(resized, clip_model)  # open_clip's helper, in place; a no-op at the same grid
        visual.update(take_prefix(resized, "visual."))
    return visual
