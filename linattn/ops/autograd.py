"""How a call reaches the kernels: directly in eager mode, through the custom ops when traced.

Eager: an autograd.Function whose forward and backward call execute.run_forward/run_backward;
without gradients, run_forward alone. A torch.library custom op costs several times more host
time per call (dispatch, schema checks, its autograd wrappers), which at small and medium shapes
is more than the kernels themselves (benchmarks/RESULTS.md, per-call overhead).
Traced (torch.compile): the custom ops of custom_op.py, which dynamo sees as two opaque ops with
fake shape functions, so graphs have no break. Both paths run the same functions (execute.py),
so they compute the same results (tests/test_compile.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .custom_op import forward_op
from .execute import Settings, run_backward, run_forward


class _LinearAttention(torch.autograd.Function):
    """Eager autograd over the kernels: the forward's S and z are saved for the backward."""

    @staticmethod
    def forward(ctx, settings: Settings, num_q_params: int, q: Tensor, k: Tensor, v: Tensor,
                key_mask: Optional[Tensor], *params: Tensor) -> Tensor:
        o, state, normaliser = run_forward(q, k, v, key_mask, params[:num_q_params],
                                           params[num_q_params:], settings)
        ctx.save_for_backward(q, k, v, key_mask, state, normaliser, *params)
        ctx.settings, ctx.num_q_params = settings, num_q_params
        return o

    @staticmethod
    def backward(ctx, do: Tensor):
        if torch.is_grad_enabled():
            return _backward_with_graph(ctx, do)
        return _backward(ctx, do)


def _backward(ctx, do: Tensor):
    q, k, v, key_mask, state, normaliser, *params = ctx.saved_tensors
    n = ctx.num_q_params
    dq, dk, dv, d_q_params, d_k_params = run_backward(
        do, q, k, v, key_mask, params[:n], params[n:], state, normaliser, ctx.settings)
    return None, None, dq, dk, dv, None, *d_q_params, *d_k_params


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
                  compiling: bool) -> Tensor:
    """o for (B, N, H, D)-indexed q, k, v on the kernel backend settings.backend; `compiling`:
    torch.compiler.is_compiling(), which the caller has asked already."""
    if compiling:
        out, _, _ = forward_op(q, k, v, key_mask, list(q_params), list(k_params), *settings)
        return out
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or _any_requires_grad(q_params)
                                    or _any_requires_grad(k_params)):
        return _LinearAttention.apply(settings, len(q_params), q, k, v, key_mask, *q_params,
                                      *k_params)
    return run_forward(q, k, v, key_mask, q_params, k_params, settings)[0]


def _any_requires_grad(params: Sequence[Tensor]) -> bool:
    for p in params:  # a loop, not any(generator): builtin maps have no parameters at all
        if p.requires_grad:
            return True
    return False
