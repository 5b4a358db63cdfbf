"""linattn.distributed.linear_attention: the op on a sequence sharded over a process group."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..backends import REFERENCE, choose_backend
from ..feature_maps import FeatureMap
from ..ops import linear_attention as single_process
from ..ops.execute import Settings, state_dtype
from ..ops.linear_attention import (FeatureMapArg, _kernel_map_names, _resolve_maps,
                                    _without_masked_keys)
from ..ops.validation import validate
from ..pre_attention import QKNorm, resolve
from ..pre_attention import reference as pre_reference
from .autograd import apply_sharded_kernels
from .collectives import SumGradOverGroup
from .reference import sharded_reference
from .shard_pre import TokenOffset, localise, offsets


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None,
                     feature_map: FeatureMapArg = "relu", eps: float = 1e-6,
                     layout: str = "bnhd", key_padding_mask: Optional[Tensor] = None,
                     backend: str = "auto", reduce_param_grads: bool = False,
                     q_norm: Optional[QKNorm] = None, k_norm: Optional[QKNorm] = None,
                     rope=None, token_offset: TokenOffset = None) -> Tensor:
    """linattn.linear_attention over a sequence sharded across the processes of `group`.

    Each process passes its own tokens (any split of the sequence, uneven sizes included: the
    query and key counts may differ from process to process and between q and k) and gets the
    outputs of its own queries: exactly what the unsharded op gives those queries on the whole
    sequence. S and z are summed over the group by one all-reduce in float32 (float64 for
    float64 inputs) of B·H·D'·(Dv + 1) elements; the backward sums dS and dz the same way, so
    dq, dk and dv are the whole gradients with respect to this process's tokens.

    Args:
        q, k, v, feature_map, eps, layout, key_padding_mask, backend: as for
            linattn.linear_attention, each holding this process's tokens (key_padding_mask:
            (B, Nk_local), the mask of this process's keys). Every process needs at least one
            query and one key, and the same B, H, D, Dv, dtype, feature map and backend.
        group: the torch.distributed process group the sequence is sharded over (None: the
            default group). A group of one process runs the single-process op.
        reduce_param_grads: the feature maps' parameters (Hedgehog's W) are replicated and
            used on every process's tokens, so each process's backward gives its share of their
            gradient, like the share of every layer before the op (the q/k/v projections). By
            default that share is what the parameters receive: the trainer's DDP or FSDP2 sums
            every parameter's gradient over the context-parallel group anyway, and summing here
            as well would count W's gradient once per process. True sums them over the group
            here (one more float32 all-reduce per parameter), for a caller that reduces nothing
            over the group itself: every process then holds the whole gradient.
        q_norm, k_norm, rope: as for linattn.linear_attention: the kernels apply each
            process's norms and RoPE while loading its q and k, as the single-process op does
            (the norms are per token, so they shard with the sequence). The norm weights'
            gradients are this process's share (summed over the group with
            reduce_param_grads=True), like the maps' parameters.
        token_offset: where the positions in q_norm.tokens, k_norm.tokens and rope (its start
            and table rows) count from (linattn/distributed/shard_pre.py):
            None (default): this process's own tokens, from 0: the tables hold this
                process's rows, as diffusers' context parallelism shards them with the tokens;
            an int, or (q_offset, k_offset): the whole sequence's tokens, this process holding
                q tokens [q_offset, q_offset + Nq_local) and k tokens [k_offset, k_offset +
                Nk_local). Pass the whole tables (or any rows, with the start of the first)
                and each side uses the rows of its own range: right for uneven shards.

    Returns:
        (B, Nq_local, H, Dv) (or (B, H, Nq_local, Dv)) in q's dtype.

    Like any collective, every process of the group must make the same calls in the same order;
    shapes that disagree fail in the all-reduce (gloo raises; NCCL may hang:
    TORCH_DISTRIBUTED_DEBUG=DETAIL makes torch check collective shapes). Runs eagerly, also
    inside torch.compile'd code (the all-reduce is a graph break).
    """
    if group is None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first, or use "
                         "linattn.linear_attention for one process")
    if dist.get_world_size(group) == 1:
        if offsets(token_offset) not in (None, (0, 0)):
            raise ValueError(f"token_offset: a group of one process holds the whole sequence, "
                             f"so its tokens start at 0, got {token_offset!r}")
        return single_process(q, k, v, feature_map=feature_map, eps=eps, layout=layout,
                              key_padding_mask=key_padding_mask, backend=backend,
                              q_norm=q_norm, k_norm=k_norm, rope=rope)
    q_map, k_map = _resolve_maps(feature_map)
    problem = validate(q, k, v, layout=layout, eps=eps, key_padding_mask=key_padding_mask,
                       q_map=q_map, k_map=k_map)
    q_params = _params(q_map, group, reduce_param_grads, "feature_map (for q)")
    k_params = _params(k_map, group, reduce_param_grads, "feature_map (for k)")
    D, Dv, F = problem.head_dim, problem.value_dim, problem.feature_dim
    has_pre = q_norm is not None or k_norm is not None or rope is not None
    q_pre = k_pre = None
    if has_pre:
        if reduce_param_grads:
            q_norm, k_norm = _summed_norm(q_norm, group), _summed_norm(k_norm, group)
        (q_norm, q_rope), (k_norm, k_rope) = localise(q_norm, k_norm, rope, token_offset,
                                                      problem.q_len, problem.kv_len)
        common = dict(batch=problem.batch, heads=problem.heads, head_dim=D, dtype=q.dtype,
                      device=q.device)
        # Each side on its own: under context parallelism q and k may cover different token
        # ranges, so each has its own rows of the RoPE tables.
        q_pre = resolve(q_norm, None, q_rope, q_len=problem.q_len, kv_len=problem.q_len,
                        **common)
        k_pre = resolve(None, k_norm, k_rope, q_len=problem.kv_len, kv_len=problem.kv_len,
                        **common)
        q_pre = None if q_pre is None else q_pre.bounded(problem.q_len, problem.q_len)
        k_pre = None if k_pre is None else k_pre.bounded(problem.kv_len, problem.kv_len)
    fused_pre = has_pre and q_map.kernel_name is not None and k_map.kernel_name is not None
    name = choose_backend(backend, q.device, q.dtype,
                          D if q_map.kernel_name is not None else F, Dv, F,
                          _kernel_map_names(q_map, k_map), pre_attention=fused_pre)
    bhnd = layout == "bhnd"
    if bhnd:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if name == REFERENCE:
        out = sharded_reference(q, k, v, q_map, k_map, q_params, k_params, eps,
                                key_padding_mask, group, q_pre, k_pre)
        return out.transpose(1, 2).contiguous() if bhnd else out

    if has_pre and not fused_pre:
        # A map no kernel knows runs in PyTorch (below), so the norms and RoPE before it must too.
        q = _apply_side(q, q_pre, "q")
        k = _apply_side(_without_masked_keys(k, key_padding_mask), k_pre, "k")
        q_pre = k_pre = None
    # A map no kernel knows is applied here, in PyTorch, and the kernels run the identity map
    # (as in the single-process op).
    q_name, k_name = _kernel_map_names(q_map, k_map)
    if q_map.kernel_name is None:
        q, q_params = q_map.apply(q, q_params), ()
    if k_map.kernel_name is None:
        k, k_params = k_map.apply(_without_masked_keys(k, key_padding_mask), k_params), ()
    out = apply_sharded_kernels(q, k, v, key_padding_mask, tuple(q_params), tuple(k_params),
                                Settings(q_name, k_name, float(eps), bhnd, name), group,
                                q_pre, k_pre)
    return out.transpose(1, 2) if bhnd else out


def _apply_side(x: Tensor, pre, side: str) -> Tensor:
    """RoPE(norm(x)) of one side in PyTorch (autograd differentiates it)."""
    if pre is None:
        return x
    return pre_reference.apply(x, pre.q_norm if side == "q" else pre.k_norm, pre.rope)


def _summed_norm(norm, group):
    """The norm with its weight and bias (those that require grad) through SumGradOverGroup:
    reduce_param_grads=True for the norms' parameters."""
    if not isinstance(norm, QKNorm):
        return norm
    import dataclasses

    def summed(t):
        return SumGradOverGroup.apply(t, group) if isinstance(t, Tensor) and t.requires_grad \
            else t
    return dataclasses.replace(norm, weight=summed(norm.weight), bias=summed(norm.bias))


def _params(fmap: FeatureMap, group, reduce: bool, argument: str) -> tuple[Tensor, ...]:
    """The map's parameters as the op passes them on: with reduce_param_grads, each through
    SumGradOverGroup (its gradient summed over the group in the backward)."""
    params = tuple(fmap.kernel_params())
    if not reduce:
        return params
    hidden = {id(p) for p in fmap.parameters()} - {id(p) for p in params}
    if hidden:
        raise ValueError(f"{argument}: reduce_param_grads=True sums the gradients of the "
                         f"parameters a map declares in kernel_params(); "
                         f"{type(fmap).__name__} has parameters outside them, whose gradients "
                         f"would stay this process's share: declare them in kernel_params() "
                         f"or reduce them with the rest of the model's")
    return tuple(SumGradOverGroup.apply(p, group) if p.requires_grad else p for p in params)


def state_bytes(batch: int, heads: int, features: int, value_dim: int,
                dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one process sends into the state all-reduce of one call (forward; the backward
    sends as many again): B·H·D'·(Dv + 1) elements of the state dtype of `dtype` inputs."""
    element = torch.empty((), dtype=state_dtype(dtype)).element_size()
    return batch * heads * features * (value_dim + 1) * element
