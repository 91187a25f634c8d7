"""Shared test setup.

Without a GPU, Triton kernels run in the Triton interpreter: TRITON_INTERPRET must be
set before any kernel module is imported, so it is set here, once, for the whole run.
"""
import os
import tempfile

import torch

# A private Triton and Inductor cache per test run: concurrent runs on one machine (CI
# beside a developer's run) then never read each other's half-written cache files.
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="fusion-triton-cache-"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fusion-inductor-cache-"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _interpreter_bounds():
    """Every Triton kernel the interpreter runs in a test is bounds-checked: a masked-in
    load or store outside the launch's tensor arguments fails the test at that access
    (see tests/interpreter_bounds.py) instead of corrupting the heap."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from interpreter_bounds import bounds_checked

    with bounds_checked():
        yield
