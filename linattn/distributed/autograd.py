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

With q/k norms and RoPE (linattn.pre_attention), each side's part is its own PreAttentionCall
(q_pre: q's norm and RoPE; k_pre: k's), since under context parallelism the two sides may hold
different token ranges and so different rows of the RoPE tables (shard_pre.py). Each phase
applies its side's; the forward phases write the statistics of a norm over all heads, which
the backward phases read, and the norms' weight and bias gradients come back as this process's
share, like the maps' parameters.

Eager only: the all-reduce and the backends' host code run as Python. (The single-process op
keeps its custom ops for torch.compile, linattn/ops/custom_op.py.)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..backends import MapCall, PreCall, get_kernel_backend
from ..feature_maps import map_width
from ..ops import alloc
from ..ops.execute import Settings, state_dtype
from ..pre_attention import PreAttentionCall
from .collectives import all_reduce_


def _state_buffer(batch: int, heads: int, features: int, value_dim: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(buffer, S view (B, H, F, Dv), z view (B, H, F)): both in one contiguous tensor."""
    size = batch * heads * features * value_dim
    buffer = alloc.empty(size + batch * heads * features, dtype=dtype, device=device)
    return (buffer, buffer[:size].view(batch, heads, features, value_dim),
            buffer[size:].view(batch, heads, features))


def _stats(norm, x: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """The (B, N, 2) statistics buffer of a norm over all heads; None for other norms."""
    if norm is None or not norm.over_heads:
        return None
    return alloc.empty(x.shape[0], x.shape[1], 2, dtype=dtype, device=x.device)


def _side_grads(norm) -> list[Optional[Tensor]]:
    """Buffers for a side's (d weight, d bias), (H, D) like the norm's views; None where absent."""
    if norm is None:
        return [None, None]
    return [None if t is None else alloc.empty(*t.shape, dtype=t.dtype, device=t.device)
            for t in (norm.weight, norm.bias)]


def sharded_forward(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                    q_params: Sequence[Tensor], k_params: Sequence[Tensor], settings: Settings,
                    group, q_pre: Optional[PreAttentionCall] = None,
                    k_pre: Optional[PreAttentionCall] = None
                    ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(o, S, z, q_stats, k_stats) for this process's (B, N, H, D)-indexed q, k, v; S and z
    summed over group; the stats those of q's and k's norms over all heads (else None)."""
    backend = get_kernel_backend(settings.backend)
    B, Nq, H, D = q.shape
    Dv = v.shape[3]
    F = map_width(settings.q_map, q_params, D)
    sdt = state_dtype(q.dtype)
    buffer, state, normaliser = _state_buffer(B, H, F, Dv, sdt, q.device)
    k_stats = None if k_pre is None else _stats(k_pre.k_norm, k, sdt)
    backend.forward_state(k, v, key_mask, MapCall(settings.k_map, tuple(k_params)), state,
                          normaliser, **_pre_kwargs(k_pre, None, k_stats))
    all_reduce_(buffer, group)
    o = alloc.empty_bnhd(B, Nq, H, Dv, bhnd=settings.bhnd, dtype=q.dtype, device=q.device)
    q_stats = None if q_pre is None else _stats(q_pre.q_norm, q, sdt)
    backend.forward_output(q, MapCall(settings.q_map, tuple(q_params)), settings.eps, state,
                           normaliser, o, **_pre_kwargs(q_pre, q_stats, None))
    return o, state, normaliser, q_stats, k_stats


def _pre_kwargs(pre: Optional[PreAttentionCall], q_stats, k_stats, d_pre=None) -> dict:
    """The pre (and d_pre) keyword arguments of a phase: none at all without pre-attention work,
    so a backend without it is called exactly as before."""
    if pre is None:
        return {}
    kwargs = {"pre": PreCall(pre, q_stats, k_stats)}
    if d_pre is not None:
        kwargs["d_pre"] = d_pre
    return kwargs


def sharded_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                     q_params: Sequence[Tensor], k_params: Sequence[Tensor], state: Tensor,
                     normaliser: Tensor, settings: Settings, group,
                     q_pre: Optional[PreAttentionCall] = None,
                     k_pre: Optional[PreAttentionCall] = None,
                     q_stats: Optional[Tensor] = None, k_stats: Optional[Tensor] = None):
    """(dq, dk, dv, d_q_params, d_k_params, d_norms) of this process's tokens, dS and dz'
    summed over group; the parameter gradients (maps' and norms': d_norms = (q weight, q bias,
    k weight, k bias), None where absent) are this process's share."""
    backend = get_kernel_backend(settings.backend)
    B, _, H, _ = q.shape
    F, Dv = state.shape[2], state.shape[3]
    buffer, d_state, d_normaliser = _state_buffer(B, H, F, Dv, state.dtype, q.device)
    centre = alloc.empty(B, H, Dv, dtype=state.dtype, device=q.device)
    dq = alloc.empty_like(q)
    d_q_params = [alloc.empty_like(p) for p in q_params]
    d_q_norm = _side_grads(None if q_pre is None else q_pre.q_norm)
    backend.backward_queries(do, q, MapCall(settings.q_map, tuple(q_params)), settings.eps,
                             state, normaliser, dq, d_state, d_normaliser, centre, d_q_params,
                             **_pre_kwargs(q_pre, q_stats, None, d_q_norm))
    all_reduce_(buffer, group)
    dk, dv = alloc.empty_like(k), alloc.empty_like(v)
    d_k_params = [alloc.empty_like(p) for p in k_params]
    d_k_norm = _side_grads(None if k_pre is None else k_pre.k_norm)
    backend.backward_keys(k, v, key_mask, MapCall(settings.k_map, tuple(k_params)), d_state,
                          d_normaliser, centre, dk, dv, d_k_params,
                          **_pre_kwargs(k_pre, None, k_stats, d_k_norm))
    return dq, dk, dv, d_q_params, d_k_params, (*d_q_norm, *d_k_norm)


