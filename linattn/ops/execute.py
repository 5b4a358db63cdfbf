"""One forward or backward call of a kernel backend: allocate its outputs, call the backend.

The eager autograd path (autograd.py) and the custom ops that torch.compile traces
(custom_op.py) both run these two functions, so the two paths cannot drift apart.

Settings are the call's non-tensor arguments, one NamedTuple in the custom ops' argument order.
A new keyword argument of the op that reaches the kernels is a new field here (and an argument
of the custom ops, in the same place); tensor arguments go beside q, k, v.

The pre-attention work (q/k norms and RoPE, linattn.pre_attention) arrives resolved, as the
canonical PreAttentionCall whose tensors are views of the caller's weights and tables; the custom ops
carry it as those tensors plus PreAttentionCall.code() and decode it before calling here. A norm
over all heads of a token needs per-token statistics (mean, rstd) before the per-head passes:
the forward allocates them, the backend's forward writes them once, and the backward reads them
instead of computing them again.

Why this is CUDA-graph capturable: every allocation below has a size that follows from shapes
and dtypes alone, nothing reads a tensor's values on the host (no .item(), .tolist(), nonzero or
bool() of a tensor), and the backends follow the same rule (tests/test_host_path.py checks it on
the CPU with a mode that refuses such calls, and runs the Triton planning on meta tensors).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..backends import MapCall, PreCall, get_kernel_backend
from ..feature_maps import map_width
from ..pre_attention import PreAttentionCall
from . import alloc


class Settings(NamedTuple):
    """The op's non-tensor arguments, as the custom ops take them (custom_op.py)."""
    q_map: str      # kernel name of φ for q (linattn.feature_maps)
    k_map: str      # kernel name of φ for k
    eps: float
    bhnd: bool      # allocate outputs in (B, H, N, D) memory order
    backend: str    # a kernel backend's name (linattn.backends)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """S and z are kept in float32 (float64 for float64 inputs), whatever the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_forward(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                q_params: Sequence[Tensor], k_params: Sequence[Tensor], settings: Settings,
                pre: Optional[PreAttentionCall] = None
                ) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """(o, S, z, q_stats, k_stats): o like (B, Nq, H, Dv) in q's dtype, S (B, H, D', Dv),
    z (B, H, D'); q_stats, k_stats (B, N, 2) in the state dtype, the statistics of a q or k
    norm over all heads (None where that side has none), for run_backward."""
    B, Nq, H, D = q.shape
    Dv = v.shape[3]
    F = map_width(settings.q_map, q_params, D)
    dtype, device = q.dtype, q.device
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    o = alloc.empty_bnhd(B, Nq, H, Dv, bhnd=settings.bhnd, dtype=dtype, device=device)
    state = alloc.empty(B, H, F, Dv, dtype=sdt, device=device)
    normaliser = alloc.empty(B, H, F, dtype=sdt, device=device)
    backend = get_kernel_backend(settings.backend)
    q_call, k_call = _map_call(settings.q_map, q_params), _map_call(settings.k_map, k_params)
    if pre is None:
        backend.forward(q, k, v, key_mask, q_call, k_call, settings.eps, o, state, normaliser)
        return o, state, normaliser, None, None
    pre = pre.bounded(Nq, k.shape[1])
    q_stats = _stats(pre.q_norm, q, sdt)
    k_stats = _stats(pre.k_norm, k, sdt)
    backend.forward(q, k, v, key_mask, q_call, k_call, settings.eps, o, state, normaliser,
                    pre=PreCall(pre, q_stats, k_stats))
    return o, state, normaliser, q_stats, k_stats


def _stats(norm, x: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    """The (B, N, 2) statistics buffer of a norm over all heads; None for other norms."""
    if norm is None or not norm.over_heads:
        return None
    return alloc.empty(x.shape[0], x.shape[1], 2, dtype=dtype, device=x.device)


_NO_NORM_GRADS = (None, None, None, None)


def run_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                 q_params: Sequence[Tensor], k_params: Sequence[Tensor], state: Tensor,
                 normaliser: Tensor, settings: Settings, pre: Optional[PreAttentionCall] = None,
                 q_stats: Optional[Tensor] = None, k_stats: Optional[Tensor] = None
                 ) -> tuple[Tensor, Tensor, Tensor, list[Tensor], list[Tensor], tuple]:
    """(dq, dk, dv, d_q_params, d_k_params, d_norms) from do and the forward's S, z (and norm
    statistics). dq, dk, dv are laid out like q, k, v (a (B, H, N, D) input gets a (B, H, N, D)
    gradient); the parameters' gradients are contiguous (the Hedgehog kernels sum partials into
    them by flat offset). d_norms: the gradients of (q weight, q bias, k weight, k bias) of the
    norms, (H, D) each like PreAttentionCall's views, None where absent."""
    dq, dk, dv = alloc.empty_like(q), alloc.empty_like(k), alloc.empty_like(v)
    d_q_params = [alloc.empty(*p.shape, dtype=p.dtype, device=p.device) for p in q_params]
    d_k_params = [alloc.empty(*p.shape, dtype=p.dtype, device=p.device) for p in k_params]
    backend = get_kernel_backend(settings.backend)
    q_call, k_call = _map_call(settings.q_map, q_params), _map_call(settings.k_map, k_params)
    if pre is None:
        backend.backward(do, q, k, v, key_mask, q_call, k_call, settings.eps, state, normaliser,
                         dq, dk, dv, d_q_params, d_k_params)
        return dq, dk, dv, d_q_params, d_k_params, _NO_NORM_GRADS
    d_norms = tuple(None if t is None else alloc.empty(*t.shape, dtype=t.dtype, device=t.device)
                    for t in pre.tensors()[:4])
    pre = pre.bounded(q.shape[1], k.shape[1])
    backend.backward(do, q, k, v, key_mask, q_call, k_call, settings.eps, state, normaliser,
                     dq, dk, dv, d_q_params, d_k_params, pre=PreCall(pre, q_stats, k_stats),
                     d_pre=d_norms)
    return dq, dk, dv, d_q_params, d_k_params, d_norms


# A map without parameters (every builtin one) is the same MapCall on every call.
_PARAMETER_FREE_CALLS: dict[str, MapCall] = {}


def _map_call(name: str, params: Sequence[Tensor]) -> MapCall:
    if params:
        return MapCall(name, tuple(params))
    call = _PARAMETER_FREE_CALLS.get(name)
    if call is None:
        call = _PARAMETER_FREE_CALLS[name] = MapCall(name, ())
    return call
