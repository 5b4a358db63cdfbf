"""Fused Hedgehog linear attention on Triton: φ(x) = softmax(xW) ⊕ softmax(−xW) (method.md §2)
applied inside the kernels, never written to memory.

Entry points (called by the "triton" backend when q and k both use a Hedgehog map; arguments as
in linattn/backends/base.py: (B, N, H, D)-indexed views with any strides, outputs preallocated
by the op):

    hedgehog_forward(q, k, v, key_mask, w_q, w_k, eps, o, state, normaliser)
    hedgehog_backward(do, q, k, v, key_mask, w_q, w_k, eps, state, normaliser,
                      dq, dk, dv, dw_q, dw_k)
    hedgehog_unsupported(head_dim, value_dim, feature_width, dtype=None) -> reason or None

and each pass on its own (the phases of linattn/backends/base.py, for context parallelism):

    hedgehog_state(k, v, key_mask, w_k, state, normaliser)
    hedgehog_output(q, w_q, eps, state, normaliser, o)
    hedgehog_query_grads(do, q, w_q, eps, state, normaliser, dq, dw_q, d_state, d_normaliser,
                         centre)
    hedgehog_key_grads(k, v, key_mask, w_k, d_state, d_normaliser, centre, dk, dv, dw_k)

hedgehog_forward is hedgehog_state then hedgehog_output; hedgehog_backward is
hedgehog_query_grads then hedgehog_key_grads. The query pass writes dz' = dz + dS m and the
centre m (backward_kernels.py), which the key pass takes back: a caller that sums dS and dz'
over processes passes the same m on every one (m is a function of the summed S and z).

Inputs are float16, bfloat16 or float32; w_q, w_k are (H, D, F) in float32 or the input dtype,
multiplied in the input dtype (as Hedgehog.apply does). state (B, H, 2F, Dv) and normaliser
(B, H, 2F) are float32; dw_q, dw_k are written in their own dtype. D, F and Dv go up to 128
(64 for float32 inputs): plan.py says why.

Launches. Forward: state kernel, [sum of split partials], output kernel. Backward: query pass,
[sum of dW_q], state-gradient pass, [sum of dS, dz], key pass, [sum of dW_k]; a sum is launched
only where a quantity was split over several programs. Scratch comes from
linattn.ops.alloc.empty (NaN-filled under the tests, so an unwritten partial shows up) and is
bounded by the split count, not by N: at most plan.scratch_budget per reduction (5% of the bytes
of q, k, v, or 16 MiB for short sequences), freed before the next one, plus 8 bytes per query and
head in the backward (1% of q, k, v in bf16 at D = 128).

``block_n`` and ``num_splits`` are keyword-only overrides for tests and benchmarks; ``check``
(default True) checks every argument, which the "triton" backend skips (the op validated the
inputs and allocated the outputs: checking again costs more host time than small kernels).
``pre`` (a backend PreCall) and ``d_pre`` carry the q/k norms and RoPE that the kernels apply
while loading q and k (../pre_attention.py), and their weight and bias gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ....ops import alloc
from . import plan
from ..common import cdiv, launch, mask_args, padded_dim
from ..pre_attention import (PreLaunch, finish_norm_over_heads, norm_statistics,
                             reduce_norm_grads)
from .backward_kernels import (hedgehog_key_grad_kernel, hedgehog_query_grad_kernel,
                                   hedgehog_state_grad_kernel)
from .forward_kernels import hedgehog_output_kernel, hedgehog_state_kernel
from .helpers import sum_partials_kernel

_TOKEN_TYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_SUM_BLOCK = 1024
# Whether triton.jit produced interpreter functions (TRITON_INTERPRET=1 at decoration time):
# then bf16 rounding is emulated (common.py says why) and no GPU limits apply to configs.
_INTERPRETED = not isinstance(hedgehog_state_kernel, triton.runtime.JITFunction)


def hedgehog_unsupported(head_dim: int, value_dim: int, feature_width: int,
                         dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the fused kernels take these sizes (and dtype); else the reason. feature_width
    is the map's output width 2F, as KernelBackend.unsupported receives it."""
    return plan.unsupported(dtype, head_dim, value_dim, feature_width)


