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
from .autograd import apply_sharded_kernels
from .collectives import SumGradOverGroup
from .reference import sharded_reference


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None,
                     feature_map: FeatureMapArg = "relu", eps: float = 1e-6,
                     layout: str = "bnhd", key_padding_mask: Optional[Tensor] = None,
                     backend: str = "auto", reduce_param_grads: bool = False,
                     q_norm=None, k_norm=None, rope=None) -> Tensor:
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
        q_norm, k_norm, rope: refused (a ValueError naming the argument). The sharded op does
            not fuse pre-attention work: apply the norms and RoPE (with this process's rows of
            the tables) to q and k before the call, as converted DiT layers do under context
            parallelism (linattn/dit/processor.py). The norms are per token, so the results are
            those of the unsharded fused op up to rounding; the norm weights' gradients then
            reach them through autograd, as this process's share like any replicated weight's.

    Returns:
        (B, Nq_local, H, Dv) (or (B, H, Nq_local, Dv)) in q's dtype.

    Like any collective, every process of the group must make the same calls in the same order;
    shapes that disagree fail in the all-reduce (gloo raises; NCCL may hang:
    TORCH_DISTRIBUTED_DEBUG=DETAIL makes torch check collective shapes). Runs eagerly, also
    inside torch.compile'd code (the all-reduce is a graph break).
    """
    for argument, value in (("q_norm", q_norm), ("k_norm", k_norm), ("rope", rope)):
        if value is not None:
            raise ValueError(
                f"{argument}: linattn.distributed.linear_attention does not fuse q/k norms or "
                f"RoPE; apply them to this process's q and k before the call (RoPE with this "
                f"process's rows of its tables) and pass {argument}=None")
    if group is None and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: torch.distributed is not initialized; call "
                         "torch.distributed.init_process_group first, or use "
                         "linattn.linear_attention for one process")
    if dist.get_world_size(group) == 1:
        return single_process(q, k, v, feature_map=feature_map, eps=eps, layout=layout,
                              key_padding_mask=key_padding_mask, backend=backend)
    q_map, k_map = _resolve_maps(feature_map)
    problem = validate(q, k, v, layout=layout, eps=eps, key_padding_mask=key_padding_mask,
                       q_map=q_map, k_map=k_map)
    q_params = _params(q_map, group, reduce_param_grads, "feature_map (for q)")
    k_params = _params(k_map, group, reduce_param_grads, "feature_map (for k)")
    D, Dv, F = problem.head_dim, problem.value_dim, problem.feature_dim
    name = choose_backend(backend, q.device, q.dtype,
                          D if q_map.kernel_name is not None else F, Dv, F,
                          _kernel_map_names(q_map, k_map))
    bhnd = layout == "bhnd"
    if bhnd:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if name == REFERENCE:
        out = sharded_reference(q, k, v, q_map, k_map, q_params, k_params, eps,
                                key_padding_mask, group)
        return out.transpose(1, 2).contiguous() if bhnd else out

    # A map no kernel knows is applied here, in PyTorch, and the kernels run the identity map
    # (as in the single-process op).
    q_name, k_name = _kernel_map_names(q_map, k_map)
    if q_map.kernel_name is None:
        q, q_params = q_map.apply(q, q_params), ()
    if k_map.kernel_name is None:
        k, k_params = k_map.apply(_without_masked_keys(k, key_padding_mask), k_params), ()
    out = apply_sharded_kernels(q, k, v, key_padding_mask, tuple(q_params), tuple(k_params),
                                Settings(q_name, k_name, float(eps), bhnd, name), group)
    return out.transpose(1, 2) if bhnd else out


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
