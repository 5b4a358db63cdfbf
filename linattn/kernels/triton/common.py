"""Helpers shared by the Triton kernel files (the builtin maps' and Hedgehog's).

In-kernel (``@triton.jit``):
  * ``to_operand`` / ``to_storage``: values to a dot operand / to the output dtype.
  * ``mma``: ``tl.dot`` with fp32 accumulation, fp32-accurate (3xTF32) for fp32 inputs.
  * ``split_range``: the tokens of one sequence split; ``block_offsets``: the in-block offsets
    and column mask of a block of tokens of a (B, N, H, D) view.
  * ``unit_columns``: the B operand that turns a sum over a block's tokens (z = Σ φ) into a
    tensor-core product beside the state's own.
  * ``state_centre`` and ``state_scale``: the vector m and the scale c with which the dq pass
    rounds (S − z mᵀ) / c, and the output pass S / c, not S, to a 16-bit operand.

Host side:
  * ``launch`` (every kernel launch; ``capture_launches`` records them instead, for offline
    compilation; ``observe_launches`` is the hook both use), ``bnhd_strides``, ``mask_args``, ``check_state``, ``interpreting``,
    ``emulate_bf16``, ``padded_dim``, ``cdiv``.

Why bf16 is emulated under the interpreter. The Triton interpreter (TRITON_INTERPRET=1, how CI
runs these kernels on CPU tensors) keeps bf16 values as raw uint16 in numpy. Checked with triton
3.6: ``tl.dot`` on bf16 operands multiplies those integers (errors of ~1e10), and fp32 -> bf16
casts truncate (or, with an explicit rtne mode, round without carrying into the exponent). So
when interpreting bf16 inputs the kernels round to bf16 themselves, with integer bit operations
that are exact on both the interpreter and a GPU, and keep the rounded values in fp32 for the dot:
bf16 × bf16 products are exact in fp32, so this equals a bf16 tensor-core dot with fp32
accumulation up to summation order. On a GPU (EMULATE_BF16 = False) the hardware casts and bf16
tensor cores are used directly.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import interpreter_compat


if os.environ.get("TRITON_INTERPRET", "0") == "1":
    # Every kernel file imports this module, so interpreted kernels get the numpy >= 2.4 fix.
    interpreter_compat.install()


def interpreting() -> bool:
    """Whether these kernels run in the interpreter: what triton.jit made of them when they
    were decorated (TRITON_INTERPRET at import time), whatever the variable says now."""
    return _INTERPRETED


def emulate_bf16(dtype: torch.dtype) -> bool:
    """True where the kernels must round to bf16 with integer ops (see the module docstring)."""
    return dtype == torch.bfloat16 and interpreting()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def padded_dim(n: int) -> int:
    """A head or value dim padded to what a kernel block holds: a power of two, at least 16
    (the smallest dot dimension Triton accepts). Loads mask the padding."""
    return max(16, triton.next_power_of_2(n))


def mask_args(key_mask: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], int, int]:
    """A (B, N) bool key mask as bytes (a free view) and its two strides; None: no mask."""
    if key_mask is None:
        return None, 0, 0
    return key_mask.view(torch.uint8), key_mask.stride(0), key_mask.stride(1)


def check_state(state: torch.Tensor, normaliser: torch.Tensor, what: str) -> None:
    """The kernels index S (B, H, D', Dv) and z (B, H, D') as contiguous fp32 (alloc.empty)."""
    for name, t in (("state", state), ("normaliser", normaliser)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{what}: the {name} must be a contiguous float32 tensor, got "
                             f"{t.dtype} with strides {tuple(t.stride())}")


_launch_observer = None


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), the one place the host code launches a kernel; inside
    ``capture_launches`` the launch is recorded instead (benchmarks/tune_triton.py compiles the
    recorded launches for a GPU that this machine need not have), and replay.py records the
    launches of a call's first run through the same hook."""
    if _launch_observer is not None:
        _launch_observer(kernel, grid, args, kwargs)
    else:
        kernel[grid](*args, **kwargs)


def launch_observer():
    """The function launches go to instead of running (None: they run)."""
    return _launch_observer


@contextlib.contextmanager
def observe_launches(observer):
    """Within the block, every launch calls observer(kernel, grid, args, kwargs) instead of
    running; the observer decides what happens (it gets the previous one from
    launch_observer() before entering)."""
    global _launch_observer
    previous, _launch_observer = _launch_observer, observer
    try:
        yield
    finally:
        _launch_observer = previous


@contextlib.contextmanager
def capture_launches():
    """Within the block, launches are appended to the yielded list as (kernel, grid, args,
    kwargs) and not run."""
    recorded: list = []
    with observe_launches(lambda *launch_args: recorded.append(launch_args)):
        yield recorded


def bnhd_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """Element strides of a (B, N, H, D)-indexed view, whatever its memory layout."""
    if t.dim() != 4:
        raise ValueError(f"expected a (B, N, H, D) view, got shape {tuple(t.shape)}")
    return tuple(t.stride())  # type: ignore[return-value]


@triton.jit
def _bf16_rounded_bits(x):
    """fp32 bits of x rounded to the nearest bf16 (ties to even); the low 16 bits are junk."""
    bits = x.to(tl.uint32, bitcast=True)
    return bits + 0x7FFF + ((bits >> 16) & 1)


