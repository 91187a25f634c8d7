"""SAM: segment_anything's own ``ImageEncoderViT``, its neck output as the token grid.

``model`` is one of segment_anything's sizes (``vit_b``, ``vit_l``, ``vit_h``: the keys of
``segment_anything.sam_model_registry``), built with the same constructor arguments as
segment_anything's builder. ``arch`` overrides any ``ImageEncoderViT`` argument
(``img_size``, ``embed_dim``, ``depth``, ``num_heads``, ``global_attn_indexes``,
``window_size``, ``out_chans``, ...); ``encoders.<name>.image_size`` is the same as
``arch.img_size``. The image side must be a multiple of the patch size (16).

``layer``: only the neck output is available (``-1``, the default): SAM's neck
(1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) is what SAM's own mask decoder reads,
so intermediate blocks are not offered; any other value is a ``ValueError``.

``pretrained``: a local file holding the full SAM checkpoint that segment_anything's
builder loads (``sam_vit_b_01ec64.pth``, ...): the ``image_encoder.*`` keys are loaded
strictly, the ``prompt_encoder.*`` / ``mask_decoder.*`` keys are ignored.
segment_anything has no download cache, so there are no tags.

``forward``: ``[B, 3, S, S]`` normalised pixels -> ``[B, S/16, S/16, out_chans]`` (256).
Every block's attention runs :class:`fusion.encoders.sam_attention.RelPosSdpaAttention`
(swapped in on this model's instances, same parameters and state-dict keys): the same
function as segment_anything's ``Attention`` without its ``[B*heads, L, L]`` score and bias
matrices. Every block and the neck are used, so nothing is pruned.
SAM normalises with ``pixel_mean/255`` and ``pixel_std/255`` and pads the bottom/right
of a longest-side-resized image (``resize = "longest_side_pad"``).
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Dict

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, Sam
from torch import nn

from ..config import EncoderConfig
from .base import Encoder
from .registry import register_encoder
from .sam_attention import install as install_sam_attention
from .weights import (
    check_keys,
    check_pixels,
    finalize,
    load_strict,
    param_dtype,
    read_checkpoint,
    resolve_pretrained,
    take_prefix,
    unknown_model,
)

# segment_anything.build_sam: build_sam_vit_{b,l,h} -> _build_sam(...)
SAM_SIZES: Dict[str, Dict[str, Any]] = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}
# The image-encoder arguments _build_sam passes for every size.
SAM_COMMON: Dict[str, Any] = dict(
    img_size=1024, patch_size=16, mlp_ratio=4, qkv_bias=True, use_rel_pos=True, window_size=14,
    out_chans=256, norm_layer=partial(nn.LayerNorm, eps=1e-6),
)
# The official checkpoint file of each size (for error messages).
SAM_CHECKPOINTS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}
# The full SAM checkpoint's other parts, which this adapter does not use.
_IGNORED_PREFIXES = ("prompt_encoder.", "mask_decoder.")
_ARCH_KEYS = set(inspect.signature(ImageEncoderViT).parameters) - {"self", "in_chans"}
_SAM_DEFAULTS = inspect.signature(Sam).parameters
PIXEL_MEAN = tuple(v / 255.0 for v in _SAM_DEFAULTS["pixel_mean"].default)
PIXEL_STD = tuple(v / 255.0 for v in _SAM_DEFAULTS["pixel_std"].default)
assert set(SAM_SIZES) <= set(sam_model_registry), "SAM_SIZES names must be segment_anything's"


@register_encoder("sam")
class SamEncoder(Encoder):
    """SAM's image encoder (neck output).

    Attributes (besides the :class:`Encoder` contract): ``model`` (segment_anything's
    ``ImageEncoderViT``), ``depth`` (number of ViT blocks).
    """

    resize = "longest_side_pad"
    interpolation = "bilinear"
    mean = PIXEL_MEAN
    std = PIXEL_STD

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True):
        super().__init__(cfg, load_weights)
        prefix = f"encoders.{cfg.name}"
        if cfg.model not in SAM_SIZES:
            raise unknown_model(f"{prefix}.model", cfg.model, sorted(SAM_SIZES), "segment_anything")
        if cfg.layer != -1:
            raise ValueError(f"{prefix}.layer: got {cfg.layer}; the SAM adapter returns the image encoder's neck "
                             f"output (what SAM's mask decoder reads), so only -1 is supported")
        kwargs = _encoder_kwargs(cfg, prefix)
        source = resolve_pretrained(
            cfg, (), load_weights, "segment_anything",
            tag_help=(f"segment_anything has no download cache: download {SAM_CHECKPOINTS[cfg.model]} and set "
                      f"{prefix}.pretrained to the local file"),
        )
        self.model = ImageEncoderViT(**kwargs)
        if source.load_file:
            state = read_checkpoint(source.value, source.key)
            encoder_state = take_prefix(state, "image_encoder.")
            stray = [k for k in state if not k.startswith(("image_encoder.",) + _IGNORED_PREFIXES)]
            load_strict(self.model, {**encoder_state, **{k: state[k] for k in stray}}, source.key, source.value,
                        f"the full SAM checkpoint (keys image_encoder.*, prompt_encoder.*, mask_decoder.*) "
                        f"for {cfg.model!r} with arch {cfg.arch or {}}, as segment_anything's builder loads it")
        self.image_size = kwargs["img_size"]
        self.patch_size = kwargs["patch_size"]
        self.grid = (self.image_size // self.patch_size,) * 2
        self.dim = kwargs["out_chans"]
        self.depth = kwargs["depth"]
        install_sam_attention(self.model)
        finalize(self.model, cfg)

    def upstream_name(self) -> str:
        return f"segment_anything:{self.cfg.model}"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised, padded pixels -> ``[B, S/16, S/16, out_chans]`` neck output."""
        check_pixels(pixels, self.image_size, self.name)
        features = self.model(pixels.to(param_dtype(self.model)))  # [B, out_chans, h, w]
        return features.permute(0, 2, 3, 1).contiguous()


