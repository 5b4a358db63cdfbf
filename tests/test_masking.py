"""The key padding mask's contract, on every backend, the float64 reference included:

* masked keys contribute nothing: whatever they hold (NaN, inf) changes no output and no
  gradient by a single bit, and their own gradients dk, dv are exactly 0;
* a batch row whose keys are all masked returns exactly 0, and its queries' gradients are
  exactly 0 (README, the op's docstring).

Each case runs twice on the same unmasked values: once with ordinary random numbers in the
masked positions, once with NaN in k and ±inf in v there; the two runs must agree exactly.
"""
from __future__ import annotations

import pytest
import torch

import linattn
from linattn import feature_maps
from linattn.feature_maps import Hedgehog

from conftest import backend_device

BACKENDS = ["reference", "cpu", "triton"]


class ShiftedSquare(feature_maps.FeatureMap):
    """A map no kernel knows (applied in PyTorch by the op), with a learnable parameter."""

    kernel_name = None

    def __init__(self):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(0.7))

    def kernel_params(self):
        return (self.shift,)

    def apply(self, x, params):
        (shift,) = params
        return (x + shift.to(x.dtype)) ** 2


def make_map(name: str):
    if name == "hedgehog":
        return Hedgehog(2, 16, feature_dim=16, init="random")
    if name == "user":
        return ShiftedSquare()
    return name


def run(backend, fmap, q, k, v, mask, grad_out, layout):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    params = list(fmap.parameters()) if isinstance(fmap, torch.nn.Module) else []
    for p in params:
        p.grad = None
    out = linattn.linear_attention(q, k, v, feature_map=fmap, key_padding_mask=mask,
                                   layout=layout, backend=backend)
    out.backward(grad_out)
    result = dict(out=out.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
    result.update({f"d_param{i}": p.grad.clone() for i, p in enumerate(params)})
    return result


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("map_name, layout, dtype", [
    ("relu", "bnhd", torch.float32),
    ("elu", "bhnd", torch.float32),
    ("softmax", "bnhd", torch.bfloat16),
    ("hedgehog", "bnhd", torch.float32),
    ("user", "bhnd", torch.float32),
])
def test_masked_keys_contribute_nothing(backend, map_name, layout, dtype):
    torch.manual_seed(0)
    # Drawn on CPU (the same numbers everywhere), then moved where the backend runs: on a GPU
    # machine triton refuses CPU tensors.
    device = backend_device(backend)
    B, Nq, Nk, H, D = 2, 9, 13, 2, 16
    seq_first = layout == "bnhd"

    def randn(n):
        shape = (B, n, H, D) if seq_first else (B, H, n, D)
        return torch.randn(*shape).to(device, dtype)

    q, k, v = randn(Nq), randn(Nk), randn(Nk)
    mask = (torch.rand(B, Nk) < 0.6).to(device)
    mask[0, 0] = True
    mask[1] = False  # a batch row whose keys are all masked
    dropped = ~mask if seq_first else (~mask)[:, None, :].expand(B, H, Nk)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[dropped] = float("nan")
    poisoned_v[dropped] = float("inf")
    poisoned_v[..., 0][dropped] = float("-inf")
    grad_out = randn(Nq)
    fmap = make_map(map_name)
    if isinstance(fmap, torch.nn.Module):
        fmap = fmap.to(device)  # the map's parameters go where the inputs are

    clean = run(backend, fmap, q, k, v, mask, grad_out, layout)
    poisoned = run(backend, fmap, q, poisoned_k, poisoned_v, mask, grad_out, layout)
    for name, value in clean.items():
        assert torch.isfinite(value).all(), f"{name}: not finite"
        assert torch.equal(value, poisoned[name]), f"{name}: changed by what masked keys hold"
    assert (clean["dk"][dropped] == 0).all() and (clean["dv"][dropped] == 0).all(), \
        "masked keys must get dk = dv = 0 exactly"
    assert (clean["out"][1] == 0).all(), "a row with every key masked must return exactly 0"
    assert (clean["dq"][1] == 0).all(), "... and its queries' gradients must be exactly 0"
