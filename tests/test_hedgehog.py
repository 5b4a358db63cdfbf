"""The Hedgehog map φ(x) = softmax(xW) ⊕ softmax(−xW): its fused Triton kernels, its float64
reference, and the LinearAttention module that owns two of them.

Fresh random inputs and weights each run (no fixed seed); every output and every scratch
buffer the kernels get is NaN-filled first (conftest.py), so an unwritten element fails.
Tolerances are numerics.py's. Shapes are tiny because CI runs the kernels in Triton's
interpreter; block_n=16 and explicit num_splits make even these shapes cover several token
blocks per program, ragged last blocks, and the sum of split partials.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton reads this when it decorates the kernels (conftest.py sets it too).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass, replace  # noqa: E402
from typing import Optional  # noqa: E402

import pytest  # noqa: E402

import linattn  # noqa: E402
from linattn.feature_maps import Hedgehog  # noqa: E402
from linattn.kernels.triton.hedgehog import (hedgehog_backward, hedgehog_forward,  # noqa: E402
                                             hedgehog_unsupported)
from linattn.modules import LinearAttention  # noqa: E402
from linattn.ops import alloc  # noqa: E402
from linattn.ops.reference import linear_attention_reference  # noqa: E402

from numerics import assert_close_to_reference  # noqa: E402

EPS = 1e-6


@dataclass(frozen=True)
class Case:
    batch: int = 2
    q_len: int = 37
    kv_len: int = 29
    heads: int = 2
    head_dim: int = 20
    value_dim: int = 24
    feature_dim: int = 12
    dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype = torch.float32
    layout: str = "bnhd"
    masked: bool = False
    strided: bool = False
    num_splits: Optional[int] = 2

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        wdt = str(self.weight_dtype).replace("torch.", "")
        return (f"B{self.batch}-Nq{self.q_len}-Nk{self.kv_len}-H{self.heads}-D{self.head_dim}"
                f"-Dv{self.value_dim}-F{self.feature_dim}-{dt}-W{wdt}-{self.layout}"
                f"{'-mask' if self.masked else ''}{'-strided' if self.strided else ''}"
                f"-splits{self.num_splits}")


BASE = Case()
CASES = [
    # F < D, Dv != D, Nq != Nk, none a power of two; masked keys; two splits (partial sums).
    replace(BASE, masked=True),
    # F = D = Dv, (B, H, N, D) memory, one batch and one split: every result written directly.
    replace(BASE, batch=1, q_len=50, kv_len=50, head_dim=16, value_dim=16, feature_dim=16,
            layout="bhnd", num_splits=1),
    # F > D in bf16, bhnd, masked, three splits.
    replace(BASE, dtype=torch.bfloat16, head_dim=16, feature_dim=24, layout="bhnd",
            masked=True, num_splits=3),
    # fp16 from one fused projection buffer (non-unit token strides), F < D.
    replace(BASE, dtype=torch.float16, head_dim=16, value_dim=16, feature_dim=8, strided=True),
    # W kept in the input dtype (a model cast to bf16): dW comes back in bf16.
    replace(BASE, dtype=torch.bfloat16, weight_dtype=torch.bfloat16, masked=True),
]


def make_maps(case: Case, device) -> tuple[Hedgehog, Hedgehog]:
    """Two separate randomly initialised maps (identity init is tested on its own)."""
    return tuple(Hedgehog(case.heads, case.head_dim, case.feature_dim, init="random",
                          dtype=case.weight_dtype, device=device) for _ in range(2))


def make_inputs(case: Case, device):
    """(B, N, H, D)-indexed q, k, v in the case's memory layout, and a key mask."""
    B, Nq, Nk, H, D, Dv = (case.batch, case.q_len, case.kv_len, case.heads, case.head_dim,
                           case.value_dim)

    def randn(*shape):
        return torch.randn(*shape, device=device).to(case.dtype)

    if case.strided:
        width = 2 * D + Dv + 3
        fused_q, fused_kv = randn(B, Nq, H, width), randn(B, Nk, H, width)
        q, k, v = fused_q[..., :D], fused_kv[..., D:2 * D], fused_kv[..., 2 * D:2 * D + Dv]
        assert not q.is_contiguous() and not v.is_contiguous()
    elif case.layout == "bhnd":
        q, k, v = (randn(B, H, n, d).transpose(1, 2)
                   for n, d in ((Nq, D), (Nk, D), (Nk, Dv)))
    else:
        q, k, v = randn(B, Nq, H, D), randn(B, Nk, H, D), randn(B, Nk, H, Dv)
    mask = None
    if case.masked:
        mask = torch.rand(B, Nk, device=device) < 0.7
        mask[-1] = False  # a batch row without any key: o = 0 and every gradient 0
        mask[0, 0] = True
    return q, k, v, mask


