"""Encoder adapters: the contract, the registry, and the built-in adapters.

The built-in adapters (``clip``, ``siglip``, ``sam``, ``dinov2``) import their upstream
libraries, so they load on first use: through the registry (``get_encoder_class``,
``list_encoders``) or by attribute (``fusion.encoders.ClipEncoder``).
"""
from importlib import import_module

from .base import Encoder
from .registry import get_encoder_class, list_encoders, register_encoder

_LAZY = {
    "OpenClipEncoder": "clip",
    "ClipEncoder": "clip",
    "SiglipEncoder": "clip",
    "SamEncoder": "sam",
    "Dinov2Encoder": "dinov2",
}

__all__ = ["Encoder", "register_encoder", "list_encoders", "get_encoder_class", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
