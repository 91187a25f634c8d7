"""Typed tower configuration: schema, presets, loading, dotted overrides, validation.

A config is loaded from a preset name (``fusion/configs/<name>.yaml``), a ``.yaml`` /
``.yml`` / ``.json`` path, a plain dict, or a :class:`TowerConfig`, then dotted
overrides are applied (``"fusion.grid=16"``, ``"encoders.sam=null"`` drops SAM,
``"encoders.clip.layer=-1"``). Every error is a ``ValueError`` (or ``TypeError`` for a
wrong Python type passed to a function) naming the dotted key, the value given and
what is accepted; a typo'd key gets the closest valid key suggested.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import yaml

from .config_files import read_config_file
from .suggest import did_you_mean
from .config_values import (arch_mapping, boolean, choice, int_list, integer, layer, nonempty_str, optional_str,
                            pad_color, positive_float)
from .encoder_types import check_encoder_type

PRESET_DIR = Path(__file__).with_name("configs")

DTYPES = ("float32", "float16", "bfloat16")
RESAMPLE_MODES = ("area", "bilinear")
NORMS = ("layernorm", "none")
COMBINES = ("channel_concat", "sequence_concat", "sva")
KERNEL_BACKENDS = ("auto", "triton", "torch")
PROJECTORS = ("none", "linear", "mlp2x_gelu", "fused_gelu_mlp")
PROCESSOR_MODES = ("pad", "squash", "crop")
REDUCE_METHODS = ("bipartite",)
POS_EMBEDS = ("none", "sincos")
SVA_CONTEXTS = ("first", "none")


# ----------------------------------------------------------------------------- schema


@dataclass
class EncoderConfig:
    """One encoder. ``name`` is its key under ``encoders:`` (and its place in channel order)."""

    name: str
    type: str
    model: str
    pretrained: Optional[str] = None
    layer: int = -1
    image_size: Optional[int] = None
    freeze: bool = True
    dtype: Optional[str] = None
    arch: Dict[str, Any] = field(default_factory=dict)
    # S2 multi-scale: the encoder runs at each scale (s x its input size, as s x s tiles of
    # its input size), each scale area-pooled to its base grid, scales concatenated on
    # channels (see fusion.multiscale). [1] is the plain encoder.
    scales: List[int] = field(default_factory=lambda: [1])


@dataclass
class ReduceConfig:
    """Content-aware token reduction of the fused grid (``fusion.reduce``, see fusion.reduce).

    ``method: bipartite`` is ToMe's bipartite soft matching down to ``keep`` tokens;
    ``metric`` is ``fused`` (the fused tokens) or an encoder name (that encoder's grid
    aligned to the fused grid).
    """

    method: str = "bipartite"
    keep: Optional[int] = None
    metric: str = "fused"


@dataclass
class SVAConfig:
    """The Spatial Vision Aggregator of ``fusion.combine: sva`` (see fusion.sva); defaults are
    Cambrian-1's (width 1024, 16 heads, 3 layers, the first encoder's mean as context)."""

    dim: int = 1024
    heads: int = 16
    layers: int = 3
    context: str = "first"


@dataclass
class FusionConfig:
    """How the encoder grids become one token sequence.

    ``levels``: coarser square levels of the fused grid (e.g. ``[12, 6]``) appended after
    it (a leading entry equal to ``grid`` names the fused grid itself and adds nothing).
    ``reduce``: null, or a :class:`ReduceConfig`. ``pos_embed``: ``none`` or ``sincos``
    (a fixed 2-D sin-cos embedding of each token's box centre added before the projector).
    ``sva``: the aggregator's settings when ``combine`` is ``sva`` (defaults filled in).
    """

    grid: int = 24
    resample: str = "area"
    norm: str = "layernorm"
    combine: str = "channel_concat"
    width: Optional[int] = None
    kernels: str = "auto"
    eps: float = 1e-5
    levels: List[int] = field(default_factory=list)
    reduce: Optional[ReduceConfig] = None
    pos_embed: str = "none"
    sva: Optional[SVAConfig] = None

    def extra_levels(self) -> List[int]:
        """The levels appended after the fused grid (``levels`` without a leading ``grid``)."""
        return [lv for i, lv in enumerate(self.levels) if not (i == 0 and lv == self.grid)]


@dataclass
class ProjectorConfig:
    """Maps fused tokens to the language model's width (``out_dim``)."""

    type: str = "mlp2x_gelu"
    out_dim: Optional[int] = None


@dataclass
class ProcessorConfig:
    """Host-side image processing: every image becomes ``[3, size, size]`` in [0, 1].

    ``size`` null means the largest encoder input size. ``mode``: ``pad`` (pad to a
    square with a mean colour, then resize: LLaVA-1.5, Prismatic's ``letterbox``),
    ``squash`` (resize, aspect ignored: Prismatic's ``resize-naive``) or ``crop``
    (resize the short side, centre crop).

    ``pad_color`` (``pad`` mode): ``per_encoder`` (each encoder's image is letterboxed
    with its own mean colour ``int(mean * 255)``, as Prismatic does), an encoder name
    (that encoder's mean colour for every encoder) or ``[R, G, B]`` (0-255, for every
    encoder). See :mod:`fusion.letterbox`.

    ``mean_from``: the encoder whose ``mean`` / ``std`` the image processor reports
    (``image_mean``, ``image_std``: what LLaVA reads for its own padding) and whose colour
    pads ``pixel_values`` under ``pad_color: per_encoder``; null: the encoder ``pad_color``
    names, else the first encoder.
    """

    size: Optional[int] = None
    mode: str = "pad"
    pad_color: Union[str, List[int]] = "per_encoder"
    mean_from: Optional[str] = None


@dataclass
class TowerConfig:
    encoders: Dict[str, EncoderConfig]
    fusion: FusionConfig = field(default_factory=FusionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    processor: ProcessorConfig = field(default_factory=ProcessorConfig)

    def to_dict(self) -> Dict[str, Any]:
        """A plain dict that :func:`load_config` turns back into an equal config."""
        out: Dict[str, Any] = {"encoders": {}}
        for name, enc in self.encoders.items():
            d = dataclasses.asdict(enc)
            d.pop("name")
            out["encoders"][name] = d
        out["fusion"] = dataclasses.asdict(self.fusion)
        out["projector"] = dataclasses.asdict(self.projector)
        out["processor"] = dataclasses.asdict(self.processor)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- loading


def list_presets() -> List[str]:
    """Names of the shipped presets (``fusion/configs/*.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


ConfigSource = Union[str, os.PathLike, Mapping[str, Any], TowerConfig]
Overrides = Union[None, Sequence[str], Mapping[str, Any]]


def load_config(source: ConfigSource, overrides: Overrides = None) -> TowerConfig:
    """Load and validate a config from a preset name, a file, a dict or a config object."""
    raw = _load_raw(source)
    for key, value in _parse_overrides(overrides):
        _apply_override(raw, key, value)
    return parse_config(raw)


def _load_raw(source: ConfigSource) -> Dict[str, Any]:
    if isinstance(source, TowerConfig):
        return source.to_dict()
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source: expected a preset name, a .yaml/.json path, a dict or a TowerConfig, "
            f"got {type(source).__name__}"
        )
    text = os.fspath(source)
    path = Path(text)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        return read_config_file(path)
    if text in list_presets():
        return read_config_file(PRESET_DIR / f"{text}.yaml")
    hint = did_you_mean(text, list_presets())
    raise ValueError(
        f"source: {text!r} is neither a preset{hint} nor a .yaml/.yml/.json file; "
        f"presets are {list_presets()}"
    )




def _parse_overrides(overrides: Overrides) -> List[Tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    if isinstance(overrides, str):
        overrides = [overrides]
    out = []
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ValueError(f"overrides: expected 'dotted.key=value' strings, got {item!r}")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(f"overrides: cannot parse the value of {key!r}: {text!r} ({err})") from err
        out.append((key.strip(), value))
    return out


def _apply_override(raw: Dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ValueError(f"overrides: {key!r} is not a dotted key like 'fusion.grid'")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ValueError(f"overrides: {key!r}: {where!r} holds {child!r}, not a mapping")
        node = child
    last = parts[-1]
    if value is None and len(parts) == 2 and parts[0] == "encoders":
        if last not in node:
            raise ValueError(f"overrides: {key}=null drops an encoder, but there is no encoder {last!r}; "
                             f"encoders are {list(node)}")
        del node[last]
        return
    node[last] = value


# ----------------------------------------------------------------------------- validation


def parse_config(raw: Mapping[str, Any]) -> TowerConfig:
    """Validate a plain dict (the YAML shape) into a :class:`TowerConfig`."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"config: expected a mapping, got {type(raw).__name__}")
    _check_keys(raw, ("encoders", "fusion", "projector", "processor"), "")
    encoders_raw = raw.get("encoders")
    if not isinstance(encoders_raw, Mapping) or not encoders_raw:
        raise ValueError(f"encoders: expected a non-empty mapping of name -> encoder config, got {encoders_raw!r}")
    encoders = {}
    for name, enc in encoders_raw.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"encoders: encoder names must be identifiers (letters, digits, _), got {name!r}")
        encoders[name] = _parse_encoder(name, enc)
    fusion = _parse_section(FusionConfig, raw.get("fusion"), "fusion", _FUSION_CHECKS)
    projector = _parse_section(ProjectorConfig, raw.get("projector"), "projector", _PROJECTOR_CHECKS)
    processor = _parse_section(ProcessorConfig, raw.get("processor"), "processor", _PROCESSOR_CHECKS)
    if projector.type != "none" and projector.out_dim is None:
        raise ValueError(f"projector.out_dim: projector.type {projector.type!r} needs an output width "
                         f"(a positive int); got null")
    _check_levels(fusion)
    _check_sva(fusion)
    _check_reduce(fusion, list(encoders))
    _check_pad_color(processor, list(encoders))
    return TowerConfig(encoders=encoders, fusion=fusion, projector=projector, processor=processor)


def _check_levels(fusion: FusionConfig) -> None:
    """Levels: each coarser than ``fusion.grid`` (a leading ``grid`` is allowed), strictly decreasing."""
    for i, lv in enumerate(fusion.levels):
        if lv > fusion.grid or (lv == fusion.grid and i > 0):
            raise ValueError(f"fusion.levels: got {fusion.levels}; levels pool the fused grid down, so each "
                             f"must be < fusion.grid={fusion.grid} (only the first may equal it, naming the "
                             f"fused grid itself)")
        if i > 0 and lv >= fusion.levels[i - 1]:
            raise ValueError(f"fusion.levels: got {fusion.levels}; list the levels from fine to coarse, "
                             f"strictly decreasing, e.g. [12, 6, 3]")


def _check_sva(fusion: FusionConfig) -> None:
    """``fusion.sva`` goes with ``combine: sva`` (filled with defaults there), area windows, no width."""
    if fusion.combine != "sva":
        if fusion.sva is not None:
            raise ValueError(f"fusion.sva: set, but fusion.combine is {fusion.combine!r}; the aggregator runs "
                             f"only with combine 'sva' (set it, or remove fusion.sva)")
        return
    sva = fusion.sva = fusion.sva or SVAConfig()
    if sva.dim % sva.heads:
        raise ValueError(f"fusion.sva.heads: got {sva.heads}, which does not divide fusion.sva.dim={sva.dim}; "
                         f"dim must be a multiple of heads")
    if fusion.resample != "area":
        raise ValueError(f"fusion.resample: got {fusion.resample!r}; combine 'sva' attends to each cell's area "
                         f"window (grid_merge's area tables), so resample must be 'area'")
    if fusion.width is not None:
        raise ValueError(f"fusion.width: got {fusion.width}; combine 'sva' sets its width with fusion.sva.dim, "
                         f"so leave fusion.width null")


def _check_reduce(fusion: FusionConfig, encoder_names: List[str]) -> None:
    """``fusion.reduce``: ``keep`` within the fused token count, ``metric`` a valid source."""
    red = fusion.reduce
    if red is None:
        return
    n_grids = len(encoder_names) if fusion.combine == "sequence_concat" else 1
    n_tokens = fusion.grid * fusion.grid * n_grids
    if red.keep is None:
        raise ValueError(f"fusion.reduce.keep: missing; set the number of fused tokens to keep "
                         f"(an int between 1 and {n_tokens})")
    if red.keep > n_tokens:
        raise ValueError(f"fusion.reduce.keep: got {red.keep}, but the fused grid has only {n_tokens} tokens "
                         f"(fusion.grid={fusion.grid}" + (f" x {n_grids} encoders" if n_grids > 1 else "")
                         + f"); keep must be between 1 and {n_tokens}")
    choices = ["fused", *encoder_names]
    if red.metric not in choices:
        raise ValueError(f"fusion.reduce.metric: got {red.metric!r}{did_you_mean(red.metric, choices)}; accepted values are {choices} "
                         f"('fused' or an encoder name)")
    if red.metric != "fused" and fusion.combine == "sequence_concat":
        raise ValueError(f"fusion.reduce.metric: an encoder metric ({red.metric!r}) gives one feature per grid "
                         f"cell, but fusion.combine {fusion.combine!r} has {n_grids} tokens per cell; use "
                         f"metric 'fused' or combine 'channel_concat'")


def _check_pad_color(processor: ProcessorConfig, encoder_names: List[str]) -> None:
    """``processor.pad_color``: a name must be ``per_encoder`` or one of the encoders; so must
    ``processor.mean_from`` be one of them."""
    if processor.mean_from is not None and processor.mean_from not in encoder_names:
        hint = did_you_mean(processor.mean_from, encoder_names)
        raise ValueError(f"processor.mean_from: got {processor.mean_from!r}{hint}; accepted values are the encoder "
                         f"names {encoder_names}, or null (the encoder pad_color names, else the first)")
    value = processor.pad_color
    choices = ["per_encoder", *encoder_names]
    if isinstance(value, str) and value not in choices:
        raise ValueError(f"processor.pad_color: got {value!r}{did_you_mean(value, choices)}; accepted values are {choices} "
                         f"(an encoder name uses that encoder's mean colour for all) or [R, G, B] in 0-255")


def _parse_encoder(name: str, raw: Any) -> EncoderConfig:
    prefix = f"encoders.{name}"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{prefix}: expected a mapping with at least 'type' and 'model', got {raw!r}")
    for required in ("type", "model"):
        if required not in raw:
            raise ValueError(f"{prefix}.{required}: missing (every encoder needs 'type' and 'model')")
    check_encoder_type(nonempty_str(raw["type"], f"{prefix}.type"), key=f"{prefix}.type")
    return _parse_section(EncoderConfig, {"name": name, **raw}, prefix, _ENCODER_CHECKS, hidden=("name",))


def _parse_section(cls, raw: Any, prefix: str, checks: Mapping[str, Any], hidden: Iterable[str] = ()):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{prefix}: expected a mapping, got {raw!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    _check_keys(raw, [n for n in names if n not in hidden], prefix, extra_ok=hidden)
    values = {}
    for name in names:
        if name in raw:
            values[name] = checks[name](raw[name], f"{prefix}.{name}") if name in checks else raw[name]
    return cls(**values)


def _check_keys(raw: Mapping[str, Any], allowed: Sequence[str], prefix: str, extra_ok: Iterable[str] = ()) -> None:
    for key in raw:
        if key in allowed or key in extra_ok:
            continue
        dotted = f"{prefix}.{key}" if prefix else str(key)
        raise ValueError(f"{dotted}: unknown key{did_you_mean(key, allowed)}; valid keys here are {list(allowed)}")


def _sva(value: Any, key: str) -> Optional[SVAConfig]:
    if value is None:
        return None
    return _parse_section(SVAConfig, value, key, _SVA_CHECKS)


def _reduce(value: Any, key: str) -> Optional[ReduceConfig]:
    if value is None:
        return None
    return _parse_section(ReduceConfig, value, key, _REDUCE_CHECKS)


_ENCODER_CHECKS = {
    "name": nonempty_str,
    "type": nonempty_str,
    "model": nonempty_str,
    "pretrained": optional_str,
    "layer": layer,
    "image_size": integer(minimum=1, optional=True),
    "freeze": boolean,
    "dtype": choice(DTYPES, optional=True),
    "arch": arch_mapping,
    "scales": int_list(1, "e.g. [1, 2]: the input size and twice it", increasing=True, allow_empty=False),
}
_REDUCE_CHECKS = {
    "method": choice(REDUCE_METHODS),
    "keep": integer(minimum=1),
    "metric": nonempty_str,
}
_FUSION_CHECKS = {
    "grid": integer(minimum=1),
    "resample": choice(RESAMPLE_MODES),
    "norm": choice(NORMS),
    "combine": choice(COMBINES),
    "width": integer(minimum=1, optional=True),
    "kernels": choice(KERNEL_BACKENDS),
    "eps": positive_float,
    "levels": int_list(1, "e.g. [12, 6, 3]: coarser square levels of the fused grid"),
    "reduce": _reduce,
    "pos_embed": choice(POS_EMBEDS),
    "sva": _sva,
}
_SVA_CHECKS = {
    "dim": integer(minimum=1),
    "heads": integer(minimum=1),
    "layers": integer(minimum=1),
    "context": choice(SVA_CONTEXTS),
}
_PROJECTOR_CHECKS = {
    "type": choice(PROJECTORS),
    "out_dim": integer(minimum=1, optional=True),
}
_PROCESSOR_CHECKS = {
    "size": integer(minimum=1, optional=True),
    "mode": choice(PROCESSOR_MODES),
    "pad_color": pad_color,
    "mean_from": optional_str,
}
