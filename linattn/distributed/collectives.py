"""The one collective context parallelism needs: a sum over the group, and its autograd rules.

``all_reduce_`` sums a tensor over the group in place (torch.distributed.all_reduce). The two
autograd functions give the float64 reference path (reference.py) the same communication as
the kernels' path: ``SumOverGroup`` is the state all-reduce (forward: sum; backward: the
gradient of a replicated sum is the sum of the gradients, so the backward sums too), and
``SumGradOverGroup`` is the identity whose backward sums a parameter's gradient over the group
(``reduce_param_grads=True``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def all_reduce_(t: Tensor, group) -> Tensor:
    """t <- Σ over the processes of `group` of their t, in place; returns t."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class SumOverGroup(torch.autograd.Function):
    """y = Σ_group x (every process gets the sum); dx = Σ_group dy."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return all_reduce_(x.clone(memory_format=torch.contiguous_format), group)

    @staticmethod
    def backward(ctx, dy: Tensor):
        return all_reduce_(dy.clone(memory_format=torch.contiguous_format), ctx.group), None


class SumGradOverGroup(torch.autograd.Function):
    """y = x; dx = Σ_group dy, summed in float32 at least (a replicated parameter whose
    gradient is wanted whole on every process)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy: Tensor):
        wide = dy.to(torch.promote_types(dy.dtype, torch.float32),
                     memory_format=torch.contiguous_format, copy=True)
        return all_reduce_(wide, ctx.group).to(dy.dtype), None