# ----------------------------------------------------------------------------- checks


def _fail(argument: str, message: str) -> None:
    raise ValueError(f"{argument}: {message}")


def _check_like(argument: str, t: Tensor, shape: tuple, dtype: torch.dtype,
                device: torch.device) -> None:
    if tuple(t.shape) != tuple(shape):
        _fail(argument, f"expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        _fail(argument, f"expected dtype {dtype}, got {t.dtype}")
    if t.device != device:
        _fail(argument, f"expected device {device}, got {t.device}")


def _check_contiguous(argument: str, t: Tensor) -> None:
    # Split partials are summed into these with flat offsets.
    if not t.is_contiguous():
        _fail(argument, "must be contiguous (the op allocates it so)")


@dataclass(frozen=True)
class _Sizes:
    B: int
    Nq: int
    Nk: int
    H: int
    D: int
    Dv: int
    F: int

    @property
    def pads(self) -> tuple[int, int, int]:
        return padded_dim(self.D), padded_dim(self.F), padded_dim(self.Dv)


def _check_device(argument: str, t: Tensor) -> None:
    # Meta tensors only plan: nothing can launch on them outside common.capture_launches,
    # which is how the planning path is measured and checked without a GPU.
    if t.device.type not in ("cuda", "meta") and not (_INTERPRETED and t.device.type == "cpu"):
        _fail(argument, f"Triton kernels run CUDA tensors (CPU tensors under TRITON_INTERPRET=1), "
                        f"got {t.device}")


def _check_tokens(argument: str, t: Tensor) -> None:
    if t.dim() != 4:
        _fail(argument, f"expected a (B, N, H, D) view, got shape {tuple(t.shape)}")
    if t.dtype not in _TOKEN_TYPES:
        _fail(argument, f"dtype {t.dtype} is not supported (float16, bfloat16, float32)")
    _check_device(argument, t)


def _check_weight(argument: str, w: Tensor, H: int, D: int, device: torch.device) -> int:
    """F of a (H, D, F) Hedgehog W."""
    if w.dim() != 3 or tuple(w.shape[:2]) != (H, D):
        _fail(argument, f"expected (H, D, F) = ({H}, {D}, F), got {tuple(w.shape)}")
    _check_like(argument, w, tuple(w.shape), w.dtype, device)
    if not w.is_floating_point():
        _fail(argument, f"expected a floating-point W, got {w.dtype}")
    return w.shape[-1]


def _check_sizes(n: "_Sizes", dtype: torch.dtype, what: str) -> None:
    why_not = plan.unsupported(dtype, n.D, n.Dv, 2 * n.F)
    if why_not is not None:
        _fail(what, why_not)


def _check_keys(k: Tensor, v: Tensor, key_mask: Optional[Tensor], w_k: Tensor) -> "_Sizes":
    """The key side of a call (Nq is 0 in the sizes)."""
    _check_tokens("k", k)
    B, Nk, H, D = k.shape
    Dv = v.shape[-1] if v.dim() == 4 else 0
    _check_like("v", v, (B, Nk, H, Dv), k.dtype, k.device)
    F = _check_weight("w_k", w_k, H, D, k.device)
    if key_mask is not None:
        _check_like("key_mask", key_mask, (B, Nk), torch.bool, k.device)
    n = _Sizes(B, 0, Nk, H, D, Dv, F)
    _check_sizes(n, k.dtype, "k, v, w_k")
    return n


def _check_queries(q: Tensor, w_q: Tensor, eps: float, value_dim: int) -> "_Sizes":
    """The query side of a call (Nk is 0 in the sizes)."""
    _check_tokens("q", q)
    B, Nq, H, D = q.shape
    F = _check_weight("w_q", w_q, H, D, q.device)
    if not eps > 0:
        _fail("eps", f"must be > 0, got {eps}")
    n = _Sizes(B, Nq, 0, H, D, value_dim, F)
    _check_sizes(n, q.dtype, "q, w_q")
    return n


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], w_q: Tensor,
                  w_k: Tensor, eps: float) -> "_Sizes":
    keys = _check_keys(k, v, key_mask, w_k)
    queries = _check_queries(q, w_q, eps, keys.Dv)
    for argument, name, a, b in (("k", "batch", queries.B, keys.B),
                                 ("k", "heads", queries.H, keys.H),
                                 ("k", "head dim", queries.D, keys.D),
                                 ("w_k", "features", queries.F, keys.F)):
        if a != b:
            _fail(argument, f"{name} differs from q's (w_q's): {b}, expected {a}")
    if q.dtype != k.dtype or q.device != k.device:
        _fail("k", f"expected dtype {q.dtype} on {q.device} like q, got {k.dtype} on {k.device}")
    return _Sizes(keys.B, queries.Nq, keys.Nk, keys.H, keys.D, keys.Dv, keys.F)


