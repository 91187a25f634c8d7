"""Prism checkpoints (TRI-ML/prismatic-vlms) into a fusion tower: the projector and the vision backbone.

Prismatic's training strategies save ``torch.save({"model": {module_key: state_dict}})``
(``latest-checkpoint.pt``), one state dict per top-level module of the VLM, its keys
relative to that module:

- ``"projector"``: Prismatic's projector module, whose layers sit in a ``projector``
  attribute: ``linear`` (``projector.weight``), ``gelu-mlp`` (``projector.0.*``,
  ``projector.2.*``) or ``fused-gelu-mlp`` (``projector.0.*``, ``projector.2.*``,
  ``projector.4.*``; Prismatic's projector for fused encoders such as DINO-SigLIP). They
  load into fusion's ``linear``, ``mlp2x_gelu`` and ``fused_gelu_mlp`` projectors
  (:data:`PROJECTOR_LAYOUTS`).
- ``"llm_backbone"``: the language model; never read here (the file is memory-mapped, so
  a 7B model's weights are not loaded into memory).
- ``"vision_backbone"``: only in checkpoints whose backbone was trained (Prismatic's
  ``full-finetune`` stage): ``featurizer.*`` (single-encoder backbones) or
  ``dino_featurizer.*`` + ``siglip_featurizer.*`` (DINO-SigLIP), each a timm
  ``VisionTransformer`` state dict. Featurizer ``<name>_featurizer`` loads into encoder
  ``<name>`` (``featurizer`` into a one-encoder tower), or as ``featurizers`` maps them;
  the encoder's upstream module must be that timm ViT (DINOv2: the model itself; SigLIP:
  open_clip's timm trunk). Released Prism models hold no ``vision_backbone``: their
  encoders are the timm weights that the ``dinosiglip`` preset's ``pretrained`` tags name.

Loading is strict: a missing or unexpected key or a shape mismatch is a ``ValueError``
listing them.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from timm.models.vision_transformer import VisionTransformer

from .encoders.weights import load_strict, take_prefix
from .tower import MultiEncoderTower

# fusion projector type -> (Prismatic's arch name, the projector's state-dict keys in a Prism checkpoint)
PROJECTOR_LAYOUTS: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "linear": ("linear", ("projector.weight", "projector.bias")),
    "mlp2x_gelu": ("gelu-mlp", tuple(f"projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias"))),
    "fused_gelu_mlp": ("fused-gelu-mlp", tuple(f"projector.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias"))),
}
FEATURIZER_SUFFIX = "_featurizer"


def load_prism_checkpoint(tower: MultiEncoderTower, path: str, projector: bool = True,
                          vision_backbone: Optional[bool] = None,
                          featurizers: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """Load a Prism checkpoint's projector and (if it has one) vision backbone into ``tower``.

    ``projector``: load ``model["projector"]`` (the tower's ``projector.type`` must have the
    checkpoint's layout). ``vision_backbone``: None loads it when the checkpoint has one,
    True requires it, False skips it. ``featurizers``: Prismatic featurizer name -> encoder
    name, for towers whose encoder names do not follow ``<name>_featurizer``.

    Returns what was loaded: ``{"projector": <Prismatic arch name or None>,
    "encoders": {encoder name: featurizer name}}``.
    """
    if not isinstance(tower, MultiEncoderTower):
        raise TypeError(f"tower: expected a fusion MultiEncoderTower, got {type(tower).__name__}")
    for arg, value in (("projector", projector), ("vision_backbone", vision_backbone)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{arg}: expected True or False{' or None' if arg == 'vision_backbone' else ''}, "
                            f"got {value!r}")
    modules = read_prism_checkpoint(path)
    report: Dict[str, Any] = {"projector": None, "encoders": {}}
    if projector:
        if "projector" not in modules:
            raise ValueError(f"path: {path!r} has no 'projector' weights (its model keys are {sorted(modules)}); "
                             f"pass projector=False to load only the vision backbone")
        report["projector"] = _load_projector(tower, modules["projector"], path)
    if vision_backbone is False:
        return report
    if "vision_backbone" not in modules:
        if vision_backbone:
            raise ValueError(f"path: {path!r} has no 'vision_backbone' weights (its model keys are "
                             f"{sorted(modules)}): Prismatic saves them only when the backbone was trained; the "
                             f"encoders' own `pretrained` weights are the ones that checkpoint was trained with")
        return report
    report["encoders"] = _load_featurizers(tower, modules["vision_backbone"], path, featurizers)
    return report


def read_prism_checkpoint(path: str) -> Dict[str, Dict[str, torch.Tensor]]:
    """``torch.load(path, weights_only=True, mmap=True)["model"]``, checked: module key -> state dict."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a path to a Prism checkpoint (.pt), got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: the Prism checkpoint {path!r} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"path: torch.load(weights_only=True) refused {path!r}: it is not a checkpoint of "
                         f"tensors and plain containers ({err})") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"path: {path!r} is not a readable torch checkpoint ({type(err).__name__}: {err})") from err
    model = obj.get("model") if isinstance(obj, Mapping) else None
    if not isinstance(model, Mapping) or not all(isinstance(v, Mapping) for v in model.values()):
        got = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"path: {path!r} is not a Prism checkpoint: expected {{'model': {{'projector': {{...}}, "
                         f"'llm_backbone': {{...}}, ...}}}} (Prismatic's save_checkpoint layout), got {got}")
    return {str(k): dict(v) for k, v in model.items()}


