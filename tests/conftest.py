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


# Kernel tests run first. In one long pytest process, the Triton interpreter's calls into
# the fusion:: custom ops crashed (SIGSEGV / std::bad_alloc inside the dispatcher) after a
# few hundred tower, compile, HF and distributed tests had run, though every file passes
# on its own and every pair tried passes together. Running the interpreter tests before
# the rest avoids it; the root cause is still open (see the note on issue 3).
_KERNEL_FILES = ("test_kernels_", "test_traffic")


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: not item.fspath.basename.startswith(_KERNEL_FILES))
