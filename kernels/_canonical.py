"""This directory is the package ``fusion.kernels``, and only that.

Run from a checkout's root (``python -m pytest``, ``python -c ...``, ``python -m
fusion``), the current directory is on ``sys.path``, so this ``kernels/`` directory is
also importable as a top-level ``kernels``, the name of the Hugging Face kernel-hub
package that transformers probes with ``importlib.import_module("kernels")``.
Executing the op modules a second time under that name would register the
``fusion::`` custom ops again; torch then destroys the first registrations while
``torch.ops.fusion.*`` handles and the first module's ops still point at them, and later
calls read freed memory (``std::bad_alloc``, ``vector::reserve`` or SIGSEGV inside the
dispatcher, depending on what reused it).

So a top-level ``import kernels`` gets an empty module (transformers then sees no
usable kernel-hub package, which is true) and a direct ``import kernels.<op>`` is
refused by :func:`require_canonical` before it registers anything.
"""
from __future__ import annotations

CANONICAL = "fusion.kernels"


def require_canonical(module_name: str) -> None:
    """Raise ImportError unless ``module_name`` is inside ``fusion.kernels``."""
    if module_name != CANONICAL and not module_name.startswith(CANONICAL + "."):
        raise ImportError(
            f"{module_name!r} is fusion's kernels/ directory imported under another name "
            f"(the repository root is on sys.path); import it as 'fusion.kernels' "
            f"(pip install -e . from the repository root). Importing it twice would register "
            f"the fusion:: custom ops twice.")
