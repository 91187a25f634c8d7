"""The encoder registry: ``@register_encoder("clip")`` on an :class:`Encoder` subclass.

Config files name encoders by ``type``; the tower looks the class up here, so adding an
encoder family never touches the tower or the config code.

The names live in :mod:`fusion.encoder_types` (data, no imports), so that validating a
config's ``type`` and listing the types import nothing heavy; the built-in adapters (which
import open_clip, timm or segment_anything) are imported the first time a class is asked for.
"""
from __future__ import annotations

from importlib import import_module
from typing import Callable, Dict, Type

from ..encoder_types import BUILTIN_TYPES, add_type, check_encoder_type, list_encoders  # noqa: F401 (re-exported)

_ENCODERS: Dict[str, type] = {}


def register_encoder(name: str) -> Callable[[Type], Type]:
    """Class decorator that makes an encoder available as ``type: <name>`` in configs."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_encoder(name): expected a non-empty string, got {name!r}")

    def decorate(cls: Type) -> Type:
        from .base import Encoder

        if not (isinstance(cls, type) and issubclass(cls, Encoder)):
            raise TypeError(f"register_encoder({name!r}): {cls!r} is not a subclass of fusion.Encoder")
        if name in BUILTIN_TYPES and cls.__module__ != BUILTIN_TYPES[name]:
            _import_builtin(name)  # a user class taking a built-in name meets the built-in one
        existing = _ENCODERS.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"register_encoder: the name {name!r} is already taken by {existing.__qualname__}")
        _ENCODERS[name] = cls
        add_type(name)
        cls.encoder_type = name
        return cls

    return decorate


def get_encoder_class(name: str, key: str = "type") -> type:
    """The class registered as ``name`` (a built-in adapter is imported here, on first use);
    ``key`` is the config key named in the error."""
    check_encoder_type(name, key)
    if name not in _ENCODERS:
        _import_builtin(name)
    return _ENCODERS[name]


def _import_builtin(name: str) -> None:
    """Import the adapter module that registers the built-in type ``name``."""
    import_module(BUILTIN_TYPES[name])
