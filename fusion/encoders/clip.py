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

``arch`` also takes ``timm_act_layer`` (fusion's own key, for a timm trunk such as
SigLIP's): the MLP activation of the trunk's blocks and pooling head (``gelu``,
``gelu_tanh``, ``quick_gelu``, ``silu``). open_clip builds timm trunks with the timm
model's default activation and has no argument for it, so the adapter sets the activation
modules of the trunk it owns; Hugging Face SigLIP checkpoints use ``gelu_tanh``
(``gelu_pytorch_tanh``), timm's ``vit_so400m_patch14_siglip_384`` plain ``gelu``.

``pretrained`` (see :mod:`.sources`): an open_clip tag for the model (``openai``,
``webli``, ...), whose file is fetched into open_clip's own cache (the Hugging Face hub
cache, or ``~/.cache/clip``) and loaded like a local file; a local file holding the full
open_clip state dict (``visual.*`` is loaded strictly, the text tower's keys are ignored);
a Hugging Face CLIP / SigLIP checkpoint (:mod:`.hf_maps`); or ``random``. The
architecture is the config's alone: a tag trained with QuickGELU (OpenAI's) needs
``arch: {quick_gelu: true}`` in the config, and naming it without is an error. Position
embeddings are resampled by the upstream helpers when ``image_size`` differs from the
checkpoint's.

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
import os
from dataclasses import fields, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import open_clip
import timm
import torch
from open_clip.constants import INCEPTION_MEAN, INCEPTION_STD, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, resize_pos_embed
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn

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
    take_prefix,
)
from .adapter import check_keys, create_upstream, finalize, unknown_model

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
# fusion's own arch key for timm trunks (see the module docstring) and the activations it takes.
TIMM_ACT_KEY = "timm_act_layer"
TIMM_ACTS = ("gelu", "gelu_tanh", "quick_gelu", "silu")
# open_clip's default hub file name, and its safetensors twin (open_clip.pretrained prefers the latter).
_OPEN_CLIP_HF_FILE = "open_clip_pytorch_model.bin"
_OPEN_CLIP_HF_SAFE = "open_clip_model.safetensors"


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
    library = "open_clip"

    def __init__(self, cfg: EncoderConfig, load_weights: bool = True):
        super().__init__(cfg, load_weights)
        prefix = f"encoders.{cfg.name}"
        base = open_clip.get_model_config(cfg.model) if cfg.model in open_clip.list_models() else None
        if base is None:
            raise unknown_model(f"{prefix}.model", cfg.model, open_clip.list_models(), "open_clip")
        overrides, act_layer = _arch_overrides(cfg.arch, base, f"{prefix}.arch")
        source = resolve_pretrained(cfg, self.pretrained_tags(cfg), load_weights, self.library)
        tag_cfg = open_clip.get_pretrained_cfg(cfg.model, source.value) if source.kind == "tag" else {}
        _check_tag_activation(cfg, base, overrides, tag_cfg, prefix)
        self.pretrained_tag = source.value if source.kind == "tag" else None
        path = locate(source, lambda: self.tag_checkpoint(cfg, source.value))  # fetched before building

        clip_model = self._create(cfg, overrides, prefix)
        self.model = clip_model.visual  # the text tower and logit scale go with clip_model
        if act_layer is not None:
            _set_trunk_act(self.model, act_layer, cfg, prefix)
        self.image_size, self.patch_size, self.grid, self.dim, self.depth = _geometry(self.model, cfg, prefix)
        self.loaded_weights = LoadedWeights("random", cfg.pretrained)
        if path is not None:
            self._load(source, path, clip_model)
        self.block = block_index(cfg.layer, self.depth, f"{prefix}.layer")
        self.pruned = prune_unused(self.model, lambda: _prune(self.model, self.block))
        self.mean = tuple(float(v) for v in tag_cfg.get("mean", self.default_mean))
        self.std = tuple(float(v) for v in tag_cfg.get("std", self.default_std))
        interpolation = tag_cfg.get("interpolation", "bicubic")
        self.interpolation = interpolation if interpolation in _INTERPOLATIONS else "bicubic"
        finalize(self.model, cfg)

    @staticmethod
    def _create(cfg: EncoderConfig, overrides: Dict[str, Any], prefix: str):
        """Build the whole open_clip model from the config alone (random init; never downloads)."""
        kwargs = dict(overrides)
        if cfg.image_size is not None:
            # force_image_size alone is lost when arch replaces vision_cfg; set both.
            kwargs["vision_cfg"] = {**kwargs.get("vision_cfg", open_clip.get_model_config(cfg.model)["vision_cfg"]),
                                    "image_size": cfg.image_size}
            kwargs["force_image_size"] = cfg.image_size
        # open_clip moves the model to `device` (default "cpu"): pass the current default device,
        # so that a build under `torch.device("meta")` (fusion.geometry) stays on meta
        kwargs["device"] = torch.empty(()).device
        return create_upstream(lambda: open_clip.create_model(cfg.model, pretrained=None, **kwargs),
                               cfg, prefix, "open_clip")

    def _load(self, source, path: str, clip_model) -> None:
        """Read ``source`` (tag, file or Hugging Face) from ``path``, fit it to the vision tower, load strictly."""
        got = read_source(source, path, self.library, self, self.model)
        visual = got.state if got.converted else _visual_state(got.state, source.key, got.path)
        state, notes = _fit_checkpoint(visual, clip_model)
        what = (f"the vision tower of {self.cfg.model!r} with arch {self.cfg.arch or {}}" if got.converted else
                f"the full open_clip state dict of {self.cfg.model!r} with arch {self.cfg.arch or {}}")
        load_strict(self.model, state, source.key, got.path, what)
        self.loaded_weights = replace(got.loaded, notes=got.loaded.notes + notes)

    @classmethod
    def pretrained_tags(cls, cfg: EncoderConfig) -> Sequence[str]:
        return open_clip.list_pretrained_tags_by_model(cfg.model) if cfg.model in open_clip.list_models() else ()

    @classmethod
    def tag_checkpoint(cls, cfg: EncoderConfig, tag: str) -> Remote:
        """The file of open_clip tag ``tag``: on the Hugging Face hub (preferred, as open_clip
        does; ``.safetensors`` first) or at a URL cached in ``~/.cache/clip``."""
        pc = open_clip.get_pretrained_cfg(cfg.model, tag)
        what = f"open_clip tag {tag!r} of {cfg.model}"
        file_format = f"the full open_clip state dict of {cfg.model!r}"
        if pc.get("hf_hub") and open_clip.pretrained.has_hf_hub():
            repo, filename = os.path.split(pc["hf_hub"])  # 'org/name/' names the default file
            filename = filename or _OPEN_CLIP_HF_FILE
            safe = (_OPEN_CLIP_HF_SAFE,) if filename == _OPEN_CLIP_HF_FILE else (
                (os.path.splitext(filename)[0] + ".safetensors",) if filename.endswith((".bin", ".pth")) else ())
            return Remote("open_clip", what, file_format, hf_repo=repo, hf_files=(*safe, filename))
        url = pc.get("url", "")
        if not url:
            raise ValueError(f"encoders.{cfg.name}.pretrained: open_clip gives no download location for {what}")
        cache = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return Remote("open_clip", what, file_format, url=url, cache_file=cache,
                      download=lambda: open_clip.pretrained.download_pretrained_from_url(url))

    def upstream_name(self) -> str:
        return f"open_clip:{self.cfg.model}"

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised pixels -> ``[B, h, w, C]`` output of block ``self.block``."""
        return self.block_grid(pixels, lambda x, indices: self.model.forward_intermediates(
            x, indices=indices, stop_early=True, normalize_intermediates=False, intermediates_only=True,
            output_fmt="NLC")["image_intermediates"][0])


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


def _arch_overrides(arch: Mapping[str, Any], base: Mapping[str, Any], key: str
                    ) -> Tuple[Dict[str, Any], Optional[str]]:
    """Validate ``arch``; merge its nested configs into the named model config's. Returns the
    open_clip overrides and fusion's ``timm_act_layer`` (or None)."""
    vision_hint = ("Vision-tower settings go under vision_cfg, e.g. {vision_cfg: {layers: 2}}; "
                   "the input size is encoders.<name>.image_size")
    check_keys(arch, _ARCH_KEYS | {TIMM_ACT_KEY}, key, vision_hint)
    out: Dict[str, Any] = {}
    for name, value in arch.items():
        if name == TIMM_ACT_KEY:
            if value not in TIMM_ACTS:
                raise ValueError(f"{key}.{name}: got {value!r}; accepted values are {list(TIMM_ACTS)}")
        elif name in _NESTED_KEYS:
            if not isinstance(value, Mapping):
                raise ValueError(f"{key}.{name}: expected a mapping of open_clip {name} fields, got {value!r}")
            hint = "the input size is encoders.<name>.image_size" if name == "vision_cfg" else ""
            check_keys(value, _NESTED_KEYS[name], f"{key}.{name}", hint)
            out[name] = {**base.get(name, {}), **value}
        else:
            out[name] = value
    return out, arch.get(TIMM_ACT_KEY)


