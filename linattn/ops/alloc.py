"""Output allocation for every backend, with optional NaN poisoning.

Tests turn poisoning on so that a kernel which leaves any output element unwritten fails
instead of passing on whatever the allocator happened to return (fla's conftest trick, made
explicit). LINATTN_POISON_OUTPUTS=1 turns it on for a whole process.
"""
from __future__ import annotations

import contextlib
import os

import torch

_poison = os.environ.get("LINATTN_POISON_OUTPUTS", "0") == "1"


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Within the block, every output linattn allocates starts filled with NaN."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def poisoning() -> bool:
    return _poison


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Sizes as separate arguments: torch parses them faster than one tuple (about a fifth of
    # an allocation's host cost, which a small call pays several times).
    out = torch.empty(*shape, dtype=dtype, device=device)
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_like(t: torch.Tensor) -> torch.Tensor:
    """Like t: its shape, dtype, device and (for a dense t) its memory order. Cheaper than
    empty() by about a microsecond, which matters per call of a small op."""
    out = torch.empty_like(t)
    if _poison and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_bnhd(batch: int, seq: int, heads: int, dim: int, *, bhnd: bool, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """A (B, N, H, D)-indexed tensor whose memory is laid out (B, H, N, D) when `bhnd`."""
    if bhnd:
        return empty(batch, heads, seq, dim, dtype=dtype, device=device).permute(0, 2, 1, 3)
    return empty(batch, seq, heads, dim, dtype=dtype, device=device)
