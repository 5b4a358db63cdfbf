"""Every kernel backend against the float64 reference: forward and all gradients.

Fresh random inputs each run (no fixed seed), outputs NaN-poisoned (conftest.py), sizes that are
not multiples of any block size, non-contiguous inputs, both layouts, masks, every builtin map.
Tolerances are justified in numerics.py. Each backend runs on its own device (BACKEND_DEVICES):
on a GPU machine the Triton cases run the compiled kernels (benchmarks/gpu_check.py runs them).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

import linattn
from linattn.ops.reference import linear_attention_reference
from linattn.ops.validation import to_bnhd
from linattn import feature_maps

from conftest import backend_device
from numerics import assert_close_to_reference

# The backends CI must exercise: native CPU and Triton (interpreted on a CPU-only machine).
# A missing one is a failure, not a skip: "nothing fails silently".
EXPECTED_KERNEL_BACKENDS = ["cpu", "triton"]

# Each backend on the device it runs: cpu on CPU tensors; triton on the GPU where there is one
# (compiled kernels: the hardware bf16, fp16 and 3xTF32 fp32 paths), else on CPU tensors under
# the interpreter (conftest.py sets TRITON_INTERPRET=1 only when torch sees no GPU).
TRITON_DEVICE = backend_device("triton")
BACKEND_DEVICES = [pytest.param("cpu", torch.device("cpu"), id="cpu"),
                   pytest.param("triton", TRITON_DEVICE, id=f"triton-{TRITON_DEVICE.type}")]


@dataclass(frozen=True)
class Case:
    batch: int = 2
    q_len: int = 77
    kv_len: int = 77
    heads: int = 2
    head_dim: int = 32
    value_dim: int = 32
    dtype: torch.dtype = torch.float32
    feature_map: str = "relu"
    layout: str = "bnhd"
    masked: bool = False
    strided: bool = False  # q, k, v as slices of one fused qkv buffer (how DiTs produce them)
    # With a single key, o = φ(q)·φ(k) v / (φ(q)·φ(k) + eps) ≈ v and dq is an eps-sized
    # difference of two large terms: ill-conditioned in any precision below float64 (fp32
    # errors reach 10x the fp32 reference's own, either way). Those cases test block edges, not
    # conditioning, so they use an eps that keeps dq well-conditioned.
    eps: float = 1e-6

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        extra = "-mask" if self.masked else ""
        extra += "-strided" if self.strided else ""
        extra += f"-eps{self.eps:g}" if self.eps != 1e-6 else ""
        return (f"B{self.batch}-Nq{self.q_len}-Nk{self.kv_len}-H{self.heads}-D{self.head_dim}"
                f"-Dv{self.value_dim}-{dt}-{self.feature_map}-{self.layout}{extra}")


BASE = Case()
CASES = [
    # sequence lengths, including 1 and lengths that are not multiples of any block size
    replace(BASE, q_len=1, kv_len=1, eps=0.5),
    *[replace(BASE, q_len=n, kv_len=n) for n in (77, 1000, 4096)],
    # head dims
    *[replace(BASE, batch=1, head_dim=d, value_dim=d) for d in (16, 32, 64, 128)],
    # Dv != D, Nq != Nk, batch > 1
    replace(BASE, head_dim=64, value_dim=32),
    replace(BASE, head_dim=32, value_dim=128, batch=1),
    replace(BASE, q_len=77, kv_len=1000),
    replace(BASE, q_len=1000, kv_len=1, batch=3, eps=0.5),
    # every map, both layouts
    *[replace(BASE, feature_map=m) for m in ("elu", "softmax", "identity")],
    *[replace(BASE, feature_map=m, layout="bhnd") for m in ("relu", "softmax")],
    # masks (one batch row fully masked), non-contiguous inputs
    replace(BASE, masked=True, kv_len=1000, q_len=33),
    replace(BASE, masked=True, layout="bhnd", feature_map="elu"),
    replace(BASE, strided=True, head_dim=64, value_dim=64, q_len=300, kv_len=300),
    replace(BASE, strided=True, layout="bhnd", masked=True),
    # reduced precision
    replace(BASE, dtype=torch.bfloat16, q_len=1000, kv_len=1000, head_dim=64, value_dim=64),
    replace(BASE, dtype=torch.bfloat16, layout="bhnd", masked=True, feature_map="softmax"),
    replace(BASE, dtype=torch.bfloat16, feature_map="elu", head_dim=128, value_dim=64, batch=1),
    # the video DiTs' class (D = Dv = 128, 16-bit): on a GPU, the timed configs of the tuned table
    replace(BASE, dtype=torch.bfloat16, head_dim=128, value_dim=128, batch=1, q_len=1000,
            kv_len=1000),
    replace(BASE, dtype=torch.float16, strided=True, feature_map="relu"),
]


def make_inputs(case: Case, device: torch.device):
    """Leaf tensors q, k, v in the case's layout (requires_grad) and an optional key mask."""
    B, Nq, Nk, H, D, Dv = (case.batch, case.q_len, case.kv_len, case.heads, case.head_dim,
                           case.value_dim)

    def randn(*shape):
        x = torch.randn(*shape, device=device, dtype=torch.float32)
        if case.feature_map == "identity":
            # φ = identity needs positive features for a well-conditioned denominator.
            x = x.abs() + 0.1
        return x.to(case.dtype)

    if case.strided:
        # One fused projection output, sliced: every tensor has a non-unit token stride, and
        # (with padding columns) a head stride that is not D.
        width = 2 * D + Dv + 5
        fused_q = randn(B, Nq, H, width)
        fused_kv = randn(B, Nk, H, width)
        q, k, v = fused_q[..., :D], fused_kv[..., D:2 * D], fused_kv[..., 2 * D:2 * D + Dv]
        if case.layout == "bhnd":
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        assert not q.is_contiguous() and not v.is_contiguous()
    elif case.layout == "bhnd":
        q, k, v = randn(B, H, Nq, D), randn(B, H, Nk, D), randn(B, H, Nk, Dv)
    else:
        q, k, v = randn(B, Nq, H, D), randn(B, Nk, H, D), randn(B, Nk, H, Dv)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))

    mask: Optional[torch.Tensor] = None
    if case.masked:
        mask = torch.rand(B, Nk, device=device) < 0.7
        mask[-1] = False  # a batch row with no key at all: o must be exactly 0, not NaN
        mask[0, 0] = True
    return q, k, v, mask