class ShardedLinearAttention(torch.autograd.Function):
    """Autograd over sharded_forward / sharded_backward (the forward's S, z and norm
    statistics are saved). The norms' (H, D) weight and bias views are inputs, so autograd
    carries their gradients back to the caller's parameters."""

    @staticmethod
    def forward(ctx, settings: Settings, group, num_q_params: int,
                q_pre: Optional[PreAttentionCall], k_pre: Optional[PreAttentionCall],
                q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                q_norm_weight: Optional[Tensor], q_norm_bias: Optional[Tensor],
                k_norm_weight: Optional[Tensor], k_norm_bias: Optional[Tensor],
                *params: Tensor) -> Tensor:
        o, state, normaliser, q_stats, k_stats = sharded_forward(
            q, k, v, key_mask, params[:num_q_params], params[num_q_params:], settings, group,
            q_pre, k_pre)
        ctx.save_for_backward(q, k, v, key_mask, state, normaliser, q_stats, k_stats, *params)
        ctx.settings, ctx.group, ctx.num_q_params = settings, group, num_q_params
        ctx.q_pre, ctx.k_pre = q_pre, k_pre
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do: Tensor):
        q, k, v, key_mask, state, normaliser, q_stats, k_stats, *params = ctx.saved_tensors
        n = ctx.num_q_params
        dq, dk, dv, d_q_params, d_k_params, d_norms = sharded_backward(
            do, q, k, v, key_mask, params[:n], params[n:], state, normaliser, ctx.settings,
            ctx.group, ctx.q_pre, ctx.k_pre, q_stats, k_stats)
        return (None, None, None, None, None, dq, dk, dv, None, *d_norms, *d_q_params,
                *d_k_params)


def _norm_tensors(pre: Optional[PreAttentionCall], side: str) -> tuple[Optional[Tensor], ...]:
    norm = None if pre is None else (pre.q_norm if side == "q" else pre.k_norm)
    return (None, None) if norm is None else (norm.weight, norm.bias)


def apply_sharded_kernels(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                          q_params: Sequence[Tensor], k_params: Sequence[Tensor],
                          settings: Settings, group,
                          q_pre: Optional[PreAttentionCall] = None,
                          k_pre: Optional[PreAttentionCall] = None) -> Tensor:
    """o for this process's (B, N, H, D)-indexed q, k, v on the kernel backend
    settings.backend, differentiable when anything requires grad; q_pre, k_pre: each side's
    resolved norm and RoPE (bounded to its own length), or None."""
    norms = (*_norm_tensors(q_pre, "q"), *_norm_tensors(k_pre, "k"))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k, v, *q_params, *k_params, *norms)):
        return ShardedLinearAttention.apply(settings, group, len(q_params), q_pre, k_pre, q, k,
                                            v, key_mask, *norms, *q_params, *k_params)
    return sharded_forward(q, k, v, key_mask, q_params, k_params, settings, group, q_pre,
                           k_pre)[0]
