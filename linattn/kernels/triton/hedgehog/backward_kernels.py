"""The Hedgehog backward kernels. φ is recomputed from q, k and W in registers, never loaded.

With num_i = Sᵀφ(q_i), den_i = zᵀφ(q_i) + eps, u_i = S do_i (so do_i·num_i = φ(q_i)·u_i):

    dden_i = −(φ(q_i)·u_i) / den_i²           dφ(q_i) = u_i / den_i + dden_i z
    dS = Σ_i φ(q_i) (do_i / den_i)ᵀ            dz = Σ_i φ(q_i) dden_i
    dφ(k_j) = dS v_j + dz                       dv_j = dSᵀ φ(k_j)
    dL = vjp(a, dφ_a) − vjp(c, dφ_c)           vjp(p, dp) = p ⊙ (dp − ⟨dp, p⟩)
    dx = dL Wᵀ                                  dW = Σ_tokens xᵀ dL
    (L = xW, a = softmax(L), c = softmax(−L); φ = [a, c])

Three passes, each a loop over the blocks of one sequence split (forward_kernels.py
explains splits and the 64-bit token offsets):

1. query pass (splits, B·H): dq, the partial dW_q of its split, and two fp32 numbers per query,
   1/den_i and dden'_i, kept for pass 2 (8 bytes per token and head: ~3% of a bf16 q at D = 128).
   S enters scaled by 1/(number of kept keys), as in the output kernel (output_scale), and
   centred (common.state_centre); the centre m is written out for pass 3, and dden' is the
   centred dden, so that pass 2's dz' = Σ φ dden' is dz + dS m.
2. state-gradient pass (2, splits, B·H): partial dS, dz of one half. With 1/den and dden stored
   it needs no S at all, only q, do and W, so its accumulator is one F × Dv half; computing dS
   in pass 1 instead would hold 2F × Dv + D × F fp32 accumulators in one program.
3. key pass (splits, B·H): dk, dv and the partial dW_k, from the summed dS, dz' and m:
   dφ(k) = dS_op v + (dz' − dS_op m) is dS v + dz exactly, with the 16-bit dS operand's error
   multiplying v − m instead of v, so that it does not add up over the keys in dW_k (it did:
   134% off at N = 8192 with positive values). triton/backward.py's docstring says more.

Pre-attention work (q/k norm and RoPE, ../pre_attention.py): every pass recomputes what the map
saw from the raw block; the query and key passes take dx back through RoPE and the norm and
write their share of the norm's dw, db (and, for a norm over all heads, per-row sums that
a per-token kernel finishes dq or dk with).
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..common import block_offsets, to_operand, to_storage
from ..pre_attention import (head_columns, head_offsets, pre_backward, pre_forward, pre_params,
                             store_norm_grads, store_norm_sums)
from .helpers import (dot, hedgehog_features, hedgehog_logits_grad, load_scaled_state,
                            load_state_halves,
                            load_vector_halves, load_weight, rows_ok, softmax_rows,
                            store_state_half)


@triton.jit
def _store_weight_grad(dw_ptr, split, b, h, acc, D, F, s_ws, s_wb, s_wh, s_wd, s_wf,
                       D_PAD: tl.constexpr, F_PAD: tl.constexpr, EMULATE_DW: tl.constexpr,
                       ROPE: tl.constexpr):
    offs_d, d_ok = head_columns(D, D_PAD, ROPE)
    offs_f = tl.arange(0, F_PAD)
    base = (dw_ptr + split.to(tl.int64) * s_ws + b.to(tl.int64) * s_wb
            + h.to(tl.int64) * s_wh)
    tl.store(base + offs_d[:, None] * s_wd + offs_f[None, :] * s_wf,
             to_storage(acc, dw_ptr.dtype.element_ty, EMULATE_DW),
             mask=d_ok[:, None] & (offs_f[None, :] < F))


@triton.jit
def _pre_grad(dx, x_ptrs, b, h, tok, rows, d_ok, w_pre, D, pst_ptr, cos_ptr, sin_ptr, s_pstb,
              s_pstn, p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
              psum_ptr, s_psb, s_psn, H, NORM: tl.constexpr, NORM_HEADS: tl.constexpr,
              ROPE: tl.constexpr, ROPE_PAIRS: tl.constexpr, BLOCK_N: tl.constexpr,
              D_PAD: tl.constexpr):
    """dx of the raw block (reloaded from x_ptrs) from dx of what the map saw; returns it with
    the block's (dw, db) and stores a norm over heads' row sums."""
    x_raw = tl.load(x_ptrs, mask=rows[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    dx, dw, db, sum_g, sum_gx = pre_backward(
        dx, x_raw, b, h, tok, rows, d_ok, w_pre, D, pst_ptr, cos_ptr, sin_ptr, s_pstb, s_pstn,
        p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start, r_stop, NORM, NORM_HEADS, ROPE,
        ROPE_PAIRS, BLOCK_N, D_PAD)
    store_norm_sums(psum_ptr, b, h, tok, rows & (tok >= p_start) & (tok < p_stop), sum_g,
                    sum_gx, s_psb, s_psn, H, NORM_HEADS)
    return dx, dw, db


@triton.jit
def hedgehog_query_grad_kernel(
        q_ptr, do_ptr, w_ptr, s_ptr, z_ptr, dq_ptr, dw_ptr, tok_ptr, m_ptr, eps,
        Nq, H, D, F, Dv, num_blocks, blocks_per_split,
        s_qb, s_qn, s_qh, s_qd, s_dob, s_don, s_doh, s_dov, s_wh, s_wd, s_wf,
        s_sb, s_sh, s_sf, s_sv, s_zb, s_zh, s_zf, s_dqb, s_dqn, s_dqh, s_dqd,
        s_dws, s_dwb, s_dwh, s_dwd, s_dwf, s_tb, s_th, s_tsel,
        pw_ptr, pb_ptr, pst_ptr, cos_ptr, sin_ptr, s_pwh, s_pwd, s_pbh, s_pbd, s_pstb, s_pstn,
        p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
        pg_ptr, s_pgr, psum_ptr, s_psb, s_psn,
        BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, F_PAD: tl.constexpr, V_PAD: tl.constexpr,
        TOKEN: tl.constexpr, EMULATE_BF16: tl.constexpr, EMULATE_DW: tl.constexpr,
        NORM: tl.constexpr, NORM_HEADS: tl.constexpr, NORM_W: tl.constexpr,
        NORM_B: tl.constexpr, ROPE: tl.constexpr, ROPE_PAIRS: tl.constexpr):
    """Pass 1: dq; partial dW_q (split, b, h, D, F); 1/den and dden' of every query; m."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    f_ok = tl.arange(0, F_PAD) < F
    w = load_weight(w_ptr, h, D, F, s_wh, s_wd, s_wf, D_PAD, F_PAD, TOKEN, EMULATE_BF16, ROPE)
    w_pre, b_pre = pre_params(pw_ptr, pb_ptr, h, D, s_pwh, s_pwd, s_pbh, s_pbd, D_PAD, NORM_W,
                              NORM_B, ROPE)
    dw_pre = tl.zeros((D_PAD,), dtype=tl.float32)
    db_pre = tl.zeros((D_PAD,), dtype=tl.float32)
    # The forward's scaled form (output_scale): with Ŝ = S/c, ẑ = z/c, den^ = φ·ẑ + eps/c and
    # û = Ŝ do, dφ = û/den^ + dden^ ẑ is the same gradient; the true 1/den = 1/(c den^) and
    # dden = dden^/c are what pass 2 needs.
    # And centred (load_scaled_state): û = û' + ẑ μ with û' = Ŝ' do, μ = m·do.
    s_a, s_c, z_a, z_c, scale, centre = load_scaled_state(
        s_ptr, z_ptr, b, h, F, Dv, s_sb, s_sh, s_sf, s_sv, s_zb, s_zh, s_zf,
        F_PAD, V_PAD, TOKEN, EMULATE_BF16, True)
    offs_v = tl.arange(0, V_PAD)
    tl.store(m_ptr + bh.to(tl.int64) * Dv + offs_v, centre, mask=(offs_v < Dv) & (split == 0))
    eps_scaled = eps * scale
    q_offs, d_ok = head_offsets(s_qn, s_qd, D, BLOCK_N, D_PAD, ROPE)
    do_offs, v_ok = block_offsets(s_don, s_dov, Dv, BLOCK_N, V_PAD)
    dq_offs, _ = head_offsets(s_dqn, s_dqd, D, BLOCK_N, D_PAD, ROPE)
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    do_base = do_ptr + b.to(tl.int64) * s_dob + h.to(tl.int64) * s_doh
    dq_base = dq_ptr + b.to(tl.int64) * s_dqb + h.to(tl.int64) * s_dqh
    tok_base = tok_ptr + b.to(tl.int64) * s_tb + h.to(tl.int64) * s_th
    acc_dw = tl.zeros((D_PAD, F_PAD), dtype=tl.float32)
    first = split.to(tl.int64) * blocks_per_split
    for t in range(first, tl.minimum(first + blocks_per_split, num_blocks)):
        start = t * BLOCK_N
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Nq
        # Rows past Nq load as zeros: do = 0 makes u, dden and so dL exactly 0 there.
        q = tl.load(q_base + start * s_qn + q_offs, mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if NORM != 0 or ROPE != 0:
            q = pre_forward(q.to(tl.float32), b, h, offs_n, n_ok, d_ok, w_pre, b_pre,
                            D, pst_ptr, cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps,
                            s_rb, s_rn, s_rh, s_rd, r_start, r_stop, NORM, NORM_HEADS, ROPE,
                            ROPE_PAIRS, BLOCK_N, D_PAD)
        do = tl.load(do_base + start * s_don + do_offs, mask=n_ok[:, None] & v_ok[None, :],
                     other=0.0)
        a, c = hedgehog_features(q, w, f_ok, BLOCK_N, F_PAD, TOKEN, EMULATE_BF16)
        u_a = dot(do, tl.trans(s_a), tl.zeros((BLOCK_N, F_PAD), dtype=tl.float32), TOKEN,
                  EMULATE_BF16)
        u_c = dot(do, tl.trans(s_c), tl.zeros((BLOCK_N, F_PAD), dtype=tl.float32), TOKEN,
                  EMULATE_BF16)
        rden = 1.0 / (tl.sum(a * z_a[None, :], axis=1) + tl.sum(c * z_c[None, :], axis=1)
                      + eps_scaled)
        mu = tl.sum(do.to(tl.float32) * centre[None, :], axis=1)
        # The centred dden (common.state_centre): dφ = û'/den^ + dden_c ẑ.
        dden_c = (eps_scaled * mu - tl.sum(a * u_a, axis=1) - tl.sum(c * u_c, axis=1)) \
            * rden * rden
        da = u_a * rden[:, None] + dden_c[:, None] * z_a[None, :]
        dc = u_c * rden[:, None] + dden_c[:, None] * z_c[None, :]

        dl = hedgehog_logits_grad(a, c, da, dc)
        dq = dot(dl, tl.trans(w), tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32), TOKEN,
                 EMULATE_BF16)
        if NORM != 0 or ROPE != 0:
            dq, dw_blk, db_blk = _pre_grad(
                dq, q_base + start * s_qn + q_offs, b, h, offs_n, n_ok, d_ok, w_pre, D, pst_ptr,
                cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd,
                r_start, r_stop, psum_ptr, s_psb, s_psn, H, NORM, NORM_HEADS, ROPE, ROPE_PAIRS,
                BLOCK_N, D_PAD)
            dw_pre += dw_blk
            db_pre += db_blk
        tl.store(dq_base + start * s_dqn + dq_offs,
                 to_storage(dq, dq_ptr.dtype.element_ty, EMULATE_BF16),
                 mask=n_ok[:, None] & d_ok[None, :])
        tl.store(tok_base + offs_n, rden * scale, mask=n_ok)
        tl.store(tok_base + s_tsel + offs_n, dden_c * scale, mask=n_ok)  # dden' (docstring)
        acc_dw = dot(tl.trans(q), dl, acc_dw, TOKEN, EMULATE_BF16)
    _store_weight_grad(dw_ptr, split, b, h, acc_dw, D, F, s_dws, s_dwb, s_dwh, s_dwd, s_dwf,
                       D_PAD, F_PAD, EMULATE_DW, ROPE)
    store_norm_grads(pg_ptr, split * (tl.num_programs(1) // H) + b, h, dw_pre, db_pre, D, s_pgr,
                     H * D, D_PAD, NORM, ROPE)


@triton.jit
def hedgehog_state_grad_kernel(
        q_ptr, do_ptr, w_ptr, tok_ptr, ds_ptr, dz_ptr,
        Nq, H, D, F, Dv, num_blocks, blocks_per_split,
        s_qb, s_qn, s_qh, s_qd, s_dob, s_don, s_doh, s_dov, s_wh, s_wd, s_wf, s_tb, s_th, s_tsel,
        s_ss, s_sb, s_sh, s_sf, s_sv, s_zs, s_zb, s_zh, s_zf,
        pw_ptr, pb_ptr, pst_ptr, cos_ptr, sin_ptr, s_pwh, s_pwd, s_pbh, s_pbd, s_pstb, s_pstn,
        p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
        BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, F_PAD: tl.constexpr, V_PAD: tl.constexpr,
        TOKEN: tl.constexpr, EMULATE_BF16: tl.constexpr, NORM: tl.constexpr,
        NORM_HEADS: tl.constexpr, NORM_W: tl.constexpr, NORM_B: tl.constexpr, ROPE: tl.constexpr,
        ROPE_PAIRS: tl.constexpr):
    """Pass 2: partial dS (split, b, h, 2F, Dv) and dz (split, b, h, 2F) of one half."""
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
    q_offs, d_ok = head_offsets(s_qn, s_qd, D, BLOCK_N, D_PAD, ROPE)
    do_offs, v_ok = block_offsets(s_don, s_dov, Dv, BLOCK_N, V_PAD)
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    do_base = do_ptr + b.to(tl.int64) * s_dob + h.to(tl.int64) * s_doh
    tok_base = tok_ptr + b.to(tl.int64) * s_tb + h.to(tl.int64) * s_th
    acc_ds = tl.zeros((F_PAD, V_PAD), dtype=tl.float32)
    acc_dz = tl.zeros((F_PAD,), dtype=tl.float32)
    first = split.to(tl.int64) * blocks_per_split
    for t in range(first, tl.minimum(first + blocks_per_split, num_blocks)):
        start = t * BLOCK_N
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Nq
        q = tl.load(q_base + start * s_qn + q_offs, mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if NORM != 0 or ROPE != 0:
            q = pre_forward(q.to(tl.float32), b, h, offs_n, n_ok, d_ok, w_pre, b_pre,
                            D, pst_ptr, cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps,
                            s_rb, s_rn, s_rh, s_rd, r_start, r_stop, NORM, NORM_HEADS, ROPE,
                            ROPE_PAIRS, BLOCK_N, D_PAD)
        do = tl.load(do_base + start * s_don + do_offs, mask=n_ok[:, None] & v_ok[None, :],
                     other=0.0).to(tl.float32)
        # Rows past Nq: 1/den = dden = 0 (and do = 0), so their (uniform) φ adds nothing.
        rden = tl.load(tok_base + offs_n, mask=n_ok, other=0.0)
        dden = tl.load(tok_base + s_tsel + offs_n, mask=n_ok, other=0.0)
        logits = dot(q, w, tl.zeros((BLOCK_N, F_PAD), dtype=tl.float32), TOKEN, EMULATE_BF16)
        phi = softmax_rows(sign * logits, f_ok)
        acc_ds = dot(tl.trans(phi), do * rden[:, None], acc_ds, TOKEN, EMULATE_BF16)
        acc_dz += tl.sum(phi * dden[:, None], axis=0)
    ds_out = ds_ptr + split.to(tl.int64) * s_ss + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh
    dz_out = dz_ptr + split.to(tl.int64) * s_zs + b.to(tl.int64) * s_zb + h.to(tl.int64) * s_zh
    store_state_half(ds_out, half, acc_ds, acc_dz, F, Dv, s_sf, s_sv, dz_out, s_zf, F_PAD,
                     V_PAD)


@triton.jit
def hedgehog_key_grad_kernel(
        k_ptr, v_ptr, mask_ptr, w_ptr, ds_ptr, dz_ptr, m_ptr, dk_ptr, dv_ptr, dw_ptr,
        Nk, H, D, F, Dv, num_blocks, blocks_per_split,
        s_kb, s_kn, s_kh, s_kd, s_vb, s_vn, s_vh, s_vd, s_mb, s_mn, s_wh, s_wd, s_wf,
        s_sb, s_sh, s_sf, s_sv, s_zb, s_zh, s_zf, s_dkb, s_dkn, s_dkh, s_dkd,
        s_dvb, s_dvn, s_dvh, s_dvd, s_dws, s_dwb, s_dwh, s_dwd, s_dwf,
        pw_ptr, pb_ptr, pst_ptr, cos_ptr, sin_ptr, s_pwh, s_pwd, s_pbh, s_pbd, s_pstb, s_pstn,
        p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
        pg_ptr, s_pgr, psum_ptr, s_psb, s_psn,
        HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
        F_PAD: tl.constexpr, V_PAD: tl.constexpr, TOKEN: tl.constexpr,
        EMULATE_BF16: tl.constexpr, EMULATE_DW: tl.constexpr, NORM: tl.constexpr,
        NORM_HEADS: tl.constexpr, NORM_W: tl.constexpr, NORM_B: tl.constexpr,
        ROPE: tl.constexpr, ROPE_PAIRS: tl.constexpr):
    """Pass 3: dk, dv and the partial dW_k (split, b, h, D, F)."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    f_ok = tl.arange(0, F_PAD) < F
    w = load_weight(w_ptr, h, D, F, s_wh, s_wd, s_wf, D_PAD, F_PAD, TOKEN, EMULATE_BF16, ROPE)
    w_pre, b_pre = pre_params(pw_ptr, pb_ptr, h, D, s_pwh, s_pwd, s_pbh, s_pbd, D_PAD, NORM_W,
                              NORM_B, ROPE)
    dw_pre = tl.zeros((D_PAD,), dtype=tl.float32)
    db_pre = tl.zeros((D_PAD,), dtype=tl.float32)
    ds_a, ds_c = load_state_halves(ds_ptr + b.to(tl.int64) * s_sb + h.to(tl.int64) * s_sh,
                                   F, Dv, s_sf, s_sv, F_PAD, V_PAD)
    dz_a, dz_c = load_vector_halves(dz_ptr + b.to(tl.int64) * s_zb + h.to(tl.int64) * s_zh,
                                    F, s_zf, F_PAD)
    ds_a = to_operand(ds_a, TOKEN, EMULATE_BF16)
    ds_c = to_operand(ds_c, TOKEN, EMULATE_BF16)
    # dz' − dS_op m (module docstring, pass 3).
    offs_v = tl.arange(0, V_PAD)
    centre = tl.load(m_ptr + bh.to(tl.int64) * Dv + offs_v, mask=offs_v < Dv, other=0.0)
    dz_a -= tl.sum(ds_a.to(tl.float32) * centre[None, :], axis=1)
    dz_c -= tl.sum(ds_c.to(tl.float32) * centre[None, :], axis=1)
    k_offs, d_ok = head_offsets(s_kn, s_kd, D, BLOCK_N, D_PAD, ROPE)
    v_offs, v_ok = block_offsets(s_vn, s_vd, Dv, BLOCK_N, V_PAD)
    dk_offs, _ = head_offsets(s_dkn, s_dkd, D, BLOCK_N, D_PAD, ROPE)
    dv_offs, _ = block_offsets(s_dvn, s_dvd, Dv, BLOCK_N, V_PAD)
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    dk_base = dk_ptr + b.to(tl.int64) * s_dkb + h.to(tl.int64) * s_dkh
    dv_base = dv_ptr + b.to(tl.int64) * s_dvb + h.to(tl.int64) * s_dvh
    acc_dw = tl.zeros((D_PAD, F_PAD), dtype=tl.float32)
    first = split.to(tl.int64) * blocks_per_split
    for t in range(first, tl.minimum(first + blocks_per_split, num_blocks)):
        start = t * BLOCK_N
        n_ok = (start + tl.arange(0, BLOCK_N)) < Nk
        keep = rows_ok(mask_ptr, b, start, Nk, s_mb, s_mn, HAS_MASK, BLOCK_N)
        # Masked keys are never read; their dk and dv are written as exact zeros below.
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
        a, c = hedgehog_features(k, w, f_ok, BLOCK_N, F_PAD, TOKEN, EMULATE_BF16)
        da = dot(v, tl.trans(ds_a), tl.zeros((BLOCK_N, F_PAD), dtype=tl.float32), TOKEN,
                 EMULATE_BF16) + dz_a[None, :]
        dc = dot(v, tl.trans(ds_c), tl.zeros((BLOCK_N, F_PAD), dtype=tl.float32), TOKEN,
                 EMULATE_BF16) + dz_c[None, :]
        dv = dot(a, ds_a, tl.zeros((BLOCK_N, V_PAD), dtype=tl.float32), TOKEN, EMULATE_BF16)
        dv = tl.where(keep[:, None], dot(c, ds_c, dv, TOKEN, EMULATE_BF16), 0.0)
        dl = tl.where(keep[:, None], hedgehog_logits_grad(a, c, da, dc), 0.0)
        dk = dot(dl, tl.trans(w), tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32), TOKEN,
                 EMULATE_BF16)
        if NORM != 0 or ROPE != 0:
            dk, dw_blk, db_blk = _pre_grad(
                dk, k_base + start * s_kn + k_offs, b, h, start + tl.arange(0, BLOCK_N), keep,
                d_ok, w_pre, D, pst_ptr, cos_ptr, sin_ptr, s_pstb,
                s_pstn, p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
                psum_ptr, s_psb, s_psn, H, NORM, NORM_HEADS, ROPE, ROPE_PAIRS, BLOCK_N, D_PAD)
            dw_pre += dw_blk
            db_pre += db_blk
        tl.store(dk_base + start * s_dkn + dk_offs,
                 to_storage(dk, dk_ptr.dtype.element_ty, EMULATE_BF16),
                 mask=n_ok[:, None] & d_ok[None, :])
        tl.store(dv_base + start * s_dvn + dv_offs,
                 to_storage(dv, dv_ptr.dtype.element_ty, EMULATE_BF16),
                 mask=n_ok[:, None] & v_ok[None, :])
        acc_dw = dot(tl.trans(k), dl, acc_dw, TOKEN, EMULATE_BF16)
    _store_weight_grad(dw_ptr, split, b, h, acc_dw, D, F, s_dws, s_dwb, s_dwh, s_dwd, s_dwf,
                       D_PAD, F_PAD, EMULATE_DW, ROPE)
    store_norm_grads(pg_ptr, split * (tl.num_programs(1) // H) + b, h, dw_pre, db_pre, D, s_pgr,
                     H * D, D_PAD, NORM, ROPE)
