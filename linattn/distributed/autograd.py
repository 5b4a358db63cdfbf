"""The kernels under context parallelism: a backend's phases with one all-reduce between them.

    forward:  forward_state (this process's keys) -> all-reduce (S, z) -> forward_output
    backward: backward_queries (dq; this process's dS, dz'; m) -> all-reduce (dS, dz')
              -> backward_keys

S and z (dS and dz') are written into one contiguous buffer in the state dtype (float32; float64
for float64 inputs), so each direction is a single all-reduce of B·H·D'·(Dv + 1) elements. The
maps' parameter gradients come back as this process's share (its queries for the q map, its keys
for the k map), like the gradient of any parameter used on this process's tokens.

The centre m (backends/base.py: the Triton backward centres the state before rounding it to a
16-bit operand, and sums dz' = dz + dS m instead of dz) is not reduced: it is a function of the
forward's S and z, which the forward's all-reduce made the same on every process, so every
process computes the same m, and Σ_p (dz_p + dS_p m) = dz + dS m is the dz' the key pass takes
back with that m. (Were the all-reduced S to differ between processes in its last bits, m would
too, and dk would carry Σ_p dS_p (m_p − m): rounding-level, not a different result.)

Eager only: the all-reduce and the backends' host code run as Python. (The single-process op
keeps its custom ops for torch.compile, linattn/ops/custom_op.py.)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..backends import MapCall, get_kernel_backend
from ..feature_maps import map_width
from ..ops import alloc
from ..ops.execute import Settings, state_dtype
from .collectives import all_reduce_


def _state_buffer(batch: int, heads: int, features: int, value_dim: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(buffer, S view (B, H, F, Dv), z view (B, H, F)): both in one contiguous tensor."""
    size = batch * heads * features * value_dim
    buffer = alloc.empty(size + batch * heads * features, dtype=dtype, device=device)
    return (buffer, buffer[:size].view(batch, heads, features, value_dim),
            buffer[size:].view(batch, heads, features))


def sharded_forward(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                    q_params: Sequence[Tensor], k_params: Sequence[Tensor], settings: Settings,
                    group) -> tuple[Tensor, Tensor, Tensor]:
    """(o, S, z) for this process's (B, N, H, D)-indexed q, k, v; S and z summed over group."""
    backend = get_kernel_backend(settings.backend)
    B, Nq, H, D = q.shape
    Dv = v.shape[3]
    F = map_width(settings.q_map, q_params, D)
    buffer, state, normaliser = _state_buffer(B, H, F, Dv, state_dtype(q.dtype), q.device)
    backend.forward_state(k, v, key_mask, MapCall(settings.k_map, tuple(k_params)), state,
                          normaliser)
    all_reduce_(buffer, group)
    o = alloc.empty_bnhd(B, Nq, H, Dv, bhnd=settings.bhnd, dtype=q.dtype, device=q.device)
    backend.forward_output(q, MapCall(settings.q_map, tuple(q_params)), settings.eps, state,
                           normaliser, o)
    return o, state, normaliser


def sharded_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                     q_params: Sequence[Tensor], k_params: Sequence[Tensor], state: Tensor,
                     normaliser: Tensor, settings: Settings, group
                     ) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor]]:
    """(dq, dk, dv, d_q_params, d_k_params) of this process's tokens, dS and dz' summed over
    group; the parameter gradients are this process's share."""
    backend = get_kernel_backend(settings.backend)
    B, _, H, _ = q.shape
    F, Dv = state.shape[2], state.shape[3]
    buffer, d_state, d_normaliser = _state_buffer(B, H, F, Dv, state.dtype, q.device)
    centre = alloc.empty(B, H, Dv, dtype=state.dtype, device=q.device)
    dq = alloc.empty_like(q)
    d_q_params = [alloc.empty_like(p) for p in q_params]
    backend.backward_queries(do, q, MapCall(settings.q_map, tuple(q_params)), settings.eps,
                             state, normaliser, dq, d_state, d_normaliser, centre, d_q_params)
    all_reduce_(buffer, group)
    dk, dv = alloc.empty_like(k), alloc.empty_like(v)
    d_k_params = [alloc.empty_like(p) for p in k_params]
    backend.backward_keys(k, v, key_mask, MapCall(settings.k_map, tuple(k_params)), d_state,
                          d_normaliser, centre, dk, dv, d_k_params)
    return dq, dk, dv, d_q_params, d_k_params


class ShardedLinearAttention(torch.autograd.Function):
    """Autograd over sharded_forward / sharded_backward (the forward's S, z are saved)."""

    @staticmethod
    def forward(ctx, settings: Settings, group, num_q_params: int, q: Tensor, k: Tensor,
                v: Tensor, key_mask: Optional[Tensor], *params: Tensor) -> Tensor:
        o, state, normaliser = sharded_forward(q, k, v, key_mask, params[:num_q_params],
                                               params[num_q_params:], settings, group)
        ctx.save_for_backward(q, k, v, key_mask, state, normaliser, *params)
        ctx.settings, ctx.group, ctx.num_q_params = settings, group, num_q_params
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do: Tensor):
        q, k, v, key_mask, state, normaliser, *params = ctx.saved_tensors
        n = ctx.num_q_params
        dq, dk, dv, d_q_params, d_k_params = sharded_backward(
            do, q, k, v, key_mask, params[:n], params[n:], state, normaliser, ctx.settings,
            ctx.group)
        return None, None, None, dq, dk, dv, None, *d_q_params, *d_k_params


def apply_sharded_kernels(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                          q_params: Sequence[Tensor], k_params: Sequence[Tensor],
                          settings: Settings, group) -> Tensor:
    """o for this process's (B, N, H, D)-indexed q, k, v on the kernel backend
    settings.backend, differentiable when anything requires grad."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *q_params, *k_params)):
        return ShardedLinearAttention.apply(settings, group, len(q_params), q, k, v, key_mask,
                                            *q_params, *k_params)
    return sharded_forward(q, k, v, key_mask, q_params, k_params, settings, group)[0]
