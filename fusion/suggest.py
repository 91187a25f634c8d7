"""The "did you mean" hint every error about an unknown name carries (difflib's closest matches)."""
from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(value: object, choices: Iterable[str], n: int = 1) -> str:
    """``" (did you mean 'a'?)"`` (or ``'a' or 'b'`` for ``n > 1``) with the choices closest to
    ``value``, or ``""`` when none is close: ready to follow the value in an error message."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=n)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
