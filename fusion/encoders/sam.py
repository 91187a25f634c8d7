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

``pretrained`` (see :mod:`.sources`): the tag ``sa1b`` (the official checkpoints that
segment_anything's README links, for ``vit_b``, ``vit_l`` and ``vit_h``), downloaded into
PyTorch's hub cache (``$TORCH_HOME/hub/checkpoints``, as ``torch.hub`` does) with the MD5
its file name carries checked before it is put in place; a local file holding the full
SAM checkpoint that segment_anything's builder loads (``sam_vit_b_01ec64.pth``, ...); a
Hugging Face ``SamModel`` checkpoint (:mod:`.hf_maps`); or ``random``. The
``image_encoder.*`` keys are loaded strictly, the ``prompt_encoder.*`` /
``mask_decoder.*`` keys are ignored. A tag's checkpoint fixes the architecture it was
trained with: an ``arch`` or ``image_size`` that differs from it is an error naming both
values (SAM's position embeddings are not resampled).

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
import os
from dataclasses import dataclass
from functools import partial
from typing import Any, Dict, Mapping, Sequence

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, Sam
from torch import nn

from ..config import EncoderConfig
from .base import Encoder, check_pixels, param_dtype
from .registry import register_encoder
from .fetch import Remote
from .loading import locate, read_source
from .sam_attention import install as install_sam_attention
from .weights import (
    LoadedWeights,
    load_strict,
    resolve_pretrained,
    take_prefix,
)
from .adapter import check_keys, finalize, unknown_model

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


@dataclass(frozen=True)
class SamCheckpoint:
    """A published SAM checkpoint: its URL, its full MD5 (the file name carries the first six
    hex digits) and the image-encoder arguments it was trained with."""

    url: str
    md5: str
    arch: Mapping[str, Any]


def _official(size: str) -> Dict[str, Any]:
    """segment_anything's image-encoder arguments for ``size`` (what the official file was trained with)."""
    return {k: v for k, v in {**SAM_COMMON, **SAM_SIZES[size]}.items() if k != "norm_layer"}


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
# tag -> model size -> checkpoint. `sa1b`: the SA-1B-trained checkpoints of segment_anything's README.
SAM_TAGS: Dict[str, Dict[str, SamCheckpoint]] = {
    "sa1b": {
        "vit_b": SamCheckpoint(_SAM_URL + "sam_vit_b_01ec64.pth", "01ec64d29a2fca3f0661936605ae66f8", _official("vit_b")),
        "vit_l": SamCheckpoint(_SAM_URL + "sam_vit_l_0b3195.pth", "0b3195507c641ddb6910d2bb5adee89c", _official("vit_l")),
        "vit_h": SamCheckpoint(_SAM_URL + "sam_vit_h_4b8939.pth", "4b8939a88964f0f4ff5f5b2642c598a6", _official("vit_h")),
    },
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
    library = "segment_anything"

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True):
        super().__init__(cfg, load_weights)
        prefix = f"encoders.{cfg.name}"
        if cfg.model not in SAM_SIZES:
            raise unknown_model(f"{prefix}.model", cfg.model, sorted(SAM_SIZES), "segment_anything")
        if cfg.layer != -1:
            raise ValueError(f"{prefix}.layer: got {cfg.layer}; the SAM adapter returns the image encoder's neck "
                             f"output (what SAM's mask decoder reads), so only -1 is supported")
        kwargs = _encoder_kwargs(cfg, prefix)
        source = resolve_pretrained(cfg, self.pretrained_tags(cfg), load_weights, self.library)
        if source.kind == "tag":
            _check_tag_arch(cfg, kwargs, SAM_TAGS[source.value][cfg.model], prefix)
        path = locate(source, lambda: self.tag_checkpoint(cfg, source.value))  # fetched before building
        self.arch_kwargs = kwargs
        self.model = ImageEncoderViT(**kwargs)
        self.loaded_weights = LoadedWeights("random", cfg.pretrained)
        if path is not None:
            self._load(source, path)
        self.image_size = kwargs["img_size"]
        self.patch_size = kwargs["patch_size"]
        self.grid = (self.image_size // self.patch_size,) * 2
        self.dim = kwargs["out_chans"]
        self.depth = kwargs["depth"]
        install_sam_attention(self.model)
        finalize(self.model, cfg)

    def _load(self, source, path: str) -> None:
        """Read ``source`` (tag, file or Hugging Face) from ``path``: a SAM checkpoint's
        ``image_encoder.*`` keys (prompt encoder and mask decoder skipped), loaded strictly."""
        got = read_source(source, path, self.library, self, self.model)
        state = got.state
        if not got.converted:
            stray = [k for k in state if not k.startswith(("image_encoder.",) + _IGNORED_PREFIXES)]
            state = {**take_prefix(state, "image_encoder."), **{k: state[k] for k in stray}}
            what = (f"the full SAM checkpoint (keys image_encoder.*, prompt_encoder.*, mask_decoder.*) for "
                    f"{self.cfg.model!r} with arch {self.cfg.arch or {}}, as segment_anything's builder loads it")
        else:
            what = f"SAM's image encoder {self.cfg.model!r} with arch {self.cfg.arch or {}}"
        load_strict(self.model, state, source.key, got.path, what)
        self.loaded_weights = got.loaded

    @classmethod
    def pretrained_tags(cls, cfg: EncoderConfig) -> Sequence[str]:
        return [tag for tag, sizes in SAM_TAGS.items() if cfg.model in sizes]

    @classmethod
    def tag_checkpoint(cls, cfg: EncoderConfig, tag: str) -> Remote:
        """The official file of ``tag``, cached in PyTorch's hub cache (``$TORCH_HOME/hub/checkpoints``)."""
        import torch.hub

        ckpt = SAM_TAGS[tag][cfg.model]
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(ckpt.url))
        return Remote("PyTorch hub", f"SAM checkpoint {tag!r} of {cfg.model}",
                      f"the full SAM checkpoint of {cfg.model!r} (sam_{cfg.model}_*.pth)", url=ckpt.url,
                      cache_file=cache, md5=ckpt.md5)

    def upstream_name(self) -> str:
        return f"segment_anything:{self.cfg.model}"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised, padded pixels -> ``[B, S/16, S/16, out_chans]`` neck output."""
        check_pixels(pixels, self.image_size, self.name)
        features = self.model(pixels.to(param_dtype(self.model)))  # [B, out_chans, h, w]
        return features.permute(0, 2, 3, 1).contiguous()


def _check_tag_arch(cfg: EncoderConfig, kwargs: Mapping[str, Any], ckpt: SamCheckpoint, prefix: str) -> None:
    """The config must build the architecture the tag's checkpoint was trained with."""
    def norm(value: Any) -> Any:
        return tuple(value) if isinstance(value, (list, tuple)) else value

    wrong = [(name, kwargs.get(name), trained) for name, trained in ckpt.arch.items()
             if norm(kwargs.get(name)) != norm(trained)]
    if wrong:
        where = {"img_size": "image_size"}
        listed = "; ".join(f"{prefix}.{where.get(n, 'arch.' + n)}: config {ours!r} vs checkpoint {theirs!r}"
                           for n, ours, theirs in wrong)
        raise ValueError(f"{prefix}.pretrained: the SAM tag {cfg.pretrained!r} of {cfg.model} is a checkpoint of "
                         f"another architecture than the config builds: {listed}. Remove those settings, or use "
                         f"a checkpoint of this architecture (a local file or Hugging Face folder) or 'random'")


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
