"""The float64 reference under context parallelism: linattn/ops/reference.py's two halves with
the state summed over the group between them, differentiated by autograd.

The partial S and z of this process's keys are packed into one tensor and summed with
collectives.SumOverGroup, whose backward sums dS and dz the same way: the communication of the
kernels' path (autograd.py), in float64.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..feature_maps import FeatureMap
from ..ops.reference import reference_output, reference_state
from .collectives import SumOverGroup


def sharded_reference(q: Tensor, k: Tensor, v: Tensor, q_map: FeatureMap, k_map: FeatureMap,
                      q_params: Sequence[Tensor], k_params: Sequence[Tensor], eps: float,
                      key_padding_mask: Optional[Tensor], group, q_pre=None,
                      k_pre=None) -> Tensor:
    """o of this process's queries for its (B, N, H, D) q, k, v, in q's dtype; q_params,
    k_params: the maps' parameters as their apply() takes them; q_pre, k_pre: each side's
    resolved norm and RoPE (PreAttentionCall), or None."""
    k_norm, k_rope = (None, None) if k_pre is None else (k_pre.k_norm, k_pre.rope)
    q_norm, q_rope = (None, None) if q_pre is None else (q_pre.q_norm, q_pre.rope)
    state, normaliser = reference_state(k, v, k_map, k_params, key_padding_mask, torch.float64,
                                        k_norm, k_rope)
    packed = SumOverGroup.apply(torch.cat([state.flatten(), normaliser.flatten()]), group)
    state = packed[:state.numel()].view_as(state)
    normaliser = packed[state.numel():].view_as(normaliser)
    return reference_output(q, q_map, q_params, state, normaliser, eps, q_norm, q_rope)
