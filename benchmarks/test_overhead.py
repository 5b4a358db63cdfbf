"""Host time per call (issue 10, item 1), where the kernels' own work is negligible.

* The public op at (1, 1, 1, 16), fp32, on the cpu backend, forward and forward + backward,
  beside the five-op PyTorch einsum peer measured in the same run: the ratio op / peer is the
  share of a small call's time linattn adds on the host.
* The Triton backend's planning path, launches excluded: TritonBackend.forward / backward on
  meta tensors (shapes, no memory, no values) planned for an H200-like sm_90 property object,
  with every launch captured instead of run (common.capture_launches). What remains is exactly
  the host work of a GPU call before its launches: checks, plans, scratch allocation, launch
  arguments. Runs on any machine, no GPU needed. Two paths: "replayed" (every call after a
  signature's first: its recorded launch program, linattn/kernels/triton/replay.py) and
  "planned" (replay disabled: what a signature's first call costs, minus the recording).

Both end in the "per-call host time" table of the session summary (conftest.py).
"""
from __future__ import annotations

import contextlib
import functools
from types import SimpleNamespace

import pytest
import torch

import linattn
from linattn.backends import MapCall, get_kernel_backend

import peers
from conftest import record_overhead

OVERHEAD_SHAPE = (1, 1, 1, 16)
# Rounds × iterations: a call takes tens of microseconds, so each round times many calls.
ROUNDS, ITERATIONS = 60, 40


def _time(benchmark, fn) -> tuple[float, float]:
    """(median, min) seconds per call over the rounds."""
    benchmark.pedantic(fn, rounds=ROUNDS, iterations=ITERATIONS, warmup_rounds=3)
    stats = benchmark.stats.stats
    return stats.median, stats.min


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("impl", ["linattn-cpu", "einsum-fp32"])
def test_per_call_overhead(benchmark, impl, mode):
    if impl == "linattn-cpu" and not {b.name: b for b in linattn.backends()}["cpu"].available:
        pytest.skip("the cpu backend is not built here")
    fn = (functools.partial(linattn.linear_attention, backend="cpu") if impl == "linattn-cpu"
          else peers.einsum_fp32)
    q, k, v = (torch.randn(*OVERHEAD_SHAPE) for _ in range(3))
    if mode == "forward":
        call = functools.partial(fn, q, k, v)
    else:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        grad_out = torch.randn(*OVERHEAD_SHAPE)

        def call():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)
    median, fastest = _time(benchmark, call)
    record_overhead(what=f"{mode} at {OVERHEAD_SHAPE}, fp32, relu", impl=impl,
                    seconds=median, min_seconds=fastest, peer="einsum-fp32")


H200 = SimpleNamespace(name="H200-like (sm_90, 132 SMs)", major=9, minor=0,
                       multi_processor_count=132)
PLANNING_SHAPES = {"CFG batch (2, 4096, 12, 64)": (2, 4096, 12, 64),
                   "Wan 1.3B (1, 32760, 12, 128)": (1, 32760, 12, 128)}


@pytest.mark.parametrize("path", ["replayed", "planned"])
@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("map_name", ["relu", "hedgehog"])
@pytest.mark.parametrize("shape_name", list(PLANNING_SHAPES))
def test_triton_planning(benchmark, shape_name, map_name, mode, path):
    triton_plan = pytest.importorskip("linattn.kernels.triton.plan")
    from linattn.kernels.triton import replay
    from linattn.kernels.triton.common import capture_launches

    meta = torch.device("meta")
    B, N, H, D = PLANNING_SHAPES[shape_name]
    q, k, v, do, o, dq, dk, dv = (torch.empty(B, N, H, D, dtype=torch.bfloat16, device=meta)
                                  for _ in range(8))
    F = 2 * D if map_name == "hedgehog" else D
    state = torch.empty(B, H, F, D, device=meta)
    normaliser = torch.empty(B, H, F, device=meta)
    params = (torch.empty(H, D, D, device=meta),) if map_name == "hedgehog" else ()
    d_params = [torch.empty(H, D, D, device=meta)] if params else []
    fmap = MapCall(map_name, params)
    backend = get_kernel_backend("triton")
    if mode == "forward":
        def plan_once():
            backend.forward(q, k, v, None, fmap, fmap, 1e-6, o, state, normaliser)
    else:
        def plan_once():
            backend.backward(do, q, k, v, None, fmap, fmap, 1e-6, state, normaliser, dq, dk, dv,
                             d_params, d_params)

    def call():
        plan_once()
        launches.clear()  # the captured launches would otherwise pile up over the rounds
    switch = replay.disabled() if path == "planned" else contextlib.nullcontext()
    with triton_plan.assume_device(triton_plan.DeviceInfo.from_properties(H200)), \
            capture_launches() as launches, switch:
        plan_once()
        count = len(launches)  # counted before call() clears them
        launches.clear()
        assert count > 0, "the planning path captured no launch"
        median, fastest = _time(benchmark, call)
    record_overhead(what=f"Triton planning ({path}), {mode}, {shape_name}, bf16, {map_name} "
                         f"({count} launches, {H200.name})",
                    impl="linattn-triton", seconds=median, min_seconds=fastest, peer=None)
