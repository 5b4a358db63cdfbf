"""torch.distributed plumbing: process group, device, and the DDP / FSDP2 wrappers.

Launch with torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without
those variables training runs in one process with no process group. The backend is NCCL for
CUDA devices and gloo for the CPU.

Context parallelism (train.context_parallel): the processes form a 2-D mesh, data-parallel
replicas x context-parallel groups of ring x ulysses processes (``make_mesh``; consecutive
ranks share a group). The ranks of one group train on the same samples, each on its own slice
of the sequence (diffusers' context-parallel hooks on the student, linattn's state all-reduce in
its converted layers), and DDP or FSDP2 spans every process: each rank's gradient is its
tokens' share of its group's, so the trainer scales the objective by the group size before the
wrapper averages over all processes.

Selective-transfer gates under FSDP2: fully_shard cannot shard 0-dim parameters, and the
constraint and binarisation losses read every gate outside any block's forward, so the gates
are kept out of sharding (``ignored_params``): each rank holds all of them, and their gradients
are averaged by ``all_reduce_grads`` after backward (FSDP averages the other gradients).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # this module created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(device: str = "auto", timeout_minutes: float = 120.0) -> DistContext:
    """Join the process group torchrun describes (or reuse one already initialised).

    The timeout bounds one collective wait; teacher-data generation can keep ranks apart
    for a whole shard (minutes for a 480p Wan trajectory), hence the generous default.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ  # torchrun, even with 1
    initialized_here = False
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    elif launched:
        dev = resolve_device(device, local_rank)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
        rank, initialized_here = dist.get_rank(), True
    else:
        rank = 0
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistContext(rank, world_size, local_rank, dev, initialized_here)


@dataclass(frozen=True)
class TrainMesh:
    """Where a process sits in the (data, ring, ulysses) mesh (module docstring).

    device_mesh: the DeviceMesh with those dims, None without context parallelism; data_rank,
    data_size: the data-parallel replica this process belongs to, and their count (the rank and
    world size batches are split by); ring, ulysses: the context-parallel degrees."""

    device_mesh: object
    data_rank: int
    data_size: int
    ring: int = 1
    ulysses: int = 1

    @property
    def context_parallel(self) -> int:
        return self.ring * self.ulysses


def make_mesh(ctx: DistContext, ring: int = 1, ulysses: int = 1) -> TrainMesh:
    """The trainer's mesh: world_size / (ring · ulysses) data-parallel replicas, each a
    context-parallel group of ring x ulysses processes."""
    group = ring * ulysses
    if ring < 1 or ulysses < 1:
        raise ValueError(f"train.context_parallel: ring and ulysses must be >= 1, got "
                         f"ring={ring}, ulysses={ulysses}")
    if group == 1:
        return TrainMesh(None, ctx.rank, ctx.world_size)
    if not ctx.distributed or ctx.world_size % group:
        raise ValueError(f"train.context_parallel: ring x ulysses = {group} processes per "
                         f"group must divide the {ctx.world_size} launched (torchrun "
                         f"--nproc_per_node a multiple of {group})")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size // group, ring, ulysses),
                            mesh_dim_names=("data", "ring", "ulysses"))
    return TrainMesh(mesh, mesh.get_local_rank("data"), ctx.world_size // group, ring, ulysses)


def teardown(ctx: DistContext) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def resolve_strategy(strategy: str, world_size: int) -> str:
    if strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if strategy in ("ddp", "fsdp") and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"train.strategy: {strategy!r} needs torch.distributed; launch with "
                         f"torchrun (a single process may use torchrun --nproc_per_node 1)")
    return strategy


def shardable_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP2 shards one by one: modules whose class is listed in the
    diffusers model's _no_split_modules (WanTransformerBlock for Wan)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"train.strategy 'fsdp': {type(model).__name__} declares no "
                         f"transformer block classes (_no_split_modules) to shard")
    return blocks


def wrap(model: nn.Module, strategy: str, ctx: DistContext,
         ignored_params: Iterable[nn.Parameter] = ()) -> nn.Module:
    """The module to train: model itself ("none"), DDP(model) or model after fully_shard.

    ``ignored_params`` stay replicated and unsharded under FSDP2 (the gates); under DDP they
    are synchronised like every other parameter.
    """
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DDP(model, device_ids=device_ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        ignored = set(ignored_params)
        for block in shardable_blocks(model):
            fully_shard(block, ignored_params=ignored or None)
        fully_shard(model, ignored_params=ignored or None)
        return model
    raise ValueError(f"train.strategy: unknown strategy {strategy!r}")


def shard_frozen(model: nn.Module, strategy: str) -> nn.Module:
    """The frozen teacher under FSDP2 is sharded too (it is as large as the student); under
    DDP and single-process training it is simply replicated."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in shardable_blocks(model):
            fully_shard(block)
        fully_shard(model)
    return model


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module) if type(module).__name__ == \
        "DistributedDataParallel" else module


def all_reduce_grads(params: Iterable[nn.Parameter], ctx: DistContext) -> None:
    """Average the gradients of replicated parameters that no wrapper synchronises."""
    if not ctx.distributed or ctx.world_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def maybe_no_sync(module: nn.Module, strategy: str, sync: bool):
    """Defer gradient synchronisation on the non-final micro-batches of an accumulated step:
    DDP's no_sync() context, or FSDP2's set_requires_gradient_sync switch."""
    if strategy == "ddp" and not sync:
        return module.no_sync()
    if strategy == "fsdp":
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()
