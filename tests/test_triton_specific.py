"""What only the Triton backend has: sequence splits and their reduction (deterministic and
atomic), multi-block loops, Dv tiles, the unfused dk/dv passes, the scratch budget, the tuning
table and the bf16 rounding the kernels do themselves under the interpreter.

tests/test_backends.py checks the backend on its default plan; here plan.forced() drives the
kernels through the paths that only long sequences or large dims reach by default, at sizes
the interpreter runs in seconds. Every result is compared with the float64 reference.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import linattn
from linattn import feature_maps
from linattn.backends import get_kernel_backend
from linattn.backends import triton as triton_backend_module
from linattn.ops.reference import linear_attention_reference
from linattn.ops.validation import to_bnhd

from numerics import assert_close_to_reference

pytestmark = pytest.mark.skipif(
    not {b.name: b for b in linattn.backends()}["triton"].available,
    reason="the triton backend is not available here (no CUDA device, TRITON_INTERPRET unset)")

triton = pytest.importorskip("triton")
tl = triton.language
plan = pytest.importorskip("linattn.kernels.triton.plan")
from linattn.kernels.triton.common import emulate_bf16, to_operand, to_storage  # noqa: E402

KernelConfig = plan.KernelConfig


def small_configs(block_n: int = 16, block_dv: int = 16, fused: bool = True) -> dict:
    """Blocks far below the test lengths (multi-block loops, ragged last block) and Dv tiles
    narrower than Dv (the dS-only dq launch and the dv-only dk/dv launch)."""
    return {kind: KernelConfig(block_n, block_dv, 4, 1, 1, fused) for kind in plan.KINDS}


@dataclass(frozen=True)
class Case:
    batch: int = 2
    q_len: int = 45
    kv_len: int = 53
    heads: int = 2
    head_dim: int = 20      # not a power of two: masked up to 32
    value_dim: int = 40     # != D, not a power of two: 3 tiles of 16
    dtype: torch.dtype = torch.float32
    maps: tuple = ("relu", "relu")
    layout: str = "bnhd"
    masked: bool = False
    splits: int = 3
    fused: bool = True


CASES = [
    Case(),
    Case(maps=("softmax", "elu"), masked=True, layout="bhnd"),
    Case(maps=("elu", "identity"), fused=False, masked=True),
    Case(dtype=torch.bfloat16, maps=("softmax", "softmax"), masked=True, splits=4),
    Case(dtype=torch.float16, head_dim=32, value_dim=16, layout="bhnd", splits=2, fused=False),
]


def _inputs(case: Case, device):
    B, Nq, Nk, H, D, Dv = (case.batch, case.q_len, case.kv_len, case.heads, case.head_dim,
                           case.value_dim)

    def randn(n, d):
        shape = (B, n, H, d) if case.layout == "bnhd" else (B, H, n, d)
        x = torch.randn(*shape, device=device)
        return x.to(case.dtype).requires_grad_()

    q, k, v = randn(Nq, D), randn(Nk, D), randn(Nk, Dv)
    if "identity" in case.maps:
        with torch.no_grad():  # the identity map needs positive features
            k.abs_().add_(0.1)
            q.abs_().add_(0.1)
    mask = None
    if case.masked:
        mask = torch.rand(B, Nk, device=device) < 0.6
        mask[0, 0] = True
        mask[-1] = False  # a batch row with no key: o = 0 exactly
    return q, k, v, mask


def _reference(case: Case, q, k, v, mask, grad_out):
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    q_map, k_map = (feature_maps.resolve(name) for name in case.maps)
    out = linear_attention_reference(*(to_bnhd(t, case.layout) for t in (q64, k64, v64)),
                                     q_map, k_map, 1e-6, mask)
    out = to_bnhd(out, case.layout)
    out.backward(grad_out.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def _run(case: Case, q, k, v, mask, grad_out, configs: Optional[dict] = None):
    """Output and gradients of the triton backend under a forced plan."""
    for t in (q, k, v):
        t.grad = None
    configs = small_configs(fused=case.fused) if configs is None else configs
    with plan.forced(splits=case.splits, configs=configs):
        out = linattn.linear_attention(q, k, v, feature_map=case.maps, layout=case.layout,
                                       key_padding_mask=mask, backend="triton")
        out.backward(grad_out)
    return out.detach().clone(), q.grad.clone(), k.grad.clone(), v.grad.clone()


@pytest.mark.parametrize("case", CASES, ids=lambda c: (
    f"{str(c.dtype)[6:]}-{c.maps[0]}-{c.maps[1]}-{c.layout}-D{c.head_dim}-Dv{c.value_dim}"
    f"-splits{c.splits}{'-mask' if c.masked else ''}{'' if c.fused else '-unfused'}"))
def test_split_multiblock_and_tiled_paths_match_reference(case: Case, device):
    q, k, v, mask = _inputs(case, device)
    grad_out = torch.randn(to_bnhd(q, case.layout).shape[:-1] + (case.value_dim,),
                           device=device).to(case.dtype)
    grad_out = to_bnhd(grad_out, case.layout)
    got = _run(case, q, k, v, mask, grad_out)
    want = _reference(case, q, k, v, mask, grad_out)
    for name, g, w in zip(("output", "dq", "dk", "dv"), got, want):
        assert_close_to_reference(g, w, case.dtype, f"triton {name} ({case})")
    if mask is not None:
        masked = ~mask
        assert (to_bnhd(got[2], case.layout)[masked] == 0).all(), "masked keys got dk != 0"
        assert (to_bnhd(got[3], case.layout)[masked] == 0).all(), "masked keys got dv != 0"
        assert (to_bnhd(got[0], case.layout)[-1] == 0).all(), "a row without keys must give 0"


def test_split_reduction_is_deterministic(device):
    """The default reduction sums partials in split order: reruns are bitwise identical.
    (The interpreter runs programs in order anyway; on a GPU this is what the flag-off path
    guarantees and atomics would not.)"""
    case = Case(q_len=48, kv_len=48, head_dim=16, value_dim=16, maps=("elu", "elu"), splits=3)
    q, k, v, mask = _inputs(case, device)
    grad_out = torch.randn(case.batch, case.q_len, case.heads, case.value_dim, device=device)
    first = _run(case, q, k, v, mask, grad_out)
    second = _run(case, q, k, v, mask, grad_out)
    for name, a, b in zip(("output", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_atomic_reduction_matches_reference(device):
    case = Case(maps=("softmax", "relu"), masked=True, splits=3)
    q, k, v, mask = _inputs(case, device)
    grad_out = torch.randn(case.batch, case.q_len, case.heads, case.value_dim, device=device)
    with plan.atomic_reduction(True):
        got = _run(case, q, k, v, mask, grad_out)
    want = _reference(case, q, k, v, mask, grad_out)
    for name, g, w in zip(("output", "dq", "dk", "dv"), got, want):
        assert_close_to_reference(g, w, case.dtype, f"triton {name}, atomic reduction")


def test_unsupported_reasons_name_the_problem():
    backend = get_kernel_backend("triton")
    assert backend.unsupported(torch.bfloat16, 128, 128, 128, ("relu", "elu")) is None
    assert backend.unsupported(torch.float32, 20, 40, 20, ("softmax", "identity")) is None
    assert "float64" in backend.unsupported(torch.float64, 64, 64, 64, ("relu", "relu"))
    assert "up to 256" in backend.unsupported(torch.float32, 512, 64, 512, ("relu", "relu"))
    too_big = backend.unsupported(torch.bfloat16, 256, 256, 256, ("relu", "relu"))
    assert "Dv <= 128" in too_big
    assert backend.unsupported(torch.bfloat16, 256, 128, 256, ("relu", "relu")) is None
    fp32_too_big = backend.unsupported(torch.float32, 256, 128, 256, ("relu", "relu"))
    assert "float32 inputs" in fp32_too_big and "cpu backend" in fp32_too_big
    mixed = backend.unsupported(torch.float32, 64, 64, 128, ("hedgehog", "relu"))
    assert "Hedgehog only for both q and k" in mixed


def test_hedgehog_listed_exactly_when_its_kernels_import(monkeypatch):
    backend = get_kernel_backend("triton")
    assert {"relu", "elu", "softmax", "identity"} <= backend.supported_maps
    try:
        importlib.import_module("linattn.kernels.triton.hedgehog")
        imports = True
    except ImportError:
        imports = False
    assert ("hedgehog" in backend.supported_maps) == imports
    # Without the module, a Hedgehog pair is refused with the import's reason.
    monkeypatch.setattr(triton_backend_module, "_hedgehog_kernels",
                        lambda: (None, "pretend it failed to import"))
    assert "hedgehog" not in backend.supported_maps
    reason = backend.unsupported(torch.float32, 64, 64, 128, ("hedgehog", "hedgehog"))
    assert "pretend it failed to import" in reason


def test_tuning_table_entries_are_well_formed_and_used():
    from linattn.kernels.triton.tuned_configs import SOURCES, TABLE
    assert TABLE, "the shipped table is empty"
    for key, entry in TABLE.items():
        arch, kind, d_pad, dv_pad, itemsize = key
        assert arch in SOURCES, f"{key}: no SOURCES line says how {arch} was chosen"
        # A "+pre" kind: the same kernel with q/k norms and RoPE fused (plan.PRE_SUFFIX).
        assert kind.removesuffix(plan.PRE_SUFFIX) in plan.KINDS and itemsize in (2, 4)
        config = KernelConfig(*entry)
        for size in (d_pad, dv_pad, config.block_n, config.block_dv):
            assert size >= 16 and size & (size - 1) == 0, f"{key}: {entry}"
        assert config.block_dv <= dv_pad and d_pad * dv_pad <= plan.MAX_STATE_ELEMENTS
        assert config.num_warps in (4, 8, 16) and config.programs_per_sm >= 1
    key = next(iter(TABLE))
    with plan.assume_device(plan.DeviceInfo(key[0], 132)):
        got = plan.kernel_config(key[1], torch.device("cpu"), key[2], key[3], key[4],
                                 n_tokens=1000)
    assert got == KernelConfig(*TABLE[key])
    pre_key = next(k for k in TABLE if k[1].endswith(plan.PRE_SUFFIX))
    with plan.assume_device(plan.DeviceInfo(pre_key[0], 132)):
        got = plan.kernel_config(pre_key[1].removesuffix(plan.PRE_SUFFIX), torch.device("cpu"),
                                 *pre_key[2:], n_tokens=1000, pre=True)
    assert got == KernelConfig(*TABLE[pre_key])
    # A class the table lacks falls back to the heuristic of its architecture.
    with plan.assume_device(plan.DeviceInfo("sm_unknown", 132)):
        got = plan.kernel_config("state", torch.device("cpu"), 64, 64, 2, n_tokens=1000)
    assert got == plan.heuristic_config("sm_unknown", "state", 64, 64, 2, 1000)


@triton.jit
def _round_kernel(x_ptr, operand_ptr, stored_ptr, EMULATE_BF16: tl.constexpr,
                  BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(operand_ptr + offs, to_operand(x, tl.bfloat16, EMULATE_BF16).to(tl.float32))
    tl.store(stored_ptr + offs, to_storage(x, tl.bfloat16, EMULATE_BF16))


def test_bf16_rounding_matches_torch(device):
    """Under the interpreter the kernels round fp32 to bf16 with integer operations (triton's
    own interpreted casts truncate): the result must be torch's round-to-nearest-even."""
    n = 4096
    x = torch.randn(n, device=device) * torch.logspace(-20, 20, n, device=device)
    # Exact ties between two bf16 values: must round to the even one.
    x[:4] = torch.tensor([1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8, -(1.0 + 2.0 ** -8), 0.0])
    operand = torch.empty(n, device=device)
    stored = torch.empty(n, device=device, dtype=torch.bfloat16)
    _round_kernel[(1,)](x, operand, stored, EMULATE_BF16=emulate_bf16(torch.bfloat16), BLOCK=n)
    assert torch.equal(stored, x.to(torch.bfloat16))
    assert torch.equal(operand, x.to(torch.bfloat16).float())
