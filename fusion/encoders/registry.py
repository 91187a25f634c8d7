"""The encoder registry: ``@register_encoder("clip")`` on an :class:`Encoder` subclass.

Config files name encoders by ``type``; the tower looks the class up here, so adding an
encoder family never touches the tower or the config code.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, List, Type

_ENCODERS: Dict[str, type] = {}


def register_encoder(name: str) -> Callable[[Type], Type]:
    """Class decorator that makes an encoder available as ``type: <name>`` in configs."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_encoder(name): expected a non-empty string, got {name!r}")

    def decorate(cls: Type) -> Type:
        from .base import Encoder

        if not (isinstance(cls, type) and issubclass(cls, Encoder)):
            raise TypeError(f"register_encoder({name!r}): {cls!r} is not a subclass of fusion.Encoder")
        existing = _ENCODERS.get(name)
        if existing is not None and existing is not cls and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"register_encoder: the name {name!r} is already taken by {existing.__qualname__}")
        _ENCODERS[name] = cls
        cls.encoder_type = name
        return cls

    return decorate


def list_encoders() -> List[str]:
    """The registered encoder types, sorted."""
    _import_builtin()
    return sorted(_ENCODERS)


def get_encoder_class(name: str, key: str = "type") -> type:
    """The class registered as ``name``; ``key`` is the config key named in the error."""
    _import_builtin()
    if name not in _ENCODERS:
        close = difflib.get_close_matches(str(name), list(_ENCODERS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{key}: unknown encoder type {name!r}{hint}; registered types are {sorted(_ENCODERS)}")
    return _ENCODERS[name]


def _import_builtin() -> None:
    """Import the built-in adapter modules so their decorators run."""
    from . import clip, dinov2, sam  # noqa: F401