def _check_tag_activation(cfg: EncoderConfig, base: Mapping[str, Any], overrides: Mapping[str, Any],
                          tag_cfg: Mapping[str, Any], prefix: str) -> None:
    """A tag's config names the activation its weights were trained with (OpenAI's QuickGELU);
    the config must build the same one: the tag does not change the architecture."""
    if not tag_cfg:
        return
    built = bool(overrides.get("quick_gelu", base.get("quick_gelu", False)))
    trained = bool(tag_cfg.get("quick_gelu", False))
    if built != trained:
        raise ValueError(f"{prefix}.arch.quick_gelu: the open_clip tag {cfg.pretrained!r} of {cfg.model!r} was "
                         f"trained with quick_gelu={trained}, but the config builds quick_gelu={built}; the "
                         f"architecture is the config's (any weight source only brings tensors), so set "
                         f"{prefix}.arch.quick_gelu: {str(trained).lower()}")


def _set_trunk_act(visual: torch.nn.Module, name: str, cfg: EncoderConfig, prefix: str) -> None:
    """Give every MLP of a timm trunk (blocks and pooling head) the activation ``name``."""
    if not isinstance(visual, TimmModel):
        raise ValueError(f"{prefix}.arch.{TIMM_ACT_KEY}: {cfg.model!r} has an open_clip {type(visual).__name__}, "
                         f"not a timm trunk; its activation is {prefix}.arch.quick_gelu")
    act = timm.layers.get_act_layer(name)
    for module in visual.trunk.modules():
        if isinstance(module, timm.layers.Mlp):
            module.act = act()


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


