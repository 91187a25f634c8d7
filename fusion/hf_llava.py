"""Llava and LLaVA-NeXT (transformers' ``LlavaForConditionalGeneration`` and
``LlavaNextForConditionalGeneration``) set up for the fusion tower; re-exported by
:mod:`fusion.hf`.

**Llava**: :func:`llava_config` and :func:`llava_processor` (see :mod:`fusion.hf`).

**LLaVA-NeXT** (LLaVA-1.6's anyres tiling, see :mod:`fusion.anyres`)::

    import fusion.hf as fhf
    vision = fhf.FusionVisionConfig(tower="vsre")
    config = fhf.llava_next_config(vision, text_config, image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = LlavaNextForConditionalGeneration(config)
    processor = fhf.llava_next_processor(tok, model.config.vision_config, config.image_grid_pinpoints)

LLaVA-NeXT encodes the whole image resized to the tower's side ``S`` and the ``S x S``
tiles of the best ``image_grid_pinpoints`` resolution, lays each tile's tokens out as the
``g x g`` fused grid (``g = fusion.grid``: ``vision_config.image_size // patch_size``),
stitches the tiles, removes the rows or columns that only covered padding, and ends each
row with its learned ``image_newline``. The defaults: ``image_grid_pinpoints`` is
LLaVA-1.6's layout in tiles of ``S`` (:func:`fusion.anyres.default_pinpoints`; with ``S =
336`` exactly LLaVA-1.6's ``[[336, 672], [672, 336], [672, 672], [1008, 336], [336,
1008]]``); the image processor is transformers' own ``LlavaNextImageProcessor`` with the
tower's ``S`` and no normalisation (``pixel_values`` ``[B, tiles, 3, S, S]`` in [0, 1];
each encoder normalises its own input). A tower whose token count is not ``g * g``
(``fusion.levels``, ``fusion.reduce``, ``sequence_concat``), pinpoints that are not
multiples of ``S``, or a side ``S`` that no integer ``patch_size`` divides into ``g``
tokens are ``ValueError`` s naming the key.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .anyres import check_token_grid, default_pinpoints, parse_pinpoints
from .hf_vision import FusionImageProcessor, FusionVisionConfig


def llava_config(vision_config: FusionVisionConfig, text_config, image_token_id: int, **kwargs):
    """A ``transformers.LlavaConfig`` set up for the tower: ``vision_feature_layer=-1``,
    ``vision_feature_select_strategy="full"``, ``image_seq_length = num_patches``.

    ``kwargs`` go to ``LlavaConfig`` (e.g. ``projector_hidden_act``); the three settings
    above cannot be overridden, because any other value feeds Llava the wrong tokens.
    """
    from transformers import LlavaConfig

    fixed = _fixed_settings(vision_config, kwargs)
    return LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
                       **fixed, **kwargs)


def _fixed_settings(vision_config: FusionVisionConfig, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The settings the fused tokens need (popped from ``kwargs``; a different value is an error)."""
    if not isinstance(vision_config, FusionVisionConfig):
        raise TypeError(f"vision_config: expected a FusionVisionConfig, got {type(vision_config).__name__}")
    vision_config.resolve_geometry()
    fixed = {"vision_feature_layer": -1, "vision_feature_select_strategy": "full",
             "image_seq_length": vision_config.num_patches}
    for key, value in fixed.items():
        if key in kwargs and kwargs[key] != value:
            raise ValueError(f"{key}: the fused tokens need {key}={value!r} (got {kwargs[key]!r}); the tower's "
                             f"{vision_config.num_patches} tokens are hidden_states[-1] and have no CLS token "
                             f"to drop")
        kwargs.pop(key, None)
    return fixed


def llava_processor(tokenizer, vision_config: FusionVisionConfig, image_token: str = "<image>",
                    chat_template: Optional[str] = None, image_processor: Optional[FusionImageProcessor] = None):
    """A ``transformers.LlavaProcessor`` whose image-token count per image is the tower's
    ``num_patches`` (``image_token`` must be a token of ``tokenizer``)."""
    from transformers import LlavaProcessor

    vision_config.resolve_geometry()
    if image_processor is None:
        image_processor = FusionImageProcessor.from_vision_config(vision_config)
    if image_processor.image_size != vision_config.image_size:
        raise ValueError(f"image_processor.image_size: {image_processor.image_size} differs from the tower's "
                         f"image_size {vision_config.image_size}")
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision_config.patch_size,
                          vision_feature_select_strategy="full", image_token=image_token, chat_template=chat_template,
                          num_additional_image_tokens=vision_config.num_additional_image_tokens)


