"""Launch planning for the Hedgehog kernels: which sizes they take, block sizes and warps per
kernel, and how far to split the sequence.

Limits and configs come from compiling every kernel for sm_90 (H100) with ptxas, which needs no
GPU: ``python -m linattn.kernels.triton.hedgehog.resources`` prints shared memory, registers and
spills per kernel and config. An H100 gives a program at most 227 KB of shared memory; each
kernel keeps W (D × F) and, in the output and backward kernels, a (2F, Dv) state as product
operands for its whole loop, so the footprint grows with D·F + F·Dv, not with N. Measured
(ptxas, triton 3.6, 16-bit inputs, D = F = Dv = 128, the configs below): 64-224 KB of shared
memory, spills of 0 bytes except the key-gradient kernel (92 bytes). fp32 inputs multiply
exactly (not on tensor cores), whose operands take twice the room: at D = F = Dv = 128 the
backward kernels would need 565-827 KB, so fp32 is limited to 64 (217 KB at most).
No timing has been measured: the configs are the fastest-looking ones that fit, not tuned.

Scratch. Each reduction's partials are capped at SCRATCH_FRACTION of the bytes of q, k and v
and freed before the next pass. Computed from these rules (not measured on a GPU) for the Wan
1.3B shape (1, 32760, 12, 128), F = 128, bf16, 132 SMs: 9 splits for the state kernel (14.3 MB
of partials, 4.7% of q, k, v), 19 / 9 / 19 splits for the three backward passes, whose scratch
peaks at 19.0 MB (6.3%) in the state-gradient pass (dS partials, dS itself, 1/den and dden).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..common import cdiv, padded_dim

KINDS = ("state", "output", "query_grad", "state_grad", "key_grad")
#: Largest D, F and Dv (after padding to a power of two) per input dtype (module docstring).
MAX_PADDED_DIM = {torch.float16: 128, torch.bfloat16: 128, torch.float32: 64}
#: Partial slabs of one reduction may take at most this share of the bytes of q, k and v;
#: with the 8 bytes per query and head of the backward, the peak scratch stays under 10%.
SCRATCH_FRACTION = 0.05
#: A split owns at least this many token blocks, so its loop streams (and pipelines) loads and
#: the fixed cost of a program (loading W and S, writing its partial) stays small beside it.
MIN_BLOCKS_PER_SPLIT = 4
#: Programs per SM the split count aims for.
PROGRAMS_PER_SM = 2

# (16-bit inputs, largest padded dim) -> kind -> (block_n, num_warps). Every entry fits in
# shared memory on sm_90 with at most ~100 bytes of register spills (resources.py).
_GPU_CONFIGS = {
    (True, 64): dict.fromkeys(KINDS, (64, 8)),
    (True, 128): dict(state=(64, 8), output=(32, 8), query_grad=(32, 8), state_grad=(32, 8),
                      key_grad=(16, 8)),
    (False, 64): dict.fromkeys(KINDS, (16, 8)),
}
#: The interpreter's cost is per operation, not per element: few large blocks run fastest.
_INTERPRETER_BLOCK_N = 64


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


def config(kind: str, dtype: torch.dtype, pads: tuple[int, ...], interpreted: bool,
           block_n: Optional[int]) -> Config:
    """Block size and warps of one kernel; block_n (tests, benchmarks) overrides the size."""
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"block_n: must be a power of two >= 16 (a Triton dot dimension), "
                         f"got {block_n}")
    if interpreted:
        return Config(block_n or _INTERPRETER_BLOCK_N, 4)
    widest = max(64, *pads)
    n, warps = _GPU_CONFIGS[(dtype != torch.float32, widest)][kind]
    return Config(block_n or n, warps)


def splits(num_blocks: int, programs_per_split: int, device: torch.device,
           requested: Optional[int], slab_bytes: int = 0,
           budget_bytes: int = 0) -> tuple[int, int]:
    """(splits, blocks per split): the sequence's token blocks cut into contiguous ranges.
    slab_bytes is the scratch one more split costs (0 where nothing is reduced)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"num_splits: must be >= 1, got {requested}")
        count = requested
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        count = min(cdiv(PROGRAMS_PER_SM * sms, programs_per_split),
                    num_blocks // MIN_BLOCKS_PER_SPLIT)
        if slab_bytes:
            count = min(count, budget_bytes // slab_bytes)
    else:
        # The interpreter runs one program at a time: splitting would only add partials.
        count = 1
    count = max(1, min(count, num_blocks))
    per_split = cdiv(num_blocks, count)
    return cdiv(num_blocks, per_split), per_split


def scratch_budget(*tensors: torch.Tensor) -> int:
    return int(SCRATCH_FRACTION * sum(t.numel() * t.element_size() for t in tensors))
