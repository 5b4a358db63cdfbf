"""Context parallelism on CPU processes: time and bytes per layer call, state all-reduce against
all-gathering k and v (issue 14's figures).

    python benchmarks/context_parallel.py [--tokens 65536] [--heads 2] [--dim 16]
        [--ranks 1 2 4] [--repeats 5] [--threads 1]

For each process count W, W gloo processes each hold N / W tokens of q, k, v (B = 1, bf16 is not
used: float32, relu) and time, per forward + backward of one attention call:

* state all-reduce: linattn.distributed.linear_attention (one all-reduce of S, z forward and one
  of dS, dz' backward, B·H·D·(Dv + 1) float32 elements each);
* all-gather k, v: every process gathers the whole k and v (differentiably: the backward
  reduce-scatters their gradients) and runs the single-process op on its queries against all
  keys. That is what a softmax-style context parallelism (ring, Ulysses) moves.

Bytes are what one process sends per call, counted from the collectives' sizes (ring
algorithms: an all-reduce of M bytes sends 2·(W − 1)/W·M per process, an all-gather or
reduce-scatter of a total of M bytes (W − 1)/W·M). Times are the median over --repeats calls,
the slowest process of each call. Prints a markdown table; the figures in
benchmarks/RESULTS.md come from it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import linattn
from linattn import distributed


class _AllGatherTokens(torch.autograd.Function):
    """(B, N_local, H, D) -> (B, N, H, D) gathered over the group; backward: reduce-scatter."""

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.n = x.shape[1]
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, dy):
        world = dist.get_world_size()
        parts = [p.contiguous() for p in dy.split(ctx.n, dim=1)]
        out = torch.empty_like(parts[0])
        dist.reduce_scatter(out, parts)
        return out


def _call(kind: str, q, k, v, world: int):
    if world == 1:
        return linattn.linear_attention(q, k, v, backend="cpu")
    if kind == "state all-reduce":
        return distributed.linear_attention(q, k, v, backend="cpu")
    k_all, v_all = _AllGatherTokens.apply(k), _AllGatherTokens.apply(v)
    return linattn.linear_attention(q, k_all, v_all, backend="cpu")


def bytes_sent(kind: str, world: int, n: int, heads: int, dim: int) -> int:
    """Bytes one process sends per forward + backward (module docstring)."""
    if world == 1:
        return 0
    if kind == "state all-reduce":
        state = heads * dim * (dim + 1) * 4
        return 2 * int(2 * (world - 1) / world * state)
    kv = n * heads * 2 * dim * 4  # the whole k and v, float32
    return 2 * int((world - 1) / world * kv)  # all-gather forward, reduce-scatter backward


def worker(rank: int, world: int, init: str, args, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(args.threads)
    local = args.tokens // world
    gen = torch.Generator().manual_seed(rank)
    shape = (1, local, args.heads, args.dim)
    q, k, v, do = (torch.randn(*shape, generator=gen) for _ in range(4))
    rows = []
    for kind in ("state all-reduce", "all-gather k, v"):
        if world == 1 and kind != "state all-reduce":
            continue
        times = []
        for i in range(args.repeats + 1):  # the first call warms up
            qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
            dist.barrier()
            start = time.perf_counter()
            o = _call(kind, qq, kk, vv, world)
            o.backward(do)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i:
                times.append(float(elapsed))
        rows.append((kind, statistics.median(times)))
    if rank == 0:
        torch.save(rows, out)
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args(argv)
    table = []
    for world in args.ranks:
        if args.tokens % world:
            sys.exit(f"--tokens {args.tokens} is not a multiple of {world} processes")
        with tempfile.TemporaryDirectory() as root:
            out = os.path.join(root, "rows.pt")
            mp.start_processes(worker, args=(world, os.path.join(root, "init"), args, out),
                               nprocs=world, start_method="spawn", join=True)
            for kind, seconds in torch.load(out):
                table.append((world, kind, seconds,
                              bytes_sent(kind, world, args.tokens, args.heads, args.dim)))
        print(f"done: {world} process(es)", file=sys.stderr, flush=True)
    print(f"\n(1, {args.tokens}, {args.heads}, {args.dim}) float32 relu, cpu backend, "
          f"{args.threads} thread(s) per process, median of {args.repeats}\n")
    print("| processes | communication | fwd+bwd ms | bytes sent per process per call |")
    print("|---|---|---|---|")
    for world, kind, seconds, sent in table:
        label = "none (one process)" if world == 1 else kind
        print(f"| {world} | {label} | {1000 * seconds:.1f} | {sent:,} |")


if __name__ == "__main__":
    main()
