"""Launch planning: block sizes, warps and stages per kernel, and how far to split the sequence.

Configs come from the table in tuned_configs.py, keyed by GPU architecture and shape class
(kernel, padded head dim, padded value dim, bytes per element); a class missing from the table
gets ``heuristic_config``. There is no run-time sweep: one config per class, so the first call of
a new shape family compiles each of its kernels once.

Sequence splits. A program owns one (batch, head), one Dv tile and one contiguous chunk of the
sequence. With B·H·tiles programs alone a video DiT leaves most SMs idle (Wan 1.3B: B·H = 12 on
132 SMs), so the sequence is split until the grid fills whole waves of the resident-program
capacity (SMs × programs_per_sm; split_count's timings model picks how many waves). Kernels
that reduce over the sequence (S, z forward; dS, dz backward) then write one fp32 partial per
split, summed in a fixed order by reduce.py (deterministic); their split count is also capped
so the partials stay within SCRATCH_FRACTION of the bytes of q, k and v, or SCRATCH_FLOOR_BYTES
for short sequences.

Per-call cost. A call's plan depends only on its sizes, dtype and device, so plan_kernel caches
it and the tuning table is read once: planning a launch is a dictionary lookup. Nothing here
reads tensor values or synchronises with the device, and every size it produces (grids, scratch
buffers) follows from shapes alone, which is what lets a CUDA graph capture the forward and
backward. DeviceInfo is queried once per device.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import torch
import triton

from .common import cdiv, interpreting, padded_dim

KINDS = ("state", "output", "dq", "dkdv")
#: A kernel that also applies q/k norms and RoPE (pre_attention.py) holds a few more token tiles
#: live, so it has configs of its own: the table key's kind gets this suffix.
PRE_SUFFIX = "+pre"

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
#: the backward's peak extra memory is 5%; the reduced dS, dz take the rest) ...
SCRATCH_FRACTION = 0.04
#: ... or this many bytes, whichever is more. Relative to the tensors alone, the cap starved
#: short sequences: at (2, 4096, 12, 64) bf16 4% of q, k, v is 0.75 MB, one split of S and z
#: (B·H·D·(Dv+1) fp32) 0.4 MB, so the state kernel got 1 split where the SMs want about 11;
#: 16 MiB is nothing beside any GPU's memory and covers whole waves for such shapes.
SCRATCH_FLOOR_BYTES = 16 << 20
#: A split must own at least this many blocks, so its loop pipelines loads and the fixed cost of
#: a program (loading S, writing its partial) stays small beside its streaming work.
MIN_BLOCKS_PER_SPLIT = 4
#: The fixed cost of one program in split_count's timings model, in blocks streamed: loading
#: or writing one fp32 state tile is about one to two blocks of q/k/v traffic (D = 128: a
#: 64 KiB tile against 32 KiB a block), plus the program's start. An estimate from byte
#: counts, not a measurement (benchmarks/RESULTS.md, "Open for the GPU").
PROGRAM_OVERHEAD_BLOCKS = 2
#: split_count looks at grids of up to this many waves; more only shrink the rounding loss
#: further while each wave adds PROGRAM_OVERHEAD_BLOCKS.
MAX_PLANNED_WAVES = 8
#: The interpreter runs programs one after another; a nominal SM count still makes long test
#: sequences take the split-and-reduce path.
INTERPRETER_SM_COUNT = 8
#: Interpreter blocks: about this many per sequence, at most this large.
INTERPRETER_BLOCKS = 4
INTERPRETER_MAX_BLOCK = 1024
#: Set to 1 (read at import; atomic_reduction() in code): partial states are added with fp32
#: atomics into zeroed S, z (or dS, dz) instead of written to a partials buffer and summed in
#: split order by reduce.py. It saves the partials' memory, not launches: zero-filling the two
#: outputs takes two fill launches where the ordered sum takes one (reduce.split_targets). And
#: it is not bitwise reproducible.
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
    if kind.endswith(PRE_SUFFIX):
        # Half the tokens per step of the plain kernel's config (ptxas, sm_90: the plain
        # 64-token state config spills 224 B with a fused RMSNorm + RoPE, the 32-token one none).
        base = heuristic_config(arch, kind[:-len(PRE_SUFFIX)], d_pad, dv_pad, itemsize, n_tokens)
        if arch == "interpreter":
            return base
        return KernelConfig(max(16, base.block_n // 2), base.block_dv, base.num_warps,
                            min(base.num_stages, 2), base.programs_per_sm, base.fused)
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


class DeviceInfo(NamedTuple):
    """What planning needs to know about a device: its architecture key (tuned_configs.py) and
    how many SMs share the grid. A NamedTuple, so the per-call plan caches hash it cheaply."""
    arch: str
    sm_count: int

    @classmethod
    def from_properties(cls, properties) -> "DeviceInfo":
        """From torch.cuda.get_device_properties(...) or any object with its major, minor and
        multi_processor_count (tests and benchmarks describe an sm_90 GPU this way)."""
        return cls(f"sm{properties.major}{properties.minor}", properties.multi_processor_count)


#: Planning of the interpreter: programs run one after another, but a nominal SM count still
#: makes long test sequences take the split-and-reduce path.
INTERPRETER = DeviceInfo("interpreter", INTERPRETER_SM_COUNT)

_assumed_device: Optional[DeviceInfo] = None


def settings() -> int:
    """The planning switches now in force (assume_device, forced, atomic_reduction), as a
    small int that equal switches share: part of the signature under which replay.py keeps a
    call's launches (an int hashes in nanoseconds; the switches' tuple would on every call)."""
    return _settings


_settings_ids: dict = {}


def _update_settings() -> None:
    global _settings
    value = (_assumed_device, _forced_splits, tuple(sorted(_forced_configs.items())), _atomic)
    _settings = _settings_ids.setdefault(value, len(_settings_ids))


@contextlib.contextmanager
def assume_device(info: DeviceInfo) -> Iterator[None]:
    """Within the block, plan every launch for `info` whatever device the tensors are on.

    For measuring and testing the planning of a GPU this machine does not have: with launches
    stubbed (common.capture_launches) and meta tensors, the host path runs exactly as it would
    for that GPU, kernels aside."""
    global _assumed_device
    previous, _assumed_device = _assumed_device, info
    _update_settings()
    try:
        yield
    finally:
        _assumed_device = previous
        _update_settings()


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> DeviceInfo:
    # Queried once per device: get_device_properties costs microseconds, and the answer never
    # changes within a process.
    return DeviceInfo.from_properties(torch.cuda.get_device_properties(index))


def device_info(device: torch.device) -> DeviceInfo:
    if _assumed_device is not None:
        return _assumed_device
    if device.type == "cuda":
        return _cuda_device_info(device.index if device.index is not None
                                 else torch.cuda.current_device())
    if device.type == "cpu" and interpreting():
        return INTERPRETER
    raise ValueError(f"the Triton kernels plan launches for CUDA devices (or the interpreter), "
                     f"got {device}")


def arch_key(device: torch.device) -> str:
    return device_info(device).arch


def sm_count(device: torch.device) -> int:
    return device_info(device).sm_count


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
        if kind.removesuffix(PRE_SUFFIX) not in KINDS:
            raise ValueError(f"configs: unknown kernel kind {kind!r}; expected one of {KINDS}")
    previous = _forced_splits, _forced_configs
    _forced_splits, _forced_configs = splits, dict(configs or {})
    _update_settings()
    try:
        yield
    finally:
        _forced_splits, _forced_configs = previous
        _update_settings()


def kernel_config(kind: str, device: torch.device, d_pad: int, dv_pad: int, itemsize: int,
                  n_tokens: int, pre: bool = False) -> KernelConfig:
    """The config of one kernel: forced (tests, tuning), else the table, else the heuristic.
    `pre`: the launch also applies q/k norms and RoPE (its own table entries, PRE_SUFFIX); a
    config forced for the plain kind applies to it too."""
    if pre and kind + PRE_SUFFIX in _forced_configs:
        return _forced_configs[kind + PRE_SUFFIX]
    if kind in _forced_configs:
        return _forced_configs[kind]
    if pre:
        kind = kind + PRE_SUFFIX
    info = device_info(device)
    # Only the interpreter's blocks depend on the sequence length (heuristic_config).
    return _table_or_heuristic(info.arch, kind, d_pad, dv_pad, itemsize,
                               n_tokens if info.arch == INTERPRETER.arch else 0)


@functools.lru_cache(maxsize=None)
def _table_or_heuristic(arch: str, kind: str, d_pad: int, dv_pad: int, itemsize: int,
                        n_tokens: int) -> KernelConfig:
    from .tuned_configs import TABLE  # a large literal: read on first use, not at import
    entry = TABLE.get((arch, kind, d_pad, dv_pad, itemsize))
    if entry is not None:
        return KernelConfig(*entry)
    return heuristic_config(arch, kind, d_pad, dv_pad, itemsize, n_tokens)


# Read once: an environment lookup costs about a microsecond per reducing launch when the
# variable is unset, for a switch nobody flips mid-process (atomic_reduction() does, in code).
_atomic = os.environ.get(ATOMIC_ENV, "0") == "1"


_update_settings()


def atomic_reduce() -> bool:
    """Whether reductions use atomics: LINATTN_TRITON_ATOMIC_REDUCE=1 when the kernels were
    imported, or atomic_reduction(True)."""
    return _atomic


@contextlib.contextmanager
def atomic_reduction(enabled: bool = True) -> Iterator[None]:
    """Within the block, reduce split partials with atomics (enabled) or in split order."""
    global _atomic
    previous, _atomic = _atomic, enabled
    _update_settings()
    try:
        yield
    finally:
        _atomic = previous
        _update_settings()


@dataclass(frozen=True)
class Split:
    count: int   # programs along the sequence per (batch, head, tile)
    chunk: int   # tokens per program, a multiple of block_n (the last one may own fewer)


def scratch_budget(qkv_bytes: int) -> int:
    """Bytes the partial states of one pass may take: SCRATCH_FRACTION of q, k and v, but at
    least SCRATCH_FLOOR_BYTES (short sequences would otherwise get too few splits to fill the
    GPU for the sake of a few megabytes)."""
    return max(int(SCRATCH_FRACTION * qkv_bytes), SCRATCH_FLOOR_BYTES)


def split_count(blocks: int, programs_per_split: int, slots: int, max_count: int) -> int:
    """How many splits of a sequence of `blocks` token blocks, when each split adds
    `programs_per_split` programs and `slots` programs are resident at once (SMs × programs per
    SM), with at most `max_count` splits (block and scratch limits).

    A grid of P programs on `slots` slots runs in ceil(P / slots) waves, and a wave lasts as long
    as its longest program. So the candidates are, for w = 1, 2, ... waves, the largest count
    whose programs fit in w waves (w = 1: the largest count that does not exceed the resident
    capacity; where programs_per_split divides w·slots, exactly w whole waves); the timings
    model below picks among them:

        time(c) = waves(c) · (ceil(blocks / c) + PROGRAM_OVERHEAD_BLOCKS)

    in units of one program streaming one block. Ties go to the smaller count (less scratch,
    and one split means no reduction launch). A count like cdiv(slots, programs_per_split),
    which the old rule took, can leave a tail wave of a few programs (HunyuanVideo, B·H = 24 on
    132 SMs: 144 programs, a second wave of 12) and is never better than one of these.
    """
    max_count = max(1, min(max_count, blocks))

    def time(count: int) -> int:
        waves = cdiv(count * programs_per_split, slots)
        return waves * (cdiv(blocks, count) + PROGRAM_OVERHEAD_BLOCKS)

    best, best_time = 1, time(1)
    for waves in range(1, MAX_PLANNED_WAVES + 1):
        count = min(max_count, waves * slots // programs_per_split)
        if count > best and time(count) < best_time:
            best, best_time = count, time(count)
        if count >= max_count:
            break
    return best


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
        info = device_info(device)
        max_count = max(1, blocks // MIN_BLOCKS_PER_SPLIT)
        if partial_bytes:
            max_count = min(max_count, max(1, budget_bytes // partial_bytes))
        count = split_count(blocks, programs_per_split, info.sm_count * config.programs_per_sm,
                            max_count)
    chunk = cdiv(blocks, count) * config.block_n
    # Recount so that no program is left with an empty chunk.
    return Split(cdiv(n_tokens, chunk), chunk)


class KernelPlan(NamedTuple):
    """Everything about one launch that follows from the sizes alone."""
    config: KernelConfig
    d_pad: int
    dv_pad: int
    block_dv: int
    tiles: int     # Dv tiles: programs per (batch, head, split)
    split: Split


def plan_kernel(kind: str, device: torch.device, n_tokens: int, batch_heads: int, head_dim: int,
                value_dim: int, itemsize: int, reduces: bool = False,
                qkv_bytes: int = 0, pre: bool = False) -> KernelPlan:
    """The plan of one kernel launch. `reduces`: the kernel writes one fp32 partial of a
    (D, Dv) matrix and a D vector per (batch, head) and split (S, z or dS, dz), so its split
    count is capped by the scratch budget of q, k and v's `qkv_bytes`. `pre`: the kernel also
    applies q/k norms and RoPE (kernel_config's PRE_SUFFIX configs).

    A pure function of its arguments and the device's DeviceInfo, so it is cached: planning a
    call is a dictionary lookup (forced plans, for tests and tuning, are not cached)."""
    if _forced_splits is not None or _forced_configs:
        return _plan_kernel(kind, device, n_tokens, batch_heads, head_dim, value_dim, itemsize,
                            reduces, qkv_bytes, pre)
    return _cached_plan(kind, device_info(device), device, n_tokens, batch_heads, head_dim,
                        value_dim, itemsize, reduces, qkv_bytes, pre)


@functools.lru_cache(maxsize=4096)
def _cached_plan(kind, _info: DeviceInfo, device, *args) -> KernelPlan:
    # _info is part of the key only: a plan made under assume_device is not one for the device.
    return _plan_kernel(kind, device, *args)


def _plan_kernel(kind: str, device: torch.device, n_tokens: int, batch_heads: int,
                 head_dim: int, value_dim: int, itemsize: int, reduces: bool,
                 qkv_bytes: int, pre: bool = False) -> KernelPlan:
    d_pad, dv_pad = padded_dim(head_dim), padded_dim(value_dim)
    config = kernel_config(kind, device, d_pad, dv_pad, itemsize, n_tokens, pre)
    block_dv = min(config.block_dv, dv_pad)
    tiles = cdiv(value_dim, block_dv)
    if reduces:
        split = sequence_split(n_tokens, batch_heads * tiles, config, device,
                               partial_bytes=4 * batch_heads * head_dim * (value_dim + 1),
                               budget_bytes=scratch_budget(qkv_bytes))
    else:
        split = sequence_split(n_tokens, batch_heads * tiles, config, device)
    return KernelPlan(config, d_pad, dv_pad, block_dv, tiles, split)
