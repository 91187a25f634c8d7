"""The encoder registry: ``@register_encoder("clip")`` on an :class:`Encoder` subclass.

Config files name encoders by ``type``; the tower looks the class up here, so adding an
encoder family never touches the tower or the config code.

The built-in types are known by name without importing their adapters (which import
open_clip, timm or segment_anything): :data:`BUILTIN_MODULES` maps each to the module that
registers it, imported the first time its class is asked for. So validating a config's
``type`` (:func:`check_encoder_type`) and listing the types import nothing heavy.
"""
from __future__ import annotations

from importlib import import_module
from typing import Callable, Dict, List, Type

from ..suggest import did_you_mean

_ENCODERS: Dict[str, type] = {}
# built-in type -> the module (in this package) whose @register_encoder registers it
BUILTIN_MODULES: Dict[str, str] = {"clip": "clip", "siglip": "clip", "sam": "sam", "dinov2": "dinov2"}


def register_encoder(name: str) -> Callable[[Type], Type]:
    """Class decorator that makes an encoder available as ``type: <name>`` in configs."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_encoder(name): expected a non-empty string, got {name!r}")

    def decorate(cls: Type) -> Type:
        from .base import Encoder

        if not (isinstance(cls, type) and issubclass(cls, Encoder)):
            raise TypeError(f"register_encoder({name!r}): {cls!r} is not a subclass of fusion.Encoder")
        if name in BUILTIN_MODULES and cls.__module__ != _builtin_module(name):
            _import_builtin(name)  # a user class taking a built-in name meets the built-in one
        existing = _ENCODERS.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"register_encoder: the name {name!r} is already taken by {existing.__qualname__}")
        _ENCODERS[name] = cls
        cls.encoder_type = name
        return cls

    return decorate


def list_encoders() -> List[str]:
    """The encoder types: built-in and registered, sorted (no adapter is imported)."""
    return sorted(set(_ENCODERS) | set(BUILTIN_MODULES))


def check_encoder_type(name: str, key: str = "type") -> None:
    """``ValueError`` naming ``key`` unless ``name`` is a built-in or registered type; imports nothing."""
    if name in _ENCODERS or name in BUILTIN_MODULES:
        return
    known = list_encoders()
    raise ValueError(f"{key}: unknown encoder type {name!r}{did_you_mean(name, known)}; registered types are {known}")


def get_encoder_class(name: str, key: str = "type") -> type:
    """The class registered as ``name`` (a built-in adapter is imported here, on first use);
    ``key`` is the config key named in the error."""
    check_encoder_type(name, key)
    if name not in _ENCODERS:
        _import_builtin(name)
    return _ENCODERS[name]


def _builtin_module(name: str) -> str:
    return f"{__package__}.{BUILTIN_MODULES[name]}"


def _import_builtin(name: str) -> None:
    """Import the adapter module that registers the built-in type ``name``."""
    import_module(_builtin_module(name))
