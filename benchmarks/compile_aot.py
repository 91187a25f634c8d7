"""Compile one :class:`fusion.kernels._launch.Launch` for a GPU target, on a machine without one.

The launch's own arguments go through Triton's argument binder for the target's backend
(``create_function_from_signature`` + ``JITFunction._pack_args``, what
``JITFunction.run`` does before it compiles), so the specialisation is the one a real
launch gets: integer arguments equal to 1 or divisible by 16, 16-byte aligned data
pointers and strides, constexprs, ``num_warps``, ``num_stages``. ``triton.compile`` then
runs the whole pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin) and the ``ptxas`` that
ships with Triton reports registers and spills; ``metadata.shared`` is the shared memory
Triton checks at launch time. Needs TRITON_INTERPRET unset.
"""
from __future__ import annotations

import contextlib
import io
import re
from dataclasses import dataclass
from typing import Optional

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


@dataclass(frozen=True)
class Compiled:
    """What ptxas and Triton report for one compiled launch (per thread: registers, spills)."""
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    num_warps: int
    num_stages: int
    error: Optional[str] = None

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


def specialisation(launch, arch: int):
    """``(signature, constexprs, attrs, options)`` the binder gives ``launch`` on ``sm_<arch>``."""
    fn = launch.kernel
    if not isinstance(fn, JITFunction):
        raise TypeError(f"{launch.label}: {type(fn).__name__} is not a compilable @triton.jit function "
                        "(unset TRITON_INTERPRET before importing fusion)")
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages,
                  debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    if launch.maxnreg is not None:
        kwargs["maxnreg"] = launch.maxnreg
    bound, spec, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    return signature, constexprs, attrs, options


def key(launch, arch: int) -> str:
    """Everything that decides the compiled binary (two launches with one key share it)."""
    signature, constexprs, attrs, options = specialisation(launch, arch)
    return repr((launch.kernel.fn.__qualname__, arch, sorted(signature.items()), sorted(constexprs.items()),
                 sorted(attrs.items()), launch.num_warps, launch.num_stages, launch.maxnreg))


def compile_launch(launch, arch: int) -> Compiled:
    """Compile ``launch`` for ``sm_<arch>`` and read ptxas' report; errors are returned, not raised."""
    try:
        signature, constexprs, attrs, options = specialisation(launch, arch)
        src = ASTSource(launch.kernel, signature, constexprs, attrs)
        log = io.StringIO()
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True   # the cache would skip ptxas and its report
            knobs.nvidia.dump_ptxas_log = True
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options.__dict__)
    except Exception as e:  # a compile error is a result of the report
        return Compiled(0, 0, 0, 0, 0, launch.num_warps, launch.num_stages, f"{type(e).__name__}: {e}"[:500])
    text = log.getvalue()
    used, spill, stack = _USED.search(text), _SPILL.search(text), _STACK.search(text)
    if used is None:
        return Compiled(0, 0, 0, 0, int(kernel.metadata.shared), launch.num_warps, launch.num_stages,
                        f"no ptxas report in: {text[-300:]!r}")
    return Compiled(int(used.group(1)), int(spill.group(1)) if spill else 0, int(spill.group(2)) if spill else 0,
                    int(stack.group(1)) if stack else 0, int(kernel.metadata.shared), launch.num_warps,
                    launch.num_stages)
