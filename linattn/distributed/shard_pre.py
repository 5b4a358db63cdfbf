"""The q/k norms and RoPE of a sharded call, as each process's side of them.

Under context parallelism a process holds q tokens [q_offset, q_offset + Nq) and k tokens
[k_offset, k_offset + Nk) of the whole sequence. The norms are per token (RMSNorm or LayerNorm
over a head or over all heads of one token), so they shard with the sequence; only what is tied
to a position needs this process's range: RoPE's tables (row r rotates token start + r) and a
norm's ``tokens=(start, stop)``.

Two ways to say where the specs' positions are (``token_offset`` of
linattn.distributed.linear_attention):

* ``None``: local. The tables' rows, ``RoPE.start`` and ``QKNorm.tokens`` already count this
  process's own tokens from 0, as the single-process op would on this process's tensors. What
  diffusers' context parallelism hands a layer: its plans shard the RoPE tables with the tokens.
* an int, or ``(q_offset, k_offset)``: global. The specs count tokens of the whole sequence (the
  full tables with start 0, or any rows with the start of the first one: rows outside this
  process's range are skipped), and the offsets say where this process's tokens begin. Right for
  any split, uneven ones included; each side gets the table rows of its own range.

``localise`` turns either form into one (q_norm, rope) pair for the q side and one
(k_norm, rope) pair for the k side, in local coordinates: what the single-process resolver
(linattn.pre_attention.resolve) then checks against each side's own length.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

from torch import Tensor

from ..pre_attention import QKNorm, RoPE

TokenOffset = Union[None, int, tuple[int, int]]


def offsets(token_offset: TokenOffset) -> Optional[tuple[int, int]]:
    """(q_offset, k_offset), or None for local specs; a ValueError naming token_offset."""
    if token_offset is None:
        return None
    pair = (token_offset, token_offset) if not isinstance(token_offset, (tuple, list)) \
        else tuple(token_offset)
    if len(pair) != 2 or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                             for t in pair):
        raise ValueError(f"token_offset: expected None, an int >= 0 or (q_offset, k_offset) "
                         f"ints >= 0, got {token_offset!r}")
    return pair


def _local_norm(norm, offset: int, length: int):
    """The norm with its token range in local coordinates (an empty range when this process
    holds none of its tokens)."""
    if not isinstance(norm, QKNorm) or norm.tokens is None:
        return norm  # None, all tokens, or not a QKNorm (the resolver words that error)
    tokens = norm.tokens
    if (not isinstance(tokens, (tuple, list)) or len(tokens) != 2
            or any(isinstance(t, bool) or not isinstance(t, int) for t in tokens)):
        return norm  # the resolver's error names it
    start = min(max(tokens[0] - offset, 0), length)
    stop = min(max(tokens[1] - offset, start), length)
    return dataclasses.replace(norm, tokens=(start, stop))


def _rows_dim(table: Tensor) -> int:
    """The rows (token) dim of a (Nr, W), (Nr, H, W) or (B, Nr, H, W) table."""
    return 1 if table.dim() == 4 else 0


def _local_rope(rope, offset: int, length: int):
    """The rows of rope's tables that rotate this side's tokens, with a local start; None when
    it rotates none of them."""
    if not isinstance(rope, RoPE) or not isinstance(rope.cos, Tensor) \
            or not isinstance(rope.sin, Tensor) or rope.cos.dim() not in (2, 3, 4) \
            or isinstance(rope.start, bool) or not isinstance(rope.start, int) or rope.start < 0:
        return rope  # the resolver words the error
    dim = _rows_dim(rope.cos)
    rows = rope.cos.shape[dim]
    first = max(rope.start, offset)
    last = min(rope.start + rows, offset + length)
    if first >= last:
        return None
    pick = slice(first - rope.start, last - rope.start)
    index = (slice(None),) * dim + (pick,)
    return dataclasses.replace(rope, cos=rope.cos[index], sin=rope.sin[index],
                               start=first - offset)


def localise(q_norm, k_norm, rope, token_offset: TokenOffset, q_len: int, kv_len: int):
    """((q_norm, rope for q), (k_norm, rope for k)) in this process's local coordinates."""
    pair = offsets(token_offset)
    if pair is None:
        return (q_norm, rope), (k_norm, rope)
    q_offset, k_offset = pair
    return ((_local_norm(q_norm, q_offset, q_len), _local_rope(rope, q_offset, q_len)),
            (_local_norm(k_norm, k_offset, kv_len), _local_rope(rope, k_offset, kv_len)))
