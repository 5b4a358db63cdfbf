"""The Hedgehog forward kernels: the state kernel (S, z over the keys) and the output kernel
(o = φ(q)ᵀS / (φ(q)ᵀz + eps)). φ(k) and φ(q) live only in registers: each block of tokens is
loaded once, multiplied by W on the tensor cores and put through both softmaxes in place.

Grids. The sequence is cut into `splits` contiguous ranges of BLOCK_N-token blocks so that
B·H·splits programs fill the GPU (plan.py picks them); each program loops over its
blocks. The state kernel's partial (S, z) of each split go to a scratch slab that
sum_partials_kernel adds up in split order, so results do not depend on scheduling. The state
kernel also splits by half: program (half, split, b·h) accumulates only the F rows of S that
pair with softmax(±kW), which halves its fp32 accumulator (F × Dv instead of 2F × Dv) and
doubles the programs; the two halves of one split are neighbours in launch order (axis 0), so
the second read of a k, v block is likely an L2 hit.

Pre-attention work (q/k norm and RoPE, ../pre_attention.py) is applied to each loaded block of k
or q before it meets W; without it (NORM = ROPE = 0) the block goes to the product as loaded.

Token offsets: the loop counter is 64-bit and each block's origin is added to the base pointer
in 64 bits, so N × token stride may pass 2^31 (long sequences read from a fused projection);
offsets inside a block stay 32-bit.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import block_offsets, to_operand, to_storage, unit_columns
from ..pre_attention import head_offsets, pre_forward, pre_params
from .helpers import (dot, hedgehog_features, load_scaled_state,
                            load_weight, rows_ok, softmax_rows, store_state_half)


@triton.jit
def hedgehog_state_kernel(
        k_ptr, v_ptr, mask_ptr, w_ptr, s_ptr, z_ptr,
        Nk, H, D, F, Dv, num_blocks, blocks_per_split,
        s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd, s_mb, s_mn, s_wh, s_wd, s_wf,
        s_ss, s_sb, s_sh, s_sf, s_sv, s_zs, s_zb, s_zh, s_zf,
        pw_ptr, pb_ptr, pst_ptr, cos_ptr, sin_ptr, s_pwh, s_pwd, s_pbh, s_pbd, s_pstb, s_pstn,
        p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
        HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
        F_PAD: tl.constexpr, V_PAD: tl.constexpr, TOKEN: tl.constexpr,
        EMULATE_BF16: tl.constexpr, NORM: tl.constexpr, NORM_HEADS: tl.constexpr,
        NORM_W: tl.constexpr, NORM_B: tl.constexpr, ROPE: tl.constexpr,
        ROPE_PAIRS: tl.constexpr):
    """Partial S (split, b, h, 2F, Dv) and z (split, b, h, 2F): one split, one half."""
    half = tl.program_id(0)
    split = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    sign = 1.0 - 2.0 * half.to(tl.float32)
    f_ok = tl.arange(0, F_PAD) < F
    w = load_weight(w_ptr, h, D, F, s_wh, s_wd, s_wf, D_PAD, F_PAD, TOKEN, EMULATE_BF16, ROPE)
    w_pre, b_pre = pre_params(pw_ptr, pb_ptr, h, D, s_pwh, s_pwd, s_pbh, s_pbd, D_PAD, NORM_W,
                              NORM_B, ROPE)
    k_offs, d_ok = head_offsets(s_kn, s_kd, D, BLOCK_N, D_PAD, ROPE)
    v_offs, v_ok = block_offsets(s_vn, s_vd, Dv, BLOCK_N, V_PAD)
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    acc_s = tl.zeros((F_PAD, V_PAD), dtype=tl.float32)
    # z on the tensor cores beside S (common.unit_columns: a sum over the block's tokens each
    # step held the builtin maps' state kernel at ~40% of its floor on the H200).
    unit = unit_columns(BLOCK_N)
    acc_z_cols = tl.zeros((F_PAD, 16), dtype=tl.float32)
    first = split.to(tl.int64) * blocks_per_split
    for t in range(first, tl.minimum(first + blocks_per_split, num_blocks)):
        start = t * BLOCK_N
        keep = rows_ok(mask_ptr, b, start, Nk, s_mb, s_mn, HAS_MASK, BLOCK_N)
        # Masked and out-of-range keys are never read (whatever they hold, NaN included, cannot
        # leak): their rows load as zeros, so v = 0, and φ is zeroed below (softmax(0) is not).
        k = tl.load(k_base + start * s_kn + k_offs, mask=keep[:, None] & d_ok[None, :],
                    other=0.0)
        if NORM != 0 or ROPE != 0:
            tok = start + tl.arange(0, BLOCK_N)
            k = pre_forward(k.to(tl.float32), b, h, tok, keep, d_ok, w_pre, b_pre,
                            D, pst_ptr, cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps,
                            s_rb, s_rn, s_rh, s_rd, r_start, r_stop, NORM, NORM_HEADS, ROPE,
                            ROPE_PAIRS, BLOCK_N, D_PAD)
        v = tl.load(v_base + start * s_vn + v_offs, mask=keep[:, None] & v_ok[None, :],
                    other=0.0)
        logits = dot(k, w, tl.zeros((BLOCK_N, F_PAD), dtype=tl.float32), TOKEN, EMULATE_BF16)
        phi = tl.where(keep[:, None], softmax_rows(sign * logits, f_ok), 0.0)
        # z sums the same φ that S multiplies (rounded to the input dtype), so a value shared by
        # every key comes back exactly: o = (φ(q)ᵀS)/(φ(q)ᵀz) up to eps.
        phi = to_operand(phi, TOKEN, EMULATE_BF16).to(tl.float32)
        acc_s = dot(tl.trans(phi), v, acc_s, TOKEN, EMULATE_BF16)
        acc_z_cols = dot(tl.trans(phi), unit, acc_z_cols, TOKEN, EMULATE_BF16)
    acc_z = tl.sum(acc_z_cols, axis=1)
    s_out = s_ptr + split.to(tl.int64) * s_ss + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh
    z_out = z_ptr + split.to(tl.int64) * s_zs + b.to(tl.int64) * s_zb + h.to(tl.int64) * s_zh
    store_state_half(s_out, half, acc_s, acc_z, F, Dv, s_sf, s_sv, z_out, s_zf, F_PAD, V_PAD)


@triton.jit
def hedgehog_output_kernel(
        q_ptr, w_ptr, s_ptr, z_ptr, o_ptr, eps,
        Nq, H, D, F, Dv, num_blocks, blocks_per_split,
        s_qb, s_qn, s_qh, s_qd, s_wh, s_wd, s_wf, s_sb, s_sh, s_sf, s_sv, s_zb, s_zh, s_zf,
        s_ob, s_on, s_oh, s_ov,
        pw_ptr, pb_ptr, pst_ptr, cos_ptr, sin_ptr, s_pwh, s_pwd, s_pbh, s_pbd, s_pstb, s_pstn,
        p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
        BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, F_PAD: tl.constexpr, V_PAD: tl.constexpr,
        TOKEN: tl.constexpr, EMULATE_BF16: tl.constexpr, NORM: tl.constexpr,
        NORM_HEADS: tl.constexpr, NORM_W: tl.constexpr, NORM_B: tl.constexpr, ROPE: tl.constexpr,
        ROPE_PAIRS: tl.constexpr):
    """o for the query blocks of one split of one (b, h); W, S and z are loaded once."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    f_ok = tl.arange(0, F_PAD) < F
    w = load_weight(w_ptr, h, D, F, s_wh, s_wd, s_wf, D_PAD, F_PAD, TOKEN, EMULATE_BF16, ROPE)
    w_pre, b_pre = pre_params(pw_ptr, pb_ptr, h, D, s_pwh, s_pwd, s_pbh, s_pbd, D_PAD, NORM_W,
                              NORM_B, ROPE)
    # o = φᵀ(S/c) / (φᵀ(z/c) + eps/c): S/c is a safe operand in the input dtype.
    s_a, s_c, z_a, z_c, scale, _ = load_scaled_state(
        s_ptr, z_ptr, b, h, F, Dv, s_sb, s_sh, s_sf, s_sv, s_zb, s_zh, s_zf,
        F_PAD, V_PAD, TOKEN, EMULATE_BF16, False)
    eps_scaled = eps * scale
    q_offs, d_ok = head_offsets(s_qn, s_qd, D, BLOCK_N, D_PAD, ROPE)
    o_offs, v_ok = block_offsets(s_on, s_ov, Dv, BLOCK_N, V_PAD)
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    o_base = o_ptr + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh
    first = split.to(tl.int64) * blocks_per_split
    for t in range(first, tl.minimum(first + blocks_per_split, num_blocks)):
        start = t * BLOCK_N
        n_ok = (start + tl.arange(0, BLOCK_N)) < Nq
        q = tl.load(q_base + start * s_qn + q_offs, mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if NORM != 0 or ROPE != 0:
            tok = start + tl.arange(0, BLOCK_N)
            q = pre_forward(q.to(tl.float32), b, h, tok, n_ok, d_ok, w_pre, b_pre,
                            D, pst_ptr, cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps,
                            s_rb, s_rn, s_rh, s_rd, r_start, r_stop, NORM, NORM_HEADS, ROPE,
                            ROPE_PAIRS, BLOCK_N, D_PAD)
        a, c = hedgehog_features(q, w, f_ok, BLOCK_N, F_PAD, TOKEN, EMULATE_BF16)
        num = dot(a, s_a, tl.zeros((BLOCK_N, V_PAD), dtype=tl.float32), TOKEN, EMULATE_BF16)
        num = dot(c, s_c, num, TOKEN, EMULATE_BF16)
        den = tl.sum(a * z_a[None, :], axis=1) + tl.sum(c * z_c[None, :], axis=1) + eps_scaled
        tl.store(o_base + start * s_on + o_offs,
                 to_storage(num / den[:, None], o_ptr.dtype.element_ty, EMULATE_BF16),
                 mask=n_ok[:, None] & v_ok[None, :])
