"""The op as torch.library custom ops, for tracing: forward, backward, their fake (shape)
functions and the autograd formula that joins them. torch.compile sees two opaque ops with
known output shapes, so a model that calls linear_attention compiles with fullgraph=True, and
with dynamic=True the fake functions keep B and N symbolic.

Eager calls do not come here: a custom op's dispatch and its autograd wrappers cost more host
time than the kernels of a small call (autograd.py runs the same functions directly).

Arguments are plain tensors, lists of tensors and scalars (which is what a custom op accepts):
feature maps travel as their kernel name plus their parameter tensors (base.py of
linattn.feature_maps), the scalars in execute.Settings' order, and the pre-attention work (q/k
norms, RoPE) as its six optional tensors plus its code string (linattn.pre_attention.
PreAttentionCall.code). q, k, v are (B, N, H, D)-indexed views; `bhnd` says which memory layout the
outputs are allocated in, so a (B, H, N, D) caller gets its layout back without a copy.

The forward also returns the per-token statistics of q and k norms over all heads ((B, N, 2) in
the state dtype; empty when a side has no such norm), saved for the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..feature_maps import map_width
from ..pre_attention import NO_PRE_ATTENTION, PreAttentionCall
from .execute import Settings, run_backward, run_forward, state_dtype


def _stats_shapes(code: str, q: Tensor, k: Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the (q, k) norm statistics: (B, N, 2) for a norm over heads, else (0,)."""
    if code == NO_PRE_ATTENTION:
        return (0,), (0,)
    q_code, k_code, _ = code.split(";")
    over = [c != "-" and c.split(",")[1] == "1" for c in (q_code, k_code)]
    return tuple((t.shape[0], t.shape[1], 2) if o else (0,) for t, o in zip((q, k), over))


def _or_empty(stats: Optional[Tensor], like: Tensor) -> Tensor:
    # A custom op returns tensors, never None: a side without statistics gets an empty one.
    return like.new_empty(0, dtype=state_dtype(like.dtype)) if stats is None else stats


@torch.library.custom_op("linattn::forward", mutates_args=())
def forward_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
               q_params: list[Tensor], k_params: list[Tensor], q_map: str, k_map: str,
               eps: float, bhnd: bool, backend: str,
               q_norm_weight: Optional[Tensor], q_norm_bias: Optional[Tensor],
               k_norm_weight: Optional[Tensor], k_norm_bias: Optional[Tensor],
               rope_cos: Optional[Tensor], rope_sin: Optional[Tensor],
               pre_code: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    pre = PreAttentionCall.decode(pre_code, q.shape[-1], q_norm_weight, q_norm_bias, k_norm_weight,
                              k_norm_bias, rope_cos, rope_sin)
    o, state, normaliser, q_stats, k_stats = run_forward(
        q, k, v, key_mask, q_params, k_params, Settings(q_map, k_map, eps, bhnd, backend), pre)
    return o, state, normaliser, _or_empty(q_stats, q), _or_empty(k_stats, q)


@forward_op.register_fake
def _forward_fake(q, k, v, key_mask, q_params, k_params, q_map, k_map, eps, bhnd, backend,
                  q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, rope_cos, rope_sin,
                  pre_code):
    B, Nq, H, _ = q.shape
    Dv = v.shape[-1]
    F = map_width(q_map, q_params, q.shape[-1])
    o = (q.new_empty(B, H, Nq, Dv).permute(0, 2, 1, 3) if bhnd else q.new_empty(B, Nq, H, Dv))
    sdt = state_dtype(q.dtype)
    q_shape, k_shape = _stats_shapes(pre_code, q, k)
    return (o, q.new_empty(B, H, F, Dv, dtype=sdt), q.new_empty(B, H, F, dtype=sdt),
            q.new_empty(q_shape, dtype=sdt), q.new_empty(k_shape, dtype=sdt))


