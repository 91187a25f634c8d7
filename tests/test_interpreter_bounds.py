"""The interpreter bounds checker (tests/interpreter_bounds.py) catches stray accesses.

Every kernel test runs under it (tests/conftest.py), so a kernel whose masks let a lane
address memory outside its tensors fails at that access rather than corrupting the heap.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from interpreter_bounds import OutOfBounds, bounds_checked  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="checks the Triton interpreter")


@triton.jit
def _copy(x_ptr, y_ptr, n_load, n_store, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n_load, other=0.0)
    tl.store(y_ptr + offs, v, mask=offs < n_store)


def test_in_bounds_accesses_pass_and_are_counted():
    x, y = torch.arange(10.0), torch.zeros(10)
    with bounds_checked() as checker:
        _copy[(1,)](x, y, 10, 10, BLOCK=16)
    assert torch.equal(y, x)
    assert checker.accesses == 20  # 10 lanes loaded + 10 stored; the 6 masked-off lanes are not checked


def test_store_one_past_the_end_is_caught_before_it_happens():
    x = torch.arange(16.0)
    base = torch.zeros(12)
    y = base[:10]  # a view: its storage (12 floats) is what may be touched
    with bounds_checked(), pytest.raises(OutOfBounds, match="store of 1 lane"):
        _copy[(1,)](x, y, 10, 13, BLOCK=16)
    assert torch.equal(base, torch.zeros(12))  # the check ran before any lane was written


def test_load_past_the_end_is_caught():
    x, y = torch.arange(10.0), torch.zeros(16)
    with bounds_checked(), pytest.raises(OutOfBounds, match="load of 2 lane"):
        _copy[(1,)](x, y, 12, 10, BLOCK=16)
