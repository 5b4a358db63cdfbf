"""Launch planning: block sizes, warps and stages per kernel, and how far to split the sequence.

Configs come from the table in tuned_configs.py, keyed by GPU architecture and shape class
(kernel, padded head dim, padded value dim, bytes per element); a class missing from the table
gets ``heuristic_config``. There is no run-time sweep: one config per class, so the first call of
a new shape family compiles each of its kernels once.

Sequence splits. A program owns one (batch, head), one Dv tile and one contiguous chunk of the
sequence. With B·H·tiles programs alone a video DiT leaves most SMs idle (Wan 1.3B: B·H = 12 on
132 SMs), so the sequence is split until the grid has about programs_per_sm programs per SM.
Kernels that reduce over the sequence (S, z forward; dS, dz backward) then write one fp32
partial per split, summed in a fixed order by reduce.py (deterministic); their split count is
also capped so the partials stay within SCRATCH_FRACTION of the bytes of q, k and v.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import triton

from .common import cdiv, interpreting, padded_dim

KINDS = ("state", "output", "dq", "dkdv")

#: Largest head dim and value dim the kernels hold in one block (masked up from smaller dims).
MAX_DIM = 256
#: Largest D_PAD × DV_PAD: the dq and dk/dv kernels keep the whole S (or dS) of one head as a dot
#: operand (64 KiB in bf16 at this size) and must still fit their tiles beside it.
MAX_STATE_ELEMENTS = 32768
#: The same bound for fp32 inputs: 3xTF32 dots keep two tf32 copies of each operand in shared
#: memory, and the dq kernel's Sᵀ at 256 x 128 did not fit the 227 KiB of an sm_90 block for any
#: candidate config (benchmarks/tune_triton.py --static).
MAX_STATE_ELEMENTS_FP32 = 16384
#: fp32 accumulator elements per program (D_PAD × block_dv): 64 registers a thread at 8 warps.
ACC_ELEMENTS = 16384
#: Partial states may take at most this share of the bytes of q, k and v (the issue's bound on
#: the backward's peak extra memory is 5%; the reduced dS, dz take the rest).
SCRATCH_FRACTION = 0.04
#: A split must own at least this many blocks, so its loop pipelines loads and the fixed cost of
#: a program (loading S, writing its partial) stays small beside its streaming work.
MIN_BLOCKS_PER_SPLIT = 4
#: The interpreter runs programs one after another; a nominal SM count still makes long test
#: sequences take the split-and-reduce path.
INTERPRETER_SM_COUNT = 8
#: Interpreter blocks: about this many per sequence, at most this large.
INTERPRETER_BLOCKS = 4
INTERPRETER_MAX_BLOCK = 1024
#: Set to 1: partial states are added with fp32 atomics into zeroed S, z (or dS, dz) instead of
#: summed in split order by a second launch: one launch fewer, but not bitwise reproducible.
ATOMIC_ENV = "LINATTN_TRITON_ATOMIC_REDUCE"


@dataclass(frozen=True)
class KernelConfig:
    block_n: int          # tokens per loop step
    block_dv: int         # value columns per program (a Dv tile)
    num_warps: int
    num_stages: int
    programs_per_sm: int  # the grid size the split count aims for, per SM
    # dk/dv kernel only: dk and the first dv tile in one pass (reads k, v once) rather than a
    # dk pass and a dv pass (reads k twice, but each pass holds one dS operand).
    fused: bool = True

    def as_tuple(self) -> tuple:
        return (self.block_n, self.block_dv, self.num_warps, self.num_stages,
                self.programs_per_sm, self.fused)


def unsupported_dims(head_dim: int, value_dim: int, itemsize: int) -> Optional[str]:
    """None when the kernels hold these dims for inputs of `itemsize` bytes; else the reason."""
    if head_dim > MAX_DIM or value_dim > MAX_DIM:
        return (f"head dim {head_dim} / value dim {value_dim}: the Triton kernels take dims up to "
                f"{MAX_DIM}")
    elements = padded_dim(head_dim) * padded_dim(value_dim)
    padded = f"{padded_dim(head_dim)} x {padded_dim(value_dim)} after padding to powers of two"
    if elements > MAX_STATE_ELEMENTS:
        return (f"head dim {head_dim} with value dim {value_dim}: the state of one head, "
                f"{padded}, exceeds the {MAX_STATE_ELEMENTS} elements the backward kernels keep "
                f"per program (e.g. D = 256 works with Dv <= 128)")
    if itemsize == 4 and elements > MAX_STATE_ELEMENTS_FP32:
        return (f"float32 inputs with head dim {head_dim} and value dim {value_dim}: the state of "
                f"one head, {padded}, exceeds the {MAX_STATE_ELEMENTS_FP32} elements whose 3xTF32 "
                f"operand copies fit in shared memory (bf16 and fp16 take up to "
                f"{MAX_STATE_ELEMENTS}; the cpu backend takes any size)")
    return None


def heuristic_config(arch: str, kind: str, d_pad: int, dv_pad: int, itemsize: int,
                     n_tokens: int = 0) -> KernelConfig:
    """An untuned config from register and shared-memory budgets (see tuned_configs.py).
    n_tokens (the sequence the kernel streams) matters only to the interpreter's config."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    block_dv = min(dv_pad, max(16, ACC_ELEMENTS // d_pad))
    if arch == "interpreter":
        # The interpreter's cost is per operation, not per element, so blocks are large; but a
        # sequence still spans about INTERPRETER_BLOCKS of them (and a partial last one), so
        # every test size runs the multi-block loop and its tail masks.
        block_n = min(INTERPRETER_MAX_BLOCK, max(16, triton.next_power_of_2(
            cdiv(n_tokens, INTERPRETER_BLOCKS))))
        return KernelConfig(block_n=block_n, block_dv=block_dv, num_warps=4, num_stages=1,
                            programs_per_sm=1)
    # Conservative where tuned_configs.py has no entry (ptxas results for sm_90 guided these):
    # the dq kernel keeps a D_PAD × block_dv accumulator, Sᵀ and a block of g live at once, so
    # a full-width accumulator takes 32-token blocks; fp32 operands are split in two for 3xTF32
    # dots and held in shared memory, so fp32 tiles are narrower and single-staged.
    if itemsize == 4:
        block_dv = min(block_dv, max(16, ACC_ELEMENTS // (2 * d_pad)))
        block_n, num_stages = 32, 1
    else:
        full_width_dq = kind == "dq" and d_pad * block_dv >= ACC_ELEMENTS
        block_n = 32 if full_width_dq or d_pad > 128 else 64
        num_stages = 3 if arch.startswith("sm9") else 2
    num_warps = 8 if d_pad * block_dv >= 8192 else 4
    # Reducing kernels hold a D_PAD × block_dv accumulator: one program per SM. The per-token
    # kernels hold block_n-row tiles only: two per SM hide each other's latency.
    programs_per_sm = 1 if kind in ("state", "dq") else 2
    # fp32 dots use 3xTF32, which keeps split copies of both operands in shared memory: one
    # dS operand per dk/dv pass keeps that within the shared memory of one block.
    fused = itemsize == 2
    return KernelConfig(block_n, block_dv, num_warps, num_stages, programs_per_sm, fused)


def arch_key(device: torch.device) -> str:
    if device.type == "cpu" and interpreting():
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    if device.type == "cpu" and interpreting():
        return INTERPRETER_SM_COUNT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)


_forced_splits: Optional[int] = None
_forced_configs: dict[str, KernelConfig] = {}


@contextlib.contextmanager
def forced(splits: Optional[int] = None,
           configs: Optional[dict[str, KernelConfig]] = None) -> Iterator[None]:
    """Within the block, use these split counts and configs instead of the planned ones.

    For the tuning script and for tests that must reach the split, reduce and multi-block paths at
    small sizes. `splits` is still limited to one block per split at least.
    """
    global _forced_splits, _forced_configs
    for kind in (configs or {}):
        if kind not in KINDS:
            raise ValueError(f"configs: unknown kernel kind {kind!r}; expected one of {KINDS}")
    previous = _forced_splits, _forced_configs
    _forced_splits, _forced_configs = splits, dict(configs or {})
    try:
        yield
    finally:
        _forced_splits, _forced_configs = previous


def kernel_config(kind: str, device: torch.device, d_pad: int, dv_pad: int, itemsize: int,
                  n_tokens: int) -> KernelConfig:
    """The config of one kernel: forced (tests, tuning), else the table, else the heuristic."""
    if kind in _forced_configs:
        return _forced_configs[kind]
    from .tuned_configs import TABLE
    arch = arch_key(device)
    entry = TABLE.get((arch, kind, d_pad, dv_pad, itemsize))
    if entry is not None:
        return KernelConfig(*entry)
    return heuristic_config(arch, kind, d_pad, dv_pad, itemsize, n_tokens)


def atomic_reduce() -> bool:
    return os.environ.get(ATOMIC_ENV, "0") == "1"


@dataclass(frozen=True)
class Split:
    count: int   # programs along the sequence per (batch, head, tile)
    chunk: int   # tokens per program, a multiple of block_n (the last one may own fewer)


def sequence_split(n_tokens: int, programs_per_split: int, config: KernelConfig,
                   device: torch.device, partial_bytes: int = 0, budget_bytes: int = 0) -> Split:
    """How many programs share the sequence of one (batch, head, tile).

    programs_per_split: B·H·tiles, the programs there are with one split each.
    partial_bytes: scratch one extra split costs (0: the kernel writes no partials).
    budget_bytes: the most all partials together may take.
    """
    blocks = cdiv(n_tokens, config.block_n)
    if _forced_splits is not None:
        count = max(1, min(_forced_splits, blocks))
    else:
        target = sm_count(device) * config.programs_per_sm
        count = cdiv(target, programs_per_split)
        count = min(count, max(1, blocks // MIN_BLOCKS_PER_SPLIT))
        if partial_bytes and count > 1:
            count = min(count, max(1, budget_bytes // partial_bytes))
        count = max(1, count)
    chunk = cdiv(blocks, count) * config.block_n
    # Recount so that no program is left with an empty chunk.
    return Split(cdiv(n_tokens, chunk), chunk)