def _sizes(q: Optional[Tensor], k: Optional[Tensor], value_dim: int, w: Tensor) -> _Sizes:
    """The sizes of inputs already checked (by _check_inputs, or the op's validation); q or k
    may be None for a phase that sees one side."""
    B, N, H, D = (q if q is not None else k).shape
    return _Sizes(B, q.shape[1] if q is not None else 0, k.shape[1] if k is not None else 0,
                  H, D, value_dim, w.shape[2])


def _check_state(n: _Sizes, state: Tensor, normaliser: Tensor, device: torch.device,
                 names: tuple[str, str] = ("state", "normaliser")) -> None:
    _check_like(names[0], state, (n.B, n.H, 2 * n.F, n.Dv), torch.float32, device)
    _check_like(names[1], normaliser, (n.B, n.H, 2 * n.F), torch.float32, device)
    _check_contiguous(names[0], state)
    _check_contiguous(names[1], normaliser)


def _check_centre(n: _Sizes, centre: Tensor, device: torch.device) -> None:
    _check_like("centre", centre, (n.B, n.H, n.Dv), torch.float32, device)
    _check_contiguous("centre", centre)


def _check_weight_grad(name: str, grad: Tensor, like: Tensor) -> None:
    _check_like(name, grad, tuple(like.shape), grad.dtype, like.device)
    if not grad.is_floating_point():
        _fail(name, f"expected a floating-point tensor, got {grad.dtype}")
    _check_contiguous(name, grad)


# ----------------------------------------------------------------------------- launch helpers


def _emulates_bf16(dtype: torch.dtype) -> bool:
    return _INTERPRETED and dtype == torch.bfloat16


