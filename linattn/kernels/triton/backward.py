"""Backward (kernels.md): with den_i = φ(q_i)ᵀz + eps and g_i = S do_i,

    dφ(q_i) = g_i / den_i + z · dden_i,
    dden_i = −(do_i · o_i) / den_i = −(φ(q_i) · g_i) / den_i²
    dS = Σ_i φ(q_i) (do_i / den_i)ᵀ,        dz = Σ_i φ(q_i) dden_i
    dφ(k_j) = dS v_j + dz,                  dv_j = dSᵀ φ(k_j)

do_i · o_i is taken as φ(q_i) · g_i (the same number, since o_i = Sᵀφ(q_i) / den_i), so the
backward needs neither o nor a second product with S. φ(q), φ(k) and den are recomputed from q,
k, z; nothing per token is stored between the two kernels.

* dq kernel, grid (B·H, splits, 1): streams its chunk of q and do; writes dq and an fp32 partial
  of dS (one Dv tile) and of dz' = dz + dS m (below), and m itself. When Dv needs more than one
  tile, a second launch of the same kernel (COMPUTE_DQ = False) accumulates the other dS tiles:
  dq needs the whole of g = S do, while a dS accumulator of every tile at once would not fit in
  registers.
* the partials are summed in split order (reduce.py), unless there is one split.
* dk/dv kernel, grid (B·H, splits, 1), again with a second launch for further Dv tiles of dv
  (or, where the config is not fused, one launch for dk and one for every dv tile: each then
  holds a single dS operand, which 3xTF32 fp32 dots need to fit in shared memory).

Scratch: dS, dz' and m (B·H·(D·(Dv + 1) + Dv) fp32) and, when split, one partial of dS and
dz' per split, capped by plan.scratch_budget; no per-block partials.

dS enters the key pass as a 16-bit operand whose error (its own rounding, and φ(q) and do/den
rounded in its products) is the same for every key: with positive-mean values it added up
coherently, dS v_j + dz cancels, and a sum over keys of dk (Hedgehog's dW_k) was 100-250% off
at N = 8192 in bf16. With m the forward's centre (common.state_centre, about the mean of v),
the key pass computes dφ(k_j) = dS_op v_j + (dz' − dS_op m), where dz' = dz + dS m is summed
in fp32 by the dq pass (φ·dden' per query: no operand rounding). That is dS v_j + dz exactly,
and the operand's error multiplies v_j − m, which no longer adds up: dk 2x and that sum 300x
more accurate in a float64 emulation, nothing lost for zero-mean values.

Pre-attention work (q/k norm and RoPE, pre_attention.py): the dq and dk passes recompute what φ
saw from the raw q or k block, take φ's gradient back through RoPE and the norm, and write each
program's share of the norm's dw and db (one fp32 row per split and batch, summed in order by
reduce.py). A norm over all heads reads the per-token statistics the forward wrote, also writes
per-(token, head) sums, and a per-token kernel finishes dq or dk once every head is done.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...ops import alloc
from . import plan
from .common import (block_offsets, bnhd_strides, cdiv, check_state, emulate_bf16, launch,
                     mask_args, mma, padded_dim, split_range, state_centre, state_scale,
                     to_operand, to_storage)
from .feature_maps import feature_map, feature_map_backward, map_id
from .forward import qkv_bytes
from .pre_attention import (PreLaunch, finish_norm_over_heads, head_offsets, pre_backward,
                            pre_forward, pre_params, reduce_norm_grads, store_norm_grads,
                            store_norm_sums)
from .reduce import split_targets


@triton.jit
def fp16_row_balance(inv_den):
    """(σ, 1/σ) per row, σ = 2^⌊log2(den)/2⌋ from den = 1/inv_den's fp32 exponent bits, clamped
    to [1, 2^14]: powers of two (so scaling by them is exact), built with integer operations
    (exact on a GPU and in the interpreter alike). Scaling φ by 1/σ and do/den by σ leaves
    their product unchanged and puts both near 1/√den, inside fp16's normal range up to den =
    2^28. σ ≥ 1: φ is never scaled up (no overflow), and a den below 1 keeps today's operands."""
    den_exponent = (((1.0 / inv_den).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    half = tl.minimum(tl.maximum(den_exponent >> 1, 0), 14)
    up = ((half + 127) << 23).to(tl.float32, bitcast=True)
    down = ((127 - half) << 23).to(tl.float32, bitcast=True)
    return up, down


@triton.jit
def _dq_kernel(q_ptr, do_ptr, s_ptr, z_ptr, dq_ptr, ds_ptr, dz_ptr, m_ptr,
               H, N, D, DV, chunk, eps, ds_split_stride, dz_split_stride, dz_offset,
               first_tile,
               s_qb, s_qn, s_qh, s_qd, s_gb, s_gn, s_gh, s_gd, s_xb, s_xn, s_xh, s_xd,
               pw_ptr, pb_ptr, pst_ptr, cos_ptr, sin_ptr, s_pwh, s_pwd, s_pbh, s_pbd,
               s_pstb, s_pstn, p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
               pg_ptr, s_pgr, psum_ptr, s_psb, s_psn,
               MAP: tl.constexpr, ATOMIC: tl.constexpr, COMPUTE_DQ: tl.constexpr,
               D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_DV: tl.constexpr, FP32: tl.constexpr, EMULATE_BF16: tl.constexpr,
               NORM: tl.constexpr, NORM_HEADS: tl.constexpr, NORM_W: tl.constexpr,
               NORM_B: tl.constexpr, ROPE: tl.constexpr, ROPE_PAIRS: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    tile = first_tile + tl.program_id(2)
    b = bh // H
    h = bh % H
    dtype = q_ptr.dtype.element_ty
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    do_base = do_ptr + b.to(tl.int64) * s_gb + h.to(tl.int64) * s_gh
    q_offs, d_ok = head_offsets(s_qn, s_qd, D, BLOCK_N, D_PAD, ROPE)
    dot_offs, t_ok = block_offsets(s_gn, s_gd, DV - tile * BLOCK_DV, BLOCK_N, BLOCK_DV)
    dot_offs += tile * BLOCK_DV * s_gd
    rows = tl.arange(0, BLOCK_N)
    start, end = split_range(split, chunk, N)
    w_pre, b_pre = pre_params(pw_ptr, pb_ptr, h, D, s_pwh, s_pwd, s_pbh, s_pbd, D_PAD, NORM_W,
                              NORM_B, ROPE)

    d = tl.arange(0, D_PAD)
    z = tl.load(z_ptr + bh * D + d, mask=d < D, other=0.0)
    if COMPUTE_DQ:
        dq_base = dq_ptr + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh
        dq_offs, _ = head_offsets(s_xn, s_xd, D, BLOCK_N, D_PAD, ROPE)
        dw_acc = tl.zeros((D_PAD,), dtype=tl.float32)
        db_acc = tl.zeros((D_PAD,), dtype=tl.float32)
        do_offs, e_ok = block_offsets(s_gn, s_gd, DV, BLOCK_N, DV_PAD)
        e = tl.arange(0, DV_PAD)
        # Sᵀ of the head (DV_PAD, D_PAD), centred and scaled before it is rounded to the operand
        # dtype (common.state_centre, state_scale): the right operand of g' = c · do (S'/c)ᵀ.
        state_t = tl.load(s_ptr + bh * (D * DV) + d[None, :] * DV + e[:, None],
                          mask=(d < D)[None, :] & (e < DV)[:, None], other=0.0)
        centre = state_centre(state_t, z[None, :], 1)
        tl.store(m_ptr + bh * DV + e, centre, mask=(e < DV) & (split == 0))
        scale = state_scale(z)
        state_t = to_operand((state_t - centre[:, None] * z[None, :]) / scale, dtype,
                             EMULATE_BF16)
        dz_acc = tl.zeros((D_PAD,), dtype=tl.float32)
    ds_acc = tl.zeros((D_PAD, BLOCK_DV), dtype=tl.float32)

    for n0 in range(start, end, BLOCK_N):
        row_ok = rows < end - n0
        tok = n0 + rows
        x = tl.load(q_base + n0 * s_qn + q_offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        x = pre_forward(x.to(tl.float32), b, h, tok, row_ok, d_ok, w_pre, b_pre, D, pst_ptr,
                        cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps, s_rb, s_rn,
                        s_rh, s_rd, r_start, r_stop, NORM, NORM_HEADS, ROPE, ROPE_PAIRS,
                        BLOCK_N, D_PAD)
        phi = tl.where(row_ok[:, None], feature_map(x, d_ok, MAP), 0.0)
        inv_den = 1.0 / (tl.sum(phi * z[None, :], axis=1) + eps)
        if COMPUTE_DQ:
            grad = tl.load(do_base + n0 * s_gn + do_offs, mask=row_ok[:, None] & e_ok[None, :],
                           other=0.0)
            # g' = S' do and mu = m·do (g = g' + z mu); dφ from g' (state_centre's formula).
            g = mma(to_operand(grad, dtype, EMULATE_BF16), state_t,
                    tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32), FP32) * scale
            mu = tl.sum(grad.to(tl.float32) * centre[None, :], axis=1)
            dden = (eps * mu - tl.sum(phi * g, axis=1)) * inv_den * inv_den
            dphi = g * inv_den[:, None] + z[None, :] * dden[:, None]
            dx = feature_map_backward(x, phi, dphi, MAP)
            if NORM != 0 or ROPE != 0:
                # The raw block again (an L1/L2 hit): cheaper than keeping it live beside φ.
                x_raw = tl.load(q_base + n0 * s_qn + q_offs,
                                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                dx, dw, db, sum_g, sum_gx = pre_backward(
                    dx, x_raw.to(tl.float32), b, h, tok, row_ok, d_ok, w_pre, D, pst_ptr,
                    cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps, s_rb, s_rn, s_rh,
                    s_rd, r_start, r_stop, NORM, NORM_HEADS, ROPE, ROPE_PAIRS, BLOCK_N, D_PAD)
                dw_acc += dw
                db_acc += db
                store_norm_sums(psum_ptr, b, h, tok, row_ok & (tok >= p_start) & (tok < p_stop),
                                sum_g, sum_gx, s_psb, s_psn, H, NORM_HEADS)
            tl.store(dq_base + n0 * s_xn + dq_offs, to_storage(dx, dq_ptr.dtype.element_ty,
                                                               EMULATE_BF16),
                     mask=row_ok[:, None] & d_ok[None, :])
            # dz' = Σ φ dden' = dz + dS m (the true dden is dden' − μ/den): see the docstring.
            dz_acc += tl.sum(phi * dden[:, None], axis=0)
            if BLOCK_DV == DV_PAD:
                grad_tile = grad
            else:
                grad_tile = tl.load(do_base + n0 * s_gn + dot_offs,
                                    mask=row_ok[:, None] & t_ok[None, :], other=0.0)
        else:
            grad_tile = tl.load(do_base + n0 * s_gn + dot_offs,
                                mask=row_ok[:, None] & t_ok[None, :], other=0.0)
        if dtype == tl.float16:
            # do/den shrinks like 1/N (den grows with the keys): rounded to an fp16 operand it
            # fell below fp16's normal range (6.1e-5) and lost bits, dk and dv 9e-3 off at
            # N = 100003. φ_i/σ_i ⊗ do_i σ_i/den_i with σ_i ≈ √den_i a power of two is the same
            # product, exact, with both operands ~1/√den_i (fp16_row_balance).
            up, down = fp16_row_balance(inv_den)
            dnum = grad_tile.to(tl.float32) * (inv_den * up)[:, None]
            phi_ds = phi * down[:, None]
        else:
            dnum = grad_tile.to(tl.float32) * inv_den[:, None]
            phi_ds = phi
        ds_acc = mma(tl.trans(to_operand(phi_ds, dtype, EMULATE_BF16)),
                     to_operand(dnum, dtype, EMULATE_BF16), ds_acc, FP32)

    col = tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
    ds_offs = split * ds_split_stride + bh * (D * DV) + d[:, None] * DV + col[None, :]
    ds_ok = (d < D)[:, None] & (col < DV)[None, :]
    if ATOMIC:
        tl.atomic_add(ds_ptr + ds_offs, ds_acc, mask=ds_ok, sem="relaxed")
    else:
        tl.store(ds_ptr + ds_offs, ds_acc, mask=ds_ok)
    if COMPUTE_DQ:
        store_norm_grads(pg_ptr, split * (tl.num_programs(0) // H) + b, h, dw_acc, db_acc, D,
                         s_pgr, H * D, D_PAD, NORM, ROPE)
        dz_offs = dz_offset + split * dz_split_stride + bh * D + d
        if ATOMIC:
            tl.atomic_add(dz_ptr + dz_offs, dz_acc, mask=d < D, sem="relaxed")
        else:
            tl.store(dz_ptr + dz_offs, dz_acc, mask=d < D)


@triton.jit
def _dkdv_kernel(k_ptr, v_ptr, mask_ptr, ds_ptr, dz_ptr, m_ptr, dk_ptr, dv_ptr,
                 H, N, D, DV, chunk, first_tile,
                 s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd, s_mb, s_mn,
                 s_xb, s_xn, s_xh, s_xd, s_yb, s_yn, s_yh, s_yd,
                 pw_ptr, pb_ptr, pst_ptr, cos_ptr, sin_ptr, s_pwh, s_pwd, s_pbh, s_pbd,
                 s_pstb, s_pstn, p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start,
                 r_stop, pg_ptr, s_pgr, psum_ptr, s_psb, s_psn,
                 MAP: tl.constexpr, HAS_MASK: tl.constexpr, COMPUTE_DK: tl.constexpr,
                 COMPUTE_DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, FP32: tl.constexpr,
                 EMULATE_BF16: tl.constexpr, NORM: tl.constexpr, NORM_HEADS: tl.constexpr,
                 NORM_W: tl.constexpr, NORM_B: tl.constexpr, ROPE: tl.constexpr,
                 ROPE_PAIRS: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    tile = first_tile + tl.program_id(2)
    b = bh // H
    h = bh % H
    dtype = k_ptr.dtype.element_ty
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    k_offs, d_ok = head_offsets(s_kn, s_kd, D, BLOCK_N, D_PAD, ROPE)
    rows = tl.arange(0, BLOCK_N)
    start, end = split_range(split, chunk, N)
    w_pre, b_pre = pre_params(pw_ptr, pb_ptr, h, D, s_pwh, s_pwd, s_pbh, s_pbd, D_PAD, NORM_W,
                              NORM_B, ROPE)
    if HAS_MASK:
        m_base = mask_ptr + b.to(tl.int64) * s_mb
    d = tl.arange(0, D_PAD)
    if COMPUTE_DV:
        dv_base = dv_ptr + b.to(tl.int64) * s_yb + h.to(tl.int64) * s_yh + tile * BLOCK_DV * s_yd
        dv_offs, t_ok = block_offsets(s_yn, s_yd, DV - tile * BLOCK_DV, BLOCK_N, BLOCK_DV)
        col = tile * BLOCK_DV + tl.arange(0, BLOCK_DV)
        ds_tile = tl.load(ds_ptr + bh * (D * DV) + d[:, None] * DV + col[None, :],
                          mask=(d < D)[:, None] & (col < DV)[None, :], other=0.0)
        ds_tile = to_operand(ds_tile, dtype, EMULATE_BF16)
    if COMPUTE_DK:
        v_base = v_ptr + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
        dk_base = dk_ptr + b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh
        v_offs, e_ok = block_offsets(s_vn, s_vd, DV, BLOCK_N, DV_PAD)
        dk_offs, _ = head_offsets(s_xn, s_xd, D, BLOCK_N, D_PAD, ROPE)
        dw_acc = tl.zeros((D_PAD,), dtype=tl.float32)
        db_acc = tl.zeros((D_PAD,), dtype=tl.float32)
        # dSᵀ of the whole head (DV_PAD, D_PAD), for dφ(k) = v dSᵀ + dz; when the dv tile is
        # all of dS it is reused (a second copy would double the shared memory).
        if COMPUTE_DV and BLOCK_DV == DV_PAD:
            ds_t = tl.trans(ds_tile)
        else:
            e = tl.arange(0, DV_PAD)
            ds_t = tl.load(ds_ptr + bh * (D * DV) + d[None, :] * DV + e[:, None],
                           mask=(d < D)[None, :] & (e < DV)[:, None], other=0.0)
            ds_t = to_operand(ds_t, dtype, EMULATE_BF16)
        # dz' − dS_op m, so that dφ(k) = v dS_opᵀ + this is dS v + dz (module docstring).
        e = tl.arange(0, DV_PAD)
        centre = tl.load(m_ptr + bh * DV + e, mask=e < DV, other=0.0)
        dz = (tl.load(dz_ptr + bh * D + d, mask=d < D, other=0.0)
              - tl.sum(ds_t.to(tl.float32) * centre[:, None], axis=0))

    for n0 in range(start, end, BLOCK_N):
        row_ok = rows < end - n0
        keep = row_ok
        if HAS_MASK:
            flags = tl.load(m_base + (n0 + rows) * s_mn, mask=row_ok, other=0)
            keep = keep & (flags != 0)
        tok = n0 + rows
        x = tl.load(k_base + n0 * s_kn + k_offs, mask=keep[:, None] & d_ok[None, :], other=0.0)
        x = pre_forward(x.to(tl.float32), b, h, tok, keep, d_ok, w_pre, b_pre, D, pst_ptr,
                        cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps, s_rb, s_rn,
                        s_rh, s_rd, r_start, r_stop, NORM, NORM_HEADS, ROPE, ROPE_PAIRS,
                        BLOCK_N, D_PAD)
        phi = tl.where(keep[:, None], feature_map(x, d_ok, MAP), 0.0)
        if COMPUTE_DK:
            vals = tl.load(v_base + n0 * s_vn + v_offs, mask=keep[:, None] & e_ok[None, :],
                           other=0.0)
            dphi = mma(to_operand(vals, dtype, EMULATE_BF16), ds_t,
                       tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32), FP32) + dz[None, :]
            # A masked key contributed nothing, so its gradient is exactly 0.
            dx = tl.where(keep[:, None], feature_map_backward(x, phi, dphi, MAP), 0.0)
            if NORM != 0 or ROPE != 0:
                x_raw = tl.load(k_base + n0 * s_kn + k_offs, mask=keep[:, None] & d_ok[None, :],
                                other=0.0)
                dx, dw, db, sum_g, sum_gx = pre_backward(
                    dx, x_raw.to(tl.float32), b, h, tok, keep, d_ok, w_pre, D, pst_ptr,
                    cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps, s_rb, s_rn, s_rh,
                    s_rd, r_start, r_stop, NORM, NORM_HEADS, ROPE, ROPE_PAIRS, BLOCK_N, D_PAD)
                dw_acc += dw
                db_acc += db
                store_norm_sums(psum_ptr, b, h, tok, keep & (tok >= p_start) & (tok < p_stop),
                                sum_g, sum_gx, s_psb, s_psn, H, NORM_HEADS)
            tl.store(dk_base + n0 * s_xn + dk_offs, to_storage(dx, dk_ptr.dtype.element_ty,
                                                               EMULATE_BF16),
                     mask=row_ok[:, None] & d_ok[None, :])
        if COMPUTE_DV:
            # φ = 0 for a masked key, so its dv is exactly 0.
            dv = mma(to_operand(phi, dtype, EMULATE_BF16), ds_tile,
                     tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32), FP32)
            tl.store(dv_base + n0 * s_yn + dv_offs, to_storage(dv, dv_ptr.dtype.element_ty,
                                                               EMULATE_BF16),
                     mask=row_ok[:, None] & t_ok[None, :])
    if COMPUTE_DK:
        store_norm_grads(pg_ptr, split * (tl.num_programs(0) // H) + b, h, dw_acc, db_acc, D,
                         s_pgr, H * D, D_PAD, NORM, ROPE)


def _launch_options(config: plan.KernelConfig, dtype: torch.dtype) -> dict:
    return dict(FP32=dtype == torch.float32, EMULATE_BF16=emulate_bf16(dtype),
                num_warps=config.num_warps, num_stages=config.num_stages)


def state_gradients(do: torch.Tensor, q: torch.Tensor, q_map: str, eps: float,
                    state: torch.Tensor, normaliser: torch.Tensor, dq: torch.Tensor,
                    d_state: torch.Tensor, d_normaliser: torch.Tensor, centre: torch.Tensor,
                    qkv_size: int, q_pre: Optional[PreLaunch] = None,
                    d_norm: tuple = (None, None)) -> None:
    """dq, and dS (B·H·D·Dv), dz' = dz + dS m (B·H·D) and m (B·H·Dv) into contiguous fp32
    buffers (m: common.state_centre of the forward's S, z; the module docstring says why), and
    the q norm's weight and bias gradients into d_norm.
    qkv_size: bytes of q, k and v (the scratch budget's reference)."""
    q_pre = q_pre or PreLaunch(None, "q")
    B, N, H, D = q.shape
    Dv = do.shape[-1]
    p = plan.plan_kernel("dq", q.device, N, B * H, D, Dv, q.element_size(), reduces=True,
                         qkv_bytes=qkv_size, pre=q_pre.active)
    targets = split_targets(d_state, d_normaliser, p.split.count, plan.atomic_reduce())
    partials = q_pre.grad_partials(p.split.count * B, H, D, q.device)
    sums = q_pre.row_sums(q)
    args = (q, do, state, normaliser, dq, targets.matrix, targets.vector, centre, H, N, D, Dv,
            p.split.chunk, eps, targets.matrix_stride, targets.vector_stride,
            targets.vector_offset)
    strides = (*bnhd_strides(q), *bnhd_strides(do), *bnhd_strides(dq), *q_pre.args(),
               *q_pre.grad_args(partials, sums))
    meta = dict(MAP=map_id(q_map), ATOMIC=targets.atomic, D_PAD=p.d_pad, DV_PAD=p.dv_pad,
                BLOCK_N=p.config.block_n, BLOCK_DV=p.block_dv,
                **_launch_options(p.config, q.dtype), **q_pre.meta())
    grid = (B * H, p.split.count)
    launch(_dq_kernel, (*grid, 1), *args, 0, *strides, COMPUTE_DQ=True, **meta)
    if p.tiles > 1:
        launch(_dq_kernel, (*grid, p.tiles - 1), *args, 1, *strides, COMPUTE_DQ=False, **meta)
    targets.finish()
    reduce_norm_grads(partials, *d_norm)
    if q_pre.over_heads:
        finish_norm_over_heads(q, dq, q_pre, sums, None)


def key_gradients(k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                  k_map: str, d_state: torch.Tensor, d_normaliser: torch.Tensor,
                  centre: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                  k_pre: Optional[PreLaunch] = None, d_norm: tuple = (None, None)) -> None:
    """dk = φ'(k)ᵀ(dS v + dz) and dv = dSᵀ φ(k); 0 for masked keys (and the k norm's weight and
    bias gradients into d_norm). d_normaliser holds dz' = dz + dS m and centre m
    (state_gradients)."""
    k_pre = k_pre or PreLaunch(None, "k")
    B, N, H, D = k.shape
    Dv = v.shape[-1]
    p = plan.plan_kernel("dkdv", k.device, N, B * H, D, Dv, k.element_size(),
                         pre=k_pre.active)
    tiles = p.tiles
    mask, s_mb, s_mn = mask_args(key_mask)
    partials = k_pre.grad_partials(p.split.count * B, H, D, k.device)
    sums = k_pre.row_sums(k)
    args = (k, v, mask, d_state, d_normaliser, centre, dk, dv, H, N, D, Dv, p.split.chunk)
    strides = (*bnhd_strides(k), *bnhd_strides(v), s_mb, s_mn, *bnhd_strides(dk),
               *bnhd_strides(dv), *k_pre.args(), *k_pre.grad_args(partials, sums))
    meta = dict(MAP=map_id(k_map), HAS_MASK=key_mask is not None, D_PAD=p.d_pad,
                DV_PAD=p.dv_pad, BLOCK_N=p.config.block_n, BLOCK_DV=p.block_dv,
                **_launch_options(p.config, k.dtype), **k_pre.meta())
    grid = (B * H, p.split.count)
    if p.config.fused:
        # dk and the first dv tile in one pass over k and v; further dv tiles after it.
        launch(_dkdv_kernel, (*grid, 1), *args, 0, *strides, COMPUTE_DK=True, COMPUTE_DV=True,
               **meta)
        if tiles > 1:
            launch(_dkdv_kernel, (*grid, tiles - 1), *args, 1, *strides, COMPUTE_DK=False,
                   COMPUTE_DV=True, **meta)
    else:
        # Separate passes hold one dS operand each (see KernelConfig.fused).
        launch(_dkdv_kernel, (*grid, 1), *args, 0, *strides, COMPUTE_DK=True, COMPUTE_DV=False,
               **meta)
        launch(_dkdv_kernel, (*grid, tiles), *args, 0, *strides, COMPUTE_DK=False,
               COMPUTE_DV=True, **meta)
    reduce_norm_grads(partials, *d_norm)
    if k_pre.over_heads:
        finish_norm_over_heads(k, dk, k_pre, sums, key_mask)


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             key_mask: Optional[torch.Tensor], q_map: str, k_map: str, eps: float,
             state: torch.Tensor, normaliser: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
             dv: torch.Tensor, pre=None, d_pre: tuple = (None, None, None, None)) -> None:
    """Fills dq, dk, dv (KernelBackend.backward's contract, builtin maps), and the q/k norms'
    weight and bias gradients (d_pre) when `pre` has norms."""
    check_state(state, normaliser, "backward")
    B, _, H, D = q.shape
    Dv = v.shape[-1]
    # dS, dz' and m in one fp32 buffer: the scratch the backward needs whatever the split.
    grads = alloc.empty(B * H * (D * (Dv + 1) + Dv), dtype=torch.float32, device=q.device)
    # split_with_sizes: the same views as split() at under half its host time (no Python layer).
    d_state, d_normaliser, centre = grads.split_with_sizes(
        [B * H * D * Dv, B * H * D, B * H * Dv])
    state_gradients(do, q, q_map, eps, state, normaliser, dq, d_state, d_normaliser, centre,
                    qkv_bytes(q, k, v), PreLaunch(pre, "q"), d_pre[:2])
    key_gradients(k, v, key_mask, k_map, d_state, d_normaliser, centre, dk, dv,
                  PreLaunch(pre, "k"), d_pre[2:])
