"""Shared test setup.

Without a GPU, Triton kernels run in the Triton interpreter: TRITON_INTERPRET must be
set before any kernel module is imported, so it is set here, once, for the whole run.
"""
import atexit
import os
import shutil
import tempfile

import torch

# A private Triton and Inductor cache per test run: concurrent runs on one machine (CI
# beside a developer's run) then never read each other's half-written cache files. The
# run removes the directories it made when it ends.
_CACHES = (("TRITON_CACHE_DIR", "fusion-triton-cache-"), ("TORCHINDUCTOR_CACHE_DIR", "fusion-inductor-cache-"))
for _var, _prefix in _CACHES:
    if _var not in os.environ:
        os.environ[_var] = tempfile.mkdtemp(prefix=_prefix)
        atexit.register(shutil.rmtree, os.environ[_var], ignore_errors=True)

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
