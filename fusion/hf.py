"""Hugging Face transformers integration: the tower as a ``PreTrainedModel``.

``import fusion.hf`` registers with transformers' Auto classes:

- :class:`FusionVisionConfig` (``model_type = "fusion_vision"``, ``AutoConfig``):
  ``FusionVisionConfig(tower="vsre", overrides=["fusion.grid=16"], weights="pretrained")``.
- :class:`FusionVisionModel` (``AutoModel``): ``forward(pixel_values, output_hidden_states=...)``
  -> ``BaseModelOutputWithPooling``: ``last_hidden_state`` the tokens ``[B, N, D]``,
  ``hidden_states`` the tower's (:class:`fusion.TowerOutput`). ``output_hidden_states`` may be
  an index or a list (Llava's ``vision_feature_layer``): unselected entries are ``None``.
- :class:`FusionImageProcessor` (``AutoImageProcessor``): :class:`fusion.ImageProcessor`
  (``pixel_values`` in [0, 1]; each encoder normalises its own input).

As Llava's vision tower (:func:`llava_config`, :func:`llava_processor`): the fused tokens
have no CLS, so ``vision_feature_layer=-1`` with ``vision_feature_select_strategy="full"``,
and the processor's token count is set to ``num_patches``. Llava's own
``multi_modal_projector`` projects, so the tower's projector is ``none`` unless
``keep_projector=True``. ``from_pretrained`` needs ``import fusion.hf`` first; weights a
checkpoint lacks come from the config's sources or the seeded init (:mod:`fusion.hf_init`).
``output_attentions=True`` is a ``ValueError`` (encoders have no common attention layout);
only ``"eager"`` attention is declared; ``_no_split_modules`` names the encoders' blocks.
LLaVA-NeXT helpers are in :mod:`fusion.hf_llava` (re-exported here).
"""
from __future__ import annotations

from .hf_llava import (llava_config, llava_next_config, llava_next_image_processor, llava_next_processor,
                       llava_processor)
from .hf_vision import (MODEL_TYPE, FusionImageProcessor, FusionVisionConfig, FusionVisionModel, register,
                        select_hidden_states)
from .stages import generate_stages  # noqa: F401  (fusion.hf.generate_stages: staged reasoning)

__all__ = ["FusionImageProcessor", "FusionVisionConfig", "FusionVisionModel", "MODEL_TYPE", "generate_stages",
           "llava_config", "llava_next_config", "llava_next_image_processor", "llava_next_processor",
           "llava_processor", "register", "select_hidden_states"]
