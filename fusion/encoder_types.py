"""The names of the encoder types a config may use (``encoders.<name>.type``), without any encoder.

Data only: this module imports nothing of torch or an upstream library (only fusion.suggest), so reading a
config checks ``type`` for free. :data:`BUILTIN_TYPES` names each built-in type's adapter
module; :func:`fusion.encoders.registry.register_encoder` adds the names of registered
classes (:func:`add_type`), and :func:`fusion.encoders.registry.get_encoder_class` resolves
a name to its class where the tower is built.
"""
from __future__ import annotations

from typing import Dict, List, Set

from .suggest import did_you_mean

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
    raise ValueError(f"{key}: unknown encoder type {name!r}{did_you_mean(name, known)}; registered types are {known}")
