"""How a call reaches the kernels: directly in eager mode, through the custom ops when traced.

Eager: an autograd.Function whose forward and backward call execute.run_forward/run_backward;
without gradients, run_forward alone. A torch.library custom op costs several times more host
time per call (dispatch, schema checks, its autograd wrappers), which at small and medium shapes
is more than the kernels themselves (benchmarks/RESULTS.md, per-call overhead).
Traced (torch.compile): the custom ops of custom_op.py, which dynamo sees as two opaque ops with
fake shape functions, so graphs have no break. Both paths run the same functions (execute.py),
so they compute the same results (tests/test_compile.py).

With pre-attention work (q/k norms, RoPE: linattn.pre_attention) the norms' weights and biases
are inputs of the autograd function too (their (H, D) views, as PreAttentionCall holds them), so
autograd carries their gradients back to the caller's parameters, and the forward's per-token
statistics of a norm over all heads are saved for the backward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..pre_attention import NO_PRE_ATTENTION, PreAttentionCall
from .custom_op import forward_op
from .execute import Settings, run_backward, run_forward

_NO_NORMS = (None, None, None, None)


class _LinearAttention(torch.autograd.Function):
    """Eager autograd over the kernels: the forward's S and z (and norm statistics) are saved
    for the backward."""

    @staticmethod
    def forward(ctx, settings: Settings, num_q_params: int, pre: Optional[PreAttentionCall],
                q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                q_norm_weight: Optional[Tensor], q_norm_bias: Optional[Tensor],
                k_norm_weight: Optional[Tensor], k_norm_bias: Optional[Tensor],
                *params: Tensor) -> Tensor:
        o, state, normaliser, q_stats, k_stats = run_forward(
            q, k, v, key_mask, params[:num_q_params], params[num_q_params:], settings, pre)
        ctx.save_for_backward(q, k, v, key_mask, state, normaliser, q_stats, k_stats,
                              q_norm_weight, q_norm_bias, k_norm_weight, k_norm_bias, *params)
        ctx.settings, ctx.num_q_params, ctx.pre = settings, num_q_params, pre
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        if torch.is_grad_enabled():
            return _backward_with_graph(ctx, do)
        return _backward(ctx, do)


def _backward(ctx, do: Tensor):
    q, k, v, key_mask, state, normaliser, q_stats, k_stats, *rest = ctx.saved_tensors
    params = rest[4:]
    n = ctx.num_q_params
    dq, dk, dv, d_q_params, d_k_params, d_norms = run_backward(
        do, q, k, v, key_mask, params[:n], params[n:], state, normaliser, ctx.settings, ctx.pre,
        q_stats, k_stats)
    return None, None, None, dq, dk, dv, None, *d_norms, *d_q_params, *d_k_params


_NOT_TWICE = (b"linattn.linear_attention's gradients are not differentiable (its kernels have no "
              b"double backward); compute the second derivative with backend='reference'")


def _backward_with_graph(ctx, do: Tensor):
    """create_graph=True. The kernels' gradients cannot be differentiated again: where they
    depend on something that requires grad, they get a grad_fn that raises once reached, as
    torch.autograd.function.once_differentiable does, but judged by q, k, v and the maps'
    parameters too, not by do alone (a plain backward never comes here: its grad mode is off,
    and entering torch.no_grad() costs more than a small call's kernels)."""
    with torch.no_grad():
        grads = _backward(ctx, do)
    if not (do.requires_grad or any(t is not None and t.requires_grad
                                    for t in ctx.saved_tensors)):
        return grads
    present = [g for g in grads if g is not None]
    marked = torch._C._functions.DelayedError(_NOT_TWICE, len(present))(
        *[g.detach().requires_grad_() for g in present])
    marked = iter((marked,) if isinstance(marked, Tensor) else marked)
    return tuple(None if g is None else next(marked) for g in grads)


def apply_kernels(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                  q_params: Sequence[Tensor], k_params: Sequence[Tensor], settings: Settings,
                  compiling: bool, pre: Optional[PreAttentionCall] = None) -> Tensor:
    """o for (B, N, H, D)-indexed q, k, v on the kernel backend settings.backend; `compiling`:
    torch.compiler.is_compiling(), which the caller has asked already; `pre`: the resolved
    q/k norms and RoPE the kernels apply before φ."""
    if compiling:
        pre_tensors = (None,) * 6 if pre is None else pre.tensors()
        code = NO_PRE_ATTENTION if pre is None else pre.code()
        return forward_op(q, k, v, key_mask, list(q_params), list(k_params), *settings,
                          *pre_tensors, code)[0]
    norms = _NO_NORMS if pre is None else pre.tensors()[:4]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or _any_requires_grad(q_params)
                                    or _any_requires_grad(k_params)
                                    or (pre is not None and _any_requires_grad(norms))):
        return _LinearAttention.apply(settings, len(q_params), pre, q, k, v, key_mask, *norms,
                                      *q_params, *k_params)
    return run_forward(q, k, v, key_mask, q_params, k_params, settings, pre)[0]


def _any_requires_grad(params: Sequence[Optional[Tensor]]) -> bool:
    for p in params:  # a loop, not any(generator): builtin maps have no parameters at all
        if p is not None and p.requires_grad:
            return True
    return False