def reference(q, k, v, mask, maps, grad_out):
    """Float64 output, S, z and gradients (dq, dk, dv, dW_q, dW_k) by autograd."""
    q64, k64, v64 = (t.detach().to(torch.float64).requires_grad_() for t in (q, k, v))
    maps64 = []
    for fmap in maps:
        m = Hedgehog(fmap.num_heads, fmap.head_dim, fmap.feature_dim, dtype=torch.float64,
                     device=q.device)
        with torch.no_grad():
            m.weight.copy_(fmap.weight)
        maps64.append(m)
    out = linear_attention_reference(q64, k64, v64, maps64[0], maps64[1], EPS, mask)
    out.backward(grad_out.to(torch.float64))
    with torch.no_grad():
        phi_k = maps64[1](k64)
        if mask is not None:
            phi_k = torch.where(mask[:, :, None, None], phi_k, 0.0)
        state = torch.einsum("bnhf,bnhe->bhfe", phi_k, v64)
        normaliser = phi_k.sum(dim=1)
    return dict(o=out.detach(), state=state, normaliser=normaliser, dq=q64.grad, dk=k64.grad,
                dv=v64.grad, dw_q=maps64[0].weight.grad, dw_k=maps64[1].weight.grad)


def empty_like_bnhd(t: torch.Tensor, last: Optional[int] = None) -> torch.Tensor:
    """A NaN-poisoned output with t's (B, N, H, ·) shape and memory order."""
    B, N, H, D = t.shape
    bhnd = t.stride(1) < t.stride(2)
    return alloc.empty_bnhd(B, N, H, D if last is None else last, bhnd=bhnd, dtype=t.dtype,
                            device=t.device)


def run_kernels(q, k, v, mask, maps, grad_out=None, **knobs):
    """hedgehog_forward, then (given grad_out) hedgehog_backward, on freshly allocated
    (poisoned) outputs."""
    B, Nq, H, _ = q.shape
    Dv, F = v.shape[-1], maps[0].feature_dim
    w_q, w_k = (m.weight.detach() for m in maps)
    o = empty_like_bnhd(q, Dv)
    state = alloc.empty(B, H, 2 * F, Dv, dtype=torch.float32, device=q.device)
    normaliser = alloc.empty(B, H, 2 * F, dtype=torch.float32, device=q.device)
    hedgehog_forward(q, k, v, mask, w_q, w_k, EPS, o, state, normaliser, **knobs)
    if grad_out is None:
        return dict(o=o, state=state, normaliser=normaliser)
    dq, dk, dv = empty_like_bnhd(q), empty_like_bnhd(k), empty_like_bnhd(v)
    dw_q, dw_k = (alloc.empty(*w.shape, dtype=w.dtype, device=w.device) for w in (w_q, w_k))
    hedgehog_backward(grad_out, q, k, v, mask, w_q, w_k, EPS, state, normaliser, dq, dk, dv,
                      dw_q, dw_k, **knobs)
    return dict(o=o, state=state, normaliser=normaliser, dq=dq, dk=dk, dv=dv, dw_q=dw_q,
                dw_k=dw_k)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernels_match_reference(case: Case, device):
    """Values, S, z and every gradient, W's included, against float64 autograd."""
    q, k, v, mask = make_inputs(case, device)
    maps = make_maps(case, device)
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), device=device).to(case.dtype)
    want = reference(q, k, v, mask, maps, grad_out)
    if mask is not None:
        # What masked keys hold must not matter: NaN there fails any kernel that reads them.
        k, v = k.clone(), v.clone()
        k[~mask], v[~mask] = float("nan"), float("nan")
    got = run_kernels(q, k, v, mask, maps, grad_out, block_n=16, num_splits=case.num_splits)

    assert got["dw_q"].dtype == case.weight_dtype and got["o"].dtype == case.dtype
    for name, value in got.items():
        # W rounded to bf16 is part of the kernels' documented error, so bf16 weights get the
        # bf16 tolerance whatever the inputs are.
        dtype = case.weight_dtype if name.startswith("dw") and case.weight_dtype != torch.float32 \
            else case.dtype
        assert_close_to_reference(value, want[name], dtype, f"hedgehog {name} [{case}]")
    if mask is not None:
        assert (got["dk"][~mask] == 0).all() and (got["dv"][~mask] == 0).all(), \
            "masked keys must get dk = dv = 0 exactly"
        assert (got["o"][-1] == 0).all(), "a batch row with every key masked must give o = 0"
        assert (got["dq"][-1] == 0).all(), "... and dq = 0"


