"""Sum of per-split partial states, in a fixed order (deterministic).

A reducing kernel split over the sequence writes its fp32 partials into one buffer of shape
(splits, M): the first M_a elements of a row are one output (S, or dS) and the rest another (z, or
dz), each in the contiguous (batch, head, ...) order of its destination. One launch sums the rows
in split order and writes both outputs, so the result does not depend on scheduling.

Why in order rather than pairwise (the cpu backend sums pairwise, csrc/cpu/cascade.h): the
split count does not grow with N (it is set by the SM count and capped by the scratch budget:
at most ~130), so this sum adds at most u·√splits of relative error, below the running sum in
each program (forward.py). Neither is where bf16 results lose accuracy: the 16-bit operands are
(common.state_centre).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ...ops import alloc
from .common import cdiv, launch

_BLOCK = 1024


@triton.jit
def _sum_splits_kernel(part_ptr, n_splits, split_stride, a_ptr, n_a, b_ptr, n_total,
                       BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n_total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, n_splits):
        acc += tl.load(part_ptr + s * split_stride + idx, mask=ok, other=0.0)
    tl.store(a_ptr + idx, acc, mask=idx < n_a)
    tl.store(b_ptr + (idx - n_a), acc, mask=ok & (idx >= n_a))


def sum_splits(partials: torch.Tensor, out_a: torch.Tensor, out_b: torch.Tensor) -> None:
    """out_a, out_b (contiguous fp32) <- column sums of `partials` (splits, numel(a) + numel(b))."""
    for name, t in (("partials", partials), ("out_a", out_a), ("out_b", out_b)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"sum_splits: {name} must be a contiguous float32 tensor, got "
                             f"{t.dtype} with strides {tuple(t.stride())}")
    n_a, n_total = out_a.numel(), out_a.numel() + out_b.numel()
    if partials.dim() != 2 or partials.shape[1] != n_total:
        raise ValueError(f"sum_splits: partials must be (splits, {n_total}), got "
                         f"{tuple(partials.shape)}")
    launch(
        _sum_splits_kernel, (cdiv(n_total, _BLOCK),),
        partials, partials.shape[0], partials.stride(0), out_a, n_a, out_b, n_total,
        BLOCK=_BLOCK, num_warps=4)


@dataclass
class SplitTargets:
    """Where a kernel reducing an fp32 (matrix, vector) pair over `splits` sequence splits
    writes: the outputs themselves (one split, or atomics into zeroed outputs; split stride 0),
    or rows of a partials buffer that finish() sums in split order. The vector part of a row
    starts `vector_offset` elements after `vector`'s start: the kernels add it, so the partials
    buffer goes to both pointers as it is (a view per call costs ~3 µs of host time)."""
    matrix: torch.Tensor
    vector: torch.Tensor
    matrix_stride: int
    vector_stride: int
    vector_offset: int
    atomic: bool
    partials: Optional[torch.Tensor]
    out_matrix: torch.Tensor
    out_vector: torch.Tensor

    def finish(self) -> None:
        if self.partials is not None:
            # The kernel indexes flat offsets: the contiguous outputs go as they are (a view
            # per call would cost host time for nothing).
            sum_splits(self.partials, self.out_matrix, self.out_vector)


def split_targets(out_matrix: torch.Tensor, out_vector: torch.Tensor, splits: int,
                  atomic: bool) -> SplitTargets:
    """Targets for a reduction of (out_matrix, out_vector) over `splits` splits; `atomic`
    (honoured only when there is more than one split) trades determinism for no partials."""
    atomic = atomic and splits > 1
    if splits == 1 or atomic:
        if atomic:
            out_matrix.zero_()
            out_vector.zero_()
        return SplitTargets(out_matrix, out_vector, 0, 0, 0, atomic, None, out_matrix,
                            out_vector)
    partials = alloc.empty(splits, out_matrix.numel() + out_vector.numel(), dtype=torch.float32,
                           device=out_matrix.device)
    return SplitTargets(partials, partials, partials.stride(0), partials.stride(0),
                        out_matrix.numel(), False, partials, out_matrix, out_vector)
