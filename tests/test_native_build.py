"""The native module linattn._C and its CPU kernels beyond the shared backend suite:

* the build: the module is importable, reports what it was built with, and the package still
  works (reference backend, with the reason) where it is missing;
* the bindings: inconsistent tensors are rejected with errors that name the argument;
* Hedgehog fused on the CPU: values and every gradient, W's included, against autograd of the
  float64 reference (F != D, fp32 W with bf16 inputs, W in the input dtype, masks, both
  layouts, split sequences, one map shared by q and k);
* the thread partition: sequences split for 1 or 2 threads agree with the reference, and a
  repeated call is bitwise identical;
* the contract's corner: zero-stride do and (B, H, N, D)-laid-out outputs.

Fresh random inputs each run; outputs NaN-poisoned (conftest.py); tolerances from numerics.py.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

import linattn
from linattn._native import load_error, native
from linattn.backends import MapCall
from linattn.backends.cpu import CpuBackend, _view
from linattn.feature_maps import Hedgehog, ReLU
from linattn.ops import alloc
from linattn.ops.reference import linear_attention_reference

from numerics import assert_close_to_reference

EPS = 1e-6


def _require_native():
    if native is None:
        pytest.fail(f"linattn._C must be built for this suite: {load_error}")


# ---- the build ---------------------------------------------------------------------------


def test_native_module_reports_its_build():
    _require_native()
    assert not hasattr(native, "has_cuda_kernels")  # no CUDA C++ kernels, no placeholder
    info = native.build_info()
    assert info["openmp"] > 0 and info["vector_bytes"] in (16, 32, 64)
    # Python's list of fused maps is the C++ one: a map added on one side only fails here.
    assert set(native.cpu_feature_maps()) == set(CpuBackend.supported_maps)


def test_package_works_without_the_native_module():
    """A failed build must leave an importable package whose cpu backend says why."""
    script = textwrap.dedent("""
        import importlib.abc, sys, warnings

        class NoNative(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "linattn._C":
                    raise ImportError("pretend the build failed")
                return None

        sys.meta_path.insert(0, NoNative())
        import torch, linattn
        info = {b.name: b for b in linattn.backends()}["cpu"]
        assert not info.available and "pretend the build failed" in info.reason, info
        q = torch.randn(1, 5, 1, 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            linattn.linear_attention(q, q, q, backend="auto")  # the reference, with a warning
        try:
            linattn.linear_attention(q, q, q, backend="cpu")
        except linattn.BackendUnavailableError as error:
            assert "pretend the build failed" in str(error)
        else:
            raise AssertionError("backend='cpu' ran without its module")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


# ---- the bindings --------------------------------------------------------------------------


def _forward_views(q, k, v, o, state, normaliser, q_map="relu", q_params=(), k_params=()):
    return dict(q=_view(q), k=_view(k), v=_view(v), key_mask=None, q_map=q_map,
                q_params=[_view(p) for p in q_params], k_map=q_map,
                k_params=[_view(p) for p in k_params], eps=EPS, o=_view(o), state=_view(state),
                normaliser=_view(normaliser), num_threads=1)


def test_bindings_reject_inconsistent_tensors():
    _require_native()
    q, k, v = torch.randn(2, 7, 3, 8), torch.randn(2, 5, 3, 8), torch.randn(2, 5, 3, 4)
    o, state, z = torch.empty(2, 7, 3, 4), torch.empty(2, 3, 8, 4), torch.empty(2, 3, 8)
    native.cpu_forward(**_forward_views(q, k, v, o, state, z))  # consistent: runs

    cases = [
        (dict(state=_view(torch.empty(2, 3, 8, 5))), r"state: expected shape \(B, H, D', Dv\)"),
        (dict(k=_view(k.double())), "k: expected dtype float32"),
        (dict(v=_view(torch.randn(2, 6, 3, 4))), r"v: expected shape \(B, Nk, H, Dv\)"),
        (dict(o=_view(torch.empty(2, 7, 3, 4, dtype=torch.float64))), "o: expected dtype float32"),
        (dict(q_map="gelu"), "q_map: unknown feature map 'gelu'"),
        (dict(eps=0.0), "eps: must be a finite number > 0"),
        (dict(key_mask=_view(torch.ones(2, 4, dtype=torch.bool))), r"key_mask: expected shape"),
        (dict(q_map="hedgehog", k_map="hedgehog", q_params=[_view(torch.randn(3, 9, 4))],
              k_params=[_view(torch.randn(3, 9, 4))]), r"q_map W: expected shape \(H, D, F\)"),
    ]
    for change, message in cases:
        args = {**_forward_views(q, k, v, o, state, z), **change}
        with pytest.raises(ValueError, match=message):
            native.cpu_forward(**args)
    with pytest.raises(ValueError, match="shape and strides must have the same length"):
        native.View(q.data_ptr(), native.DType.float32, [2, 7, 3, 8], [1, 2, 3])


# ---- Hedgehog on the CPU -------------------------------------------------------------------


@dataclass(frozen=True)
class HedgehogCase:
    batch: int = 2
    q_len: int = 45
    kv_len: int = 39
    heads: int = 2
    head_dim: int = 20
    value_dim: int = 12
    feature_dim: int = 12
    dtype: torch.dtype = torch.float32
    weight_dtype: torch.dtype = torch.float32
    layout: str = "bnhd"
    masked: bool = False
    shared_map: bool = False  # one Hedgehog module for q and k: its gradient sums both

    def __str__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        wdt = str(self.weight_dtype).replace("torch.", "")
        return (f"B{self.batch}-Nq{self.q_len}-Nk{self.kv_len}-H{self.heads}-D{self.head_dim}"
                f"-Dv{self.value_dim}-F{self.feature_dim}-{dt}-W{wdt}-{self.layout}"
                f"{'-mask' if self.masked else ''}{'-shared' if self.shared_map else ''}")


HH = HedgehogCase()
HEDGEHOG_CASES = [
    replace(HH, masked=True),                                          # F < D, Dv != D, masks
    replace(HH, head_dim=16, feature_dim=40, layout="bhnd"),           # F > D, (B, H, N, D)
    # one (b, h) and 1100 tokens: with two threads the sequence is split, so dW, dS and the
    # state are sums of partials
    replace(HH, batch=1, heads=1, q_len=1100, kv_len=1100, head_dim=16, feature_dim=16),
    replace(HH, dtype=torch.bfloat16, head_dim=32, value_dim=32, feature_dim=32, masked=True),
    replace(HH, dtype=torch.bfloat16, weight_dtype=torch.bfloat16),    # W in the input dtype
    replace(HH, dtype=torch.float16, layout="bhnd"),
    replace(HH, dtype=torch.float64, weight_dtype=torch.float64, masked=True),
    replace(HH, shared_map=True),
]


def _hedgehog_maps(case: HedgehogCase):
    make = lambda: Hedgehog(case.heads, case.head_dim, case.feature_dim,  # noqa: E731
                            init="random", dtype=case.weight_dtype)
    q_map = make()
    return (q_map, q_map) if case.shared_map else (q_map, make())


def _float64_copy(fmap: Hedgehog) -> Hedgehog:
    copy = Hedgehog(fmap.num_heads, fmap.head_dim, fmap.feature_dim, dtype=torch.float64)
    copy.weight.data.copy_(fmap.weight.data)
    return copy


@pytest.mark.parametrize("case", HEDGEHOG_CASES, ids=str)
def test_hedgehog_matches_float64_reference(case: HedgehogCase):
    _require_native()
    B, Nq, Nk, H = case.batch, case.q_len, case.kv_len, case.heads
    D, Dv = case.head_dim, case.value_dim
    q_map, k_map = _hedgehog_maps(case)
    shape = (lambda n, d: (B, n, H, d)) if case.layout == "bnhd" else (lambda n, d: (B, H, n, d))
    q, k, v = (torch.randn(*shape(n, d)).to(case.dtype).requires_grad_()
               for n, d in ((Nq, D), (Nk, D), (Nk, Dv)))
    mask: Optional[torch.Tensor] = None
    if case.masked:
        mask = torch.rand(B, Nk) < 0.6
        mask[-1] = False  # a batch row with no key: o = 0, no gradient through its keys
    out = linattn.linear_attention(q, k, v, feature_map=(q_map, k_map), layout=case.layout,
                                   key_padding_mask=mask, backend="cpu")
    grad_out = torch.randn_like(out)
    out.backward(grad_out)

    q64_map = _float64_copy(q_map)
    k64_map = q64_map if case.shared_map else _float64_copy(k_map)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    bnhd = (lambda t: t) if case.layout == "bnhd" else (lambda t: t.transpose(1, 2))
    ref = bnhd(linear_attention_reference(bnhd(q64), bnhd(k64), bnhd(v64), q64_map, k64_map,
                                          EPS, mask))
    ref.backward(grad_out.double())

    assert_close_to_reference(out, ref, case.dtype, "hedgehog output")
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad),
                            ("dv", v.grad, v64.grad)):
        assert_close_to_reference(got, want, case.dtype, f"hedgehog {name}")
    # dW is accumulated in fp32 (fp64) over every token from inputs that are exact in their
    # dtype, and rounded once into W's dtype: W's dtype sets the tolerance, not the inputs'.
    for name, fmap, fmap64 in (("dW (q map)", q_map, q64_map), ("dW (k map)", k_map, k64_map)):
        assert fmap.weight.grad.dtype == case.weight_dtype
        assert_close_to_reference(fmap.weight.grad, fmap64.weight.grad, case.weight_dtype,
                                  f"hedgehog {name}")
    if mask is not None:
        keys = bnhd(k.grad)[~mask]
        assert (keys == 0).all() and (bnhd(v.grad)[~mask] == 0).all(), "masked keys got gradients"