def test_identity_init_is_the_documented_function(device):
    """init="identity": φ(x) = [softmax(x), softmax(−x)] (F = D), and for F > D the extra
    features start as zero logits. Checked with formulas written here, not Hedgehog.apply."""
    H, D = 2, 16
    x = torch.randn(3, 5, H, D, device=device)
    square, wide = Hedgehog(H, D, device=device), Hedgehog(H, D, feature_dim=24, device=device)
    assert square.feature_dim == D and square.output_dim(D) == 2 * D
    expected = torch.cat([torch.softmax(x, -1), torch.softmax(-x, -1)], dim=-1)
    torch.testing.assert_close(square(x), expected)
    padded = torch.cat([x, torch.zeros(3, 5, H, 24 - D, device=device)], dim=-1)
    torch.testing.assert_close(
        wide(x), torch.cat([torch.softmax(padded, -1), torch.softmax(-padded, -1)], dim=-1))

    # The fused kernels compute the same function: o = φ(q)ᵀS / (φ(q)ᵀz + eps).
    q, k, v = (torch.randn(2, 40, H, D, device=device, dtype=torch.float64) for _ in range(3))
    phi = lambda t: torch.cat([torch.softmax(t, -1), torch.softmax(-t, -1)], -1)  # noqa: E731
    S = torch.einsum("bnhf,bnhe->bhfe", phi(k), v)
    z = phi(k).sum(1)
    want = torch.einsum("bnhf,bhfe->bnhe", phi(q), S) / (
        torch.einsum("bnhf,bhf->bnh", phi(q), z) + EPS)[..., None]
    maps = (Hedgehog(H, D, device=device), Hedgehog(H, D, device=device))
    got = run_kernels(*(t.float() for t in (q, k, v)), None, maps, block_n=16)
    assert_close_to_reference(got["o"], want, torch.float32, "identity-init hedgehog o")
    assert_close_to_reference(got["state"], S, torch.float32, "identity-init hedgehog S")


def test_saturated_logits_need_no_clamp(device):
    """Large logits make most features underflow to exactly 0 in fp32. Nothing divides by a
    feature and den >= eps, so no 1e-12 clamp (LoLCATs') is needed: values and gradients
    stay finite and match the reference."""
    case = replace(BASE, head_dim=16, value_dim=16, feature_dim=16, num_splits=1)
    q, k, v, _ = make_inputs(case, device)
    q, k = q * 200, k * 200
    maps = (Hedgehog(case.heads, 16, device=device), Hedgehog(case.heads, 16, device=device))
    phi_k = maps[1](k)
    assert (phi_k == 0).float().mean() > 0.5, "the test needs features that underflow to 0"
    grad_out = torch.randn(q.shape[:-1] + (v.shape[-1],), device=device)
    want = reference(q, k, v, None, maps, grad_out)
    got = run_kernels(q, k, v, None, maps, grad_out, block_n=16)
    for name in ("o", "dq", "dk", "dv", "dw_q", "dw_k"):
        assert_close_to_reference(got[name], want[name], torch.float32, f"saturated {name}")