def _load_projector(tower: MultiEncoderTower, state: Mapping[str, torch.Tensor], path: str) -> str:
    """Load Prismatic projector weights into ``tower.projector``; returns Prismatic's arch name."""
    found = next((t for t, (_, keys) in PROJECTOR_LAYOUTS.items() if set(state) == set(keys)), None)
    ours = tower.config.projector.type
    if found is None:
        raise ValueError(f"path: {path!r} holds a projector with keys {sorted(state)}, none of Prismatic's layouts "
                         f"{ {name: list(keys) for name, keys in PROJECTOR_LAYOUTS.values()} }")
    if found != ours:
        raise ValueError(f"projector.type: the tower has {ours!r}, but {path!r} holds Prismatic's "
                         f"{PROJECTOR_LAYOUTS[found][0]!r} projector; build the tower with "
                         f"projector.type={found} (and projector.out_dim = the checkpoint's LLM width "
                         f"{_out_width(state)})")
    load_strict(tower.projector, take_prefix(state, "projector."), "projector", path,
                f"Prismatic's {PROJECTOR_LAYOUTS[found][0]!r} projector from fused width {tower.merge.out_dim} "
                f"to projector.out_dim={tower.hidden_size}")
    return PROJECTOR_LAYOUTS[found][0]


def _out_width(state: Mapping[str, torch.Tensor]) -> int:
    last = max((k for k in state if k.endswith("weight")), key=lambda k: (len(k), k))
    return int(state[last].shape[0])


def _load_featurizers(tower: MultiEncoderTower, state: Mapping[str, torch.Tensor], path: str,
                      featurizers: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """Each ``<featurizer>.*`` group of ``state`` into its encoder's timm ViT; returns encoder -> featurizer."""
    names = sorted({k.split(".", 1)[0] for k in state})
    mapping = dict(featurizers) if featurizers is not None else _default_featurizers(names, list(tower.encoders))
    unknown = [f for f in names if f not in mapping]
    if unknown:
        raise ValueError(f"featurizers: {path!r} holds featurizers {names}, and {unknown} have no encoder; the "
                         f"tower's encoders are {list(tower.encoders)} (pass featurizers={{featurizer: encoder}})")
    loaded = {}
    for featurizer in names:
        enc_name = mapping[featurizer]
        if enc_name not in tower.encoders:
            raise ValueError(f"featurizers[{featurizer!r}]: no encoder {enc_name!r}; "
                             f"encoders are {list(tower.encoders)}")
        enc = tower.encoders[enc_name]
        vit = _timm_vit(enc)
        prefix = "trunk." if vit is not enc.model else ""  # SigLIP: the ViT is open_clip's trunk
        load_strict(vit, take_prefix(state, f"{featurizer}."), f"encoders.{enc_name}", path,
                    f"Prismatic's {featurizer!r}: the timm state dict of encoders.{enc_name} "
                    f"({enc.cfg.model}, image_size {enc.image_size})",
                    pruned=take_prefix(getattr(enc, "pruned", {}), prefix))
        loaded[enc_name] = featurizer
    return loaded


def _default_featurizers(names, encoders) -> Dict[str, str]:
    """``<name>_featurizer`` -> encoder ``<name>`` (when the tower has it); a lone ``featurizer`` -> the
    only encoder."""
    mapping = {f: f[: -len(FEATURIZER_SUFFIX)] for f in names
               if f.endswith(FEATURIZER_SUFFIX) and f[: -len(FEATURIZER_SUFFIX)] in encoders}
    if "featurizer" in names and len(encoders) == 1:
        mapping["featurizer"] = encoders[0]
    return mapping


def _timm_vit(enc: torch.nn.Module) -> VisionTransformer:
    """The timm ``VisionTransformer`` an encoder runs: its model (DINOv2) or the model's trunk (SigLIP)."""
    model = getattr(enc, "model", None)
    for candidate in (model, getattr(model, "trunk", None)):
        if isinstance(candidate, VisionTransformer):
            return candidate
    raise ValueError(f"encoders.{enc.name}: Prismatic's featurizers are timm VisionTransformers, but this "
                     f"{type(enc).__name__} runs a {type(model).__name__}; load its weights through "
                     f"encoders.{enc.name}.pretrained instead")
