"""Value checks for the config schema: each turns a raw YAML/JSON value into a typed one
or raises a ValueError naming the dotted key, the value given and what is accepted.

Plain checks take ``(value, dotted_key)``; the factories (:func:`choice`, :func:`integer`,
:func:`int_list`) return such a check. :mod:`fusion.config` maps every schema field to one.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from .suggest import did_you_mean


def nonempty_str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def choice(choices: Sequence[str], optional: bool = False):
    def check(value: Any, key: str):
        if value is None and optional:
            return None
        if value not in choices:
            raise ValueError(f"{key}: got {value!r}{did_you_mean(value, choices)}; accepted values are {list(choices)}"
                             + (" or null" if optional else ""))
        return value

    return check


def integer(minimum: Optional[int] = None, maximum: Optional[int] = None, optional: bool = False):
    def check(value: Any, key: str):
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
        if minimum is not None and value < minimum:
            raise ValueError(f"{key}: got {value}; must be >= {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"{key}: got {value}; must be <= {maximum}")
        return value

    return check


def boolean(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    return value


def positive_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{key}: expected a positive number, got {value!r}")
    return float(value)


def optional_str(value: Any, key: str) -> Optional[str]:
    return None if value is None else nonempty_str(value, key)


def pad_color(value: Any, key: str) -> Union[str, List[int]]:
    """A colour name (checked against the encoders by :mod:`fusion.config`) or ``[R, G, B]`` in 0-255."""
    if isinstance(value, str) and value:
        return value
    if (isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value)):
        return list(value)
    raise ValueError(f"{key}: expected 'per_encoder', an encoder name or [R, G, B] (three integers in 0-255), "
                     f"got {value!r}")


def layer(value: Any, key: str) -> int:
    value = integer()(value, key)
    if value == 0:
        raise ValueError(f"{key}: got 0; use -k for the k-th block from the end (-1 is the last) "
                         f"or k >= 1 for the k-th block from the start")
    return value


def int_list(minimum: int, what: str, increasing: bool = False, allow_empty: bool = True):
    def check(value: Any, key: str) -> List[int]:
        if value is None and allow_empty:
            return []
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)
        if not ok or (not allow_empty and not value):
            raise ValueError(f"{key}: expected a {'non-empty ' if not allow_empty else ''}list of integers "
                             f">= {minimum} ({what}), got {value!r}")
        if increasing and any(b <= a for a, b in zip(value, value[1:])):
            raise ValueError(f"{key}: got {list(value)}; list each value once, in increasing order ({what})")
        return list(value)

    return check


def arch_mapping(value: Any, key: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{key}: expected a mapping of upstream constructor arguments, got {value!r}")
    return dict(value)
