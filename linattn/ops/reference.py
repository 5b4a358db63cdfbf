"""The oracle: non-causal linear attention in plain PyTorch (method.md §1).

Every other backend is tested against this function run in float64. The same code in float32
is the "PyTorch einsum" peer the benchmarks compare with (SANA / LinVideo style). Tensors are
(B, N, H, D); autograd differentiates it, including the feature maps' parameters.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..feature_maps import FeatureMap
from ..pre_attention import PreAttentionCall
from ..pre_attention import reference as pre_reference


def linear_attention_reference(q: Tensor, k: Tensor, v: Tensor, q_map: FeatureMap,
                               k_map: FeatureMap, eps: float,
                               key_padding_mask: Optional[Tensor] = None,
                               compute_dtype: torch.dtype = torch.float64,
                               pre: Optional[PreAttentionCall] = None) -> Tensor:
    """o_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + eps), S = Σ_j φ(k_j) v_jᵀ, z = Σ_j φ(k_j).

    With `pre`, φ is applied to RoPE(norm(q)) and RoPE(norm(k)) (linattn/pre_attention).
    Computed in `compute_dtype` (inputs, map parameters, norm weights and RoPE tables are cast),
    returned in q's dtype.
    Masked keys contribute nothing, whatever they hold: k and v are replaced by 0 before any
    arithmetic touches them (where(), not a product, so inf or NaN there cannot leak in as
    0 · inf) and φ(k) is zeroed after the map; autograd then gives them exactly zero gradients.
    A batch row with every key masked has S = 0 and z = 0, so its output is exactly 0 and so
    are its queries' gradients.
    """
    cast = lambda t: t.to(compute_dtype)  # noqa: E731
    out_dtype = q.dtype
    q, k, v = cast(q), cast(k), cast(v)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, :, None, None]
        k, v = torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)
    if pre is not None:
        q = pre_reference.apply(q, pre.q_norm, pre.rope)
        k = pre_reference.apply(k, pre.k_norm, pre.rope)
    phi_q = q_map.apply(q, [cast(p) for p in q_map.kernel_params()])   # (B, Nq, H, F)
    phi_k = k_map.apply(k, [cast(p) for p in k_map.kernel_params()])   # (B, Nk, H, F)
    if key_padding_mask is not None:
        phi_k = torch.where(keep, phi_k, 0.0)  # φ(0) need not be 0 (elu + 1, softmax)
    state = torch.einsum("bnhf,bnhe->bhfe", phi_k, v)                  # S: (B, H, F, Dv)
    normaliser = phi_k.sum(dim=1)                                      # z: (B, H, F)
    numerator = torch.einsum("bnhf,bhfe->bnhe", phi_q, state)
    denominator = torch.einsum("bnhf,bhf->bnh", phi_q, normaliser) + eps
    return (numerator / denominator[..., None]).to(out_dtype)
