"""Input checks, done once at the public boundary, with messages that name the argument.

Cheap: each check compares values Python already holds (ranks, sizes, dtypes, devices) and a
message is only formatted once a check has failed. The op (linear_attention.py) also remembers
call shapes that passed, so a repeated call is recognised by one dictionary lookup; what
depends only on (dtype, dims, map names, device), which backend runs and whether its kernels
take the inputs, is cached by linattn.backends.choose_backend.

Traceable by torch.compile, with dynamic shapes too: no math.isfinite (eps may arrive as a
symbolic float; 0 < eps < inf says the same and traces), nothing that reads tensor values.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..feature_maps import FeatureMap

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("bnhd", "bhnd")


class Problem(NamedTuple):
    """The sizes of one call, in (B, N, H, D) terms."""
    batch: int
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    value_dim: int
    feature_dim: int


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_tensor(name: str, t, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        expected = "(B, N, H, D)" if layout == "bnhd" else "(B, H, N, D)"
        raise ValueError(f"{name}: expected a rank-4 tensor {expected} for layout={layout!r}, "
                         f"got rank {t.dim()} with shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: dtype {_dtype_name(t.dtype)} is not supported; expected one of "
                        f"{[_dtype_name(d) for d in SUPPORTED_DTYPES]}")


def to_bnhd(t: Tensor, layout: str) -> Tensor:
    """A (B, N, H, D)-indexed view of an input in `layout` (never a copy)."""
    return t if layout == "bnhd" else t.transpose(1, 2)


def _bnhd_shape(t: Tensor, layout: str):
    shape = t.shape
    return shape if layout == "bnhd" else (shape[0], shape[2], shape[1], shape[3])


def validate(q: Tensor, k: Tensor, v: Tensor, *, layout: str, eps: float,
             key_padding_mask: Optional[Tensor], q_map: FeatureMap, k_map: FeatureMap) -> Problem:
    """Every check; a Problem with the call's sizes when all pass."""
    return _validate(q, k, v, layout=layout, eps=eps, key_padding_mask=key_padding_mask,
                     q_map=q_map, k_map=k_map)


def check_eps(eps) -> None:
    """validate's check of eps alone (what a remembered call shape does not cover)."""
    _check_eps(eps)


def _check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not 0 < eps < math.inf:  # also False for NaN
        raise ValueError(f"eps: must be a finite number > 0 (the denominator φ(q)ᵀz + eps is 0 "
                         f"for a query with no positive feature), got {eps}")


def _validate(q: Tensor, k: Tensor, v: Tensor, *, layout: str, eps: float,
              key_padding_mask: Optional[Tensor], q_map: FeatureMap,
              k_map: FeatureMap) -> Problem:
    if layout != "bnhd" and layout != "bhnd":
        raise ValueError(f"layout: expected 'bnhd' (B, N, H, D) or 'bhnd' (B, H, N, D), got {layout!r}")
    _check_tensor("q", q, layout)
    _check_tensor("k", k, layout)
    _check_tensor("v", v, layout)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes must be equal, got q {_dtype_name(q.dtype)}, "
                        f"k {_dtype_name(k.dtype)}, v {_dtype_name(v.dtype)}")
    device = q.device
    if not (device == k.device == v.device):
        raise ValueError(f"q, k, v: must be on one device, got q on {q.device}, k on {k.device}, "
                         f"v on {v.device}")
    (B, Nq, H, D), (Bk, Nk, Hk, Dk), (Bv, Nv, Hv, Dv) = (
        _bnhd_shape(q, layout), _bnhd_shape(k, layout), _bnhd_shape(v, layout))
    if not (B == Bk == Bv):
        raise ValueError(f"q, k, v: batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if not (H == Hk == Hv):
        raise ValueError(f"q, k, v: numbers of heads differ: q {H}, k {Hk}, v {Hv}")
    if D != Dk:
        raise ValueError(f"q, k: head dims differ: q {D}, k {Dk}")
    if Nk != Nv:
        raise ValueError(f"k, v: sequence lengths differ: k {Nk}, v {Nv}")
    if B == 0 or H == 0 or D == 0 or Dv == 0:
        for name, size in (("batch", B), ("heads", H), ("head dim", D), ("value dim", Dv)):
            if size == 0:
                raise ValueError(f"q, k, v: {name} is 0; every dimension must be at least 1")
    if Nq == 0:
        raise ValueError("q: the query sequence is empty (N = 0)")
    if Nk == 0:
        raise ValueError("k, v: the key/value sequence is empty (N = 0)")

    _check_eps(eps)

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask: expected a bool tensor (B, Nk), "
                            f"got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype bool (True = keep), "
                            f"got {_dtype_name(key_padding_mask.dtype)}")
        if key_padding_mask.dim() != 2 or key_padding_mask.shape[0] != B \
                or key_padding_mask.shape[1] != Nk:
            raise ValueError(f"key_padding_mask: expected shape (B, Nk) = {(B, Nk)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != device:
            raise ValueError(f"key_padding_mask: must be on {device} like q, k, v, "
                             f"got {key_padding_mask.device}")

    for name, fmap in (("feature_map (for q)", q_map), ("feature_map (for k)", k_map)):
        fmap.check_input(H, D, name)
        for p in fmap.kernel_params():
            if p.device != device:
                raise ValueError(f"{name}: parameters are on {p.device}, inputs on {device}")
    Fq = q_map.output_dim(D)
    Fk = Fq if k_map is q_map else k_map.output_dim(D)
    if Fq != Fk:
        raise ValueError(f"feature_map: φ(q) and φ(k) must have the same width, got {Fq} and {Fk}")
    return Problem(B, Nq, Nk, H, D, Dv, Fq)
