"""Hugging Face transformers integration: the tower as a ``PreTrainedModel``.

``import fusion.hf`` registers three classes with transformers' Auto classes:

- :class:`FusionVisionConfig` (``model_type = "fusion_vision"``, ``AutoConfig``):
  ``FusionVisionConfig(tower="vsre", overrides=["fusion.grid=16"], weights="pretrained")``.
- :class:`FusionVisionModel` (``AutoModel``): wraps :class:`fusion.MultiEncoderTower`;
  ``forward(pixel_values, output_hidden_states=...)`` returns a
  ``BaseModelOutputWithPooling`` whose ``last_hidden_state`` is the tower's tokens
  ``[B, N, D]`` and whose ``hidden_states`` are the tower's (each encoder's grid
  flattened, then the fused tokens before the projector, then the tokens).
  ``output_hidden_states`` may be an index or a list of indices (what Llava passes to
  keep one layer): the tuple keeps its length, unselected entries are ``None``.
- :class:`FusionImageProcessor` (``AutoImageProcessor``): the tower's own
  :class:`fusion.ImageProcessor` as a transformers image processor (``pixel_values``
  in [0, 1], not normalised: each encoder normalises its own input).

So the tower is the ``vision_tower`` of ``transformers.LlavaForConditionalGeneration``::

    import fusion.hf as fhf
    vision = fhf.FusionVisionConfig(tower="vsre")
    config = fhf.llava_config(vision, text_config)          # LlavaConfig, see below
    model = LlavaForConditionalGeneration(config)
    processor = fhf.llava_processor(tokenizer, model.model.vision_tower.config)

**Llava settings.** Llava picks ``hidden_states[vision_feature_layer]`` and, with
``vision_feature_select_strategy="default"``, drops its first token (CLIP's CLS). The
fused tokens have no CLS token, so use ``vision_feature_layer=-1`` (the tokens) and
``vision_feature_select_strategy="full"``; :func:`llava_config` sets both, and
``image_seq_length``. Llava's processor counts ``(S // patch_size) ** 2 +
num_additional_image_tokens`` image tokens per image: :func:`llava_processor` sets
``patch_size`` and ``num_additional_image_tokens`` from the tower so the count is
exactly ``num_patches`` (also for ``sequence_concat``, whose token count is not a square).

**The projector.** Llava has its own ``multi_modal_projector`` (Linear-GELU-Linear, the
same as the tower's ``mlp2x_gelu``) from ``vision_config.hidden_size`` to the language
model's width, and that is the projector Llava checkpoints and recipes train. So by
default (``keep_projector=False``) the config sets the tower's ``projector.type`` to
``none``: the tower outputs the fused tokens (``hidden_size`` = the fused width) and
Llava projects them once. ``keep_projector=True`` keeps the tower's projector (two
projectors in a row; only useful to reuse a projector trained with fusion alone).

**Loading.** ``from_pretrained`` of a Llava model holding this tower needs ``import
fusion.hf`` first (so ``AutoConfig`` knows ``"fusion_vision"``). A checkpoint saved with
the tower holds every weight (frozen encoders included), so loading never downloads
encoder weights. Tower weights a checkpoint lacks (a language-model checkpoint under a
fusion Llava config, renamed keys, ``ignore_mismatched_sizes``) get what the config
says: the encoders' ``pretrained`` sources, else the seeded random initialisation (see
:mod:`fusion.hf_init`), never uninitialised memory.

**transformers' contracts.** ``output_attentions=True`` is a ``ValueError``: the tower's
encoders are separate networks whose attention maps have no common layout (read them
from ``tower.encoders[name].model`` with the upstream library). The encoders always run
their upstream attention, so the model declares no ``sdpa`` / ``flash_attention`` /
``flex_attention`` support: a host model built with ``attn_implementation=None`` gives
the tower ``"eager"`` (its own attention), and a language model that wants another one
names it per sub-config, ``attn_implementation={"text_config": "sdpa", "vision_config":
"eager"}``. ``_no_split_modules`` names the encoders' block classes, so
``device_map="auto"`` never cuts a block across devices.

LLaVA-NeXT (``LlavaNextForConditionalGeneration``) helpers are in :mod:`fusion.hf_llava`
(re-exported here).
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