# ---- the thread partition ------------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2])
def test_split_sequences_match_reference_and_repeat_bitwise(threads: int):
    """One (b, h) of 2000 tokens: with 2 threads the state and dS are sums of partial states."""
    _require_native()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        q, k, v = (torch.randn(1, 2000, 1, 24, requires_grad=True) for _ in range(3))
        grad_out = torch.randn(1, 2000, 1, 24)
        results = []
        for _ in range(2):
            for t in (q, k, v):
                t.grad = None
            out = linattn.linear_attention(q, k, v, feature_map="elu", backend="cpu")
            out.backward(grad_out)
            results.append([out.detach().clone(), q.grad, k.grad, v.grad])
    finally:
        torch.set_num_threads(previous)
    for first, second in zip(*results):
        assert torch.equal(first, second), "a repeated call changed the result"

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    fmap = linattn.feature_maps.ELU()
    ref = linear_attention_reference(q64, k64, v64, fmap, fmap, EPS)
    ref.backward(grad_out.double())
    for name, got, want in zip(("out", "dq", "dk", "dv"), results[0], (ref, q64.grad, k64.grad,
                                                                        v64.grad)):
        assert_close_to_reference(got, want, torch.float32, f"{threads} threads: {name}")


# ---- the contract's corners ---------------------------------------------------------------