class _HedgehogWith(Hedgehog):
    """A Hedgehog whose W is a given tensor (so gradcheck can treat W as an input)."""

    def __init__(self, weight: torch.Tensor):
        H, D, F = weight.shape
        super().__init__(H, D, F, dtype=weight.dtype, device=weight.device)
        self._given = weight

    def kernel_params(self):
        return (self._given,)


def test_reference_gradcheck_float64(device):
    """The oracle itself: analytic gradients of q, k, v, W_q, W_k equal finite differences."""
    B, N, H, D, F = 1, 4, 2, 3, 2
    q, k, v = (torch.randn(B, N, H, D, device=device, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    w_q, w_k = (torch.randn(H, D, F, device=device, dtype=torch.float64, requires_grad=True)
                for _ in range(2))
    mask = torch.tensor([[True, False, True, True]], device=device)

    def fn(q, k, v, w_q, w_k):
        return linear_attention_reference(q, k, v, _HedgehogWith(w_q), _HedgehogWith(w_k), 1e-3,
                                          mask)

    assert torch.autograd.gradcheck(fn, (q, k, v, w_q, w_k))


@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_public_op_on_triton(layout: str, device):
    """linattn.linear_attention(..., backend="triton") with a pair of Hedgehog maps: through
    the custom op and autograd, gradients reach q, k, v and both W."""
    case = replace(BASE, masked=True, layout=layout)
    q, k, v, mask = make_inputs(case, device)
    maps = make_maps(case, device)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    to_layout = (lambda t: t) if layout == "bnhd" else (lambda t: t.transpose(1, 2))
    out = linattn.linear_attention(*(to_layout(t) for t in (q, k, v)), feature_map=maps,
                                   layout=layout, key_padding_mask=mask, backend="triton")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    want = reference(q, k, v, mask, maps, to_layout(grad_out))
    assert_close_to_reference(to_layout(out), want["o"], case.dtype, "triton op o")
    for name, got in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad),
                      ("dw_q", maps[0].weight.grad), ("dw_k", maps[1].weight.grad)):
        assert_close_to_reference(got, want[name], case.dtype, f"triton op {name}")


# ----------------------------------------------------------------------------- the module


def test_module_owns_two_separate_hedgehog_maps(device):
    attn = LinearAttention(3, 16, device=device)
    assert isinstance(attn.q_map, Hedgehog) and isinstance(attn.k_map, Hedgehog)
    assert attn.q_map is not attn.k_map
    names = dict(attn.named_parameters())
    assert sorted(names) == ["k_map.weight", "q_map.weight"]
    eye = torch.eye(16, device=device).expand(3, 16, 16)
    assert torch.equal(attn.q_map.weight, eye) and torch.equal(attn.k_map.weight, eye)
    wide = LinearAttention(3, 16, feature_dim=24, device=device)
    assert wide.q_map.weight.shape == (3, 16, 24) and wide.q_map.output_dim(16) == 48


def test_module_forward_and_weight_gradients(device):
    """The module equals the op with its maps; learning moves both W (reference backend)."""
    attn = LinearAttention(2, 16, feature_dim=8, backend="reference", device=device)
    with torch.no_grad():
        for m in (attn.q_map, attn.k_map):
            m.weight.normal_(std=0.3)
    q, k, v = (torch.randn(2, 30, 2, 16, device=device) for _ in range(3))
    mask = torch.rand(2, 30, device=device) < 0.8
    out = attn(q, k, v, key_padding_mask=mask)
    want = linear_attention_reference(q, k, v, attn.q_map, attn.k_map, attn.eps, mask)
    torch.testing.assert_close(out, want)
    out.square().sum().backward()
    for m in (attn.q_map, attn.k_map):
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0
    assert not torch.equal(attn.q_map.weight.grad, attn.k_map.weight.grad)


