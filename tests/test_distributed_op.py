"""linattn.distributed.linear_attention in 2 and 4 gloo processes against the unsharded op.

Each process holds an uneven slice of the queries and of the keys (the query and key slices
differ too); the concatenated outputs and every gradient (dq, dk, dv, Hedgehog's dW_q and
dW_k) must equal the unsharded op's on the whole sequence: within numerics.py's tolerance of the
float64 reference, and close to the single-process kernels themselves. Masks, both layouts,
bf16, Hedgehog with and without reduce_param_grads, a map no kernel fuses, and every backend.

The processes are spawned once per process count (a module fixture) and run every case; the
test functions check what they wrote.
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
]


def make_maps(case: Case):
    """(map for q, map for k) as fresh modules, the same on every process."""
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


def bounds(n: int, world: int) -> list[int]:
    """Uneven slices of n tokens: process r gets about (r + 1) / Σ parts, at least one."""
    total = world * (world + 1) // 2
    cuts = [0]
    for r in range(world):
        cuts.append(max(cuts[-1] + 1, round(n * (r + 1) * (r + 2) / 2 / total)))
    cuts[-1] = n
    return cuts


def in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bnhd" else t.transpose(1, 2).contiguous()


def run_case(case: Case, rank: int, world: int) -> dict:
    data = make_inputs(case)
    q_map, k_map = make_maps(case)
    qc, kc = bounds(case.q_len, world), bounds(case.kv_len, world)
    q, do = (data[n][:, qc[rank]:qc[rank + 1]] for n in ("q", "do"))
    k, v = (data[n][:, kc[rank]:kc[rank + 1]] for n in ("k", "v"))
    mask = None if data["mask"] is None else data["mask"][:, kc[rank]:kc[rank + 1]]
    q, k, v = (in_layout(t, case.layout).clone().requires_grad_() for t in (q, k, v))
    do = in_layout(do, case.layout)
    o = distributed.linear_attention(q, k, v, feature_map=(q_map, k_map), layout=case.layout,
                                     key_padding_mask=mask, backend=case.backend,
                                     reduce_param_grads=case.reduce_param_grads)
    o.backward(do)
    out = {"o": o, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for side, fmap in (("q", q_map), ("k", k_map)):
        if isinstance(fmap, torch.nn.Module):
            out[f"dw_{side}"] = next(iter(fmap.parameters())).grad
    return {name: t.detach() if name.startswith("dw") else in_layout(t.detach(), case.layout)
            for name, t in out.items()}


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
    """(float64 reference, the single-process op) on the whole sequence: o and gradients."""
    data = make_inputs(case)
    answers = []
    for backend in ("reference64", case.backend):
        q_map, k_map = make_maps(case)
        dtype = torch.float64 if backend == "reference64" else case.dtype
        q, k, v = (data[n].to(dtype, copy=True).requires_grad_() for n in ("q", "k", "v"))
        if backend == "reference64":
            o = linear_attention_reference(q, k, v, *_resolve_maps((q_map, k_map)), 1e-6,
                                           data["mask"])
        else:
            o = linattn.linear_attention(q, k, v, feature_map=(q_map, k_map),
                                         key_padding_mask=data["mask"], backend=backend)
        o.backward(data["do"].to(dtype))
        out = {"o": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
        for side, fmap in (("q", q_map), ("k", k_map)):
            if isinstance(fmap, torch.nn.Module):
                out[f"dw_{side}"] = next(iter(fmap.parameters())).grad
        answers.append(out)
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


@pytest.mark.parametrize("argument", ["q_norm", "k_norm", "rope"])
def test_pre_attention_arguments_are_refused_by_name(argument):
    # Refused before anything else, so no process group is needed to see it.
    q = torch.randn(1, 4, 1, 8)
    value = (linattn.RoPE(torch.ones(4, 8), torch.zeros(4, 8)) if argument == "rope"
             else linattn.QKNorm("rms"))
    with pytest.raises(ValueError, match=f"^{argument}: .*does not fuse q/k norms or RoPE"):
        distributed.linear_attention(q, q, q, **{argument: value})


def test_state_bytes_is_the_state_not_the_sequence():
    # B·H·D'·(Dv + 1) float32 elements, for bf16 inputs too; float64 inputs keep float64.
    assert distributed.state_bytes(1, 12, 128, 128) == 12 * 128 * 129 * 4
    assert distributed.state_bytes(2, 2, 16, 8, torch.float64) == 2 * 2 * 16 * 9 * 8