def _visual_state(state: Dict[str, torch.Tensor], key: str, path: str) -> Dict[str, torch.Tensor]:
    """A full open_clip state dict's vision tower (``visual.*``, prefix removed)."""
    visual = take_prefix(state, "visual.")
    if not visual:
        raise ValueError(f"{key}: {path!r} has no 'visual.*' keys; it should hold the full open_clip state dict "
                         f"(model.state_dict() of open_clip.create_model(...)), not the vision tower alone")
    return visual


def _fit_checkpoint(visual: Dict[str, torch.Tensor], clip_model: torch.nn.Module
                    ) -> Tuple[Dict[str, torch.Tensor], Tuple[str, ...]]:
    """The vision tower's state with position embeddings resampled to its grid (and a note if so)."""
    if isinstance(clip_model.visual, TimmModel):
        # timm's own checkpoint filter resamples pos_embed (and patch_embed) to the trunk's size.
        before = visual.get("trunk.pos_embed")
        trunk = checkpoint_filter_fn(take_prefix(visual, "trunk."), clip_model.visual.trunk)
        visual = {**{k: v for k, v in visual.items() if not k.startswith("trunk.")},
                  **{f"trunk.{k}": v for k, v in trunk.items()}}
        after = visual.get("trunk.pos_embed")
        tokens = (None if before is None or after is None else (before.shape[1], after.shape[1]))
    else:
        before = visual.get("positional_embedding")
        resized = {"visual.positional_embedding": before} if before is not None else {}
        resize_pos_embed(resized, clip_model)  # open_clip's helper, in place; a no-op at the same grid
        visual.update(take_prefix(resized, "visual."))
        after = visual.get("positional_embedding")
        tokens = (None if before is None or after is None else (before.shape[0], after.shape[0]))
    if tokens and tokens[0] != tokens[1]:
        return visual, (f"position embeddings resampled from {tokens[0]} to {tokens[1]} tokens",)
    return visual, ()