class _Launcher:
    """Per-call facts every launch needs: sizes, dtype flags, the override knobs."""

    def __init__(self, n: _Sizes, dtype: torch.dtype, device: torch.device,
                 block_n: Optional[int], num_splits: Optional[int]):
        self.n, self.dtype, self.device = n, dtype, device
        self.block_n, self.num_splits = block_n, num_splits

    def config(self, kind: str, pre: bool = False) -> plan.Config:
        return plan.config(kind, self.dtype, self.n.pads, _INTERPRETED, self.block_n, pre)

    def flags(self, cfg: plan.Config) -> dict:
        d, f, v = self.n.pads
        return dict(BLOCK_N=cfg.block_n, D_PAD=d, F_PAD=f, V_PAD=v,
                    TOKEN=_TOKEN_TYPES[self.dtype], EMULATE_BF16=_emulates_bf16(self.dtype),
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def splits(self, seq_len: int, cfg: plan.Config, programs_per_split: int,
               slab_bytes: int = 0, budget_bytes: int = 0) -> tuple[int, int, int]:
        """(num_blocks, splits, blocks_per_split) for a pass over seq_len tokens."""
        num_blocks = cdiv(seq_len, cfg.block_n)
        splits, per_split = plan.splits(num_blocks, programs_per_split, self.device,
                                        self.num_splits, cfg.programs_per_sm, slab_bytes,
                                        budget_bytes)
        return num_blocks, splits, per_split


def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _sum_partials(parts: Tensor, out: Tensor, parts_b: Optional[Tensor] = None,
                  out_b: Optional[Tensor] = None) -> None:
    """out = parts.sum(0) (and out_b = parts_b.sum(0)) in one deterministic launch."""
    if parts_b is None:
        parts_b, out_b, numel_b = parts, out, 0  # unused second operand: no program reads it
    else:
        numel_b = out_b.numel()
    blocks_a = cdiv(out.numel(), _SUM_BLOCK)
    grid = (blocks_a + cdiv(numel_b, _SUM_BLOCK),)
    launch(sum_partials_kernel, grid, parts, out, out.numel(), parts_b, out_b, numel_b,
           parts.shape[0], blocks_a, BLOCK=_SUM_BLOCK, A_EMULATE_BF16=_emulates_bf16(out.dtype),
           B_EMULATE_BF16=_emulates_bf16(out_b.dtype))


def _state_target(splits: int, n: _Sizes, out: Tensor, out_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Where a (split, B, H, 2F, Dv) / (split, B, H, 2F) pass writes: straight into the
    outputs for one split, else fp32 scratch partials."""
    if splits == 1:
        return out.unsqueeze(0), out_sum.unsqueeze(0)
    return (alloc.empty(splits, n.B, n.H, 2 * n.F, n.Dv, dtype=torch.float32, device=out.device),
            alloc.empty(splits, n.B, n.H, 2 * n.F, dtype=torch.float32, device=out.device))


def _weight_grad_target(splits: int, n: _Sizes, dw: Tensor) -> tuple[Tensor, tuple]:
    """(tensor, its (split, b, h, d, f) strides) that a weight-gradient pass writes into:
    dw itself when one program covers everything (one split, one batch), else fp32 partials."""
    if splits * n.B == 1:
        return dw, (0, 0, *dw.stride())
    part = alloc.empty(splits, n.B, n.H, n.D, n.F, dtype=torch.float32, device=dw.device)
    return part, part.stride()


# ----------------------------------------------------------------------------- forward


def hedgehog_forward(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], w_q: Tensor,
                     w_k: Tensor, eps: float, o: Tensor, state: Tensor, normaliser: Tensor, *,
                     block_n: Optional[int] = None, num_splits: Optional[int] = None,
                     check: bool = True, pre=None) -> None:
    """Fill o (B, Nq, H, Dv), state S (B, H, 2F, Dv) and normaliser z (B, H, 2F) (and the
    statistics of q/k norms over all heads, when `pre` has them). check=False skips the
    argument checks: for the "triton" backend, whose caller (the op) validated the inputs and
    allocated the outputs already."""
    if check:
        n = _check_inputs(q, k, v, key_mask, w_q, w_k, eps)
        _check_like("o", o, (n.B, n.Nq, n.H, n.Dv), q.dtype, q.device)
        _check_state(n, state, normaliser, q.device)
    else:
        n = _sizes(q, k, v.shape[3], w_q)
    for x, side in ((k, PreLaunch(pre, "k")), (q, PreLaunch(pre, "q"))):
        if side.over_heads:
            norm_statistics(x, side)
    qkv = _nbytes(q, k, v)
    hedgehog_state(k, v, key_mask, w_k, state, normaliser, qkv_bytes=qkv, block_n=block_n,
                   num_splits=num_splits, check=False, pre=pre)
    hedgehog_output(q, w_q, eps, state, normaliser, o, block_n=block_n, num_splits=num_splits,
                    check=False, pre=pre)


def hedgehog_state(k: Tensor, v: Tensor, key_mask: Optional[Tensor], w_k: Tensor,
                   state: Tensor, normaliser: Tensor, *, qkv_bytes: Optional[int] = None,
                   block_n: Optional[int] = None, num_splits: Optional[int] = None,
                   check: bool = True, pre=None) -> None:
    """Fill state S (B, H, 2F, Dv) and normaliser z (B, H, 2F) from the keys. qkv_bytes: the
    bytes of q, k, v the scratch budget is measured against (default: those of k and v). pre:
    the call's pre-attention work (its k side is applied; statistics of a norm over all heads
    already computed)."""
    if check:
        n = _check_keys(k, v, key_mask, w_k)
        _check_state(n, state, normaliser, k.device)
    else:
        n = _sizes(None, k, v.shape[3], w_k)
    run = _Launcher(n, k.dtype, k.device, block_n, num_splits)
    mask, s_mb, s_mn = mask_args(key_mask)
    k_pre = PreLaunch(pre, "k")
    cfg = run.config("state", k_pre.active)
    num_blocks, splits, per_split = run.splits(
        n.Nk, cfg, 2 * n.B * n.H, slab_bytes=state.nbytes + normaliser.nbytes,
        budget_bytes=plan.scratch_budget(qkv_bytes or _nbytes(k, v)))
    s_part, z_part = _state_target(splits, n, state, normaliser)
    launch(
        hedgehog_state_kernel, (2, splits, n.B * n.H),
        k, v, mask, w_k, s_part, z_part, n.Nk, n.H, n.D, n.F, n.Dv, num_blocks, per_split,
        *k.stride(), *v.stride(), s_mb, s_mn, *w_k.stride(), *s_part.stride(), *z_part.stride(),
        *k_pre.args(), HAS_MASK=key_mask is not None, **run.flags(cfg), **k_pre.meta())
    if splits > 1:
        _sum_partials(s_part, state, z_part, normaliser)



def hedgehog_output(q: Tensor, w_q: Tensor, eps: float, state: Tensor, normaliser: Tensor,
                    o: Tensor, *, block_n: Optional[int] = None,
                    num_splits: Optional[int] = None, check: bool = True, pre=None) -> None:
    """Fill o (B, Nq, H, Dv) from the queries and the given S and z (pre: as in
    hedgehog_state, its q side)."""
    if check:
        if o.dim() != 4:
            _fail("o", f"expected a (B, Nq, H, Dv) view, got shape {tuple(o.shape)}")
        n = _check_queries(q, w_q, eps, o.shape[-1])
        _check_like("o", o, (n.B, n.Nq, n.H, n.Dv), q.dtype, q.device)
        _check_state(n, state, normaliser, q.device)
    else:
        n = _sizes(q, None, o.shape[3], w_q)
    run = _Launcher(n, q.dtype, q.device, block_n, num_splits)
    q_pre = PreLaunch(pre, "q")
    cfg = run.config("output", q_pre.active)
    num_blocks, splits, per_split = run.splits(n.Nq, cfg, n.B * n.H)
    launch(
        hedgehog_output_kernel, (splits, n.B * n.H),
        q, w_q, state, normaliser, o, float(eps), n.Nq, n.H, n.D, n.F, n.Dv, num_blocks,
        per_split, *q.stride(), *w_q.stride(), *state.stride(), *normaliser.stride(),
        *o.stride(), *q_pre.args(), **run.flags(cfg), **q_pre.meta())


# ----------------------------------------------------------------------------- backward


def hedgehog_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                      w_q: Tensor, w_k: Tensor, eps: float, state: Tensor, normaliser: Tensor,
                      dq: Tensor, dk: Tensor, dv: Tensor, dw_q: Tensor, dw_k: Tensor, *,
                      block_n: Optional[int] = None, num_splits: Optional[int] = None,
                      check: bool = True, pre=None,
                      d_pre=(None, None, None, None)) -> None:
    """Fill dq, dk, dv and dw_q, dw_k (the gradients of W_q, W_k) from do and the forward's
    state and normaliser (and the q/k norms' weight and bias gradients d_pre). check=False: as
    in hedgehog_forward."""
    if check:
        n = _check_inputs(q, k, v, key_mask, w_q, w_k, eps)
        _check_like("do", do, (n.B, n.Nq, n.H, n.Dv), q.dtype, q.device)
        _check_state(n, state, normaliser, q.device)
        for name, grad, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            _check_like(name, grad, tuple(like.shape), like.dtype, like.device)
        for name, grad, like in (("dw_q", dw_q, w_q), ("dw_k", dw_k, w_k)):
            _check_weight_grad(name, grad, like)
    else:
        n = _sizes(q, k, v.shape[3], w_q)
    qkv = _nbytes(q, k, v)
    # dS, dz' (B, H, 2F, Dv), (B, H, 2F) and the centre m (B, H, Dv): fp32 scratch between the
    # query and the key passes.
    d_state = alloc.empty(n.B, n.H, 2 * n.F, n.Dv, dtype=torch.float32, device=q.device)
    d_norm = alloc.empty(n.B, n.H, 2 * n.F, dtype=torch.float32, device=q.device)
    centre = alloc.empty(n.B, n.H, n.Dv, dtype=torch.float32, device=q.device)
    hedgehog_query_grads(do, q, w_q, eps, state, normaliser, dq, dw_q, d_state, d_norm, centre,
                         qkv_bytes=qkv, block_n=block_n, num_splits=num_splits, check=False,
                         pre=pre, d_pre=d_pre[:2])
    hedgehog_key_grads(k, v, key_mask, w_k, d_state, d_norm, centre, dk, dv, dw_k,
                       qkv_bytes=qkv, block_n=block_n, num_splits=num_splits, check=False,
                       pre=pre, d_pre=d_pre[2:])


def hedgehog_query_grads(do: Tensor, q: Tensor, w_q: Tensor, eps: float, state: Tensor,
                         normaliser: Tensor, dq: Tensor, dw_q: Tensor, d_state: Tensor,
                         d_normaliser: Tensor, centre: Tensor, *,
                         qkv_bytes: Optional[int] = None, block_n: Optional[int] = None,
                         num_splits: Optional[int] = None, check: bool = True, pre=None,
                         d_pre=(None, None)) -> None:
    """Fill dq, dw_q (the gradient of W_q over these queries), these queries' dS (B, H, 2F, Dv)
    and dz' = dz + dS m (B, H, 2F), and the centre m (B, H, Dv), from do and the (forward's)
    state and normaliser (backward_kernels.py, pass 1). pre: the call's pre-attention work (its
    q side); d_pre: the q norm's (weight, bias) gradients."""
    if check:
        if do.dim() != 4:
            _fail("do", f"expected a (B, Nq, H, Dv) view, got shape {tuple(do.shape)}")
        n = _check_queries(q, w_q, eps, do.shape[-1])
        _check_like("do", do, (n.B, n.Nq, n.H, n.Dv), q.dtype, q.device)
        _check_state(n, state, normaliser, q.device)
        _check_state(n, d_state, d_normaliser, q.device, ("d_state", "d_normaliser"))
        _check_centre(n, centre, q.device)
        _check_like("dq", dq, tuple(q.shape), q.dtype, q.device)
        _check_weight_grad("dw_q", dw_q, w_q)
    else:
        n = _sizes(q, None, do.shape[3], w_q)
    run = _Launcher(n, q.dtype, q.device, block_n, num_splits)
    budget = plan.scratch_budget(qkv_bytes or _nbytes(q, do))
    weight_slab = n.B * n.H * n.D * n.F * 4
    q_pre = PreLaunch(pre, "q")

    # Pass 1: dq, dW_q, 1/den and dden' of every query (B, H, 2, Nq) for pass 2, and the
    # centre m (B, H, Dv) for pass 3 (backward_kernels.py).
    cfg = run.config("query_grad", q_pre.active)
    num_blocks, splits, per_split = run.splits(n.Nq, cfg, n.B * n.H, weight_slab, budget)
    per_query = alloc.empty(n.B, n.H, 2, n.Nq, dtype=torch.float32, device=q.device)
    dw_part, dw_strides = _weight_grad_target(splits, n, dw_q)
    norm_part, sums = q_pre.grad_partials(splits * n.B, n.H, n.D, q.device), q_pre.row_sums(q)
    launch(
        hedgehog_query_grad_kernel, (splits, n.B * n.H),
        q, do, w_q, state, normaliser, dq, dw_part, per_query, centre, float(eps), n.Nq, n.H,
        n.D, n.F, n.Dv, num_blocks, per_split, *q.stride(), *do.stride(), *w_q.stride(),
        *state.stride(),
        *normaliser.stride(), *dq.stride(), *dw_strides, *per_query.stride()[:3],
        *q_pre.args(), *q_pre.grad_args(norm_part, sums),
        EMULATE_DW=_emulates_bf16(dw_q.dtype), **run.flags(cfg), **q_pre.meta())
    if dw_part is not dw_q:
        _sum_partials(dw_part.flatten(0, 1), dw_q)
    del dw_part
    reduce_norm_grads(norm_part, *d_pre)
    if q_pre.over_heads:
        finish_norm_over_heads(q, dq, q_pre, sums, None)

    # Pass 2: dS (B, H, 2F, Dv) and dz' (B, H, 2F).
    cfg = run.config("state_grad", q_pre.active)
    num_blocks, splits, per_split = run.splits(n.Nq, cfg, 2 * n.B * n.H,
                                               d_state.nbytes + d_normaliser.nbytes, budget)
    ds_part, dz_part = _state_target(splits, n, d_state, d_normaliser)
    launch(
        hedgehog_state_grad_kernel, (2, splits, n.B * n.H),
        q, do, w_q, per_query, ds_part, dz_part, n.Nq, n.H, n.D, n.F, n.Dv, num_blocks,
        per_split, *q.stride(), *do.stride(), *w_q.stride(), *per_query.stride()[:3],
        *ds_part.stride(), *dz_part.stride(), *q_pre.args(), **run.flags(cfg), **q_pre.meta())
    del per_query
    if splits > 1:
        _sum_partials(ds_part, d_state, dz_part, d_normaliser)


