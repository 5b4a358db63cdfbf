"""The op's host path: what a call does on the CPU before and around the kernels.

* No host synchronisation and no value-dependent allocation anywhere between the public call
  and the kernel launches, forward and backward: the condition for capturing a training step
  in a CUDA graph. Checked on the CPU by running the op under a mode that refuses every call
  that reads a tensor's values into Python (item, tolist, bool(), nonzero, ...), and by
  planning the Triton launches for an sm_90 GPU on meta tensors, which have no values at all.
* Eager calls do not go through the custom op (its dispatch is host time a small call cannot
  afford); traced calls do (tests/test_compile.py).
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

import linattn
from linattn.backends import MapCall, get_kernel_backend
from linattn.feature_maps import Hedgehog
from linattn.kernels.triton import plan
from linattn.kernels.triton.common import capture_launches
from linattn.ops import autograd as op_autograd

from conftest import backend_device

# Calls that copy a tensor's values to the host (a device synchronisation on a GPU), or whose
# output size depends on them.
VALUE_READS = frozenset({
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__", "numpy",
    "__array__", "cpu", "nonzero", "nonzero_static", "argwhere", "masked_select", "unique",
    "unique_consecutive", "equal", "allclose", "is_nonzero", "_local_scalar_dense",
    "repeat_interleave",
})


class RefuseValueReads(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in VALUE_READS:
            raise AssertionError(f"the op path called {name}: a host sync (or a value-sized "
                                 f"allocation) that a CUDA graph cannot capture")
        return func(*args, **(kwargs or {}))


def test_the_guard_catches_a_value_read():
    with pytest.raises(AssertionError, match="called item"):
        with RefuseValueReads():
            torch.ones(2).sum().item()


def _inputs(dtype=torch.float32, layout="bnhd", device=torch.device("cpu")):
    B, N, H, D = 2, 37, 2, 16
    shape = (B, N, H, D) if layout == "bnhd" else (B, H, N, D)
    q, k, v = (torch.randn(*shape).to(device, dtype).requires_grad_() for _ in range(3))
    mask = torch.rand(B, N) < 0.7
    mask[-1] = False
    return q, k, v, mask.to(device)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("feature_map", ["softmax", "hedgehog"])
def test_forward_and_backward_read_no_values(backend, feature_map):
    q, k, v, mask = _inputs(layout="bhnd")
    fmap = Hedgehog(2, 16) if feature_map == "hedgehog" else feature_map
    with RefuseValueReads():
        out = linattn.linear_attention(q, k, v, feature_map=fmap, layout="bhnd",
                                       key_padding_mask=mask, backend=backend)
        out.backward(torch.ones_like(out))
    assert q.grad is not None and k.grad is not None


@pytest.mark.parametrize("feature_map", ["elu", "hedgehog"])
def test_triton_host_path_reads_no_values(feature_map):
    """The Triton backend's whole host path (validation, planning, scratch, launch arguments)
    with its launches captured instead of run (they would read values in the interpreter)."""
    # On triton's device (cuda on a GPU machine, where it refuses CPU tensors), moved there
    # before the guard is on.
    device = backend_device("triton")
    q, k, v, mask = _inputs(dtype=torch.bfloat16, device=device)
    fmap = Hedgehog(2, 16).to(device) if feature_map == "hedgehog" else feature_map
    with capture_launches() as launches, RefuseValueReads():
        out = linattn.linear_attention(q, k, v, feature_map=fmap, key_padding_mask=mask,
                                       backend="triton")
        out.backward(torch.ones_like(out))
    assert len(launches) >= 4  # at least two kernels forward, two backward


H200 = plan.DeviceInfo.from_properties(
    SimpleNamespace(major=9, minor=0, multi_processor_count=132))


@pytest.mark.parametrize("map_name", ["relu", "hedgehog"])
def test_triton_plans_an_sm90_call_on_meta_tensors(map_name):
    """Meta tensors have shapes and no values: every size the planning produces (grids, scratch)
    comes from shapes alone, or this raises."""
    meta = torch.device("meta")
    B, N, H, D = 2, 4096, 12, 64
    q, k, v, do, dq, dk, dv, o = (torch.empty(B, N, H, D, dtype=torch.bfloat16, device=meta)
                                  for _ in range(8))
    F = 2 * D if map_name == "hedgehog" else D
    state = torch.empty(B, H, F, D, device=meta)
    normaliser = torch.empty(B, H, F, device=meta)
    params = (torch.empty(H, D, D, device=meta),) if map_name == "hedgehog" else ()
    d_params = [torch.empty(H, D, D, device=meta)] if params else []
    fmap = MapCall(map_name, params)
    backend = get_kernel_backend("triton")
    with plan.assume_device(H200), capture_launches() as launches:
        backend.forward(q, k, v, None, fmap, fmap, 1e-6, o, state, normaliser)
        backend.backward(do, q, k, v, None, fmap, fmap, 1e-6, state, normaliser, dq, dk, dv,
                         d_params, list(d_params))
    programs = [torch.Size(grid).numel() for _, grid, _, _ in launches]
    # The split kernels fill the 132 SMs (a reduction launch may be smaller).
    assert max(programs) >= 120 and len(launches) >= 5


def test_eager_calls_skip_the_custom_op(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")

    monkeypatch.setattr(op_autograd, "forward_op", refuse)
    q, k, v, mask = _inputs()
    out = linattn.linear_attention(q, k, v, key_padding_mask=mask, backend="cpu")
    out.sum().backward()
    with torch.no_grad():
        linattn.linear_attention(q, k, v, backend="cpu")


def test_double_backward_is_refused_not_wrong():
    """create_graph=True gives the right first derivatives; differentiating them again raises
    rather than treating them as constants."""
    q, k, v, _ = _inputs()
    out = linattn.linear_attention(q, k, v, backend="cpu")
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    (plain,) = torch.autograd.grad(linattn.linear_attention(q, k, v, backend="cpu").sum(), q)
    torch.testing.assert_close(dq, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="gradients are not differentiable"):
        (dq.square().sum() + q.sum()).backward()
