"""linattn beside the PyTorch peers, forward and forward + backward.

CPU: the issue-2 target shape (2, 4096, 12, 64) in fp32 (and bf16 for information).
CUDA: the video-DiT shapes of kernels.md in bf16.
"""
from __future__ import annotations

import functools

import pytest
import torch

import linattn
from linattn.feature_maps import Hedgehog

import peers
from conftest import record
from measure import cuda_median_seconds, peak_extra_bytes, synchronize

ON_CUDA = torch.cuda.is_available()

if ON_CUDA:
    SHAPES = {
        "Wan 1.3B (1, 32760, 12, 128)": (1, 32760, 12, 128),
        "HunyuanVideo (1, 119040, 24, 128)": (1, 119040, 24, 128),
        "CFG batch (2, 4096, 12, 64)": (2, 4096, 12, 64),
        "Wan 14B (1, 75600, 40, 128)": (1, 75600, 40, 128),
    }
    DTYPES = [torch.bfloat16]
    LINATTN_BACKENDS = [b.name for b in linattn.backends() if b.available and b.name in ("triton", "cuda")]
    HEDGEHOG_SHAPES = {"Wan 1.3B (1, 32760, 12, 128)": (1, 32760, 12, 128)}
else:
    SHAPES = {"CPU target (2, 4096, 12, 64)": (2, 4096, 12, 64)}
    DTYPES = [torch.float32, torch.bfloat16]
    LINATTN_BACKENDS = ["cpu"]
    HEDGEHOG_SHAPES = {"CPU small (1, 4096, 4, 64)": (1, 4096, 4, 64)}


def implementations(dtype: torch.dtype):
    impls = {f"linattn-{name}": functools.partial(linattn.linear_attention, backend=name)
             for name in LINATTN_BACKENDS}
    impls["einsum-fp32"] = peers.einsum_fp32
    if ON_CUDA and dtype != torch.float32:
        impls["matmul-bf16"] = peers.matmul_bf16
    impls["sdpa-softmax"] = peers.sdpa_softmax
    return impls


def io_bytes(shape, dtype: torch.dtype, mode: str) -> int:
    """Bytes the op must move: forward reads q, k, v and writes o; the backward reads q, k, v, do
    and writes dq, dk, dv (o is recomputed from the saved fp32 state, not re-read)."""
    B, N, H, D = shape
    one = B * N * H * D * torch.empty((), dtype=dtype).element_size()
    return 4 * one if mode == "forward" else (4 + 7) * one


def run_case(benchmark, bandwidth, device, impl_name, fn, shape, dtype, mode, feature_map="relu",
             params=()):
    B, N, H, D = shape
    q, k, v = (torch.randn(B, N, H, D, device=device, dtype=dtype) for _ in range(3))
    if mode == "forward":
        call = functools.partial(fn, q, k, v)
        out_bytes = q.numel() * q.element_size()
    else:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        grad_out = torch.randn_like(q)

        def call():
            out = fn(q, k, v)
            return torch.autograd.grad(out, (q, k, v, *params), grad_out)

        out_bytes = 4 * q.numel() * q.element_size()
    try:
        call()  # warm-up: compilation, first-touch
    except linattn.BackendUnavailableError as error:
        pytest.skip(str(error))
    except torch.OutOfMemoryError as error:
        pytest.skip(f"{impl_name} needs more memory than the device has: {error}")
    synchronize(device)

    def timed():
        result = call()
        synchronize(device)
        return result

    benchmark.pedantic(timed, rounds=10 if device.type == "cpu" else 20, warmup_rounds=1)
    if device.type == "cuda":
        seconds = cuda_median_seconds(call)
    else:
        seconds = benchmark.stats.stats.median
    extra = peak_extra_bytes(timed, out_bytes, device) if mode == "forward" else None
    nbytes = io_bytes(shape, dtype, mode)
    floor_ms = nbytes / bandwidth * 1e3
    benchmark.extra_info.update(GBps=nbytes / seconds / 1e9, floor_ms=floor_ms,
                                share_of_floor=floor_ms / (seconds * 1e3),
                                peak_extra_MB=None if extra is None else extra / 1e6)
    shape_name = next(name for name, s in {**SHAPES, **HEDGEHOG_SHAPES}.items() if s == shape)
    record(shape=shape_name, dtype=str(dtype).replace("torch.", ""), feature_map=feature_map,
           mode=mode, impl=impl_name, seconds=seconds, bytes=nbytes, floor_ms=floor_ms,
           extra_bytes=extra)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("impl_name", ["linattn-" + b for b in LINATTN_BACKENDS]
                         + ["einsum-fp32", "matmul-bf16", "sdpa-softmax"])
def test_relu(benchmark, bandwidth, device, impl_name, shape, dtype, mode):
    impls = implementations(dtype)
    if impl_name not in impls:
        pytest.skip(f"{impl_name} is a GPU bf16 peer")
    if impl_name == "sdpa-softmax" and device.type == "cpu" and mode == "forward+backward":
        pytest.skip("CPU SDPA backward at this shape only repeats the forward's story")
    run_case(benchmark, bandwidth, device, impl_name, impls[impl_name], shape, dtype, mode)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("shape", list(HEDGEHOG_SHAPES.values()), ids=list(HEDGEHOG_SHAPES))
@pytest.mark.parametrize("impl_name", ["linattn-" + b for b in LINATTN_BACKENDS] + ["hedgehog-torch"])
def test_hedgehog(benchmark, bandwidth, device, impl_name, shape, mode):
    B, N, H, D = shape
    dtype = DTYPES[-1]
    phi_q, phi_k = (Hedgehog(H, D, init="random").to(device) for _ in range(2))
    if impl_name == "hedgehog-torch":
        fn = functools.partial(peers.hedgehog_torch, phi_q=phi_q, phi_k=phi_k)
    else:
        fn = functools.partial(linattn.linear_attention, feature_map=(phi_q, phi_k),
                               backend=impl_name.removeprefix("linattn-"))
    run_case(benchmark, bandwidth, device, impl_name, fn, shape, dtype, mode,
             feature_map="hedgehog", params=(phi_q.weight, phi_k.weight))