# ----------------------------------------------------------------------------- LLaVA-NeXT


def _check_next_geometry(vision_config: FusionVisionConfig) -> None:
    """LlavaNext's layout needs exactly ``g * g`` tokens and ``image_size // patch_size == g``."""
    if not isinstance(vision_config, FusionVisionConfig):
        raise TypeError(f"vision_config: expected a FusionVisionConfig, got {type(vision_config).__name__}")
    tower_config = vision_config.tower_config_object()
    check_token_grid(tower_config, "LlavaNext")
    vision_config.resolve_geometry()
    g, size, patch = tower_config.fusion.grid, vision_config.image_size, vision_config.patch_size
    if size // patch != g:
        raise ValueError(f"fusion.grid: LlavaNext reads the grid side as image_size // patch_size, but no integer "
                         f"patch_size turns the tower's image_size {size} into fusion.grid={g} (it gives "
                         f"{size // patch} with patch_size {patch}); choose processor.size as a multiple of {g}")


def llava_next_config(vision_config: FusionVisionConfig, text_config, image_token_id: int,
                      image_grid_pinpoints: Optional[List[List[int]]] = None, **kwargs):
    """A ``transformers.LlavaNextConfig`` for the tower: the settings :func:`llava_config` fixes,
    and ``image_grid_pinpoints`` (default: LLaVA-1.6's layout in tiles of the tower's
    ``image_size``; given ones must be multiples of it). ``kwargs`` go to ``LlavaNextConfig``."""
    from transformers import LlavaNextConfig

    _check_next_geometry(vision_config)
    tile = vision_config.image_size
    pinpoints = default_pinpoints(tile) if image_grid_pinpoints is None else parse_pinpoints(image_grid_pinpoints,
                                                                                             tile)
    fixed = _fixed_settings(vision_config, kwargs)
    return LlavaNextConfig(vision_config=vision_config, text_config=text_config, image_token_id=image_token_id,
                           image_grid_pinpoints=pinpoints, **fixed, **kwargs)


def llava_next_image_processor(vision_config: FusionVisionConfig,
                               image_grid_pinpoints: Optional[List[List[int]]] = None):
    """transformers' ``LlavaNextImageProcessor`` for the tower: tiles of its ``image_size``, pixels in
    [0, 1] (rescaled, not normalised), ``image_mean`` / ``image_std`` the tower's (reported only)."""
    from transformers import LlavaNextImageProcessor

    _check_next_geometry(vision_config)
    size = vision_config.image_size
    pinpoints = default_pinpoints(size) if image_grid_pinpoints is None else parse_pinpoints(image_grid_pinpoints,
                                                                                             size)
    return LlavaNextImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                   image_grid_pinpoints=pinpoints, do_normalize=False, do_rescale=True,
                                   image_mean=vision_config.image_mean, image_std=vision_config.image_std)


def llava_next_processor(tokenizer, vision_config: FusionVisionConfig,
                         image_grid_pinpoints: Optional[List[List[int]]] = None, image_token: str = "<image>",
                         chat_template: Optional[str] = None, image_processor=None):
    """A ``transformers.LlavaNextProcessor`` whose image-token count per image is what
    ``LlavaNextForConditionalGeneration`` makes of the tower's tiles. Pass the model config's
    ``image_grid_pinpoints`` (the default is the same as :func:`llava_next_config`'s)."""
    from transformers import LlavaNextProcessor

    if image_processor is None:
        image_processor = llava_next_image_processor(vision_config, image_grid_pinpoints)
    _check_next_geometry(vision_config)
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              patch_size=vision_config.patch_size, vision_feature_select_strategy="full",
                              image_token=image_token, chat_template=chat_template, num_additional_image_tokens=0)


__all__ = ["llava_config", "llava_next_config", "llava_next_image_processor", "llava_next_processor",
           "llava_processor"]
