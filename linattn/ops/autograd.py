"""How a call reaches the kernels: directly in eager mode, through the custom ops when traced.

Eager: an autograd.Function whose forward and backward call execute.run_forward/run_backward;
without gradients, run_forward alone. A torch.library custom op costs several times more host
time per call (dispatch, schema checks, its autograd wrappers), which at small and medium shapes
is more than the kernels themselves (benchmarks/RESULTS.md, per-call overhead).
Traced (torch.compile, torch.export): the custom ops of custom_op.py, which dynamo sees as two
opaque ops with fake shape functions, so graphs have no break. Both paths run the same
functions, so they agree bit for bit (tests/test_compile.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

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
            # create_graph=True: the kernels' gradients are not differentiable again; say so
            # if anything tries (once_differentiable), rather than return silent zeros.
            return _backward_once(ctx, do)
        return _backward(ctx, do)


def _backward(ctx, do: Tensor):
    q, k, v, key_mask, state, normaliser, *params = ctx.saved_tensors
    n = ctx.num_q_params
    dq, dk, dv, d_q_params, d_k_params = run_backward(
        do, q, k, v, key_mask, params[:n], params[n:], state, normaliser, ctx.settings)
    return None, None, dq, dk, dv, None, *d_q_params, *d_k_params


# once_differentiable's torch.no_grad() costs more than a small call's kernels, so it is only
# entered where grad mode is on, which a plain backward never is.
_backward_once = once_differentiable(_backward)


def apply_kernels(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                  q_params: Sequence[Tensor], k_params: Sequence[Tensor],
                  settings: Settings) -> Tensor:
    """o for (B, N, H, D)-indexed q, k, v on the kernel backend settings.backend."""
    if torch.compiler.is_compiling():
        out, _, _ = forward_op(q, k, v, key_mask, list(q_params), list(k_params), *settings)
        return out
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                    or any(p.requires_grad for p in q_params)
                                    or any(p.requires_grad for p in k_params)):
        return _LinearAttention.apply(settings, len(q_params), q, k, v, key_mask, *q_params,
                                      *k_params)
    return run_forward(q, k, v, key_mask, q_params, k_params, settings)[0]
