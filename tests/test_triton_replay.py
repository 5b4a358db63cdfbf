"""Launch programs (linattn/kernels/triton/replay.py): a call replayed from its signature's
recorded program does exactly what planning it afresh does.

* Structurally, for a GPU this machine does not have: on meta tensors planned for an sm_90
  H200 with launches captured, a replayed call launches the same kernels with the same grids,
  options and scalars as a fresh plan, its own tensors where the fresh plan has the call's
  tensors, and fresh scratch of the same geometry where the fresh plan allocates.
* Numerically, in the interpreter: outputs and every gradient of replayed calls are bitwise
  those of fresh plans, on new tensors (so nothing of the recording call leaks into a replay),
  with masks, non-contiguous inputs, fused norms and RoPE, Hedgehog, split reductions.
* The signature: what must separate two calls does (eps, dtypes, strides, optional tensors,
  aliasing, planning switches), and what cannot be replayed is planned afresh every time.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import linattn
from linattn import QKNorm, RoPE, linear_attention
from linattn.backends import MapCall, get_kernel_backend
from linattn.feature_maps import Hedgehog

from conftest import backend_device

triton = pytest.importorskip("triton")
from linattn.kernels.triton import plan, replay  # noqa: E402
from linattn.kernels.triton.common import capture_launches  # noqa: E402

if not {b.name: b for b in linattn.backends()}["triton"].available:
    pytest.skip("the triton backend is not available here", allow_module_level=True)

H200 = SimpleNamespace(major=9, minor=0, multi_processor_count=132)
META = torch.device("meta")
#: Where the numeric tests run: cuda on a GPU machine (triton refuses CPU tensors there), else
#: CPU tensors in the interpreter. Values are drawn by a CPU generator, then moved.
DEVICE = backend_device("triton")


@pytest.fixture(autouse=True)
def _fresh_programs():
    replay.clear()
    yield
    replay.clear()


# ----------------------------------------------------------------------------- structure


class _Call:
    """A backend call to repeat, with the arguments replay.call sees (the backend's entry
    point passes its optional ones explicitly)."""

    def __init__(self, method, args: tuple, entry_args: tuple):
        self.method, self.call_args, self.args = method, args, entry_args

    def __call__(self):
        self.method(*self.call_args)


def _meta_call(map_name: str, mode: str, masked: bool, shape=(2, 4096, 12, 64)):
    """(run, tensors): a backend call on new meta tensors of one signature each time."""
    B, N, H, D = shape
    backend = get_kernel_backend("triton")

    def make():
        q, k, v, do, o, dq, dk, dv = (torch.empty(B, N, H, D, dtype=torch.bfloat16, device=META)
                                      for _ in range(8))
        # A non-contiguous k (a bhnd view): strides reach the launches as arguments.
        k = torch.empty(B, H, N, D, dtype=torch.bfloat16, device=META).transpose(1, 2)
        F = 2 * D if map_name == "hedgehog" else D
        state = torch.empty(B, H, F, D, device=META)
        normaliser = torch.empty(B, H, F, device=META)
        params = (torch.empty(H, D, D, device=META),) if map_name == "hedgehog" else ()
        d_params = (torch.empty(H, D, D, device=META),) if params else ()
        mask = torch.empty(B, N, dtype=torch.bool, device=META) if masked else None
        fmap = MapCall(map_name, params)
        if mode == "forward":
            args = (q, k, v, mask, fmap, fmap, 1e-6, o, state, normaliser)
            run = _Call(backend.forward, args, args + (None,))
            return run, [q, k, v, mask, *params, o, state, normaliser]
        args = (do, q, k, v, mask, fmap, fmap, 1e-6, state, normaliser, dq, dk, dv, d_params,
                d_params)
        run = _Call(backend.backward, args, args + (None, (None,) * 4))
        return run, [do, q, k, v, mask, *params, state, normaliser, dq, dk, dv, *d_params]
    return make


def _launch_list(launches: list, call_tensors: list) -> list:
    """Launches comparable across runs: a call tensor by its slot, scratch by its geometry."""
    slots = {id(t): i for i, t in enumerate(call_tensors)}

    def name(a):
        if not isinstance(a, torch.Tensor):
            return a
        return ("slot", slots[id(a)]) if id(a) in slots else (a.shape, a.stride(), a.dtype)
    return [(k, tuple(g), [name(a) for a in args], kw) for k, g, args, kw in launches]


def _captured(run) -> list:
    with capture_launches() as launches:
        run()
    return list(launches)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("mode", ["forward", "backward"])
@pytest.mark.parametrize("map_name", ["relu", "softmax", "hedgehog"])
def test_replay_launches_what_a_fresh_plan_launches(map_name, mode, masked):
    make = _meta_call(map_name, mode, masked)
    with plan.assume_device(plan.DeviceInfo.from_properties(H200)):
        run, _ = make()
        with replay.disabled():
            fresh = _captured(run)
        _captured(run)                                   # recorded
        before = replay.stats()["replayed"]
        run, tensors = make()                            # new tensors, same signature
        replayed = _captured(run)
        assert replay.stats()["replayed"] == before + 1
        # The compiled program launches what its steps, run one by one, launch.
        (program,) = replay._programs.values()
        call_tensors = replay.signature(mode, run.args)[1]
        stepped = _captured(lambda: program.run_steps(call_tensors))
    assert _launch_list(stepped, call_tensors) == _launch_list(replayed, call_tensors)
    ours = {id(t): i for i, t in enumerate(tensors) if t is not None}
    assert len(replayed) == len(fresh) > 0
    for (k1, g1, a1, kw1), (k2, g2, a2, kw2) in zip(fresh, replayed):
        assert k1 is k2 and tuple(g1) == tuple(g2) and kw1 == kw2
        assert len(a1) == len(a2)
        for x, y in zip(a1, a2):
            if isinstance(x, torch.Tensor):
                assert isinstance(y, torch.Tensor)
                assert (x.shape, x.stride(), x.dtype) == (y.shape, y.stride(), y.dtype)
            else:
                assert not isinstance(y, torch.Tensor) and x == y
    # Where the replayed launch passes one of the call's tensors, it is the new call's, at the
    # position the fresh plan passes that tensor's counterpart: nothing of the recording leaks.
    fresh_run, fresh_tensors = make()
    with plan.assume_device(plan.DeviceInfo.from_properties(H200)), replay.disabled():
        fresh = _captured(fresh_run)
    theirs = {id(t): i for i, t in enumerate(fresh_tensors) if t is not None}
    for (_, _, a1, _), (_, _, a2, _) in zip(fresh, replayed):
        for x, y in zip(a1, a2):
            if isinstance(x, torch.Tensor):
                assert theirs.get(id(x)) == ours.get(id(y))


# ----------------------------------------------------------------------------- numbers


CASES = {
    "relu, masked, bhnd q": dict(map="relu", mask=True, bhnd=True),
    "softmax, Dv != D": dict(map="softmax", dv=12),
    "elu, rms over heads + rope": dict(map="elu", pre=True),
    "hedgehog, masked": dict(map="hedgehog", mask=True),
}


def _inputs(case: dict, seed: int):
    g = torch.Generator().manual_seed(seed)
    B, N, H, D = 2, 19, 2, 16
    Dv = case.get("dv", D)
    q = torch.randn(B, N, H, D, generator=g).to(DEVICE)
    if case.get("bhnd"):
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k = torch.randn(B, N, H, D, generator=g).to(DEVICE)
    v = torch.randn(B, N, H, Dv, generator=g).to(DEVICE)
    do = torch.randn(B, N, H, Dv, generator=g).to(DEVICE)
    kwargs = {}
    if case.get("mask"):
        mask = torch.rand(B, N, generator=g) > 0.3
        mask[:, 0] = True
        kwargs["key_padding_mask"] = mask.to(DEVICE)
    if case["map"] == "hedgehog":
        kwargs["feature_map"] = Hedgehog(H, D, dtype=torch.float32)
        with torch.no_grad():
            kwargs["feature_map"].weight.add_(0.1 * torch.randn(
                kwargs["feature_map"].weight.shape, generator=g))
        kwargs["feature_map"].to(DEVICE)  # in place: the weight stays the module's parameter
    else:
        kwargs["feature_map"] = case["map"]
    if case.get("pre"):
        weight = (1 + 0.1 * torch.randn(H * D, generator=g)).to(DEVICE).requires_grad_()
        angles = torch.randn(N, D // 2, generator=g).to(DEVICE)
        kwargs["q_norm"] = QKNorm("rms", weight, over="heads")
        kwargs["rope"] = RoPE(angles.cos(), angles.sin())
    return q, k, v, do, kwargs


def _run(case: dict, seed: int):
    q, k, v, do, kwargs = _inputs(case, seed)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    extra = [p for p in ([kwargs["feature_map"].weight] if case["map"] == "hedgehog" else [])]
    if case.get("pre"):
        extra.append(kwargs["q_norm"].weight)
    o = linear_attention(q, k, v, backend="triton", **kwargs)
    grads = torch.autograd.grad(o, leaves + extra, do)
    return [o.detach(), *grads]


@pytest.mark.parametrize("case", list(CASES))
def test_replayed_calls_are_bitwise_fresh_plans(case):
    spec = CASES[case]
    # Two splits reach the partials buffer and its ordered sum.
    with plan.forced(splits=2):
        with replay.disabled():
            expected = _run(spec, 1)
        _run(spec, 0)                                    # recorded
        before = replay.stats()["replayed"]
        got = _run(spec, 1)                              # replayed: new tensors and values
        assert replay.stats()["replayed"] >= before + 2  # the forward and the backward
    assert len(expected) == len(got)
    for w, h in zip(expected, got):
        assert torch.equal(w, h)


def test_phases_replay_for_context_parallelism():
    # The phases linattn.distributed calls go through the same programs.
    backend = get_kernel_backend("triton")
    B, N, H, D = 1, 29, 2, 16
    relu = MapCall("relu", ())

    def state_of(seed):
        g = torch.Generator().manual_seed(seed)
        k, v = (torch.randn(B, N, H, D, generator=g).to(DEVICE) for _ in range(2))
        s, z = torch.empty(B, H, D, D, device=DEVICE), torch.empty(B, H, D, device=DEVICE)
        backend.forward_state(k, v, None, relu, s, z)
        return s, z

    with replay.disabled():
        want = state_of(3)
    state_of(4)
    before = replay.stats()["replayed"]
    have = state_of(3)
    assert replay.stats()["replayed"] == before + 1
    assert all(torch.equal(w, h) for w, h in zip(want, have))


# ----------------------------------------------------------------------------- signatures


def _key(*args, entry="forward"):
    return replay.signature(entry, args)[0]


def test_signature_separates_what_planning_depends_on():
    q = torch.empty(1, 8, 2, 16)
    relu, elu = MapCall("relu", ()), MapCall("elu", ())
    w = torch.empty(2, 16, 16)
    base = _key(q, None, relu, 1e-6)
    assert _key(torch.empty(1, 8, 2, 16), None, relu, 1e-6) == base     # new tensor, same key
    different = [
        _key(q, None, relu, 1e-6, entry="backward"),
        _key(torch.empty(1, 9, 2, 16), None, relu, 1e-6),                # shape
        _key(torch.empty(1, 2, 8, 16).transpose(1, 2), None, relu, 1e-6),  # strides
        _key(q.half(), None, relu, 1e-6),                                # dtype
        _key(q, torch.ones(1, 8, dtype=torch.bool), relu, 1e-6),         # a mask
        _key(q, None, elu, 1e-6),                                        # map
        _key(q, None, relu, 1e-5),                                       # eps
        _key(q, None, MapCall("relu", (torch.empty(2),)), 1e-6),         # map parameters
        _key(q, None, MapCall("h", (w,)), MapCall("h", (w,))),           # one map's tensors
        _key(q, None, MapCall("h", (w,)), MapCall("h", (w.clone(),))),   # ... or two maps'
    ]
    with plan.forced(splits=2):
        different.append(_key(q, None, relu, 1e-6))
    with plan.atomic_reduction(not plan.atomic_reduce()):
        different.append(_key(q, None, relu, 1e-6))
    keys = [base, *different]
    assert len(set(keys)) == len(keys)


def test_a_program_recorded_with_a_repeated_tensor_replays_only_that_aliasing():
    def add(a, b, out):
        torch.add(a, b, out=out)

    x = torch.randn(3)
    out = torch.empty(3)
    replay.call("test-alias", add, (x, x, out))                  # recorded: a and b alike
    replay.call("test-alias", add, (x, x, out))
    assert torch.equal(out, 2 * x) and replay.stats()["replayed"] == 1
    y = torch.randn(3)
    replay.call("test-alias", add, (x, y, out))                  # two tensors: planned afresh
    assert torch.equal(out, x + y) and replay.stats()["planned"] == 1
    replay.clear()
    replay.call("test-alias", add, (x, y, out))                  # recorded from distinct ones
    replay.call("test-alias", add, (y, y, out))                  # serves a repeated one too
    assert torch.equal(out, 2 * y) and replay.stats()["replayed"] == 1


def test_a_plan_that_reads_values_is_planned_afresh_every_call():
    calls = []

    def plan_by_value(x, out):
        calls.append(1)
        scale = float(x.abs().max().item())              # a value read: not replayable
        out.copy_(x * scale)

    for _ in range(3):
        x, out = torch.randn(4), torch.empty(4)
        replay.call("test-value-read", plan_by_value, (x, out))
        assert torch.equal(out, x * x.abs().max())
    assert len(calls) == 3
    stats = replay.stats()
    assert stats["programs"] == 0 and stats["unrecordable"] == 3
    assert any("item" in why for why in stats["reasons"])


def test_a_recorded_host_op_replays_on_the_new_tensors():
    def plan_zero_and_copy(x, out):
        scratch = torch.empty(x.shape[0] * 2)
        scratch[: x.shape[0]].copy_(x)
        scratch[x.shape[0]:].zero_()
        out.copy_(scratch.view(2, -1).sum(0))

    for seed in range(3):
        x = torch.randn(5, generator=torch.Generator().manual_seed(seed))
        out = torch.full((5,), float("nan"))
        replay.call("test-host-ops", plan_zero_and_copy, (x, out))
        assert torch.equal(out, x)
    assert replay.stats()["replayed"] == 2 and replay.stats()["programs"] == 1


def test_a_failed_call_records_nothing():
    attempts = []

    def fails_once(x):
        attempts.append(1)
        torch.empty(3)
        if len(attempts) == 1:
            raise ValueError("planning failed")

    with pytest.raises(ValueError, match="planning failed"):
        replay.call("test-failure", fails_once, (torch.empty(2),))
    replay.call("test-failure", fails_once, (torch.empty(2),))   # planned again, recorded
    replay.call("test-failure", fails_once, (torch.empty(2),))   # replayed: impl not run
    assert len(attempts) == 2 and replay.stats()["replayed"] == 1


def test_programs_are_bounded(monkeypatch):
    monkeypatch.setattr(replay, "MAX_PROGRAMS", 4)
    for n in range(10):
        replay.call("test-bound", lambda x: torch.empty(1), (torch.empty(n + 1),))
    assert replay.stats()["programs"] == 4


def test_disabled_records_nothing():
    with replay.disabled():
        for _ in range(2):
            replay.call("test-disabled", lambda x: torch.empty(1), (torch.empty(1),))
    assert replay.stats()["programs"] == 0
