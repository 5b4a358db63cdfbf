"""linattn.distributed.linear_attention in 2 and 4 gloo processes against the unsharded op.

Each process holds an uneven slice of the queries and of the keys (the query and key slices
differ too); the concatenated outputs and every gradient (dq, dk, dv, Hedgehog's dW_q and
dW_k) must equal the unsharded op's on the whole sequence: within numerics.py's tolerance of the
float64 reference, and close to the single-process kernels themselves. Masks, both layouts,
bf16, Hedgehog with and without reduce_param_grads, a map no kernel fuses, and every backend.
Cases with q/k norms and RoPE (fused by the kernels, as in the single-process op) check the
norms' weight and bias gradients too, with the specs in the whole sequence's positions
(token_offset, q and k split differently) and in each process's own (the tables sliced by the
caller, as diffusers' context parallelism does).

The processes are spawned once per process count (a module fixture) and run every case; the
test functions check what they wrote. Each case runs on its backend's device (conftest.py's
backend_device): the triton cases on the GPU where there is one (the gloo all-reduce takes CUDA
tensors), on CPU tensors in the interpreter elsewhere; results are compared on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import linattn
from linattn import distributed, feature_maps
from linattn.ops import alloc
from linattn.ops.linear_attention import _resolve_maps
from linattn.ops.reference import linear_attention_reference

from conftest import backend_device
from numerics import assert_close_to_reference


class ScaledRelu(feature_maps.FeatureMap):
    """A map with a parameter that no kernel fuses (applied in PyTorch before the kernels)."""

    kernel_name = None

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, heads * head_dim)
                                        .view(heads, head_dim))

    def kernel_params(self):
        return (self.scale,)

    def apply(self, x, params):
        return torch.relu(x * params[0])


@dataclass(frozen=True)
class Case:
    name: str
    backend: str = "cpu"
    feature_map: str = "relu"      # "relu", "elu", "hedgehog", "pair" (relu, elu), "scaled"
    dtype: torch.dtype = torch.float32
    layout: str = "bnhd"
    masked: bool = False
    reduce_param_grads: bool = False
    batch: int = 2
    q_len: int = 29
    kv_len: int = 37
    heads: int = 2
    head_dim: int = 16
    value_dim: int = 8
    max_processes: int = 4
    # q/k norms and RoPE: "" none; "global": specs in whole-sequence positions with
    # token_offset=(q_offset, k_offset), k split unlike q; "local": each process passes its own
    # rows of the tables and no offset (q and k split alike, as in self-attention).
    pre: str = ""
    seed: int = field(default=0, compare=False)


CASES = [
    Case("cpu-relu"),
    Case("cpu-relu-bhnd-mask", layout="bhnd", masked=True),
    Case("cpu-hedgehog-mask", feature_map="hedgehog", masked=True),
    Case("cpu-hedgehog-reduce", feature_map="hedgehog", reduce_param_grads=True),
    Case("cpu-pair-bf16", feature_map="pair", dtype=torch.bfloat16),
    Case("cpu-scaled-reduce-mask", feature_map="scaled", masked=True, reduce_param_grads=True),
    Case("reference-elu-mask", backend="reference", feature_map="elu", dtype=torch.float64,
         masked=True),
    Case("reference-hedgehog-reduce", backend="reference", feature_map="hedgehog",
         dtype=torch.float64, reduce_param_grads=True),
    # The Triton interpreter is slow: small cases, in the 2-process run only.
    Case("triton-relu-mask", backend="triton", masked=True, q_len=9, kv_len=13,
         max_processes=2),
    Case("triton-hedgehog-mask", backend="triton", feature_map="hedgehog", masked=True,
         q_len=9, kv_len=13, max_processes=2),
    # Fused q/k norms and RoPE (equal q and k lengths: the tables rotate both).
    Case("cpu-relu-pre-global", pre="global", q_len=31, kv_len=31),
    Case("cpu-hedgehog-pre-local-mask", feature_map="hedgehog", pre="local", masked=True,
         q_len=31, kv_len=31),
    Case("cpu-elu-pre-global-reduce-bhnd", feature_map="elu", pre="global", layout="bhnd",
         reduce_param_grads=True, q_len=31, kv_len=31),
    Case("cpu-scaled-pre-global", feature_map="scaled", pre="global", q_len=31, kv_len=31),
    Case("reference-relu-pre-global-mask", backend="reference", dtype=torch.float64,
         pre="global", masked=True, q_len=31, kv_len=31),
    Case("triton-relu-pre-global", backend="triton", pre="global", q_len=11, kv_len=11,
         max_processes=2),
    Case("triton-hedgehog-pre-local", backend="triton", feature_map="hedgehog", pre="local",
         q_len=11, kv_len=11, max_processes=2),
]


def make_maps(case: Case, device: torch.device = torch.device("cpu")):
    """(map for q, map for k) as fresh modules on `device`, the same on every process."""
    q_map, k_map = _make_maps(case)
    # Drawn on the CPU (the same values on every device), then moved in place.
    return tuple(m.to(device) if isinstance(m, torch.nn.Module) else m for m in (q_map, k_map))


def _make_maps(case: Case):
    torch.manual_seed(1000 + CASES.index(case))
    if case.feature_map == "hedgehog":
        q_map = feature_maps.Hedgehog(case.heads, case.head_dim, feature_dim=8)
        k_map = feature_maps.Hedgehog(case.heads, case.head_dim, feature_dim=8)
        for m in (q_map, k_map):  # away from the identity init, so dW is not special
            with torch.no_grad():
                m.weight.add_(0.3 * torch.randn_like(m.weight))
            if case.dtype == torch.float64:
                # A float32 W would round each process's share of dW to float32 before the
                # shares are summed: float32-level differences a float64 case cannot judge.
                m.double()
        return q_map, k_map
    if case.feature_map == "scaled":
        return ScaledRelu(case.heads, case.head_dim), ScaledRelu(case.heads, case.head_dim)
    if case.feature_map == "pair":
        return "relu", "elu"
    return case.feature_map, case.feature_map


def make_inputs(case: Case) -> dict:
    """The whole problem (every process draws the same)."""
    gen = torch.Generator().manual_seed(CASES.index(case))
    B, Nq, Nk, H, D, Dv = (case.batch, case.q_len, case.kv_len, case.heads, case.head_dim,
                           case.value_dim)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(case.dtype)

    mask = None
    if case.masked:
        mask = torch.rand(B, Nk, generator=gen) > 0.3
        mask[:, 0] = True
    return {"q": randn(B, Nq, H, D), "k": randn(B, Nk, H, D), "v": randn(B, Nk, H, Dv),
            "do": randn(B, Nq, H, Dv), "mask": mask}


ROPE_START = 2  # the tables rotate tokens [2, N - 1): text-like tokens before and after stay


def make_pre(case: Case, device: torch.device = torch.device("cpu")) -> dict:
    """The norms' parameters and the RoPE tables of the whole sequence (the same on every
    process). Even cases: RMSNorm over all heads with a weight (Wan), tables of one angle per
    pair, interleaved; odd: LayerNorm per head with weight and bias (CogVideoX), full-width
    tables, halves. q's norm covers tokens [1, N), k's [0, N - 2) (a dual-stream DiT's video)."""
    index = CASES.index(case)
    gen = torch.Generator().manual_seed(500 + index)
    H, D, N = case.heads, case.head_dim, case.q_len
    wdtype = torch.float64 if case.dtype == torch.float64 else torch.float32

    def param(*shape):
        weight = 1 + 0.3 * torch.randn(*shape, generator=gen)
        return torch.nn.Parameter(weight.to(device, wdtype))
    rows = N - 1 - ROPE_START
    if index % 2 == 0:
        kind, over, shape, bias, style, width = "rms", "heads", (H * D,), False, "interleaved", D // 2
    else:
        kind, over, shape, bias, style, width = "layer", "head", (D,), True, "half", D
    angles = torch.rand(rows, width, generator=gen, dtype=torch.float64) * 6.0
    return {"kind": kind, "over": over, "style": style,
            "q_weight": param(*shape), "k_weight": param(*shape),
            "q_bias": param(*shape) if bias else None, "k_bias": param(*shape) if bias else None,
            "cos": angles.cos().to(device, wdtype), "sin": angles.sin().to(device, wdtype)}


def pre_kwargs(case: Case, pre: dict, q_range=None, k_range=None) -> dict:
    """linear_attention's q_norm, k_norm, rope (and token_offset): the whole sequence's specs
    (q_range None), or this process's for q tokens q_range and k tokens k_range."""
    N = case.q_len
    q_tokens, k_tokens = (1, N), (0, N - 2)
    cos, sin, start = pre["cos"], pre["sin"], ROPE_START
    offset = {}
    if q_range is not None and case.pre == "global":
        offset = {"token_offset": (q_range[0], k_range[0])}
    elif q_range is not None:  # local: this process's rows and positions (q, k split alike)
        lo, hi = q_range
        first, last = max(ROPE_START, lo), min(ROPE_START + len(cos), hi)
        cos, sin = cos[first - ROPE_START:last - ROPE_START], sin[first - ROPE_START:last - ROPE_START]
        start = first - lo
        clip = lambda a, b: (min(max(a - lo, 0), hi - lo), min(max(b - lo, 0), hi - lo))  # noqa
        q_tokens, k_tokens = clip(*q_tokens), clip(*k_tokens)
        if last <= first:
            cos = None
    norms = {side: linattn.QKNorm(pre["kind"], weight=pre[f"{side}_weight"],
                                  bias=pre[f"{side}_bias"], eps=1e-5, over=pre["over"],
                                  tokens=tokens)
             for side, tokens in (("q", q_tokens), ("k", k_tokens))}
    rope = None if cos is None else linattn.RoPE(cos, sin, style=pre["style"], start=start)
    return {"q_norm": norms["q"], "k_norm": norms["k"], "rope": rope, **offset}


def pre_grads(pre: dict) -> dict:
    return {f"dw_{name}": pre[name].grad for name in ("q_weight", "k_weight", "q_bias", "k_bias")
            if pre[name] is not None}


def bounds(n: int, world: int) -> list[int]:
    """Uneven slices of n tokens: process r gets about (r + 1) / Σ parts, at least one."""
    total = world * (world + 1) // 2
    cuts = [0]
    for r in range(world):
        cuts.append(max(cuts[-1] + 1, round(n * (r + 1) * (r + 2) / 2 / total)))
    cuts[-1] = n
    return cuts


def key_bounds(case: Case, world: int) -> list[int]:
    """The keys' slices: like the queries' for "local" pre cases (self-attention), else the
    mirror image of bounds() (so q and k offsets differ)."""
    if case.pre == "local":
        return bounds(case.kv_len, world)
    return [case.kv_len - c for c in reversed(bounds(case.kv_len, world))]


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bnhd" else t.transpose(1, 2).contiguous()


def run_case(case: Case, rank: int, world: int) -> dict:
    """This process's outputs and gradients, on the CPU (for the test process to compare)."""
    device = backend_device(case.backend)
    data = {n: None if t is None else t.to(device) for n, t in make_inputs(case).items()}
    q_map, k_map = make_maps(case, device)
    qc, kc = bounds(case.q_len, world), key_bounds(case, world)
    q, do = (data[n][:, qc[rank]:qc[rank + 1]] for n in ("q", "do"))
    k, v = (data[n][:, kc[rank]:kc[rank + 1]] for n in ("k", "v"))
    mask = None if data["mask"] is None else data["mask"][:, kc[rank]:kc[rank + 1]]
    q, k, v = (in_layout(t, case.layout).clone().requires_grad_() for t in (q, k, v))
    do = in_layout(do, case.layout)
    pre, kwargs = None, {}
    if case.pre:
        pre = make_pre(case, device)
        kwargs = pre_kwargs(case, pre, (qc[rank], qc[rank + 1]), (kc[rank], kc[rank + 1]))
    o = distributed.linear_attention(q, k, v, feature_map=(q_map, k_map), layout=case.layout,
                                     key_padding_mask=mask, backend=case.backend,
                                     reduce_param_grads=case.reduce_param_grads, **kwargs)
    o.backward(do)
    out = {"o": o, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if pre is not None:
        out.update(pre_grads(pre))
    for side, fmap in (("q", q_map), ("k", k_map)):
        if isinstance(fmap, torch.nn.Module):
            out[f"dw_{side}"] = next(iter(fmap.parameters())).grad
    return {name: (t.detach() if name.startswith("dw") else in_layout(t.detach(), case.layout))
            .cpu() for name, t in out.items()}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    results = {}
    with alloc.poison_outputs(True):
        for case in CASES:
            if world <= case.max_processes:
                results[case.name] = run_case(case, rank, world)
    torch.save(results, os.path.join(out_dir, f"rank-{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def spawn(world: int, tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp(f"cp{world}")
    mp.start_processes(worker, args=(world, str(root / "init"), str(root)), nprocs=world,
                       start_method="spawn", join=True)
    return [torch.load(root / f"rank-{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return spawn(2, tmp_path_factory)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return spawn(4, tmp_path_factory)


def unsharded(case: Case) -> tuple[dict, dict]:
    """(float64 reference, the single-process op) on the whole sequence: o and gradients, on
    the CPU. The float64 reference runs on the CPU; the op on its backend's device."""
    answers = []
    for backend in ("reference64", case.backend):
        device = backend_device("reference" if backend == "reference64" else backend)
        data = {n: None if t is None else t.to(device) for n, t in make_inputs(case).items()}
        q_map, k_map = make_maps(case, device)
        dtype = torch.float64 if backend == "reference64" else case.dtype
        q, k, v = (data[n].to(dtype, copy=True).requires_grad_() for n in ("q", "k", "v"))
        pre, kwargs = None, {}
        if case.pre:
            pre = make_pre(case, device)
            kwargs = pre_kwargs(case, pre)
        if backend == "reference64" and not case.pre:
            o = linear_attention_reference(q, k, v, *_resolve_maps((q_map, k_map)), 1e-6,
                                           data["mask"])
        else:
            # The float64 reference with norms and RoPE: the op's reference backend on
            # float64 inputs (it computes in float64, the weights' gradients in theirs).
            o = linattn.linear_attention(q, k, v, feature_map=(q_map, k_map),
                                         key_padding_mask=data["mask"],
                                         backend="reference" if backend == "reference64"
                                         else backend, **kwargs)
        o.backward(data["do"].to(dtype))
        out = {"o": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        if pre is not None:
            out.update(pre_grads(pre))
        for side, fmap in (("q", q_map), ("k", k_map)):
            if isinstance(fmap, torch.nn.Module):
                out[f"dw_{side}"] = next(iter(fmap.parameters())).grad
        answers.append({name: t.cpu() for name, t in out.items()})
    return answers[0], answers[1]


def gathered(results: list[dict], case: Case) -> dict:
    """The processes' outputs concatenated over the sequence; parameter gradients summed
    (each process holds its share) unless they were reduced, when every process must hold the
    same whole gradient."""
    per_rank = [r[case.name] for r in results]
    out = {name: torch.cat([r[name] for r in per_rank], dim=1) for name in ("o", "dq", "dk",
                                                                           "dv")}
    for name in per_rank[0]:
        if name.startswith("dw"):
            grads = [r[name] for r in per_rank]
            if case.reduce_param_grads:
                for g in grads[1:]:
                    assert torch.equal(g, grads[0]), f"{name}: processes disagree after the sum"
                out[name] = grads[0]
            else:
                out[name] = torch.stack(grads).sum(0)
    return out


def check(results: list[dict], case: Case) -> None:
    reference, single = unsharded(case)
    sharded = gathered(results, case)
    assert sharded.keys() == reference.keys()
    for name in reference:
        what = f"{case.name} x{len(results)} {name}"
        assert_close_to_reference(sharded[name], reference[name], case.dtype, what,
                                  peer=single[name])
        # As close to the single-process kernels as rounding allows: the sums are only
        # regrouped (per process, then across processes).
        assert_close_to_reference(sharded[name], single[name].double(), case.dtype,
                                  what + " vs the unsharded op")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_two_processes_match_the_unsharded_op(two, case):
    check(two, case)


@pytest.mark.parametrize("case", [c for c in CASES if c.max_processes >= 4], ids=lambda c: c.name)
def test_four_processes_match_the_unsharded_op(four, case):
    check(four, case)


def test_uneven_slices_are_uneven():
    assert bounds(29, 4) == [0, 3, 9, 17, 29] and bounds(13, 2) == [0, 4, 13]


def test_without_a_process_group_it_says_so():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialized"):
        distributed.linear_attention(q, q, q)


def test_token_offset_is_checked_by_name():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="^token_offset: expected None, an int"):
        distributed.shard_pre.offsets((1, -2))
    with pytest.raises(ValueError, match="^token_offset: expected None, an int"):
        distributed.shard_pre.offsets("3")
    assert distributed.shard_pre.offsets(3) == (3, 3)


def test_global_specs_are_cut_to_each_side_range():
    # Tables rotating global tokens [2, 12); this process holds q tokens [5, 9) and k [0, 4).
    cos, sin = torch.arange(10.0)[:, None].expand(10, 4), torch.zeros(10, 4)
    rope = linattn.RoPE(cos, sin, start=2)
    norm = linattn.QKNorm("rms", tokens=(3, 20))
    (qn, qr), (kn, kr) = distributed.shard_pre.localise(norm, norm, rope, (5, 0), 4, 4)
    assert qr.start == 0 and qr.cos[:, 0].tolist() == [3.0, 4.0, 5.0, 6.0]
    assert kr.start == 2 and kr.cos[:, 0].tolist() == [0.0, 1.0]
    assert qn.tokens == (0, 4) and kn.tokens == (3, 4)
    # A side that holds none of the rotated tokens gets no RoPE; local specs pass unchanged.
    (_, qr), _ = distributed.shard_pre.localise(None, None, rope, (12, 0), 3, 3)
    assert qr is None
    (qn2, qr2), (kn2, kr2) = distributed.shard_pre.localise(norm, None, rope, None, 4, 4)
    assert qr2 is rope and kr2 is rope and qn2 is norm


def test_state_bytes_is_the_state_not_the_sequence():
    # B·H·D'·(Dv + 1) float32 elements, for bf16 inputs too; float64 inputs keep float64.
    assert distributed.state_bytes(1, 12, 128, 128) == 12 * 128 * 129 * 4
    assert distributed.state_bytes(2, 2, 16, 8, torch.float64) == 2 * 2 * 16 * 9 * 8
