"""Bounds checking for Triton kernels run in the interpreter.

The interpreter performs a kernel's loads and stores on raw addresses: a lane whose
mask is true but whose pointer lies outside every tensor the kernel was given reads
or writes whatever memory is there. A stray store then corrupts the heap silently and
the process crashes later, somewhere unrelated. :func:`bounds_checked` wraps the
interpreter's memory hooks and raises :class:`OutOfBounds` at the first such access,
naming the kernel, the access kind and the address, before the access happens.

Allowed memory: the whole storage of every tensor argument of the launch (a strided
view may legitimately reach anywhere in its storage), for the element's full width.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from triton.runtime import interpreter as _interp


class OutOfBounds(AssertionError):
    """A masked-in lane of an interpreted load or store addressed memory outside every
    tensor argument of the launch."""


class _Launches:
    def __init__(self):
        self.stack = []  # (kernel name, [(start, end)]) of the launches being run
        self.accesses = 0

    def check(self, ptrs: np.ndarray, mask: np.ndarray, itemsize: int, kind: str):
        m = np.broadcast_to(mask.astype(bool), ptrs.shape)
        addr = ptrs[m].astype(np.uint64)
        if addr.size == 0:
            return
        self.accesses += int(addr.size)
        name, regions = self.stack[-1] if self.stack else ("<no launch>", [])
        ok = np.zeros(addr.shape, dtype=bool)
        for start, end in regions:
            ok |= (addr >= start) & (addr + np.uint64(itemsize) <= end)
        if not ok.all():
            bad = int(addr[~ok][0])
            near = ", ".join(f"[{s:#x}, {e:#x})" for s, e in regions)
            raise OutOfBounds(f"{name}: masked-in {kind} of {int((~ok).sum())} lane(s) outside every "
                              f"tensor argument, first at {bad:#x} ({itemsize}-byte elements); "
                              f"argument storages: {near}")


@contextmanager
def bounds_checked():
    """Raise :class:`OutOfBounds` on any interpreted load/store outside the launch's
    tensor arguments. Yields the checker (``.accesses`` counts checked lanes)."""
    launches = _Launches()
    B = _interp.InterpreterBuilder
    orig_load, orig_store = B.create_masked_load, B.create_masked_store
    orig_rmw, orig_call = B.create_atomic_rmw, _interp.GridExecutor.__call__

    def load(self, ptrs, mask, other, *a):
        launches.check(ptrs.data, mask.data, np.dtype(_interp._get_np_dtype(ptrs.get_element_ty())).itemsize,
                       "load")
        return orig_load(self, ptrs, mask, other, *a)

    def store(self, ptrs, value, mask, *a):
        launches.check(ptrs.data, mask.data, value.data.dtype.itemsize, "store")
        return orig_store(self, ptrs, value, mask, *a)

    def rmw(self, op, ptrs, value, mask, *a):
        launches.check(ptrs.data, mask.data, value.data.dtype.itemsize, "atomic")
        return orig_rmw(self, op, ptrs, value, mask, *a)

    def call(self, *args, **kwargs):
        regions = []
        for arg in list(args) + list(kwargs.values()):
            if isinstance(arg, torch.Tensor) and arg.untyped_storage().nbytes():
                st = arg.untyped_storage()
                regions.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
        launches.stack.append((getattr(self.fn, "__name__", "kernel"), regions))
        try:
            return orig_call(self, *args, **kwargs)
        except _interp.InterpreterError as e:
            if isinstance(e.__cause__, OutOfBounds):
                raise e.__cause__ from None
            raise
        finally:
            launches.stack.pop()

    B.create_masked_load, B.create_masked_store, B.create_atomic_rmw = load, store, rmw
    _interp.GridExecutor.__call__ = call
    try:
        yield launches
    finally:
        B.create_masked_load, B.create_masked_store, B.create_atomic_rmw = orig_load, orig_store, orig_rmw
        _interp.GridExecutor.__call__ = orig_call
