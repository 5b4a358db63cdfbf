"""The oracle of the pre-attention work: norm, then RoPE, in plain PyTorch (spec.py says what).

The float64 reference op (linattn/ops/reference.py) calls ``apply`` on q and k before φ, with
float64 copies of the inputs and tables; every kernel backend is tested against that. Tensors
are (B, N, H, D).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .spec import NORM_KINDS, ROPE_STYLES, NormCall, RopeCall


def normalise(x: Tensor, norm: NormCall) -> Tensor:
    """(x − mean)·rsqrt(var + eps)·weight + bias over each head (or all heads) of the tokens in
    [norm.start, norm.stop) (stop None: through the last token); other tokens unchanged."""
    B, N, H, D = x.shape
    stop = N if norm.stop is None else norm.stop
    part = x[:, norm.start:stop]
    groups = part.reshape(B, -1, H * D) if norm.over_heads else part
    mean = groups.mean(-1, keepdim=True) if norm.kind == NORM_KINDS["layer"] else 0.0
    centred = groups - mean
    rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
    y = (centred * rstd).reshape(part.shape)
    if norm.weight is not None:
        y = y * norm.weight.to(x.dtype)
    if norm.bias is not None:
        y = y + norm.bias.to(x.dtype)
    return torch.cat([x[:, :norm.start], y, x[:, stop:]], dim=1)


def rotate(x: Tensor, style: int) -> Tensor:
    """rot(x): (−x₁, x₀, −x₃, x₂, ...) for interleaved pairs, (−x[D/2:], x[:D/2]) for halves."""
    if style == ROPE_STYLES["interleaved"]:
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([-odd, even], dim=-1).flatten(-2)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def full_width(table: Tensor, style: int, head_dim: int) -> Tensor:
    """A table of one angle per pair (width D/2) spread over the D dims each pair covers."""
    if table.shape[-1] == head_dim:
        return table
    if style == ROPE_STYLES["interleaved"]:
        return table.repeat_interleave(2, dim=-1)
    return torch.cat([table, table], dim=-1)


def apply_rope(x: Tensor, rope: RopeCall) -> Tensor:
    """x·cos + rot(x)·sin on the tokens [rope.start, rope.start + Nr); other tokens unchanged."""
    D = x.shape[-1]
    stop = rope.start + rope.length
    part = x[:, rope.start:stop]
    cos = full_width(rope.cos, rope.style, D).to(x.dtype)
    sin = full_width(rope.sin, rope.style, D).to(x.dtype)
    rotated = part * cos + rotate(part, rope.style) * sin
    return torch.cat([x[:, :rope.start], rotated, x[:, stop:]], dim=1)


def apply(x: Tensor, norm: Optional[NormCall], rope: Optional[RopeCall]) -> Tensor:
    """What φ sees: RoPE(norm(x)), in x's dtype."""
    if norm is not None:
        x = normalise(x, norm)
    if rope is not None:
        x = apply_rope(x, rope)
    return x