@torch.library.custom_op("linattn::backward", mutates_args=())
def backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                q_params: list[Tensor], k_params: list[Tensor], q_map: str, k_map: str,
                eps: float, state: Tensor, normaliser: Tensor, bhnd: bool,
                backend: str, q_norm_weight: Optional[Tensor], q_norm_bias: Optional[Tensor],
                k_norm_weight: Optional[Tensor], k_norm_bias: Optional[Tensor],
                rope_cos: Optional[Tensor], rope_sin: Optional[Tensor], pre_code: str,
                q_stats: Tensor, k_stats: Tensor) -> list[Tensor]:
    """[dq, dk, dv, *d_q_params, *d_k_params, *d_norm_params] (norm weights and biases present,
    in the order q weight, q bias, k weight, k bias)."""
    pre = PreAttentionCall.decode(pre_code, q.shape[-1], q_norm_weight, q_norm_bias, k_norm_weight,
                              k_norm_bias, rope_cos, rope_sin)
    dq, dk, dv, dqp, dkp, d_norms = run_backward(
        do, q, k, v, key_mask, q_params, k_params, state, normaliser,
        Settings(q_map, k_map, eps, bhnd, backend), pre,
        q_stats if q_stats.numel() else None, k_stats if k_stats.numel() else None)
    return [dq, dk, dv, *dqp, *dkp, *[t for t in d_norms if t is not None]]


@backward_op.register_fake
def _backward_fake(do, q, k, v, key_mask, q_params, k_params, q_map, k_map, eps, state,
                   normaliser, bhnd, backend, q_norm_weight, q_norm_bias, k_norm_weight,
                   k_norm_bias, rope_cos, rope_sin, pre_code, q_stats, k_stats):
    # As execute.run_backward allocates them: dq, dk, dv like q, k, v; contiguous parameters.
    norms = (q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias)
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            *[p.new_empty(p.shape) for p in q_params], *[p.new_empty(p.shape) for p in k_params],
            *[t.new_empty(t.shape) for t in norms if t is not None]]


def _setup_context(ctx, inputs, output):
    (q, k, v, key_mask, q_params, k_params, q_map, k_map, eps, bhnd, backend,
     *pre_tensors, pre_code) = inputs
    _, state, normaliser, q_stats, k_stats = output
    ctx.save_for_backward(q, k, v, key_mask, state, normaliser, q_stats, k_stats, *pre_tensors,
                          *q_params, *k_params)
    ctx.num_q_params = len(q_params)
    ctx.settings = (q_map, k_map, eps, bhnd, backend, pre_code)
    ctx.mark_non_differentiable(state, normaliser, q_stats, k_stats)


def _backward(ctx, grad_o, _grad_state, _grad_normaliser, _grad_q_stats, _grad_k_stats):
    q, k, v, key_mask, state, normaliser, q_stats, k_stats, *rest = ctx.saved_tensors
    pre_tensors, params = rest[:6], rest[6:]
    q_params, k_params = params[:ctx.num_q_params], params[ctx.num_q_params:]
    q_map, k_map, eps, bhnd, backend, pre_code = ctx.settings
    grads = backward_op(grad_o, q, k, v, key_mask, q_params, k_params, q_map, k_map, eps,
                        state, normaliser, bhnd, backend, *pre_tensors, pre_code, q_stats,
                        k_stats)
    dq, dk, dv = grads[:3]
    d_q_params = grads[3:3 + len(q_params)]
    d_k_params = grads[3 + len(q_params):3 + len(q_params) + len(k_params)]
    d_norm = iter(grads[3 + len(q_params) + len(k_params):])
    d_pre = [None if t is None else next(d_norm) for t in pre_tensors[:4]]
    return (dq, dk, dv, None, d_q_params, d_k_params, None, None, None, None, None,
            *d_pre, None, None, None)


torch.library.register_autograd("linattn::forward", _backward, setup_context=_setup_context)
