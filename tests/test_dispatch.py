"""Backend registry: what is listed, what "auto" picks, LINATTN_BACKEND, and loud failures."""
import importlib

import pytest
import torch

import linattn
from linattn.backends.base import Availability

from conftest import backend_device

# linattn.backends is the public function backends(); the registry module lives beside it.
registry = importlib.import_module("linattn.backends")


def test_backends_lists_every_backend_with_a_reason():
    infos = {b.name: b for b in linattn.backends()}
    # Only backends with kernels are listed: no placeholder entries.
    assert set(infos) == {"reference", "cpu", "triton"}
    assert infos["reference"].available
    for info in infos.values():
        assert isinstance(info.reason, str) and info.reason


def test_native_module_is_built():
    """CI builds linattn._C; if it did not, say why instead of testing only the reference."""
    info = {b.name: b for b in linattn.backends()}["cpu"]
    assert info.available, info.reason


def test_auto_picks_the_native_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("LINATTN_BACKEND", raising=False)
    assert registry.resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_env_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("LINATTN_BACKEND", "reference")
    assert registry.resolve_backend("auto", torch.device("cpu")) == "reference"
    monkeypatch.setenv("LINATTN_BACKEND", "triton")
    triton_backend = registry.KERNEL_BACKENDS["triton"]
    monkeypatch.setattr(triton_backend, "availability",
                        lambda: Availability(False, "pretend triton is missing"))
    with pytest.raises(linattn.BackendUnavailableError,
                       match="backend='triton' cannot run here: pretend triton is missing"):
        registry.resolve_backend("auto", torch.device("cpu"))
    monkeypatch.setenv("LINATTN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LINATTN_BACKEND='bogus' is not a backend"):
        registry.resolve_backend("auto", torch.device("cpu"))


def test_auto_without_kernels_warns_and_uses_reference(monkeypatch):
    monkeypatch.delenv("LINATTN_BACKEND", raising=False)
    cpu = registry.KERNEL_BACKENDS["cpu"]
    monkeypatch.setattr(cpu, "availability", lambda: Availability(False, "pretend not built"))
    monkeypatch.setattr(registry, "_warned_auto_reference", set())
    with pytest.warns(RuntimeWarning, match="pretend not built"):
        assert registry.resolve_backend("auto", torch.device("cpu")) == "reference"


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    cpu = registry.KERNEL_BACKENDS["cpu"]
    monkeypatch.setattr(cpu, "availability", lambda: Availability(False, "pretend not built"))
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(linattn.BackendUnavailableError, match="pretend not built"):
        linattn.linear_attention(q, q, q, backend="cpu")


def test_backend_rejects_inputs_it_has_no_kernel_for():
    # On triton's own device (cuda where there is one), so that the dtype is what it refuses.
    q = torch.randn(1, 4, 1, 16, dtype=torch.float64, device=backend_device("triton"))
    with pytest.raises(linattn.BackendUnavailableError, match="dtype float64 is not supported"):
        linattn.linear_attention(q, q, q, backend="triton")


def test_auto_skips_a_backend_that_refuses_the_inputs(monkeypatch):
    """auto passes over a kernel backend whose kernels refuse these inputs (here: a dtype),
    warning once, rather than picking it and raising."""
    monkeypatch.delenv("LINATTN_BACKEND", raising=False)
    cpu = registry.KERNEL_BACKENDS["cpu"]
    monkeypatch.setattr(cpu, "supported_dtypes", frozenset({torch.float32}))
    monkeypatch.setattr(registry, "_warned_auto_reference", set())
    q = torch.randn(1, 4, 1, 8, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="dtype float64 is not supported"):
        out = linattn.linear_attention(q, q, q)
    assert out.dtype == torch.float64


def test_triton_refuses_the_combination_measured_wrong_on_sm90():
    """float32 + key mask + fused norms/RoPE gave wrong results compiled on the H200: the
    backend refuses exactly that combination on CUDA, naming it, and lets every neighbour pass
    (bf16, no mask, no pre, or the interpreter's CPU tensors)."""
    from linattn.backends.triton import refuse_measured_fault
    cuda, cpu, mask, pre = torch.device("cuda"), torch.device("cpu"), object(), object()
    with pytest.raises(linattn.BackendUnavailableError,
                       match="float32 q/k/v with a key_padding_mask and fused q_norm"):
        refuse_measured_fault(torch.float32, cuda, mask, pre)
    for args in ((torch.bfloat16, cuda, mask, pre), (torch.float16, cuda, mask, pre),
                 (torch.float32, cuda, None, pre), (torch.float32, cuda, mask, None),
                 (torch.float32, cpu, mask, pre)):
        refuse_measured_fault(*args)  # no error
