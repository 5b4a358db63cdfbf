"""Shared test setup.

* Without a CUDA device, Triton kernels run under the interpreter on CPU tensors; the variable
  must be set before any triton.jit decoration, so it is set here, before linattn imports them.
* Every output linattn allocates is filled with NaN first (linattn.ops.alloc), so a kernel
  that leaves an element unwritten fails instead of passing on leftover memory.
* The tests of the diffusers integration (linattn.dit, linattn.train) are reported as skipped
  where diffusers is not installed: the op does not need it, and a bare GPU machine
  (benchmarks/gpu_check.py) has none.
"""
import functools
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from linattn.backends import clear_cache  # noqa: E402  (after TRITON_INTERPRET is decided)
from linattn.ops import alloc  # noqa: E402

#: Test modules that import diffusers, directly or through linattn.dit / linattn.train models.
NEEDS_DIFFUSERS = frozenset({
    "test_dit_api.py", "test_dit_families.py", "test_dit_hunyuan_padding.py",
    "test_dit_pipeline.py", "test_dit_transfer.py", "test_train_data.py", "test_train_e2e.py",
    "test_train_trainer.py", "test_train_distributed.py", "test_train_models.py",
    "test_train_stability.py", "test_distill_stage.py", "test_distill_objectives.py",
    "test_distill_distributed.py", "test_toy.py", "test_dit_context_parallel.py",
    "test_train_families.py", "test_dit_fused.py", "test_dit_widen.py",
    "test_distill_regression.py",
    # These two import no diffusers themselves; their tests build models with it
    # (test_distill_stage.linear_generator).
    "test_distill_ema.py", "test_train_sharded_load.py"})


@functools.lru_cache(maxsize=1)
def _diffusers_missing() -> str | None:
    """None when diffusers imports; else why not."""
    try:
        importlib.import_module("diffusers")
    except ImportError as error:
        return f"diffusers is not importable ({error}): the diffusers integration is not tested"
    return None


class _SkippedModule(pytest.Module):
    """A test module collected as one skip, without importing it."""

    reason = ""

    def collect(self):
        pytest.skip(self.reason)


def pytest_pycollect_makemodule(module_path, parent):
    if module_path.name in NEEDS_DIFFUSERS:
        why = _diffusers_missing()
        if why is not None:
            module = _SkippedModule.from_parent(parent, path=module_path)
            module.reason = why
            return module
    return None


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


def backend_device(backend: str) -> torch.device:
    """Where a test puts the inputs of `backend`: the triton backend runs CUDA tensors, and CPU
    tensors only under TRITON_INTERPRET=1 (set above when there is no GPU); "cpu" and the
    float64 "reference" run on CPU. Import it with `from conftest import backend_device`."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    threads waiting on each other made the training tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
