"""The tower as a transformers model: :class:`FusionVisionConfig`, :class:`FusionVisionModel`
and :class:`FusionImageProcessor`, registered with transformers' Auto classes on import.

:mod:`fusion.hf` is the public face of the integration (it re-exports these, the Llava
helpers of :mod:`fusion.hf_llava` and staged reasoning); its docstring says how to use them.
"""
from __future__ import annotations

import copy
import inspect
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import yaml

try:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, PretrainedConfig, PreTrainedModel
    from transformers.feature_extraction_utils import BatchFeature
    from transformers.image_processing_utils import BaseImageProcessor
    from transformers.modeling_outputs import BaseModelOutputWithPooling
except ImportError as err:  # pragma: no cover - exercised only without transformers
    raise ImportError("fusion.hf needs transformers>=5.4: pip install 'fusion-tower[hf]'") from err

from .config import TowerConfig, load_config, parse_config
from .distributed import encoder_blocks
from .hf_init import fill_unloaded
from .geometry import TowerGeometry, config_geometry, geometry_of
from .encoder_inputs import EncoderInputs
from .letterbox import choose_pad_colors
from .preprocess import ImageProcessor
from .tower import WEIGHT_MODES, MultiEncoderTower

MODEL_TYPE = "fusion_vision"
_GEOMETRY = ("hidden_size", "image_size", "patch_size", "num_patches", "image_mean", "image_std")


def _resolve_tower_config(tower: Any, overrides: Any, keep_projector: bool) -> str:
    """The full tower config for ``tower`` + ``overrides`` (projector dropped unless kept), as YAML."""
    config = load_config(tower, overrides)
    if not keep_projector:
        config = load_config(config, {"projector.type": "none", "projector.out_dim": None})
    return config.to_yaml()


def _parse_tower_yaml(text: Any) -> TowerConfig:
    if isinstance(text, dict):
        return parse_config(copy.deepcopy(text))
    if not isinstance(text, str):
        raise TypeError(f"tower_config: expected the tower config as YAML text or a dict, got {type(text).__name__}")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"tower_config: not valid YAML: {err}") from err
    return parse_config(raw)


