"""The public op: linattn.linear_attention."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import feature_maps
from ..backends import REFERENCE, BackendUnavailableError, get_kernel_backend, resolve_backend
from ..feature_maps import FeatureMap, Identity
from .custom_op import forward_op
from .reference import linear_attention_reference
from .validation import to_bnhd, validate

FeatureMapArg = Union[str, FeatureMap, Sequence[Union[str, FeatureMap]]]


def _resolve_maps(feature_map: FeatureMapArg) -> tuple[FeatureMap, FeatureMap]:
    if isinstance(feature_map, (tuple, list)):
        if len(feature_map) != 2:
            raise ValueError(f"feature_map: a sequence must be (map for q, map for k), "
                             f"got {len(feature_map)} entries")
        return (feature_maps.resolve(feature_map[0], "feature_map[0] (for q)"),
                feature_maps.resolve(feature_map[1], "feature_map[1] (for k)"))
    fmap = feature_maps.resolve(feature_map)
    return fmap, fmap


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, feature_map: FeatureMapArg = "relu",
                     eps: float = 1e-6, layout: str = "bnhd",
                     key_padding_mask: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """Non-causal linear attention: o_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + eps),
    S = Σ_j φ(k_j) v_jᵀ and z = Σ_j φ(k_j) accumulated in float32 (float64 for float64 inputs).

    Args:
        q: (B, Nq, H, D) queries ((B, H, Nq, D) with layout="bhnd").
        k: (B, Nk, H, D) keys; Nk may differ from Nq.
        v: (B, Nk, H, Dv) values; Dv may differ from D.
        feature_map: "relu" (default), "elu" (elu + 1), "softmax" (over the head dim),
            "identity", a linattn.feature_maps.FeatureMap module (e.g. Hedgehog), or a pair
            (map for q, map for k).
        eps: added to the denominator; must be > 0.
        layout: "bnhd" or "bhnd"; read in place (strides), never copied.
        key_padding_mask: (B, Nk) bool, True = keep; masked keys add nothing to S and z.
        backend: "auto" (fastest available for the device; LINATTN_BACKEND overrides),
            "reference" (float64 PyTorch oracle), "cpu", "triton", "cuda".

    Returns:
        (B, Nq, H, Dv) (or (B, H, Nq, Dv)) in q's dtype. Differentiable in q, k, v and the
        feature maps' parameters on every backend.
    """
    q_map, k_map = _resolve_maps(feature_map)
    validate(q, k, v, layout=layout, eps=eps, key_padding_mask=key_padding_mask,
             q_map=q_map, k_map=k_map)
    qb, kb, vb = (to_bnhd(t, layout) for t in (q, k, v))
    # A map no kernel knows is applied here, in PyTorch (autograd differentiates it), and the
    # kernels run with the identity map on its output. Documented in feature_maps/base.py.
    kernel_q_map = q_map if q_map.kernel_name is not None else Identity()
    kernel_k_map = k_map if k_map.kernel_name is not None else Identity()
    feature_dim = q_map.output_dim(qb.shape[-1])
    kernel_head_dim = qb.shape[-1] if q_map.kernel_name is not None else feature_dim

    def why_unsupported(kernel) -> Optional[str]:
        return kernel.unsupported(q.dtype, kernel_head_dim, vb.shape[-1], feature_dim,
                                  (kernel_q_map.kernel_name, kernel_k_map.kernel_name))

    name = resolve_backend(backend, q.device, why_unsupported)
    if name == REFERENCE:
        out = linear_attention_reference(qb, kb, vb, q_map, k_map, eps, key_padding_mask)
        return out if layout == "bnhd" else out.transpose(1, 2).contiguous()

    why_not = why_unsupported(get_kernel_backend(name))
    if why_not is not None:
        raise BackendUnavailableError(f"backend={name!r} cannot run these inputs: {why_not}")
    if q_map.kernel_name is None:
        qb = q_map(qb)
    if k_map.kernel_name is None:
        kb = k_map(kb)
    q_map, k_map = kernel_q_map, kernel_k_map
    out, _, _ = forward_op(qb, kb, vb, key_padding_mask, list(q_map.kernel_params()),
                           list(k_map.kernel_params()), q_map.kernel_name, k_map.kernel_name,
                           float(eps), layout == "bhnd", name)
    return out if layout == "bnhd" else out.transpose(1, 2)
