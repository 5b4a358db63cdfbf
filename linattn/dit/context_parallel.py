"""Converted layers under diffusers' context parallelism (ParallelConfig, Ulysses or ring).

diffusers shards a model's sequence with hooks its ``_cp_plan`` describes (split the inputs of
the first block, gather the output of the last projection), and its attention dispatcher runs
softmax attention across the processes (Ulysses all-to-all, or a ring of key/value blocks).
Every process then holds the queries, keys and values of its own tokens, so a converted layer
sums S and z over the context-parallel group with one all-reduce
(linattn.distributed.linear_attention); the softmax branch of a hybrid layer keeps diffusers'
own path (the dispatcher with the layer's parallel config).

    model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2),
                             cp_plan=linattn.dit.context_parallel_plan(model))

``context_parallel_plan`` is the model's own ``_cp_plan`` (Wan, LTX-Video) or, for a family
diffusers ships none for, its selector's (CogVideoX). ``enable_context_parallel`` does the same
as ``enable_parallelism`` and also runs on a CPU-only machine (gloo), where diffusers 0.42.1's
``enable_parallelism`` divides by the accelerator count (0): linattn's tests and the trainer on
the CPU use it.

The model's output (and every plan's gathered output) is the whole sequence on every process;
call it with return_dict=False (diffusers' split hook on the model refuses an output object).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn



def context_parallel_group(parallel_config) -> Optional[object]:
    """The process group a layer's sequence is sharded over (ring x Ulysses, flattened), or
    None without context parallelism."""
    cp_config = getattr(parallel_config, "context_parallel_config", None)
    if cp_config is None:
        return None
    mesh = cp_config._flattened_mesh
    if mesh is None:
        raise ValueError("parallel_config: its context_parallel_config has no device mesh yet "
                         "(enable_parallelism sets it up); set it up before running the model")
    return mesh.get_group()


def context_parallel_plan(model: nn.Module, selector=None) -> dict:
    """How diffusers shards `model` under context parallelism: its own _cp_plan, else the plan
    of its family's selector. Raises when neither exists, or when some self-attention layer
    would ignore the sharding (a stock processor that calls SDPA itself sees only its own
    process's keys)."""
    from .processor import LinAttnProcessor
    from .selectors import resolve_selector

    sel = resolve_selector(model, selector)
    plan = getattr(model, "_cp_plan", None) or sel.context_parallel_plan(model)
    if plan is None:
        raise ValueError(f"{type(model).__name__}: diffusers ships no context-parallel plan "
                         f"(_cp_plan) for it and selector {sel.name!r} has none either")
    unaware = [name for name, attn in sel.layers(model)
               if not isinstance(getattr(attn, "processor", None), LinAttnProcessor)
               and not sel.stock_processor_is_context_parallel]
    if unaware:
        raise ValueError(
            f"{type(model).__name__}: the stock processor of layers {unaware} calls softmax "
            f"attention itself, which under context parallelism would see only this process's "
            f"keys; convert them (mode='hybrid' keeps softmax, through diffusers' dispatcher)")
    return plan


def enable_context_parallel(model: nn.Module, *, ring_degree: int = 1, ulysses_degree: int = 1,
                            mesh=None, plan: Optional[dict] = None) -> object:
    """Shard `model`'s sequence over ring_degree x ulysses_degree processes, as
    ``model.enable_parallelism`` does, on accelerators and on the CPU alike; returns the
    ParallelConfig. mesh: a DeviceMesh with dims ("ring", "ulysses") (a sub-mesh of a larger
    one, such as the trainer's (data, ring, ulysses)); default: one over the whole world.
    plan: default context_parallel_plan(model)."""
    import torch.distributed as dist
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("enable_context_parallel: torch.distributed is not initialized")
    plan = plan if plan is not None else context_parallel_plan(model)
    cp_config = ContextParallelConfig(ring_degree=ring_degree, ulysses_degree=ulysses_degree,
                                      mesh=mesh)
    config = ParallelConfig(context_parallel_config=cp_config)
    if torch.accelerator.device_count() > 0:
        model.enable_parallelism(config=config, cp_plan=plan)
        return config
    # diffusers 0.42.1's _resolve_parallel_config takes rank % accelerator count for the
    # device, which is a division by zero without an accelerator: the same steps, on the CPU.
    from diffusers.hooks.context_parallel import apply_context_parallel
    from torch.distributed.device_mesh import init_device_mesh

    if getattr(model, "_parallel_config", None) is not None:
        raise RuntimeError(f"Parallelism is already applied to this {type(model).__name__}")
    if mesh is None:
        mesh = init_device_mesh("cpu", cp_config.mesh_shape,
                                mesh_dim_names=cp_config.mesh_dim_names)
    config.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    model._parallel_config = config
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = config
    apply_context_parallel(model, cp_config, plan)
    return config
