"""The pre-attention work of a DiT layer (q/k norm, then RoPE; linattn/pre_attention/spec.py),
fused into the Triton kernels' loads of q and k, for the builtin maps' and Hedgehog's kernels.

In-kernel (``@triton.jit``), called by every kernel that loads q or k:
  * ``head_offsets``: offsets of a block of q or k rows. For half-rotation RoPE the columns are
    loaded in interleaved order (register column 2i holds dim i, 2i + 1 holds dim i + D/2), so
    every rotation pairs neighbouring register columns whatever the style and whatever D_PAD is;
    stores of dq, dk (and Hedgehog's W rows) use the same order. Sums over the head dim (φ(x)ᵀz,
    S, softmax) do not depend on the order.
  * ``pre_params``: the norm's weight and bias of the program's head, once per program.
  * ``pre_forward``: x -> RoPE(norm(x)) for a (BLOCK_N, D_PAD) fp32 block.
  * ``pre_backward``: dL/d(RoPE(norm(x))) -> dL/dx, with the block's dw and db and, for a norm
    over all heads, each row's (Σg, Σg·x̂) (pre_attention.h of the CPU kernels has the maths).

Per-token kernels of a norm over all heads: ``_stats_kernel`` (mean and rstd of each token over
its H·D values, before the per-head kernels) and ``_finish_kernel`` (the rest of dx once every
head's sums are in).

Host side: ``PreLaunch`` turns a backend PreCall into the extra arguments of one side's kernels;
``norm_statistics``, ``finish_norm_over_heads`` and ``reduce_norm_grads`` launch the rest.

With no pre-attention work (NORM = ROPE = 0) every helper is the identity and compiles away.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ...ops import alloc
from .common import cdiv, emulate_bf16, launch, mask_args, padded_dim, to_storage
from .reduce import sum_splits

NORM_NONE: tl.constexpr = tl.constexpr(0)
NORM_RMS: tl.constexpr = tl.constexpr(1)
NORM_LAYER: tl.constexpr = tl.constexpr(2)
ROPE_NONE: tl.constexpr = tl.constexpr(0)
ROPE_INTERLEAVED: tl.constexpr = tl.constexpr(1)
ROPE_HALF: tl.constexpr = tl.constexpr(2)

#: Tokens per program of the per-token kernels.
_TOKEN_BLOCK = 32


@triton.jit
def head_columns(D, D_PAD: tl.constexpr, ROPE: tl.constexpr):
    """The memory column each register column of a q or k block holds, and which are real."""
    j = tl.arange(0, D_PAD)
    if ROPE == ROPE_HALF:
        half = D // 2
        cols = tl.where(j < D, (j // 2) + (j % 2) * half, j)
    else:
        cols = j
    return cols, j < D


@triton.jit
def head_offsets(s_n, s_d, D, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, ROPE: tl.constexpr):
    """block_offsets (common.py) for q, k, dq and dk blocks, in the column order above."""
    cols, ok = head_columns(D, D_PAD, ROPE)
    rows = tl.arange(0, BLOCK_N)
    return rows[:, None] * s_n + cols[None, :] * s_d, ok


@triton.jit
def pre_params(pw_ptr, pb_ptr, h, D, s_pwh, s_pwd, s_pbh, s_pbd, D_PAD: tl.constexpr,
               NORM_W: tl.constexpr, NORM_B: tl.constexpr, ROPE: tl.constexpr):
    """Head h's norm weight and bias as fp32 (D_PAD,) vectors in register column order: 1 and 0
    where absent, 0 in the padding (so padded columns of a normalised row stay 0)."""
    cols, ok = head_columns(D, D_PAD, ROPE)
    if NORM_W:
        w = tl.load(pw_ptr + h.to(tl.int64) * s_pwh + cols * s_pwd, mask=ok, other=0.0)
        w = w.to(tl.float32)
    else:
        w = tl.where(ok, 1.0, 0.0)
    if NORM_B:
        bias = tl.load(pb_ptr + h.to(tl.int64) * s_pbh + cols * s_pbd, mask=ok, other=0.0)
        bias = bias.to(tl.float32)
    else:
        bias = tl.zeros((D_PAD,), dtype=tl.float32)
    return w, bias


@triton.jit
def _row_stats(x, b, tok, rows, col_ok, D, pst_ptr, s_pstb, s_pstn, p_eps,
               NORM: tl.constexpr, NORM_HEADS: tl.constexpr):
    """mean and rstd of each row of the fp32 block x (0 in padded columns): its own D values,
    or, for a norm over heads, the token's statistics from the stats kernel."""
    if NORM_HEADS:
        base = pst_ptr + b.to(tl.int64) * s_pstb + tok * s_pstn
        mean = tl.load(base, mask=rows, other=0.0)
        rstd = tl.load(base + 1, mask=rows, other=1.0)
    else:
        if NORM == NORM_LAYER:
            mean = tl.sum(x, axis=1) / D
        else:
            mean = tl.zeros((x.shape[0],), dtype=tl.float32)
        centred = tl.where(col_ok[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + p_eps)
    return mean, rstd


@triton.jit
def _rotate(y, cos_a, sin_a, cos_b, sin_b, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
            TRANSPOSE: tl.constexpr):
    """Rotate each pair (a, b) of neighbouring register columns (see head_columns):
    (a·cos_a − b·sin_a, b·cos_b + a·sin_b), or with TRANSPOSE its transpose,
    (a·cos_a + b·sin_b, b·cos_b − a·sin_a). Angles are (BLOCK_N, D_PAD / 2) blocks."""
    a, b = tl.split(tl.reshape(y, (BLOCK_N, D_PAD // 2, 2)))
    if TRANSPOSE:
        first, second = a * cos_a + b * sin_b, b * cos_b - a * sin_a
    else:
        first, second = a * cos_a - b * sin_a, b * cos_b + a * sin_b
    return tl.reshape(tl.join(first, second), (BLOCK_N, D_PAD))


@triton.jit
def _angles(cos_ptr, sin_ptr, b, h, tok, row_ok, D, s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
            BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, ROPE: tl.constexpr,
            ROPE_PAIRS: tl.constexpr):
    """(cos, sin) of the first members of each pair and (cos, sin) of the second members, as
    (BLOCK_N, D_PAD / 2) blocks: 1 and 0 on rows RoPE does not rotate (outside
    [r_start, r_stop), or not real) and in the padding. Tables of one angle per pair are read
    once (both members share it); tables of one angle per dim are read at both members' dims."""
    rows = row_ok & (tok >= r_start) & (tok < r_stop)
    base = (b.to(tl.int64) * s_rb + h.to(tl.int64) * s_rh + (tok - r_start)[:, None] * s_rn)
    if ROPE_PAIRS:
        p = tl.arange(0, D_PAD // 2)
        ok = rows[:, None] & (p < D // 2)[None, :]
        offs = base + p[None, :] * s_rd
        cos_a = tl.load(cos_ptr + offs, mask=ok, other=1.0).to(tl.float32)
        sin_a = tl.load(sin_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        return cos_a, sin_a, cos_a, sin_a
    # One angle per dim: a (BLOCK_N, D_PAD) load of each table in the blocks' column order,
    # split into the pairs' members (two loads, not four strided ones: fewer live addresses).
    cols, col_ok = head_columns(D, D_PAD, ROPE)
    offs = base + cols[None, :] * s_rd
    ok_full = rows[:, None] & col_ok[None, :]
    cos_a, cos_b = tl.split(tl.reshape(tl.load(cos_ptr + offs, mask=ok_full, other=1.0),
                                       (BLOCK_N, D_PAD // 2, 2)))
    sin_a, sin_b = tl.split(tl.reshape(tl.load(sin_ptr + offs, mask=ok_full, other=0.0),
                                       (BLOCK_N, D_PAD // 2, 2)))
    cos_a, cos_b = cos_a.to(tl.float32), cos_b.to(tl.float32)
    sin_a, sin_b = sin_a.to(tl.float32), sin_b.to(tl.float32)
    return cos_a, sin_a, cos_b, sin_b


@triton.jit
def pre_forward(x, b, h, tok, row_ok, col_ok, w, bias, D,
                pst_ptr, cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps,
                s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
                NORM: tl.constexpr, NORM_HEADS: tl.constexpr, ROPE: tl.constexpr,
                ROPE_PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """RoPE(norm(x)) of an fp32 (BLOCK_N, D_PAD) block of tokens `tok` (int64); rows not
    row_ok pass unchanged. col_ok: the real columns (head_offsets); w, bias from pre_params."""
    y = x
    if NORM != NORM_NONE:
        rows = row_ok & (tok >= p_start) & (tok < p_stop)
        mean, rstd = _row_stats(x, b, tok, rows, col_ok, D, pst_ptr, s_pstb, s_pstn, p_eps,
                                NORM, NORM_HEADS)
        normed = (x - mean[:, None]) * rstd[:, None] * w[None, :] + bias[None, :]
        y = tl.where(rows[:, None], normed, x)
    if ROPE != ROPE_NONE:
        cos_a, sin_a, cos_b, sin_b = _angles(cos_ptr, sin_ptr, b, h, tok, row_ok, D, s_rb,
                                             s_rn, s_rh, s_rd, r_start, r_stop, BLOCK_N, D_PAD,
                                             ROPE, ROPE_PAIRS)
        y = _rotate(y, cos_a, sin_a, cos_b, sin_b, BLOCK_N, D_PAD, False)
    return y


@triton.jit
def pre_backward(dy, x, b, h, tok, row_ok, col_ok, w, D,
                 pst_ptr, cos_ptr, sin_ptr, s_pstb, s_pstn, p_start, p_stop, p_eps,
                 s_rb, s_rn, s_rh, s_rd, r_start, r_stop,
                 NORM: tl.constexpr, NORM_HEADS: tl.constexpr, ROPE: tl.constexpr,
                 ROPE_PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr):
    """dL/dx from dy = dL/d(pre_forward(x)) for the raw fp32 block x. Returns (dx, dw, db,
    Σg, Σg·x̂): dw, db (D_PAD,) are this block's share of the norm's weight and bias gradients;
    for a norm over heads dx holds rstd·g on normalised rows and the two row sums (0 elsewhere)
    go to the finish kernel."""
    dn = dy
    if ROPE != ROPE_NONE:
        cos_a, sin_a, cos_b, sin_b = _angles(cos_ptr, sin_ptr, b, h, tok, row_ok, D, s_rb,
                                             s_rn, s_rh, s_rd, r_start, r_stop, BLOCK_N, D_PAD,
                                             ROPE, ROPE_PAIRS)
        dn = _rotate(dy, cos_a, sin_a, cos_b, sin_b, BLOCK_N, D_PAD, True)
    zero_cols = tl.zeros((D_PAD,), dtype=tl.float32)
    zero_rows = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if NORM != NORM_NONE:
        rows = row_ok & (tok >= p_start) & (tok < p_stop)
        mean, rstd = _row_stats(x, b, tok, rows, col_ok, D, pst_ptr, s_pstb, s_pstn, p_eps,
                                NORM, NORM_HEADS)
        xhat = tl.where(col_ok[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
        dn_norm = tl.where(rows[:, None], dn, 0.0)
        dw = tl.sum(dn_norm * xhat, axis=0)
        db = tl.sum(dn_norm, axis=0)
        g = dn_norm * w[None, :]
        sum_g = tl.sum(g, axis=1)
        sum_gx = tl.sum(g * xhat, axis=1)
        if NORM_HEADS:
            dx_norm = rstd[:, None] * g
        else:
            c1 = sum_gx / D
            if NORM == NORM_LAYER:
                c0 = sum_g / D
            else:
                c0 = zero_rows
            dx_norm = rstd[:, None] * (g - c0[:, None] - xhat * c1[:, None])
        dx = tl.where(rows[:, None], dx_norm, dn)
        return dx, dw, db, sum_g, sum_gx
    return dn, zero_cols, zero_cols, zero_rows, zero_rows


@triton.jit
def store_norm_sums(psum_ptr, b, h, tok, rows, sum_g, sum_gx, s_psb, s_psn, H,
                    NORM_HEADS: tl.constexpr):
    """Row sums of a norm over heads into sums (B, N, H, 2); `rows` says which are real."""
    if NORM_HEADS:
        base = psum_ptr + b.to(tl.int64) * s_psb + tok * s_psn + h * 2
        tl.store(base, sum_g, mask=rows)
        tl.store(base + 1, sum_gx, mask=rows)


@triton.jit
def store_norm_grads(pg_ptr, row, h, dw, db, D, s_pgr, HD, D_PAD: tl.constexpr,
                     NORM: tl.constexpr, ROPE: tl.constexpr):
    """A program's (dw, db) of head h into row `row` of the (rows, 2·H·D) partials."""
    if NORM != NORM_NONE:
        cols, ok = head_columns(D, D_PAD, ROPE)
        base = pg_ptr + row.to(tl.int64) * s_pgr + h * D + cols
        tl.store(base, dw, mask=ok)
        tl.store(base + HD, db, mask=ok)


@triton.jit
def _stats_kernel(x_ptr, st_ptr, N, H, D, start, stop, eps,
                  s_xb, s_xn, s_xh, s_xd, s_sb, s_sn,
                  LAYER: tl.constexpr, BLOCK_T: tl.constexpr, D_PAD: tl.constexpr):
    """(mean, rstd) of each token of x over its H·D values; (0, 1) outside [start, stop)."""
    b = tl.program_id(0)
    tok = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    in_seq = tok < N
    rows = in_seq & (tok >= start) & (tok < stop)
    d = tl.arange(0, D_PAD)
    ok = rows[:, None] & (d < D)[None, :]
    base = x_ptr + b.to(tl.int64) * s_xb + tok[:, None] * s_xn + d[None, :] * s_xd
    width = H * D * 1.0
    mean = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if LAYER:
        for h in range(H):
            mean += tl.sum(tl.load(base + h * s_xh, mask=ok, other=0.0).to(tl.float32), axis=1)
        mean = mean / width
    var = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for h in range(H):
        x = tl.load(base + h * s_xh, mask=ok, other=0.0).to(tl.float32)
        c = tl.where(ok, x - mean[:, None], 0.0)
        var += tl.sum(c * c, axis=1)
    rstd = tl.where(rows, 1.0 / tl.sqrt(var / width + eps), 1.0)
    out = st_ptr + b.to(tl.int64) * s_sb + tok * s_sn
    tl.store(out, tl.where(rows, mean, 0.0), mask=in_seq)
    tl.store(out + 1, rstd, mask=in_seq)


@triton.jit
def _finish_kernel(x_ptr, dx_ptr, st_ptr, sum_ptr, mask_ptr, N, H, D, start, stop,
                   s_xb, s_xn, s_xh, s_xd, s_gb, s_gn, s_gh, s_gd, s_sb, s_sn, s_ub, s_un,
                   s_mb, s_mn,
                   LAYER: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr,
                   D_PAD: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """dx −= rstd·(mean(g) + x̂·mean(g·x̂)) over every head of each normalised (kept) token."""
    b = tl.program_id(0)
    tok = start + tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tok < stop
    if HAS_MASK:
        flags = tl.load(mask_ptr + b.to(tl.int64) * s_mb + tok * s_mn, mask=rows, other=0)
        rows = rows & (flags != 0)
    sums = sum_ptr + b.to(tl.int64) * s_ub + tok * s_un
    sum_g = tl.zeros((BLOCK_T,), dtype=tl.float32)
    sum_gx = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for h in range(H):
        sum_g += tl.load(sums + 2 * h, mask=rows, other=0.0)
        sum_gx += tl.load(sums + 2 * h + 1, mask=rows, other=0.0)
    width = H * D * 1.0
    if LAYER:
        c0 = sum_g / width
    else:
        c0 = tl.zeros((BLOCK_T,), dtype=tl.float32)
    c1 = sum_gx / width
    stats = st_ptr + b.to(tl.int64) * s_sb + tok * s_sn
    mean = tl.load(stats, mask=rows, other=0.0)
    rstd = tl.load(stats + 1, mask=rows, other=1.0)
    d = tl.arange(0, D_PAD)
    ok = rows[:, None] & (d < D)[None, :]
    x_base = x_ptr + b.to(tl.int64) * s_xb + tok[:, None] * s_xn + d[None, :] * s_xd
    g_base = dx_ptr + b.to(tl.int64) * s_gb + tok[:, None] * s_gn + d[None, :] * s_gd
    for h in range(H):
        x = tl.load(x_base + h * s_xh, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_base + h * s_gh, mask=ok, other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * rstd[:, None]
        dx = g - rstd[:, None] * (c0[:, None] + xhat * c1[:, None])
        tl.store(g_base + h * s_gh, to_storage(dx, dx_ptr.dtype.element_ty, EMULATE_BF16),
                 mask=ok)


# ----------------------------------------------------------------------------- host side


class PreLaunch:
    """The pre-attention arguments of one side (q or k) for a kernel launch.

    Kernels that load q or k take, after their own arguments, ``*args()`` as
    (pw_ptr, pb_ptr, pst_ptr, cos_ptr, sin_ptr, s_pwh, s_pwd, s_pbh, s_pbd, s_pstb, s_pstn,
    p_start, p_stop, p_eps, s_rb, s_rn, s_rh, s_rd, r_start, r_stop) and ``**meta()``
    (NORM, NORM_HEADS, NORM_W, NORM_B, ROPE, ROPE_PAIRS).
    """

    def __init__(self, pre, side: str):
        spec = None if pre is None else pre.spec
        self.norm = None if spec is None else (spec.q_norm if side == "q" else spec.k_norm)
        self.rope = None if spec is None else spec.rope
        self.stats = None if pre is None else (pre.q_stats if side == "q" else pre.k_stats)

    @property
    def active(self) -> bool:
        """Whether this side has any work before φ (its kernels then take the "+pre" configs)."""
        return self.norm is not None or self.rope is not None

    @property
    def has_norm(self) -> bool:
        return self.norm is not None

    @property
    def over_heads(self) -> bool:
        return self.norm is not None and self.norm.over_heads

    @property
    def rope_style(self) -> int:
        return 0 if self.rope is None else self.rope.style

    def args(self) -> tuple:
        n, r = self.norm, self.rope
        weight = None if n is None else n.weight
        bias = None if n is None else n.bias
        w_strides = (0, 0) if weight is None else tuple(weight.stride())
        b_strides = (0, 0) if bias is None else tuple(bias.stride())
        st_strides = (0, 0) if self.stats is None else tuple(self.stats.stride()[:2])
        norm_args = (0, 0, 1.0) if n is None else (n.start, n.stop, float(n.eps))
        if r is None:
            rope_tensors, rope_args = (None, None), (0, 0, 0, 0, 0, 0)
        else:
            s = r.cos.stride()
            rope_tensors = (r.cos, r.sin)
            rope_args = (s[0] if r.cos.shape[0] > 1 else 0, s[1], s[2] if r.cos.shape[2] > 1 else 0,
                         s[3], r.start, r.start + r.length)
        return (weight, bias, self.stats, *rope_tensors, *w_strides, *b_strides, *st_strides,
                *norm_args, *rope_args)

    def meta(self) -> dict:
        n, r = self.norm, self.rope
        return dict(NORM=0 if n is None else n.kind, NORM_HEADS=self.over_heads,
                    NORM_W=n is not None and n.weight is not None,
                    NORM_B=n is not None and n.bias is not None,
                    ROPE=self.rope_style, ROPE_PAIRS=r is not None and r.pairs)

    def grad_partials(self, rows: int, heads: int, head_dim: int,
                      device: torch.device) -> Optional[torch.Tensor]:
        """fp32 (rows, 2·H·D) partials of (dw, db), or None without a norm."""
        if self.norm is None:
            return None
        return alloc.empty(rows, 2 * heads * head_dim, dtype=torch.float32, device=device)

    def row_sums(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """fp32 (B, N, H, 2) per-(token, head) sums of a norm over heads, else None."""
        if not self.over_heads:
            return None
        B, N, H, _ = x.shape
        return alloc.empty(B, N, H, 2, dtype=torch.float32, device=x.device)

    def grad_args(self, partials: Optional[torch.Tensor], sums: Optional[torch.Tensor]) -> tuple:
        """(pg_ptr, s_pgr, psum_ptr, s_psb, s_psn) of a backward kernel."""
        return (partials, 0 if partials is None else partials.stride(0), sums,
                *((0, 0) if sums is None else sums.stride()[:2]))


def norm_statistics(x: torch.Tensor, pre: PreLaunch) -> None:
    """pre.stats (B, N, 2) <- (mean, rstd) of every token of x over all heads."""
    B, N, H, D = x.shape
    norm, stats = pre.norm, pre.stats
    launch(_stats_kernel, (B, cdiv(N, _TOKEN_BLOCK)), x, stats, N, H, D, norm.start, norm.stop,
           float(norm.eps), *x.stride(), *stats.stride()[:2], LAYER=norm.kind == 2,
           BLOCK_T=_TOKEN_BLOCK, D_PAD=padded_dim(D), num_warps=4)


def finish_norm_over_heads(x: torch.Tensor, dx: torch.Tensor, pre: PreLaunch,
                           sums: torch.Tensor, key_mask: Optional[torch.Tensor]) -> None:
    """The rest of a norm over heads' gradient, in place in dx, once every head wrote its sums."""
    B, N, H, D = x.shape
    norm = pre.norm
    count = norm.stop - norm.start
    if count == 0:
        return
    mask, s_mb, s_mn = mask_args(key_mask)
    launch(_finish_kernel, (B, cdiv(count, _TOKEN_BLOCK)), x, dx, pre.stats, sums, mask, N, H,
           D, norm.start, norm.stop, *x.stride(), *dx.stride(), *pre.stats.stride()[:2],
           *sums.stride()[:2], s_mb, s_mn, LAYER=norm.kind == 2, HAS_MASK=key_mask is not None,
           BLOCK_T=_TOKEN_BLOCK, D_PAD=padded_dim(D), EMULATE_BF16=emulate_bf16(dx.dtype),
           num_warps=4)


def reduce_norm_grads(partials: Optional[torch.Tensor], d_weight: Optional[torch.Tensor],
                      d_bias: Optional[torch.Tensor]) -> None:
    """d_weight, d_bias (H, D) <- the column sums of the (rows, 2·H·D) partials, in row order."""
    if partials is None:
        return
    HD = partials.shape[1] // 2
    sums = alloc.empty(2, HD, dtype=torch.float32, device=partials.device)
    sum_splits(partials, sums[0], sums[1])
    for grad, total in ((d_weight, sums[0]), (d_bias, sums[1])):
        if grad is not None:
            grad.copy_(total.view(grad.shape))
