"""Input checks, done once at the public boundary, with messages that name the argument."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..feature_maps import FeatureMap

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("bnhd", "bhnd")


@dataclass(frozen=True)
class Problem:
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


def validate(q: Tensor, k: Tensor, v: Tensor, *, layout: str, eps: float,
             key_padding_mask: Optional[Tensor], q_map: FeatureMap, k_map: FeatureMap) -> Problem:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected 'bnhd' (B, N, H, D) or 'bhnd' (B, H, N, D), got {layout!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, layout)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: dtypes must be equal, got q {_dtype_name(q.dtype)}, "
                        f"k {_dtype_name(k.dtype)}, v {_dtype_name(v.dtype)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: must be on one device, got q on {q.device}, k on {k.device}, "
                         f"v on {v.device}")
    qb, kb, vb = (to_bnhd(t, layout) for t in (q, k, v))
    (B, Nq, H, D), (Bk, Nk, Hk, Dk), (Bv, Nv, Hv, Dv) = qb.shape, kb.shape, vb.shape
    if not (B == Bk == Bv):
        raise ValueError(f"q, k, v: batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if not (H == Hk == Hv):
        raise ValueError(f"q, k, v: numbers of heads differ: q {H}, k {Hk}, v {Hv}")
    if D != Dk:
        raise ValueError(f"q, k: head dims differ: q {D}, k {Dk}")
    if Nk != Nv:
        raise ValueError(f"k, v: sequence lengths differ: k {Nk}, v {Nv}")
    for name, size in (("batch", B), ("heads", H), ("head dim", D), ("value dim", Dv)):
        if size == 0:
            raise ValueError(f"q, k, v: {name} is 0; every dimension must be at least 1")
    if Nq == 0:
        raise ValueError("q: the query sequence is empty (N = 0)")
    if Nk == 0:
        raise ValueError("k, v: the key/value sequence is empty (N = 0)")

    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps: must be a finite number > 0 (the denominator φ(q)ᵀz + eps is 0 "
                         f"for a query with no positive feature), got {eps}")

    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor):
            raise TypeError(f"key_padding_mask: expected a bool tensor (B, Nk), "
                            f"got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask: expected dtype bool (True = keep), "
                            f"got {_dtype_name(key_padding_mask.dtype)}")
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(f"key_padding_mask: expected shape (B, Nk) = {(B, Nk)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask: must be on {q.device} like q, k, v, "
                             f"got {key_padding_mask.device}")

    for name, fmap in (("feature_map (for q)", q_map), ("feature_map (for k)", k_map)):
        fmap.check_input(H, D, name)
        for p in fmap.kernel_params():
            if p.device != q.device:
                raise ValueError(f"{name}: parameters are on {p.device}, inputs on {q.device}")
    Fq, Fk = q_map.output_dim(D), k_map.output_dim(D)
    if Fq != Fk:
        raise ValueError(f"feature_map: φ(q) and φ(k) must have the same width, got {Fq} and {Fk}")
    return Problem(B, Nq, Nk, H, D, Dv, Fq)
