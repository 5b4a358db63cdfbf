"""Device functions shared by the Hedgehog kernels: φ(x) = softmax(xW) ⊕ softmax(−xW) on a
block of tokens, its vector-Jacobian product, the product they all use, and the per-head loads
(W, and a (2F, Dv) state split into its two halves).

Precision rule of every Hedgehog kernel (FlashAttention's, which rounds P and dS to bf16 before
its products): blocks are loaded in the input dtype, elementwise work (softmax, its gradient,
den, 1/den) is fp32, and every product ``dot`` rounds both operands to the input dtype and
accumulates in fp32, so bf16/fp16 inputs run on bf16/fp16 tensor cores and fp32 inputs on tf32
tensor cores as 3xTF32 (common.mma: each operand split into two tf32 parts, fp32-accurate
products). States S, z, dS, dz are accumulated and stored in fp32; where
one is a product operand it is rounded like any other operand, after S has been divided by the
number of kept keys (see output_scale) so that it cannot overflow fp16. The other rounded
operands (do/den, dS, dL) stay within fp16's range unless den = φ(q)ᵀz + eps itself is tiny
while keys are kept (φ(q) and every kept φ(k) concentrated on disjoint features); such a row's
fp16 gradients overflow in the PyTorch map as well.

Fp32 state operands (tf32) were the first design; compiled for sm_90 at D = F = Dv = 128 they
needed 262-393 KB of shared memory in the backward kernels (an H100 has 227 KB), because a
(2F, Dv) fp32 state is 128 KB before any W or token tile.

Under TRITON_INTERPRET=1 bf16 rounding is emulated (common.py says why); the flag EMULATE_BF16
is passed through unchanged.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import mma, to_operand, to_storage
from ..pre_attention import head_columns


@triton.jit
def dot(a, b, acc, TOKEN: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """acc + a @ b, both operands (fp32 values or blocks loaded in TOKEN) rounded to the input
    dtype TOKEN, fp32 accumulation."""
    return mma(to_operand(a, TOKEN, EMULATE_BF16), to_operand(b, TOKEN, EMULATE_BF16), acc, True)


@triton.jit
def output_scale(z_a):
    """1 / c with c = Σ_f z_f over the first half of z: each half of φ(k) sums to 1, so c is the
    number of kept keys (at least 1 when any key is kept; 1 is used when none is). S / c is a
    φ-weighted mean of v, bounded by max |v|, so it is a safe fp16 operand where S (a sum over
    up to 1e5 keys) is not. The scaling is exact algebra: o = φᵀ(S/c) / (φᵀ(z/c) + eps/c)."""
    return 1.0 / tl.maximum(tl.sum(z_a, axis=0), 1.0)


@triton.jit
def softmax_rows(logits, f_ok):
    """Row softmax over the valid columns (f_ok) of an fp32 (rows, F_PAD) block; padded columns
    get exactly 0. Max-subtracted, so each row's sum holds an exp(0) = 1: no division by zero,
    features in [0, 1], and an underflow to 0 is harmless (nothing divides by a feature), which
    is why no 1e-12 clamp is applied (LoLCATs clamps; tests/test_hedgehog.py checks saturated
    logits against the float64 reference)."""
    logits = tl.where(f_ok[None, :], logits, float("-inf"))
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    return e / tl.sum(e, axis=1)[:, None]


@triton.jit
def hedgehog_features(x, w, f_ok, BLOCK_N: tl.constexpr, F_PAD: tl.constexpr,
                      TOKEN: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """(softmax(xW), softmax(−xW)) in fp32 for a (BLOCK_N, D_PAD) block x and a W tile."""
    logits = dot(x, w, tl.zeros((BLOCK_N, F_PAD), dtype=tl.float32), TOKEN, EMULATE_BF16)
    return softmax_rows(logits, f_ok), softmax_rows(-logits, f_ok)


@triton.jit
def softmax_vjp(p, dp):
    """d(logits) from dp for p = softmax(logits): p ⊙ (dp − Σ_f dp ⊙ p), row-wise."""
    return p * (dp - tl.sum(dp * p, axis=1)[:, None])


@triton.jit
def hedgehog_logits_grad(a, c, da, dc):
    """dL for L = xW from the gradients of both halves: a = softmax(L), c = softmax(−L)."""
    return softmax_vjp(a, da) - softmax_vjp(c, dc)


@triton.jit
def load_weight(w_ptr, h, D, F, s_wh, s_wd, s_wf, D_PAD: tl.constexpr, F_PAD: tl.constexpr,
                TOKEN: tl.constexpr, EMULATE_BF16: tl.constexpr, ROPE: tl.constexpr = 0):
    """Head h's W (D, F), zero-padded to (D_PAD, F_PAD), as a dot operand in the input dtype
    (loaded once per program; xW and the backward's dL Wᵀ multiply these same values). Its rows
    follow the column order of the q or k blocks (pre_attention.head_columns)."""
    offs_d, d_ok = head_columns(D, D_PAD, ROPE)
    offs_f = tl.arange(0, F_PAD)
    ptrs = w_ptr + h.to(tl.int64) * s_wh + offs_d[:, None] * s_wd + offs_f[None, :] * s_wf
    w = tl.load(ptrs, mask=d_ok[:, None] & (offs_f[None, :] < F), other=0.0)
    return to_operand(w.to(tl.float32), TOKEN, EMULATE_BF16)


@triton.jit
def load_state_halves(s_ptr, F, Dv, s_sf, s_sv, F_PAD: tl.constexpr, V_PAD: tl.constexpr):
    """The two (F, Dv) halves of a (2F, Dv) fp32 state at s_ptr as zero-padded blocks: rows
    [0, F) go with softmax(xW), rows [F, 2F) with softmax(−xW)."""
    offs_f = tl.arange(0, F_PAD)
    offs_v = tl.arange(0, V_PAD)
    ok = (offs_f[:, None] < F) & (offs_v[None, :] < Dv)
    ptrs = s_ptr + offs_f[:, None] * s_sf + offs_v[None, :] * s_sv
    return tl.load(ptrs, mask=ok, other=0.0), tl.load(ptrs + F * s_sf, mask=ok, other=0.0)


@triton.jit
def load_vector_halves(z_ptr, F, s_zf, F_PAD: tl.constexpr):
    """The two (F,) halves of a (2F,) fp32 normaliser at z_ptr, zero-padded to F_PAD."""
    offs_f = tl.arange(0, F_PAD)
    ok = offs_f < F
    return (tl.load(z_ptr + offs_f * s_zf, mask=ok, other=0.0),
            tl.load(z_ptr + (F + offs_f) * s_zf, mask=ok, other=0.0))


@triton.jit
def store_state_half(s_ptr, half, acc, acc_sum, F, Dv, s_sf, s_sv, z_ptr, s_zf,
                     F_PAD: tl.constexpr, V_PAD: tl.constexpr):
    """Write one half (rows half·F + [0, F)) of a (2F, Dv) state and of its (2F,) vector."""
    offs_f = tl.arange(0, F_PAD)
    offs_v = tl.arange(0, V_PAD)
    rows = half * F + offs_f
    tl.store(s_ptr + rows[:, None] * s_sf + offs_v[None, :] * s_sv, acc,
             mask=(offs_f[:, None] < F) & (offs_v[None, :] < Dv))
    tl.store(z_ptr + rows * s_zf, acc_sum, mask=offs_f < F)


@triton.jit
def rows_ok(mask_ptr, b, start, N, s_mb, s_mn, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Which rows of the token block starting at `start` are real keys: inside the sequence
    and, with a key padding mask, kept (mask byte nonzero)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    ok = offs_n < N
    if HAS_MASK:
        keep = tl.load(mask_ptr + b.to(tl.int64) * s_mb + offs_n * s_mn, mask=ok, other=0)
        ok = ok & (keep != 0)
    return ok


@triton.jit
def sum_partials_kernel(a_part_ptr, a_out_ptr, a_numel, b_part_ptr, b_out_ptr, b_numel,
                        num_partials, a_blocks, BLOCK: tl.constexpr,
                        A_EMULATE_BF16: tl.constexpr, B_EMULATE_BF16: tl.constexpr):
    """out = Σ_p part[p] for two independent (num_partials, numel) fp32 buffers in one launch
    (programs [0, a_blocks) do buffer a, the rest buffer b), stored in each out's dtype.
    Partials are added in index order, so the result is the same on every run (no atomics).
    The buffers hold one slab per sequence split, never one per token block, so they stay a
    few MB and int32 offsets suffice."""
    pid = tl.program_id(0)
    if pid < a_blocks:
        _sum_partials(a_part_ptr, a_out_ptr, a_numel, num_partials, pid, BLOCK, A_EMULATE_BF16)
    else:
        _sum_partials(b_part_ptr, b_out_ptr, b_numel, num_partials, pid - a_blocks, BLOCK,
                      B_EMULATE_BF16)


@triton.jit
def _sum_partials(part_ptr, out_ptr, numel, num_partials, block, BLOCK: tl.constexpr,
                  EMULATE_BF16: tl.constexpr):
    offs = block * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for p in range(num_partials):
        acc += tl.load(part_ptr + p * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, to_storage(acc, out_ptr.dtype.element_ty, EMULATE_BF16), mask=ok)


@triton.jit
def load_scaled_state(s_ptr, z_ptr, b, h, F, Dv, s_sb, s_sh, s_sf, s_sv, s_zb, s_zh, s_zf,
                      F_PAD: tl.constexpr, V_PAD: tl.constexpr, TOKEN: tl.constexpr,
                      EMULATE_BF16: tl.constexpr, CENTRED: tl.constexpr):
    """The state halves of (b, h) as product operands, scaled by 1/c (output_scale): returns
    (S_a/c, S_c/c) in the input dtype, (z_a/c, z_c/c) in fp32, 1/c and the centre m. The
    forward's output pass and the backward's dq pass both read the state this way.

    CENTRED (the dq pass): the operands are (S − z mᵀ)/c, m the |z|-weighted mean of the
    per-feature means S_f / z_f over both halves (common.state_centre says why and how the dq
    formula takes it back); otherwise m = 0 and the operands are S/c."""
    s_a, s_c = load_state_halves(s_ptr + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh,
                                 F, Dv, s_sf, s_sv, F_PAD, V_PAD)
    z_a, z_c = load_vector_halves(z_ptr + b.to(tl.int64) * s_zb + h.to(tl.int64) * s_zh,
                                  F, s_zf, F_PAD)
    scale = output_scale(z_a)
    if CENTRED:
        weight = tl.sum(tl.abs(z_a), axis=0) + tl.sum(tl.abs(z_c), axis=0)
        signed = (tl.sum(tl.where(z_a[:, None] < 0.0, -s_a, s_a), axis=0)
                  + tl.sum(tl.where(z_c[:, None] < 0.0, -s_c, s_c), axis=0))
        centre = tl.where(weight > 0.0, signed / tl.maximum(weight, 1e-30), 0.0)
        s_a = s_a - z_a[:, None] * centre[None, :]
        s_c = s_c - z_c[:, None] * centre[None, :]
    else:
        centre = tl.zeros((V_PAD,), dtype=tl.float32)
    s_a = to_operand(s_a * scale, TOKEN, EMULATE_BF16)
    s_c = to_operand(s_c * scale, TOKEN, EMULATE_BF16)
    return s_a, s_c, z_a * scale, z_c * scale, scale, centre