@triton.jit
def to_operand(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x (fp32 values, or a tensor loaded in DTYPE) as a dot operand in the input dtype:
    bf16/fp16 for tensor cores, fp32 for IEEE dots. A loaded tensor passes unchanged."""
    if EMULATE_BF16:
        return ((_bf16_rounded_bits(x.to(tl.float32)) >> 16) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def to_storage(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """fp32 values rounded (to nearest) to the dtype of the tensor they are stored into."""
    if EMULATE_BF16:
        return (_bf16_rounded_bits(x) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


# triton.jit returns an interpreter function instead of a JITFunction under TRITON_INTERPRET=1.
_INTERPRETED = not isinstance(to_operand, triton.runtime.JITFunction)


@triton.jit
def mma(a, b, acc, FP32: tl.constexpr):
    """acc + a @ b, accumulated in fp32. 16-bit operands run on tensor cores as they are. fp32
    operands use 3xTF32 (each operand split into a tf32 high part and a tf32 remainder, three
    tensor-core products): fp32-accurate, where plain tf32 keeps 10 mantissa bits (~1e-3
    relative errors) and input_precision="ieee" runs on FMA units, which for these tile sizes
    compiles to kilobytes of local-memory spills per thread (ptxas, sm_90, D = Dv = 128)."""
    if FP32:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def block_offsets(s_n, s_d, COLS, BLOCK: tl.constexpr, COLS_PAD: tl.constexpr):
    """Element offsets (BLOCK, COLS_PAD) of a block of tokens relative to its first token, in a
    (B, N, H, D) view with token stride s_n and column stride s_d, and which columns are real
    (below COLS). Loop-invariant: kernels compute it once and add the 64-bit block origin
    (block start × s_n) to the base pointer, so these offsets stay 32-bit."""
    rows = tl.arange(0, BLOCK)
    cols = tl.arange(0, COLS_PAD)
    return rows[:, None] * s_n + cols[None, :] * s_d, cols < COLS


@triton.jit
def unit_columns(BLOCK_N: tl.constexpr):
    """(BLOCK_N, 16) fp32, column 0 ones and the rest zeros: φᵀ · this = [Σ_rows φ, 0, ...], the
    sum over a block's tokens on the tensor cores (16: the narrowest dot Triton accepts).

    Why. A sum over the rows of a (BLOCK_N, D) block crosses warps (rows are spread over them):
    a shared-memory round trip and a barrier every step. In the forward's state kernel that sum
    (z += Σ φ) held the kernel at ~40% of its byte floor on the H200, and as a product it ran at
    79-96% (benchmarks/state_probe.py, RESULTS.md 2026-12-04). Exact for 16-bit operands
    (products by 1 and 0, summed in fp32); for fp32 inputs the 3xTF32 product keeps each term to
    ~2^-21 (measured on the H200: the fp32 output's error against the peer 8.1e-7 -> 7.9e-7)."""
    cols = tl.arange(0, 16)[None, :] + tl.zeros((BLOCK_N, 1), dtype=tl.int32)
    return tl.where(cols == 0, 1.0, 0.0)


@triton.jit
def split_range(split, chunk, N):
    """Tokens [start, end) of sequence split `split`, as 64-bit values: a loop over them gets a
    64-bit counter, so token offsets (N · token stride can pass 2^31 for long sequences read
    from a fused projection) cannot overflow."""
    start = split.to(tl.int64) * chunk
    end = tl.minimum(start + chunk, N)
    return start, end



@triton.jit
def state_centre(state, z_b, AXIS: tl.constexpr):
    """m = Σ_f sign(z_f) S_f / Σ_f |z_f|, for a state tile with its features along AXIS and z
    broadcast to the tile's shape (z_b): one value per value column, fp32. No keys: m = 0.

    Why. The query gradient is dφ(q_i) = (S − z o_iᵀ) do_i / den_i: when the per-feature means
    of v, S_f / z_f, are all close to o_i (positive-mean values, long sequences) the two terms
    cancel, and an error in S relative to |S| comes back amplified by |S| / |S − z o_iᵀ| (about
    √N). Rounded to a 16-bit tensor-core operand, S carries 2^-9 of itself (bf16): at N = 8192
    with torch.rand inputs, bf16 dq was 100% off. S = S' + z mᵀ is exact for any m, and

        g = S do = g' + z μ  (g' = S' do, μ = m·do),
        dφ = g'/den + z·dden',  dden' = (eps·μ − φ·g')/den²,  the true dden = dden' − μ/den,

    so only S' is rounded, and with m a mean of the S_f / z_f (this one is weighted by |z_f|:
    a convex combination whatever the signs of φ) S' is as small as that cancellation leaves
    the result: its rounding error is no longer amplified. S' is formed in fp32 from the fp32
    S."""
    weight = tl.sum(tl.abs(z_b), axis=AXIS)
    signed = tl.sum(tl.where(z_b < 0.0, -state, state), axis=AXIS)
    return tl.where(weight > 0.0, signed / tl.maximum(weight, 1e-30), 0.0)


@triton.jit
def state_scale(z):
    """c = max_f |z_f| (1 when z = 0): the output pass rounds S / c, the dq pass S' / c, to the
    16-bit operand. S grows with N, past fp16's 65504 for long sequences of positive values (o
    came out inf at N = 4096 with v up to 1000); for features >= 0, |S_fe| <= max|v| z_f, so
    |S_fe| / c <= max|v| and |S'_fe| / c <= 2 max|v|. Exact algebra: the products are
    multiplied by c again in fp32."""
    top = tl.max(tl.abs(z), axis=0)
    return tl.where(top > 0.0, top, 1.0)