def test_module_map_choices(device):
    tied_map = Hedgehog(2, 16, device=device)
    tied = LinearAttention(2, 16, feature_map=tied_map)
    assert tied.q_map is tied.k_map and len(list(tied.parameters())) == 1
    relu = LinearAttention(2, 16, feature_map="relu")
    assert len(list(relu.parameters())) == 0
    pair = LinearAttention(2, 16, feature_map=("hedgehog", "hedgehog"), feature_dim=8)
    assert pair.q_map is not pair.k_map and pair.k_map.feature_dim == 8
    q = torch.randn(1, 5, 2, 16)
    assert relu(q, q, q).shape == (1, 5, 2, 16)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(feature_map="relu", feature_dim=8), "feature_dim"),
    (dict(feature_map="nope"), "feature_map"),
    (dict(feature_map=("hedgehog",)), "feature_map"),
    (dict(feature_map=Hedgehog(3, 16)), "feature_map"),
    (dict(feature_map=("hedgehog", "relu")), "feature_map"),
    (dict(eps=0.0), "eps"),
    (dict(layout="nbhd"), "layout"),
    (dict(backend="gpu"), "backend"),
    (dict(num_heads=0), "num_heads"),
])
def test_module_rejects_bad_arguments(kwargs, argument):
    args = dict(num_heads=2, head_dim=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        LinearAttention(**args)


def test_module_on_triton(device):
    attn = LinearAttention(2, 16, feature_dim=8, backend="triton", device=device)
    q, k, v = (torch.randn(1, 20, 2, 16, device=device) for _ in range(3))
    out = attn(q, k, v)
    want = linear_attention_reference(q, k, v, attn.q_map, attn.k_map, attn.eps)
    assert_close_to_reference(out, want, torch.float32, "LinearAttention on triton")


# ----------------------------------------------------------------------------- argument checks


def test_kernel_entry_points_name_bad_arguments(device):
    case = replace(BASE, num_splits=1)
    q, k, v, _ = make_inputs(case, device)
    maps = make_maps(case, device)
    w_q, w_k = (m.weight.detach() for m in maps)
    B, Nq, H, D = q.shape
    F, Dv = case.feature_dim, case.value_dim
    o = empty_like_bnhd(q, Dv)
    state = torch.empty(B, H, 2 * F, Dv, device=device)
    normaliser = torch.empty(B, H, 2 * F, device=device)
    with pytest.raises(ValueError, match="w_k"):
        hedgehog_forward(q, k, v, None, w_q, w_k[:, :, :-1], EPS, o, state, normaliser)
    with pytest.raises(ValueError, match="state"):
        hedgehog_forward(q, k, v, None, w_q, w_k, EPS, o, state.double(), normaliser)
    with pytest.raises(ValueError, match="key_mask"):
        hedgehog_forward(q, k, v, torch.ones(B, Nq + 1, dtype=torch.bool, device=device), w_q,
                         w_k, EPS, o, state, normaliser)
    with pytest.raises(ValueError, match="block_n"):
        hedgehog_forward(q, k, v, None, w_q, w_k, EPS, o, state, normaliser, block_n=24)
    dw = torch.empty(H, F, D, device=device).transpose(1, 2)  # right shape, not contiguous
    with pytest.raises(ValueError, match="dw_q"):
        hedgehog_backward(o, q, k, v, None, w_q, w_k, EPS, state, normaliser,
                          torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dw,
                          torch.empty_like(w_k))
    # Limits (kernels/triton/hedgehog/plan.py): 128 for 16-bit inputs, 64 for fp32 inputs.
    assert hedgehog_unsupported(128, 128, 256, torch.bfloat16) is None
    assert "feature_dim 512" in hedgehog_unsupported(128, 128, 1024, torch.bfloat16)
    assert "head_dim 128 exceeds 64" in hedgehog_unsupported(128, 64, 128, torch.float32)
    wide = torch.randn(1, 4, 1, 128, device=device)
    w = torch.randn(1, 128, 8, device=device)
    with pytest.raises(ValueError, match="head_dim 128 exceeds 64"):
        hedgehog_forward(wide, wide, wide, None, w, w, EPS, torch.empty_like(wide),
                         torch.empty(1, 1, 16, 128, device=device),
                         torch.empty(1, 1, 16, device=device))