def reference_and_grads(case: Case, q, k, v, mask, grad_out, compute_dtype=torch.float64):
    """Reference output and gradients (float64 unless asked), in the case's layout."""
    qr, kr, vr = (t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v))
    fmap = feature_maps.resolve(case.feature_map)
    out = linear_attention_reference(*(to_bnhd(t, case.layout) for t in (qr, kr, vr)),
                                     fmap, fmap, case.eps, mask, compute_dtype=compute_dtype)
    out = to_bnhd(out, case.layout)  # bnhd -> case layout (transpose is its own inverse)
    out.backward(grad_out.to(compute_dtype))
    return out.detach(), qr.grad, kr.grad, vr.grad


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backend_matches_reference(backend: str, case: Case, device: torch.device):
    info = {b.name: b for b in linattn.backends()}[backend]
    if not info.available:
        pytest.fail(f"backend {backend!r} must be available for this suite: {info.reason}")
    if case.dtype == torch.float64 and backend == "triton":
        pytest.skip("triton takes fp16, bf16 and fp32 (documented); float64 is checked on cpu")
    q, k, v, mask = make_inputs(case, device)
    out = linattn.linear_attention(q, k, v, feature_map=case.feature_map, layout=case.layout,
                                   key_padding_mask=mask, eps=case.eps, backend=backend)
    assert out.dtype == q.dtype and out.shape[:-1] == q.shape[:-1] and out.shape[-1] == v.shape[-1]
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    reference = reference_and_grads(case, q, k, v, mask, grad_out)
    # The same reference in the kernel's dtype: the bar for ill-conditioned cases (numerics.py).
    peer = reference_and_grads(case, q, k, v, mask, grad_out, compute_dtype=case.dtype)
    for name, got, want, peer_value in zip(("output", "dq", "dk", "dv"),
                                           (out, q.grad, k.grad, v.grad), reference, peer):
        assert_close_to_reference(got, want, case.dtype, f"{backend} {name}", peer=peer_value)
    if mask is not None:
        masked_keys = ~mask
        assert (to_bnhd(k.grad, case.layout)[masked_keys] == 0).all(), "masked keys got dk != 0"
        assert (to_bnhd(v.grad, case.layout)[masked_keys] == 0).all(), "masked keys got dv != 0"
        assert (to_bnhd(out, case.layout)[-1] == 0).all(), "a row with every key masked must give 0"


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES[:1])
def test_float64_inputs(backend: str, device: torch.device):
    """float64 inputs keep a float64 state on the native CPU backend."""
    case = replace(BASE, dtype=torch.float64, masked=True, feature_map="softmax")
    q, k, v, mask = make_inputs(case, device)
    out = linattn.linear_attention(q, k, v, feature_map="softmax", key_padding_mask=mask,
                                   backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref, dq, dk, dv = reference_and_grads(case, q, k, v, mask, grad_out)
    for name, got, want in (("out", out, ref), ("dq", q.grad, dq), ("dk", k.grad, dk),
                            ("dv", v.grad, dv)):
        assert_close_to_reference(got, want, torch.float64, f"{backend} {name}")


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_long_bf16_sequence_does_not_overflow(backend: str, device: torch.device):
    """N >= 100k in bf16 with positive features: S and z grow like N, so they must stay fp32."""
    n = 100_003
    q, k, v = (torch.randn(1, n, 1, 16, device=device).to(torch.bfloat16).requires_grad_()
               for _ in range(3))
    out = linattn.linear_attention(q, k, v, feature_map="elu", backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    case = Case(batch=1, q_len=n, kv_len=n, heads=1, head_dim=16, value_dim=16,
                dtype=torch.bfloat16, feature_map="elu")
    ref, dq, dk, dv = reference_and_grads(case, q, k, v, None, grad_out)
    assert_close_to_reference(out, ref, torch.bfloat16, f"{backend} output at N={n}")
    assert_close_to_reference(k.grad, dk, torch.bfloat16, f"{backend} dk at N={n}")
    assert_close_to_reference(v.grad, dv, torch.bfloat16, f"{backend} dv at N={n}")


class ShiftedSquare(feature_maps.FeatureMap):
    """A user's own map that no kernel knows: φ(x) = (x + s)², with a learnable shift s.
    (A scale would cancel between numerator and denominator and leave an eps-sized gradient.)"""

    kernel_name = None

    def __init__(self):
        super().__init__()
        self.shift = torch.nn.Parameter(torch.tensor(0.7))

    def kernel_params(self):
        return (self.shift,)

    def apply(self, x, params):
        (shift,) = params
        return (x + shift.to(x.dtype)) ** 2


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_unfused_user_map_runs_on_kernel_backends(backend: str, device: torch.device):
    """A map with kernel_name None is applied in PyTorch and its parameter gets a gradient."""
    fmap = ShiftedSquare().to(device)
    q, k, v = (torch.randn(2, 50, 2, 16, device=device, requires_grad=True) for _ in range(3))
    out = linattn.linear_attention(q, k, v, feature_map=fmap, backend=backend)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    got_shift_grad = fmap.shift.grad.clone()

    fmap.shift.grad = None
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = linear_attention_reference(q64, k64, v64, fmap, fmap, 1e-6)
    ref.backward(grad_out.double())
    assert_close_to_reference(out, ref, torch.float32, f"{backend} output, user map")
    assert_close_to_reference(q.grad, q64.grad, torch.float32, f"{backend} dq, user map")
    assert_close_to_reference(got_shift_grad.reshape(1), fmap.shift.grad.reshape(1),
                              torch.float32, f"{backend} d shift, user map")
