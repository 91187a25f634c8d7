"""Triton import, tolerated missing (macOS / Windows wheels ship without it).

Without Triton the ``@triton.jit`` functions are defined as plain Python (never run),
``HAVE_TRITON`` is False, and ``backend="triton"`` raises a ValueError saying so; the
PyTorch reference path keeps working.
"""
try:
    import triton
    import triton.language as tl
    # tl.sum is itself a @triton.jit function, which the interpreter re-patches on every
    # call (milliseconds each); tl.reduce with the same combine function is what tl.sum
    # lowers to on a GPU and has a numpy fast path in the interpreter.
    from triton.language.standard import _sum_combine as sum_combine

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is absent
    HAVE_TRITON = False

    class _Lang:
        constexpr = object

    class _Triton:
        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton, tl, sum_combine = _Triton(), _Lang(), None


def triton_runs_on(kernel, device) -> bool:
    """True when ``kernel`` can take tensors on ``device``: CUDA, or CPU under the interpreter."""
    if not HAVE_TRITON:
        return False
    if device.type == "cuda":
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return device.type == "cpu" and isinstance(kernel, InterpretedFunction)