def hedgehog_key_grads(k: Tensor, v: Tensor, key_mask: Optional[Tensor], w_k: Tensor,
                       d_state: Tensor, d_normaliser: Tensor, centre: Tensor, dk: Tensor,
                       dv: Tensor, dw_k: Tensor, *, qkv_bytes: Optional[int] = None,
                       block_n: Optional[int] = None, num_splits: Optional[int] = None,
                       check: bool = True, pre=None, d_pre=(None, None)) -> None:
    """Fill dk, dv (0 for masked keys) and dw_k (the gradient of W_k over these keys) from the
    given dS, dz' and centre m (hedgehog_query_grads). pre, d_pre: as there, the k side."""
    if check:
        n = _check_keys(k, v, key_mask, w_k)
        _check_state(n, d_state, d_normaliser, k.device, ("d_state", "d_normaliser"))
        _check_centre(n, centre, k.device)
        _check_like("dk", dk, tuple(k.shape), k.dtype, k.device)
        _check_like("dv", dv, tuple(v.shape), v.dtype, v.device)
        _check_weight_grad("dw_k", dw_k, w_k)
    else:
        n = _sizes(None, k, v.shape[3], w_k)
    run = _Launcher(n, k.dtype, k.device, block_n, num_splits)
    budget = plan.scratch_budget(qkv_bytes or _nbytes(k, v))
    weight_slab = n.B * n.H * n.D * n.F * 4
    k_pre = PreLaunch(pre, "k")

    # Pass 3: dk, dv, dW_k.
    cfg = run.config("key_grad", k_pre.active)
    mask, s_mb, s_mn = mask_args(key_mask)
    num_blocks, splits, per_split = run.splits(n.Nk, cfg, n.B * n.H, weight_slab, budget)
    dw_part, dw_strides = _weight_grad_target(splits, n, dw_k)
    norm_part, sums = k_pre.grad_partials(splits * n.B, n.H, n.D, k.device), k_pre.row_sums(k)
    launch(
        hedgehog_key_grad_kernel, (splits, n.B * n.H),
        k, v, mask, w_k, d_state, d_normaliser, centre, dk, dv, dw_part, n.Nk, n.H, n.D, n.F,
        n.Dv, num_blocks, per_split, *k.stride(), *v.stride(), s_mb, s_mn, *w_k.stride(),
        *d_state.stride(), *d_normaliser.stride(), *dk.stride(), *dv.stride(), *dw_strides,
        *k_pre.args(), *k_pre.grad_args(norm_part, sums),
        HAS_MASK=key_mask is not None, EMULATE_DW=_emulates_bf16(dw_k.dtype), **run.flags(cfg),
        **k_pre.meta())
    if dw_part is not dw_k:
        _sum_partials(dw_part.flatten(0, 1), dw_k)
    reduce_norm_grads(norm_part, *d_pre)
    if k_pre.over_heads:
        finish_norm_over_heads(k, dk, k_pre, sums, key_mask)
