"""The builtin feature maps φ (method.md §2) and their backward, fused into the kernels' loads.

A kernel loads a (rows, D_PAD) block of q or k, converts it to fp32 and calls ``feature_map``;
the backward recomputes φ the same way and calls ``feature_map_backward``. Nothing φ-shaped is
ever stored. The map is a compile-time constant (MAP), so each map is its own specialised kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

RELU: tl.constexpr = tl.constexpr(0)
ELU: tl.constexpr = tl.constexpr(1)
SOFTMAX: tl.constexpr = tl.constexpr(2)
IDENTITY: tl.constexpr = tl.constexpr(3)

#: kernel_name of linattn.feature_maps -> the MAP constant of these kernels.
MAP_IDS = {"relu": 0, "elu": 1, "softmax": 2, "identity": 3}


def map_id(name: str) -> int:
    try:
        return MAP_IDS[name]
    except KeyError:
        raise ValueError(f"feature map {name!r} has no fused Triton kernel here "
                         f"(fused: {sorted(MAP_IDS)})") from None


@triton.jit
def feature_map(x, col_ok, MAP: tl.constexpr):
    """φ(x) in fp32 for a (rows, D_PAD) block. Padded columns (col_ok False) come out 0, so they
    add nothing to S, z or φᵀz; rows are masked by the caller."""
    if MAP == RELU:
        phi = tl.maximum(x, 0.0)
    elif MAP == ELU:
        # elu(x) + 1; exp(x) overflowing for large x sits in the branch where() drops.
        phi = tl.where(x > 0.0, x + 1.0, tl.exp(x))
    elif MAP == SOFTMAX:
        logits = tl.where(col_ok[None, :], x, float("-inf"))
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        phi = shifted / tl.sum(shifted, axis=1)[:, None]
    else:
        phi = x
    return tl.where(col_ok[None, :], phi, 0.0)


@triton.jit
def feature_map_backward(x, phi, dphi, MAP: tl.constexpr):
    """dL/dx from dL/dφ for a (rows, D_PAD) block; phi = feature_map(x) (0 on padding)."""
    if MAP == RELU:
        # torch.relu's gradient at exactly 0 is 0.
        dx = tl.where(x > 0.0, dphi, 0.0)
    elif MAP == ELU:
        # d(exp x)/dx = exp x = φ on the x <= 0 branch.
        dx = tl.where(x > 0.0, dphi, dphi * phi)
    elif MAP == SOFTMAX:
        dx = phi * (dphi - tl.sum(phi * dphi, axis=1)[:, None])
    else:
        dx = dphi
    return dx
