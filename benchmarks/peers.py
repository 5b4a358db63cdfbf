"""What users have today, measured beside linattn in the same run (kernels.md's table).

Every peer takes (B, N, H, D) tensors and returns (B, N, H, Dv) like linattn.linear_attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from linattn import feature_maps
from linattn.ops.reference import linear_attention_reference

RELU = feature_maps.ReLU()


def einsum_fp32(q, k, v, eps=1e-6):
    """SANA / LinVideo style: ReLU features, fp32 einsums (the reference maths in float32)."""
    return linear_attention_reference(q, k, v, RELU, RELU, eps, compute_dtype=torch.float32)


def matmul_bf16(q, k, v, eps=1e-6):
    """The same maths with the matmuls left in the input dtype (bf16 on GPU)."""
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
    phi_q, phi_k = torch.relu(qh), torch.relu(kh)
    state = phi_k.transpose(-1, -2) @ vh                   # (B, H, D, Dv)
    normaliser = phi_k.sum(dim=-2, keepdim=True).transpose(-1, -2)  # (B, H, D, 1)
    out = (phi_q @ state) / (phi_q @ normaliser + eps)
    return out.transpose(1, 2)


def hedgehog_torch(q, k, v, phi_q, phi_k, eps=1e-6):
    """LinVideo's φ applied in PyTorch, then the fp32 einsum maths."""
    return linear_attention_reference(q, k, v, phi_q, phi_k, eps, compute_dtype=torch.float32)


def sdpa_softmax(q, k, v):
    """The softmax attention that linear attention replaces."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