class FusionVisionConfig(PretrainedConfig):
    """Configuration of :class:`FusionVisionModel`.

    - ``tower``: a preset name, a ``.yaml``/``.json`` path or a config dict (see
      :func:`fusion.load_config`); ``overrides``: dotted ``key=value`` strings or a dict.
    - ``weights``: ``"pretrained"`` (each encoder's ``pretrained`` source) or ``"random"``
      (seeded by ``seed``, no downloads). A model loaded with ``from_pretrained`` takes
      every weight the checkpoint holds from it; what it lacks comes from this.
    - ``keep_projector``: keep the tower's own projector (default False: the host
      model's projector, e.g. Llava's ``multi_modal_projector``, does the projection).
    - ``tower_config``: the resolved tower config as YAML text (filled in from the above
      at construction, saved in ``config.json`` so a saved model depends neither on the
      preset files nor on the config path). YAML text, not a JSON object, because
      transformers writes ``config.json`` with sorted keys and the order of the encoders
      is the channel order of the fused tokens.
    - ``hidden_size``, ``image_size`` (the processor's square side ``S``), ``patch_size``
      (``S // grid``, what Llava's processor divides by) and ``num_patches`` (tokens per
      image), ``image_mean``/``image_std`` (what the tower's image processor reports):
      the tower's geometry. They are filled in when the model is built, or by
      :meth:`resolve_geometry`, and saved with the config.
    """

    model_type = MODEL_TYPE

    tower: Union[str, dict] = "vsre"
    overrides: Union[list, dict, None] = None
    weights: str = "pretrained"
    seed: int = 0
    keep_projector: bool = False
    tower_config: Union[str, dict, None] = None
    hidden_size: Optional[int] = None
    image_size: Optional[int] = None
    patch_size: Optional[int] = None
    num_patches: Optional[int] = None
    image_mean: Optional[list] = None
    image_std: Optional[list] = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.weights not in WEIGHT_MODES:
            raise ValueError(f"weights: got {self.weights!r}; accepted values are {list(WEIGHT_MODES)}")
        if isinstance(self.tower, TowerConfig):
            self.tower = self.tower.to_dict()
        elif isinstance(self.tower, os.PathLike):
            self.tower = os.fspath(self.tower)  # config.json holds strings
        if self.tower_config is None:
            self.tower_config = _resolve_tower_config(self.tower, self.overrides, self.keep_projector)
        else:  # a saved config: validate what was saved, as saved
            self.tower_config = _parse_tower_yaml(self.tower_config).to_yaml()

    def tower_config_object(self) -> TowerConfig:
        """``tower_config`` as a validated :class:`fusion.TowerConfig`."""
        return _parse_tower_yaml(self.tower_config)

    def set_geometry(self, tower: Union[MultiEncoderTower, TowerGeometry]) -> None:
        """Fill ``hidden_size``, ``image_size``, ``patch_size``, ``num_patches`` from a built tower
        or its :class:`fusion.geometry.TowerGeometry`."""
        geo = tower if isinstance(tower, TowerGeometry) else geometry_of(tower)
        self.hidden_size = geo.hidden_size
        self.image_size = geo.image_size
        self.patch_size = max(1, geo.image_size // geo.num_patches_per_side)
        self.num_patches = geo.num_patches
        self.image_mean = list(geo.image_mean)
        self.image_std = list(geo.image_std)

    def resolve_geometry(self) -> "FusionVisionConfig":
        """Fill the geometry fields if unset, from :func:`fusion.geometry.tower_geometry` (a build
        on the meta device: no weights are made, read or downloaded).

        Building the model fills them for free; this is for code that needs them
        before (a processor made ahead of the model). Returns ``self``.
        """
        if any(getattr(self, k) is None for k in _GEOMETRY):
            self.set_geometry(config_geometry(self.tower_config_object()))
        return self

    @property
    def num_additional_image_tokens(self) -> int:
        """Tokens beyond ``(image_size // patch_size) ** 2``: what Llava's processor must add
        to count ``num_patches`` image tokens (0 unless the token count is not that square)."""
        self.resolve_geometry()
        return self.num_patches - (self.image_size // self.patch_size) ** 2


def _building_under_meta() -> bool:
    """True inside ``torch.device("meta")`` (transformers' ``from_pretrained`` builds models there)."""
    return torch.empty(()).device.type == "meta"


class FusionVisionModel(PreTrainedModel):
    """The multi-encoder tower as a transformers model (see the module docstring).

    ``self.tower`` is the :class:`fusion.MultiEncoderTower`. Frozen encoders stay frozen
    (they run without autograd whatever ``requires_grad`` says); the merge norms and the
    projector (if kept) train.
    """

    config_class = FusionVisionConfig
    config: FusionVisionConfig
    base_model_prefix = "fusion_vision"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False
    # The encoders always run their upstream attention: no _supports_sdpa / _supports_flash_attn /
    # _supports_flex_attn / _supports_attention_backend, so only "eager" (the tower's own) is declared.

    def __init__(self, config: FusionVisionConfig):
        super().__init__(config)
        self._fill_unloaded = _building_under_meta()  # from_pretrained: fill what the checkpoint lacks
        self.tower = self._build_tower(config)
        config.set_geometry(self.tower)
        # device_map="auto" must not cut an encoder block across devices
        self._no_split_modules = sorted({type(block).__name__ for enc in self.tower.encoders.values()
                                         for block in encoder_blocks(enc)})
        self.post_init()

    @staticmethod
    def _build_tower(config: FusionVisionConfig) -> MultiEncoderTower:
        tower_config = config.tower_config_object()
        if not _building_under_meta():
            return MultiEncoderTower(tower_config, weights=config.weights, seed=config.seed)
        # from_pretrained: build on the CPU (the upstream builders cannot build on "meta")
        # without initialising or downloading anything; transformers then loads the
        # checkpoint into it, and _initialize_weights fills what the checkpoint lacked.
        from transformers.initialization import no_init_weights

        with torch.device("cpu"), no_init_weights():
            tower = MultiEncoderTower(tower_config, weights="random", seed=config.seed)
        tower.set_weights_mode(config.weights)  # what the loaded weights are (tower.save_pretrained records it)
        return tower

    def get_correct_attn_implementation(self, requested_attention: Optional[str], is_init_check: bool = False) -> str:
        """``"eager"``: the encoders run their own (upstream) attention; anything else is refused."""
        if requested_attention not in (None, "eager"):
            raise ValueError(f"attn_implementation: FusionVisionModel runs each encoder's own (upstream) attention "
                             f"and cannot switch to {requested_attention!r}; accepted: 'eager'. For a language model "
                             f"beside it, name it per sub-config: attn_implementation={{'text_config': "
                             f"{requested_attention!r}, 'vision_config': 'eager'}}")
        return "eager"

    def _init_weights(self, module):
        """Nothing: the tower initialises its own weights (upstream init or pretrained files)."""

    @torch.no_grad()
    def _initialize_weights(self, module, is_custom_code: bool = False):
        """transformers calls this on every submodule after building the model and after
        loading a checkpoint. A built tower's weights are its own (never re-initialised);
        after a load, every tensor the checkpoint did not hold gets its config value
        (:func:`fusion.hf_init.fill_unloaded`), the normalisation constants are re-created,
        and frozen encoders, whose parameters the loader re-creates with
        ``requires_grad=True``, are frozen again."""
        if isinstance(module, EncoderInputs):
            module.refresh_stats()
        elif isinstance(module, MultiEncoderTower):
            if self._fill_unloaded:
                fill_unloaded(module, self.config.weights, self.config.seed)
                self._fill_unloaded = False
            for enc in module.encoders.values():
                if enc.frozen:
                    enc.requires_grad_(False)

    # Llava reads ``vision_tower.patch_size`` when it splits features by ``image_sizes``.
    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.tower.num_patches

    def get_image_processor(self) -> "FusionImageProcessor":
        return FusionImageProcessor.from_tower(self.tower)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: Any = None,
                output_attentions: Optional[bool] = None, return_dict: Optional[bool] = None,
                **kwargs) -> Union[BaseModelOutputWithPooling, Tuple]:
        """``pixel_values [B, 3, S, S]`` in [0, 1] -> ``last_hidden_state [B, N, D]``.

        ``output_hidden_states``: ``True`` returns every hidden state; an index or a list
        of indices (Llava passes the layer it will read) keeps only those (the others are
        ``None``, so the indices still select them). ``output_attentions=True`` is a
        ``ValueError`` (see the module docstring). ``pooler_output`` is the token mean
        ``[B, D]``. Other keyword arguments from host models are ignored.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        if output_attentions:
            raise ValueError("output_attentions: a multi-encoder tower returns no attention maps (its encoders are "
                             "separate networks with no common layout); pass output_attentions=False, or read an "
                             "encoder's attention from tower.encoders[name].model with its upstream library")
        if return_dict is None:
            return_dict = self.config.return_dict
        out = self.tower(pixel_values, return_dict=True)
        hidden = select_hidden_states(out.hidden_states, output_hidden_states)
        pooled = out.tokens.mean(dim=1)
        if not return_dict:
            return tuple(v for v in (out.tokens, pooled, hidden) if v is not None)
        return BaseModelOutputWithPooling(last_hidden_state=out.tokens, pooler_output=pooled, hidden_states=hidden)


def select_hidden_states(hidden: Tuple[torch.Tensor, ...], selection: Any) -> Optional[Tuple]:
    """``hidden`` as ``output_hidden_states`` asks: None/False -> None, True -> all, an index or a
    list of indices -> a tuple of the same length holding only those (``None`` elsewhere)."""
    if selection is None or selection is False:
        return None
    if selection is True:
        return hidden
    indices = [selection] if isinstance(selection, int) else selection
    n = len(hidden)
    if not isinstance(indices, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in indices):
        raise TypeError(f"output_hidden_states: expected a bool, an index or a list of indices, got {selection!r}")
    bad = [i for i in indices if not -n <= i < n]
    if bad:
        raise ValueError(f"output_hidden_states: {bad} out of range; the tower has {n} hidden states (each "
                         f"encoder's grid, the fused tokens, the tokens): indices -{n}..{n - 1}")
    keep = {i % n for i in indices}
    return tuple(h if i in keep else None for i, h in enumerate(hidden))


class FusionImageProcessor(BaseImageProcessor):
    """:class:`fusion.ImageProcessor` as a transformers image processor.

    ``processor(images, return_tensors="pt")["pixel_values"]`` is ``[B, 3, S, S]``
    float32 in [0, 1], identical to ``tower.image_processor(images)``. Options:
    ``image_size`` (``S``), ``mode`` (``pad`` / ``squash`` / ``crop``), ``image_mean`` /
    ``image_std`` (reported for code that reads them, e.g. LLaVA's pad colour; not
    applied), ``alpha``, ``pad_color`` (the letterbox's 8-bit colour: the tower's frame
    colour from ``processor.pad_color`` / ``mean_from``; default ``int(255 * image_mean)``).
    """

    model_input_names = ["pixel_values"]

    def __init__(self, image_size: int = 336, mode: str = "pad", image_mean: Optional[List[float]] = None,
                 image_std: Optional[List[float]] = None, alpha: str = "drop",
                 pad_color: Optional[List[int]] = None, **kwargs):
        kwargs.pop("image_processor_type", None)
        for key in ("size", "crop_size", "do_normalize"):  # derived, written by to_dict
            kwargs.pop(key, None)
        super().__init__(**kwargs)
        given = (("image_mean", image_mean), ("image_std", image_std), ("pad_color", pad_color))
        proc = ImageProcessor(image_size, mode=mode, alpha=alpha, **{k: v for k, v in given if v})
        self._proc = proc
        self.image_size = proc.image_size
        self.mode = proc.mode
        self.alpha = proc.alpha
        self.image_mean = list(proc.image_mean)
        self.image_std = list(proc.image_std)
        self.pad_color = list(proc.pad_color)
        self.size = {"shortest_edge": proc.image_size}
        self.crop_size = {"height": proc.image_size, "width": proc.image_size}
        self.do_normalize = False

    @classmethod
    def from_tower(cls, tower: MultiEncoderTower) -> "FusionImageProcessor":
        d = tower.image_processor.to_dict()
        return cls(image_size=d["size"], mode=d["mode"], image_mean=d["image_mean"], image_std=d["image_std"],
                   alpha=d["alpha"], pad_color=d["pad_color"])

    @classmethod
    def from_vision_config(cls, config: FusionVisionConfig) -> "FusionImageProcessor":
        """Without building the tower when the geometry is known (a saved config)."""
        tower_config = config.tower_config_object()
        config.resolve_geometry()
        encoders = {enc.name: enc for enc in config_geometry(tower_config).encoders}  # each with its .mean
        proc = tower_config.processor
        frame = choose_pad_colors(proc.pad_color, encoders, None, proc.mean_from).frame
        return cls(image_size=config.image_size, mode=tower_config.processor.mode, image_mean=config.image_mean,
                   image_std=config.image_std, pad_color=list(frame))

    def preprocess(self, images, return_tensors: Optional[str] = None, **kwargs) -> BatchFeature:
        unsupported = sorted(k for k, v in kwargs.items() if v is not None and k not in _IGNORED_KWARGS)
        if unsupported:
            raise ValueError(f"FusionImageProcessor: options {unsupported} are not supported; set image_size, "
                             f"mode or alpha on the processor (the tower defines its own preprocessing)")
        pixel_values = self._proc(images)["pixel_values"]
        return BatchFeature({"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images, *args, **kwargs) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)

    def to_dict(self) -> Dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}
        out["image_processor_type"] = type(self).__name__
        return out


# Keyword arguments that transformers' processors pass along and that change nothing here.
_IGNORED_KWARGS = {"device", "input_data_format", "data_format", "do_convert_rgb"}


# ----------------------------------------------------------------------------- registration


def register() -> None:
    """Register the classes with AutoConfig / AutoModel / AutoImageProcessor (done on import)."""
    AutoConfig.register(MODEL_TYPE, FusionVisionConfig, exist_ok=True)
    AutoModel.register(FusionVisionConfig, FusionVisionModel, exist_ok=True)
    if "image_processor_classes" in inspect.signature(AutoImageProcessor.register).parameters:  # transformers >= 5.x
        AutoImageProcessor.register(FusionVisionConfig, image_processor_classes={"torchvision": FusionImageProcessor,
                                                                                "pil": FusionImageProcessor},
                                    exist_ok=True)
    else:  # the first 5.x releases: one "slow" (not torchvision-based) class
        AutoImageProcessor.register(FusionVisionConfig, slow_image_processor_class=FusionImageProcessor,
                                    exist_ok=True)


register()

__all__ = ["MODEL_TYPE", "FusionImageProcessor", "FusionVisionConfig", "FusionVisionModel", "register",
           "select_hidden_states"]