def test_zero_stride_grad_and_bhnd_outputs():
    """do may be an expanded tensor (zero strides); outputs may be (B, H, N, D) in memory."""
    _require_native()
    B, N, H, D = 2, 33, 3, 8
    q, k, v = (torch.randn(B, H, N, D).transpose(1, 2) for _ in range(3))  # permuted views
    do = torch.randn(1, 1, H, D).expand(B, N, H, D)
    assert 0 in do.stride()
    relu = ReLU()
    call = MapCall("relu", ())
    backend = CpuBackend()
    with alloc.poison_outputs(True):
        o = alloc.empty_bnhd(B, N, H, D, bhnd=True, dtype=q.dtype, device=q.device)
        state = alloc.empty(B, H, D, D, dtype=torch.float32, device=q.device)
        z = alloc.empty(B, H, D, dtype=torch.float32, device=q.device)
        backend.forward(q, k, v, None, call, call, EPS, o, state, z)
        dq, dk, dv = (alloc.empty_bnhd(B, N, H, D, bhnd=True, dtype=q.dtype, device=q.device)
                      for _ in range(3))
        backend.backward(do, q, k, v, None, call, call, EPS, state, z, dq, dk, dv, [], [])

    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref = linear_attention_reference(q64, k64, v64, relu, relu, EPS)
    ref.backward(do.double())
    assert_close_to_reference(o, ref, torch.float32, "o")
    for name, got, want in (("dq", dq, q64.grad), ("dk", dk, k64.grad), ("dv", dv, v64.grad)):
        assert_close_to_reference(got, want, torch.float32, name)
