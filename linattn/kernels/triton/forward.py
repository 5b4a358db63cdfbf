"""Forward: S = Σ_j φ(k_j) v_jᵀ, z = Σ_j φ(k_j), then o_i = φ(q_i)ᵀS / (φ(q_i)ᵀz + eps).

Two kernels, plus the split reduction between them when the sequence is split:

* state kernel, grid (B·H, splits, Dv tiles): streams its chunk of k and v, applies φ to k as it
  loads it, accumulates an fp32 partial S (D × Dv tile) on tensor cores and z beside it (φᵀe₀,
  a second tensor-core product: common.unit_columns), and writes the partial (or S and z
  themselves when there is one split; or atomically adds them, with
  LINATTN_TRITON_ATOMIC_REDUCE=1).
* output kernel, grid (B·H, splits, Dv tiles): loads the S tile and z of its head once (as the
  operand S/c: common.state_scale), then streams its chunk of q: φ(q),
  den = φ(q)ᵀz + eps (fp32, not on tensor cores), num = φ(q)ᵀS and o = num / den in one pass.
  Neither φ(q) nor den is stored: the backward recomputes them.

q, k, v and o are read and written through their (B, N, H, D) strides; nothing is copied.

Accumulation order. Each loop step adds a whole block's sum (BLOCK_N tokens, reduced inside the
fp32 MMA) to the running fp32 S, so a program's running sum has chunk / BLOCK_N steps (about 50
at Wan 1.3B, 300 at HunyuanVideo on 132 SMs), not N as a token-by-token sum has: measured under
the interpreter (z, fp32 sums of fp32 values, 64-token blocks), 1.2e-7 relative error at 64
steps, 4.4e-7 at 1024, 5e-8 split 8 ways, against 1-3e-7 for PyTorch's fp32 einsum. It grows
like √steps, so very long sequences on a small grid would gain from a two-level sum; at the
video shapes it is the einsum's level. For 16-bit inputs it is dwarfed by the rounding of φ(k)
to a bf16 operand (S: 2.8e-5 at N = 4096, 6e-6 at 65536).

Pre-attention work (q/k norm and RoPE, pre_attention.py) is applied to each block of k or q right
after it is loaded, before φ; a norm over all heads first gets its per-token statistics from
pre_attention.norm_statistics. Without it the kernels are what they were (the helpers compile
away).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import plan
from .common import (block_offsets, bnhd_strides, check_state, emulate_bf16, launch, mask_args,
                     mma, split_range, state_scale, to_operand, to_storage, unit_columns)
from .feature_maps import feature_map, map_id
from .pre_attention import PreLaunch, head_offsets, norm_statistics, pre_forward, pre_params
from .reduce import split_targets


@triton.jit
def _state_kernel(k_ptr, v_ptr, mask_ptr, s_ptr, z_ptr,
                  H, N, D, DV, chunk, s_split_stride, z_split_stride, z_offset,
                  s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd, s_mb, s_mn,
                  pw_ptr, pb_ptr, pst_ptr, cos_ptr, sin_ptr, s_pwh, s_pwd, s_pbh, s_pbd,
                  s_pstb, s_pstn, p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
                  MAP: tl.constexpr, HAS_MASK: tl.constexpr, ATOMIC: tl.constexpr,
                  D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
                  FP32: tl.constexpr, EMULATE_BF16: tl.constexpr, NORM: tl.constexpr,
                  NORM_HEADS: tl.constexpr, NORM_W: tl.constexpr, NORM_B: tl.constexpr,
                  ROPE: tl.constexpr, ROPE_PAIRS: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    tile = tl.program_id(2)
    b = bh // H
    h = bh % H
    dtype = k_ptr.dtype.element_ty
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh + tile * BLOCK_DV * s_vd
    if HAS_MASK:
        m_base = mask_ptr + b.to(tl.int64) * s_mb
    k_offs, d_ok = head_offsets(s_kn, s_kd, D, BLOCK_N, D_PAD, ROPE)
    v_offs, e_ok = block_offsets(s_vn, s_vd, DV - tile * BLOCK_DV, BLOCK_N, BLOCK_DV)
    rows = tl.arange(0, BLOCK_N)
    start, end = split_range(split, chunk, N)
    w_pre, b_pre = pre_params(pw_ptr, pb_ptr, h, D, s_pwh, s_pwd, s_pbh, s_pbd, D_PAD, NORM_W,
                              NORM_B, ROPE)

    acc = tl.zeros((D_PAD, BLOCK_DV), dtype=tl.float32)
    # z on the tensor cores beside S (common.unit_columns: a sum over the block's tokens each
    # step held this kernel at ~40% of its floor on the H200).
    unit = to_operand(unit_columns(BLOCK_N), dtype, EMULATE_BF16)
    z_cols = tl.zeros((D_PAD, 16), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        keep = rows < end - n0
        if HAS_MASK:
            flags = tl.load(m_base + (n0 + rows) * s_mn, mask=keep, other=0)
            keep = keep & (flags != 0)
        # Masked keys are never loaded, so inf or NaN in padding cannot reach S or z.
        x = tl.load(k_base + n0 * s_kn + k_offs, mask=keep[:, None] & d_ok[None, :], other=0.0)
        x = pre_forward(x.to(tl.float32), b, h, n0 + rows, keep, d_ok, w_pre, b_pre, D, pst_ptr,
                        cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps, s_rb, s_rn,
                        s_rh, s_rd, r_start, r_stop, NORM, NORM_HEADS, ROPE, ROPE_PAIRS,
                        BLOCK_N, D_PAD)
        phi = tl.where(keep[:, None], feature_map(x, d_ok, MAP), 0.0)
        vals = tl.load(v_base + n0 * s_vn + v_offs, mask=keep[:, None] & e_ok[None, :],
                       other=0.0)
        # z sums the φ(k) that S multiplies (rounded to the operand dtype), so (S, z) is the
        # exact state of one set of features: the dq pass cancels S against z oᵀ, and a
        # rounding that S sees and z does not doubled its bf16 error (common.state_centre).
        phi = to_operand(phi, dtype, EMULATE_BF16)
        acc = mma(tl.trans(phi), to_operand(vals, dtype, EMULATE_BF16), acc, FP32)
        z_cols = mma(tl.trans(phi), unit, z_cols, FP32)
    z_acc = tl.sum(z_cols, axis=1)

    d = tl.arange(0, D_PAD)
    col = tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    s_offs = split * s_split_stride + bh * (D * DV) + d[:, None] * DV + col[None, :]
    s_ok = (d < D)[:, None] & (col < DV)[None, :]
    z_offs = z_offset + split * z_split_stride + bh * D + d
    z_ok = (d < D) & (tile == 0)  # every tile computes z; the first one writes it
    if ATOMIC:
        tl.atomic_add(s_ptr + s_offs, acc, mask=s_ok, sem="relaxed")
        tl.atomic_add(z_ptr + z_offs, z_acc, mask=z_ok, sem="relaxed")
    else:
        tl.store(s_ptr + s_offs, acc, mask=s_ok)
        tl.store(z_ptr + z_offs, z_acc, mask=z_ok)


@triton.jit
def _output_kernel(q_ptr, s_ptr, z_ptr, o_ptr,
                   H, N, D, DV, chunk, eps,
                   s_qb, s_qn, s_qh, s_qd, s_ob, s_on, s_oh, s_od,
                   pw_ptr, pb_ptr, pst_ptr, cos_ptr, sin_ptr, s_pwh, s_pwd, s_pbh, s_pbd,
                   s_pstb, s_pstn, p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start,
                   r_stop,
                   MAP: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_DV: tl.constexpr, FP32: tl.constexpr, EMULATE_BF16: tl.constexpr,
                   NORM: tl.constexpr, NORM_HEADS: tl.constexpr, NORM_W: tl.constexpr,
                   NORM_B: tl.constexpr, ROPE: tl.constexpr, ROPE_PAIRS: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    tile = tl.program_id(2)
    b = bh // H
    h = bh % H
    dtype = q_ptr.dtype.element_ty
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    o_base = o_ptr + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + tile * BLOCK_DV * s_od
    q_offs, d_ok = head_offsets(s_qn, s_qd, D, BLOCK_N, D_PAD, ROPE)
    o_offs, e_ok = block_offsets(s_on, s_od, DV - tile * BLOCK_DV, BLOCK_N, BLOCK_DV)
    rows = tl.arange(0, BLOCK_N)
    start, end = split_range(split, chunk, N)
    w_pre, b_pre = pre_params(pw_ptr, pb_ptr, h, D, s_pwh, s_pwd, s_pbh, s_pbd, D_PAD, NORM_W,
                              NORM_B, ROPE)

    d = tl.arange(0, D_PAD)
    col = tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    state = tl.load(s_ptr + bh * (D * DV) + d[:, None] * DV + col[None, :],
                    mask=(d < D)[:, None] & (col < DV)[None, :], other=0.0)
    z = tl.load(z_ptr + bh * D + d, mask=d < D, other=0.0)
    # The operand is S/c, not S (common.state_scale): S rounded to fp16 overflowed for long
    # sequences. (Centring it as the dq pass does is not needed here: o is stored in the input
    # dtype, whose rounding is as large as the operand's, and the centre's broadcast in the
    # loop cost 48 registers a thread at D = Dv = 128.)
    scale = state_scale(z)
    state = to_operand(state / scale, dtype, EMULATE_BF16)

    for n0 in range(start, end, BLOCK_N):
        row_ok = rows < end - n0
        x = tl.load(q_base + n0 * s_qn + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        x = pre_forward(x.to(tl.float32), b, h, n0 + rows, row_ok, d_ok, w_pre, b_pre, D, pst_ptr,
                        cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps, s_rb, s_rn,
                        s_rh, s_rd, r_start, r_stop, NORM, NORM_HEADS, ROPE, ROPE_PAIRS,
                        BLOCK_N, D_PAD)
        phi = feature_map(x, d_ok, MAP)
        # den in fp32 from unrounded φ(q) and z: it is a sum of positive terms for the
        # positive maps, and rounding it would bias every output of the row alike.
        den = tl.sum(phi * z[None, :], axis=1) + eps
        num = mma(to_operand(phi, dtype, EMULATE_BF16), state,
                  tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32), FP32)
        tl.store(o_base + n0 * s_on + o_offs,
                 to_storage(num * (scale / den)[:, None], o_ptr.dtype.element_ty, EMULATE_BF16),
                 mask=row_ok[:, None] & e_ok[None, :])


def qkv_bytes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> int:
    """Bytes of q, k and v: what a reducing pass's scratch budget is measured against
    (plan.scratch_budget)."""
    return (q.numel() + k.numel() + v.numel()) * q.element_size()


def compute_state(k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                  k_map: str, state: torch.Tensor, normaliser: torch.Tensor,
                  qkv_size: int, k_pre: Optional[PreLaunch] = None) -> None:
    """state (B, H, D, Dv) <- Σ_j φ(k_j) v_jᵀ and normaliser (B, H, D) <- Σ_j φ(k_j), fp32.
    qkv_size: bytes of q, k and v (the scratch budget's reference)."""
    B, N, H, D = k.shape
    Dv = v.shape[-1]
    k_pre = k_pre or PreLaunch(None, "k")
    check_state(state, normaliser, "forward")
    p = plan.plan_kernel("state", k.device, N, B * H, D, Dv, k.element_size(), reduces=True,
                         qkv_bytes=qkv_size, pre=k_pre.active)
    targets = split_targets(state, normaliser, p.split.count, plan.atomic_reduce())
    mask, s_mb, s_mn = mask_args(key_mask)
    launch(
        _state_kernel, (B * H, p.split.count, p.tiles),
        k, v, mask, targets.matrix, targets.vector, H, N, D, Dv, p.split.chunk,
        targets.matrix_stride, targets.vector_stride, targets.vector_offset,
        *bnhd_strides(k), *bnhd_strides(v), s_mb, s_mn, *k_pre.args(), **k_pre.meta(),
        MAP=map_id(k_map), HAS_MASK=key_mask is not None, ATOMIC=targets.atomic,
        D_PAD=p.d_pad, BLOCK_N=p.config.block_n, BLOCK_DV=p.block_dv,
        FP32=k.dtype == torch.float32, EMULATE_BF16=emulate_bf16(k.dtype),
        num_warps=p.config.num_warps, num_stages=p.config.num_stages)
    targets.finish()


def compute_output(q: torch.Tensor, q_map: str, eps: float, state: torch.Tensor,
                   normaliser: torch.Tensor, o: torch.Tensor,
                   q_pre: Optional[PreLaunch] = None) -> None:
    """o <- φ(q)ᵀ S / (φ(q)ᵀ z + eps) in o's dtype."""
    B, N, H, D = q.shape
    q_pre = q_pre or PreLaunch(None, "q")
    Dv = o.shape[-1]
    check_state(state, normaliser, "forward")
    p = plan.plan_kernel("output", q.device, N, B * H, D, Dv, q.element_size(),
                         pre=q_pre.active)
    launch(
        _output_kernel, (B * H, p.split.count, p.tiles),
        q, state, normaliser, o, H, N, D, Dv, p.split.chunk, eps,
        *bnhd_strides(q), *bnhd_strides(o), *q_pre.args(), **q_pre.meta(),
        MAP=map_id(q_map), D_PAD=p.d_pad, BLOCK_N=p.config.block_n, BLOCK_DV=p.block_dv,
        FP32=q.dtype == torch.float32, EMULATE_BF16=emulate_bf16(q.dtype),
        num_warps=p.config.num_warps, num_stages=p.config.num_stages)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
            q_map: str, k_map: str, eps: float, o: torch.Tensor, state: torch.Tensor,
            normaliser: torch.Tensor, pre=None) -> None:
    """Fills o, state and normaliser (KernelBackend.forward's contract, builtin maps), and the
    statistics of q/k norms over all heads when `pre` has them."""
    q_pre, k_pre = PreLaunch(pre, "q"), PreLaunch(pre, "k")
    for x, side in ((k, k_pre), (q, q_pre)):
        if side.over_heads:
            norm_statistics(x, side)
    compute_state(k, v, key_mask, k_map, state, normaliser, qkv_bytes(q, k, v), k_pre)
    compute_output(q, q_map, eps, state, normaliser, o, q_pre)
