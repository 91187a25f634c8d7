"""The names of the encoder types a config may use (``encoders.<name>.type``), without any encoder.

Data only: this module imports nothing of fusion, torch or an upstream library, so reading a
config checks ``type`` for free. :data:`BUILTIN_TYPES` names each built-in type's adapter
module; :func:`fusion.encoders.registry.register_encoder` adds the names of registered
classes (:func:`add_type`), and :func:`fusion.encoders.registry.get_encoder_class` resolves
a name to its class where the tower is built.
"""
from __future__ import annotations

import difflib
from typing import Dict, List, Set

# built-in type -> the adapter module whose @register_encoder registers it (imported on first use)
BUILTIN_TYPES: Dict[str, str] = {"clip": "fusion.encoders.clip", "siglip": "fusion.encoders.clip",
                                 "sam": "fusion.encoders.sam", "dinov2": "fusion.encoders.dinov2"}
_REGISTERED: Set[str] = set()


def add_type(name: str) -> None:
    """Record that a class is registered as ``name`` (called by ``register_encoder``)."""
    _REGISTERED.add(name)


def list_encoders() -> List[str]:
    """The encoder types: built-in and registered, sorted (no adapter is imported)."""
    return sorted(_REGISTERED | set(BUILTIN_TYPES))


def check_encoder_type(name: str, key: str = "type") -> None:
    """``ValueError`` naming ``key`` unless ``name`` is a built-in or registered type."""
    if name in _REGISTERED or name in BUILTIN_TYPES:
        return
    known = list_encoders()
    close = difflib.get_close_matches(str(name), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"{key}: unknown encoder type {name!r}{hint}; registered types are {known}")
