"""The oracle: non-causal linear attention in plain PyTorch (method.md §1).

Every other backend is tested against this function run in float64. The same code in float32
is the "PyTorch einsum" peer the benchmarks compare with (SANA / LinVideo style). Tensors are
(B, N, H, D); autograd differentiates it, including the feature maps' parameters.
"""
from __future__ import annotations

from typing import Optional, Sequence

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
    q_norm, k_norm, rope = (None, None, None) if pre is None else (pre.q_norm, pre.k_norm,
                                                                     pre.rope)
    state, normaliser = reference_state(k, v, k_map, k_map.kernel_params(), key_padding_mask,
                                        compute_dtype, k_norm, rope)
    return reference_output(q, q_map, q_map.kernel_params(), state, normaliser, eps, q_norm,
                            rope)


def reference_state(k: Tensor, v: Tensor, k_map: FeatureMap, k_params: Sequence[Tensor],
                    key_padding_mask: Optional[Tensor] = None,
                    compute_dtype: torch.dtype = torch.float64, norm=None,
                    rope=None) -> tuple[Tensor, Tensor]:
    """(S, z) of the given keys, (B, H, F, Dv) and (B, H, F) in compute_dtype; k_params: the
    map's parameters as its apply() takes them (cast to compute_dtype here); norm, rope: k's
    pre-attention work (a PreAttentionCall's k_norm and rope), applied before φ."""
    cast = lambda t: t.to(compute_dtype)  # noqa: E731
    k, v = cast(k), cast(v)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, :, None, None]
        k, v = torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)
    if norm is not None or rope is not None:
        k = pre_reference.apply(k, norm, rope)
    phi_k = k_map.apply(k, [cast(p) for p in k_params])                # (B, Nk, H, F)
    if key_padding_mask is not None:
        phi_k = torch.where(keep, phi_k, 0.0)  # φ(0) need not be 0 (elu + 1, softmax)
    state = torch.einsum("bnhf,bnhe->bhfe", phi_k, v)                  # S: (B, H, F, Dv)
    normaliser = phi_k.sum(dim=1)                                      # z: (B, H, F)
    return state, normaliser


def reference_output(q: Tensor, q_map: FeatureMap, q_params: Sequence[Tensor], state: Tensor,
                     normaliser: Tensor, eps: float, norm=None, rope=None) -> Tensor:
    """o of the given queries from (S, z), computed in the state's dtype, returned in q's;
    norm, rope: q's pre-attention work, as in reference_state."""
    compute_dtype = state.dtype
    x = q.to(compute_dtype)
    if norm is not None or rope is not None:
        x = pre_reference.apply(x, norm, rope)
    phi_q = q_map.apply(x, [p.to(compute_dtype) for p in q_params])
    numerator = torch.einsum("bnhf,bhfe->bnhe", phi_q, state)
    denominator = torch.einsum("bnhf,bhf->bnh", phi_q, normaliser) + eps
    return (numerator / denominator[..., None]).to(q.dtype)