def _encoder_kwargs(cfg: EncoderConfig, prefix: str) -> Dict[str, Any]:
    """``ImageEncoderViT`` arguments: the size's, then ``arch``, then ``image_size``; validated."""
    check_keys(cfg.arch, _ARCH_KEYS, f"{prefix}.arch")
    kwargs = {**SAM_COMMON, **SAM_SIZES[cfg.model], **cfg.arch}
    if cfg.image_size is not None:
        if "img_size" in cfg.arch and cfg.arch["img_size"] != cfg.image_size:
            raise ValueError(f"{prefix}.image_size: got {cfg.image_size} but {prefix}.arch.img_size is "
                             f"{cfg.arch['img_size']}; set one of them")
        kwargs["img_size"] = cfg.image_size
    for name in ("img_size", "patch_size", "depth", "out_chans"):
        value = kwargs[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            where = "image_size" if name == "img_size" and cfg.image_size is not None else f"arch.{name}"
            raise ValueError(f"{prefix}.{where}: expected a positive integer, got {value!r}")
    if kwargs["img_size"] % kwargs["patch_size"]:
        lower = kwargs["img_size"] // kwargs["patch_size"] * kwargs["patch_size"]
        where = "image_size" if cfg.image_size is not None or "img_size" not in cfg.arch else "arch.img_size"
        raise ValueError(f"{prefix}.{where}: got {kwargs['img_size']}; SAM takes square inputs whose side is a "
                         f"multiple of the patch size {kwargs['patch_size']} (e.g. {lower or kwargs['patch_size']})")
    indexes = kwargs["global_attn_indexes"]
    if not isinstance(indexes, (list, tuple)) or not all(isinstance(i, int) and 0 <= i < kwargs["depth"]
                                                         for i in indexes):
        raise ValueError(f"{prefix}.arch.global_attn_indexes: got {indexes!r}; with depth {kwargs['depth']} the "
                         f"global-attention block indexes must lie in 0..{kwargs['depth'] - 1} "
                         f"(SAM's {cfg.model} uses {list(SAM_SIZES[cfg.model]['global_attn_indexes'])} at depth "
                         f"{SAM_SIZES[cfg.model]['depth']}); set arch.global_attn_indexes when changing depth")
    kwargs["global_attn_indexes"] = tuple(indexes)
    return kwargs
