"""Launch planning for the Hedgehog kernels: which sizes they take, block sizes, warps and
programs per SM per kernel, and how far to split the sequence.

Limits and configs come from compiling every kernel for sm_90 (H100/H200) with ptxas, which
needs no GPU: ``python -m linattn.kernels.triton.hedgehog.resources`` prints shared memory,
registers and spills per kernel and config. An sm_90 SM gives a program at most 227 KB of
shared memory; each kernel keeps W (D × F) and, in the output and backward kernels, a (2F, Dv)
state as product operands for its whole loop, so the footprint grows with D·F + F·Dv, not with
N. Measured (ptxas, triton 3.6, 16-bit inputs, D = F = Dv = 128, the configs below): 64-224 KB
of shared memory, spills of 0 bytes except the key-gradient kernel (88-104 bytes). fp32 inputs
use 3xTF32 products (common.mma: each operand split into two tf32 parts on the tensor cores),
whose operands take twice the room of 16-bit ones and whose split copies add more, so fp32 is
limited to D, F, Dv <= 64. No timing has been measured: the configs are the fastest-looking
ones that fit, not tuned.

Programs per SM. The kernels run 8 warps (256 threads); an SM has 65536 registers, so two
programs fit only at <= 128 registers a thread. ptxas gives 144-255 registers for every kernel
and size except the 16-bit D = 64 state kernel and the fp32 output kernel (128 each): the others
run one program per SM, and the split count aims at that (RESIDENT_PROGRAMS; the split rule is
the builtin kernels', triton/plan.py split_count: whole waves).

Scratch. Each reduction's partials are capped at SCRATCH_FRACTION of the bytes of q, k and v
(at least the builtin kernels' SCRATCH_FLOOR_BYTES) and freed before the next pass.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .. import plan as base_plan
from ..common import cdiv, padded_dim

KINDS = ("state", "output", "query_grad", "state_grad", "key_grad")
#: Largest D, F and Dv (after padding to a power of two) per input dtype (module docstring).
MAX_PADDED_DIM = {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64}
#: Partial slabs of one reduction may take at most this share of the bytes of q, k and v
#: (or the builtin kernels' absolute floor, whichever is more); with the 8 bytes per query and
#: head of the backward, the peak scratch stays under 10% for long sequences.
SCRATCH_FRACTION = 0.05
#: A split owns at least this many token blocks, so its loop streams (and pipelines) loads and
#: the fixed cost of a program (loading W and S, writing its partial) stays small beside it.
MIN_BLOCKS_PER_SPLIT = 4

# (16-bit inputs, largest padded dim) -> kind -> (block_n, num_warps). Every entry fits in
# shared memory on sm_90 with at most ~100 bytes of register spills (resources.py).
_GPU_CONFIGS = {
    (True, 64): dict.fromkeys(KINDS, (64, 8)),
    (True, 128): dict(state=(64, 8), output=(32, 8), query_grad=(32, 8), state_grad=(32, 8),
                      key_grad=(16, 8)),
    (False, 64): dict.fromkeys(KINDS, (16, 8)),
}
#: Programs resident per SM, from what ptxas reports for sm_90 (resources.py, triton 3.6,
#: 8 warps: two programs need <= 128 registers a thread, and twice their shared memory within
#: the SM's 228 KB). Two fit for the 16-bit state kernel at D <= 64 (128 registers, 48 KB) and
#: the fp32 output kernel (128 registers, 108 KB); every other kernel uses 144-255 registers.
RESIDENT_PROGRAMS = {(True, 64, "state"): 2, (False, 64, "output"): 2}
#: The interpreter's cost is per operation, not per element: few large blocks run fastest.
_INTERPRETER_BLOCK_N = 64


@functools.lru_cache(maxsize=None)
def unsupported(dtype: Optional[torch.dtype], head_dim: int, value_dim: int,
                feature_width: int) -> Optional[str]:
    """None when the fused Hedgehog kernels take these sizes; else the reason. feature_width is
    the map's output width 2F (what KernelBackend.unsupported receives). dtype None checks the
    16-bit limits only."""
    if feature_width % 2:
        return f"a Hedgehog feature width is 2·feature_dim, got the odd width {feature_width}"
    limit_dtype = torch.bfloat16 if dtype is None else dtype
    if limit_dtype not in MAX_PADDED_DIM:
        return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    limit = MAX_PADDED_DIM[limit_dtype]
    for name, size in (("head_dim", head_dim), ("value dim", value_dim),
                       ("feature_dim", feature_width // 2)):
        if padded_dim(size) > limit:
            hint = " (bfloat16/float16 inputs take up to 128)" if limit_dtype == torch.float32 \
                else ""
            return (f"{name} {size} exceeds {limit}, the most the fused Hedgehog kernels hold "
                    f"for {str(limit_dtype).replace('torch.', '')} inputs{hint}: their W and "
                    f"state operands must fit in shared memory")
    return None


@dataclass(frozen=True)
class Config:
    block_n: int
    num_warps: int
    num_stages: int = 2
    programs_per_sm: int = 1


@functools.lru_cache(maxsize=None)
def config(kind: str, dtype: torch.dtype, pads: tuple[int, ...], interpreted: bool,
           block_n: Optional[int], pre: bool = False) -> Config:
    """Block size, warps and programs per SM of one kernel; block_n (tests, benchmarks)
    overrides the size. `pre`: the kernel also applies q/k norms and RoPE to its blocks
    (../pre_attention.py), which holds more token tiles live: it takes blocks half as long (at
    least 16). Cached: a pure function of its arguments."""
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"block_n: must be a power of two >= 16 (a Triton dot dimension), "
                         f"got {block_n}")
    if interpreted:
        return Config(block_n or _INTERPRETER_BLOCK_N, 4)
    sixteen_bit = dtype != torch.float32
    widest = max(64, *pads)
    n, warps = _GPU_CONFIGS[(sixteen_bit, widest)][kind]
    if pre:
        n = max(16, n // 2)
    return Config(block_n or n, warps,
                  programs_per_sm=RESIDENT_PROGRAMS.get((sixteen_bit, widest, kind), 1))


def splits(num_blocks: int, programs_per_split: int, device: torch.device,
           requested: Optional[int], programs_per_sm: int = 1, slab_bytes: int = 0,
           budget_bytes: int = 0) -> tuple[int, int]:
    """(splits, blocks per split): the sequence's token blocks cut into contiguous ranges.
    slab_bytes is the scratch one more split costs (0 where nothing is reduced)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_splits: must be >= 1, got {requested}")
        count = max(1, min(requested, num_blocks))
        per_split = cdiv(num_blocks, count)
        return cdiv(num_blocks, per_split), per_split
    return _planned_splits(num_blocks, programs_per_split, base_plan.device_info(device),
                           programs_per_sm, slab_bytes, budget_bytes)


@functools.lru_cache(maxsize=4096)
def _planned_splits(num_blocks: int, programs_per_split: int, info: base_plan.DeviceInfo,
                    programs_per_sm: int, slab_bytes: int, budget_bytes: int) -> tuple[int, int]:
    # A pure function of sizes and the device's DeviceInfo: cached, so planning a pass costs
    # a dictionary lookup.
    if info.arch == base_plan.INTERPRETER.arch:
        # The interpreter runs one program at a time: splitting would only add partials.
        count = 1
    else:
        max_count = num_blocks // MIN_BLOCKS_PER_SPLIT
        if slab_bytes:
            max_count = min(max_count, budget_bytes // slab_bytes)
        count = base_plan.split_count(num_blocks, programs_per_split,
                                      info.sm_count * programs_per_sm, max_count)
    count = max(1, min(count, num_blocks))
    per_split = cdiv(num_blocks, count)
    return cdiv(num_blocks, per_split), per_split


def scratch_budget(qkv_bytes: int) -> int:
    """Bytes one reduction's partials may take, for q, k and v of `qkv_bytes` bytes."""
    return max(int(SCRATCH_FRACTION * qkv_bytes), base_plan.SCRATCH_FLOOR_BYTES)
