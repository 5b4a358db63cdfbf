"""The op as torch.library custom ops, for tracing: forward, backward, their fake (shape)
functions and the autograd formula that joins them. torch.compile sees two opaque ops with
known output shapes, so a model that calls linear_attention compiles with fullgraph=True, and
with dynamic=True the fake functions keep B and N symbolic.

Eager calls do not come here: a custom op's dispatch and its autograd wrappers cost more host
time than the kernels of a small call (autograd.py runs the same functions directly).

Arguments are plain tensors, lists of tensors and scalars (which is what a custom op accepts):
feature maps travel as their kernel name plus their parameter tensors (base.py of
linattn.feature_maps), the scalars in execute.Settings' order. q, k, v are (B, N, H, D)-indexed
views; `bhnd` says which memory layout the outputs are allocated in, so a (B, H, N, D) caller gets
its layout back without a copy.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..feature_maps import map_width
from .execute import Settings, run_backward, run_forward, state_dtype


@torch.library.custom_op("linattn::forward", mutates_args=())
def forward_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
               q_params: list[Tensor], k_params: list[Tensor], q_map: str, k_map: str,
               eps: float, bhnd: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return run_forward(q, k, v, key_mask, q_params, k_params,
                       Settings(q_map, k_map, eps, bhnd, backend))


@forward_op.register_fake
def _forward_fake(q, k, v, key_mask, q_params, k_params, q_map, k_map, eps, bhnd, backend):
    B, Nq, H, _ = q.shape
    Dv = v.shape[-1]
    F = map_width(q_map, q_params, q.shape[-1])
    o = (q.new_empty(B, H, Nq, Dv).permute(0, 2, 1, 3) if bhnd else q.new_empty(B, Nq, H, Dv))
    sdt = state_dtype(q.dtype)
    return o, q.new_empty(B, H, F, Dv, dtype=sdt), q.new_empty(B, H, F, dtype=sdt)


@torch.library.custom_op("linattn::backward", mutates_args=())
def backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                q_params: list[Tensor], k_params: list[Tensor], q_map: str, k_map: str,
                eps: float, state: Tensor, normaliser: Tensor, bhnd: bool,
                backend: str) -> list[Tensor]:
    """[dq, dk, dv, *d_q_params, *d_k_params]."""
    dq, dk, dv, dqp, dkp = run_backward(do, q, k, v, key_mask, q_params, k_params, state,
                                        normaliser, Settings(q_map, k_map, eps, bhnd, backend))
    return [dq, dk, dv, *dqp, *dkp]


@backward_op.register_fake
def _backward_fake(do, q, k, v, key_mask, q_params, k_params, q_map, k_map, eps, state,
                   normaliser, bhnd, backend):
    # As execute.run_backward allocates them: dq, dk, dv like q, k, v; contiguous parameters.
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            *[p.new_empty(p.shape) for p in q_params], *[p.new_empty(p.shape) for p in k_params]]


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, q_params, k_params, q_map, k_map, eps, bhnd, backend = inputs
    _, state, normaliser = output
    ctx.save_for_backward(q, k, v, key_mask, state, normaliser, *q_params, *k_params)
    ctx.num_q_params = len(q_params)
    ctx.settings = (q_map, k_map, eps, bhnd, backend)
    ctx.mark_non_differentiable(state, normaliser)


def _backward(ctx, grad_o, _grad_state, _grad_normaliser):
    q, k, v, key_mask, state, normaliser, *params = ctx.saved_tensors
    q_params, k_params = params[:ctx.num_q_params], params[ctx.num_q_params:]
    q_map, k_map, eps, bhnd, backend = ctx.settings
    grads = backward_op(grad_o, q, k, v, key_mask, q_params, k_params, q_map, k_map, eps,
                        state, normaliser, bhnd, backend)
    dq, dk, dv = grads[:3]
    d_q_params = grads[3:3 + len(q_params)]
    d_k_params = grads[3 + len(q_params):]
    return dq, dk, dv, None, d_q_params, d_k_params, None, None, None, None, None


torch.library.register_autograd("linattn::forward", _backward, setup_context=_setup_context)
