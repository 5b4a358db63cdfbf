"""Shared test setup.

* Without a CUDA device, Triton kernels run under the interpreter on CPU tensors; the variable
  must be set before any triton.jit decoration, so it is set here, before linattn imports them.
* Every output linattn allocates is filled with NaN first (linattn.ops.alloc), so a kernel
  that leaves an element unwritten fails instead of passing on leftover memory.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from linattn.backends import clear_cache  # noqa: E402  (after TRITON_INTERPRET is decided)
from linattn.ops import alloc  # noqa: E402


@pytest.fixture(autouse=True)
def _poison_outputs():
    with alloc.poison_outputs(True):
        yield


@pytest.fixture(autouse=True)
def _fresh_backend_choices():
    """Tests pretend a backend is missing or refuses a dtype (monkeypatch): the op's cached
    backend choices (linattn.backends.choose_backend) must not outlive such a test."""
    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    threads waiting on each other made the training tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
