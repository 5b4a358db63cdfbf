"""The public op: linattn.linear_attention.

Per call, on the host: resolve the feature maps (builtin names map to shared instances, not a new
module per call), validate (validation.py) and choose the backend (linattn.backends.
choose_backend), then run the float64 reference or the kernels (autograd.py: directly in eager
mode, through the custom ops when traced). Keyword arguments that reach the kernels travel in
execute.Settings.

A call shaped exactly like one that passed validation (same shapes, dtypes, devices, layout,
mask, builtin maps, backend request) is recognised by one dictionary lookup, which returns its
sizes and backend: the checks and the choice read nothing else (eps, which they also read, is
checked every call). Hedgehog and user maps hold state the checks read, so their calls are
checked in full. The q/k norms and RoPE (linattn.pre_attention) hold the call's own weights and
tables: they are resolved on every call, against the remembered sizes.
"""
from __future__ import annotations

import operator
import os
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .. import feature_maps, pre_attention
from ..backends import ENV_VARIABLE, REFERENCE, choose_backend, on_clear_cache
from ..feature_maps import BUILTIN_MAPS, FeatureMap
from ..pre_attention import QKNorm, RoPE
from ..pre_attention import reference as pre_reference
from .autograd import apply_kernels
from .execute import Settings
from .reference import linear_attention_reference
from .validation import Problem, check_eps, validate

FeatureMapArg = Union[str, FeatureMap, Sequence[Union[str, FeatureMap]]]

# The builtin maps hold no state: one instance per name serves every call.
_BUILTIN_INSTANCES = {name: cls() for name, cls in BUILTIN_MAPS.items()}
_IDENTITY = _BUILTIN_INSTANCES["identity"]


def _resolve_map(spec, argument: str) -> FeatureMap:
    if isinstance(spec, str) and spec in _BUILTIN_INSTANCES:
        return _BUILTIN_INSTANCES[spec]
    return feature_maps.resolve(spec, argument)  # a module, or an error naming the argument


def _resolve_maps(feature_map: FeatureMapArg) -> tuple[FeatureMap, FeatureMap]:
    if type(feature_map) is str:
        fmap = _BUILTIN_INSTANCES.get(feature_map)
        if fmap is not None:
            return fmap, fmap
    if isinstance(feature_map, (tuple, list)):
        if len(feature_map) != 2:
            raise ValueError(f"feature_map: a sequence must be (map for q, map for k), "
                             f"got {len(feature_map)} entries")
        return (_resolve_map(feature_map[0], "feature_map[0] (for q)"),
                _resolve_map(feature_map[1], "feature_map[1] (for k)"))
    fmap = _resolve_map(feature_map, "feature_map")
    return fmap, fmap


# Calls that passed validation and the backend choice: key -> (Problem, backend name).
_checked_calls: dict[tuple, tuple[Problem, str]] = {}
on_clear_cache(_checked_calls.clear)
_STATELESS_MAPS = tuple(BUILTIN_MAPS.values())


def _call_key(q, k, v, layout, mask, q_map, k_map, backend, has_pre) -> Optional[tuple]:
    """What validation and the backend choice read, or None where that is more (a map with
    state, a non-tensor argument: those calls take the full path, which also words errors).
    has_pre: q/k norms or RoPE are passed (the backend choice asks whether they are fused;
    their own tensors are checked on every call)."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)
            and (mask is None or isinstance(mask, Tensor))
            and type(q_map) in _STATELESS_MAPS and type(k_map) in _STATELESS_MAPS):
        return None
    return (backend, os.environ.get(ENV_VARIABLE) if backend == "auto" else None, layout,
            q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            type(q_map), type(k_map), None if mask is None else (mask.shape, mask.dtype,
                                                                mask.device), has_pre)


@torch.compiler.assume_constant_result
def _choose_backend(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                    value_dim: int, feature_dim: int, map_names: tuple[str, str],
                    pre_attention: bool) -> str:
    """choose_backend, which a trace does not follow: torch.compile runs it once, as Python, and
    keeps its answer as a constant of the graph (its arguments are constants there too), so
    availability checks and imports inside it cannot break the graph."""
    return choose_backend(requested, device, dtype, head_dim, value_dim, feature_dim, map_names,
                          stacklevel=5,  # the warning points at linear_attention's caller
                          pre_attention=pre_attention)


def _kernel_map_names(q_map: FeatureMap, k_map: FeatureMap) -> tuple[str, str]:
    """The maps the kernels run: a map they do not know is applied first and they run identity."""
    return (q_map.kernel_name if q_map.kernel_name is not None else "identity",
            k_map.kernel_name if k_map.kernel_name is not None else "identity")


def _without_masked_keys(k: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """k with masked keys set to 0, before a map the kernels do not know is applied to it in
    PyTorch: φ of whatever padding holds (inf, NaN) would otherwise reach the map's parameter
    gradients through autograd (0 · NaN), though the kernels never read masked φ(k)."""
    if key_padding_mask is None:
        return k
    return torch.where(key_padding_mask[:, :, None, None], k, 0.0)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, *, feature_map: FeatureMapArg = "relu",
                     eps: float = 1e-6, layout: str = "bnhd",
                     key_padding_mask: Optional[Tensor] = None, backend: str = "auto",
                     q_norm: Optional[QKNorm] = None, k_norm: Optional[QKNorm] = None,
                     rope: Optional[RoPE] = None) -> Tensor:
    """Non-causal linear attention: o_i = φ(q_i)ᵀ S / (φ(q_i)ᵀ z + eps),
    S = Σ_j φ(k_j) v_jᵀ and z = Σ_j φ(k_j) accumulated in float32 (float64 for float64 inputs).

    With q_norm, k_norm or rope, φ applies to RoPE(q_norm(q)) and RoPE(k_norm(k)): pass the
    projected q and k as the DiT computes them and the kernels normalise and rotate them while
    loading, never writing the results to memory (linattn/pre_attention/spec.py).

    Args:
        q: (B, Nq, H, D) queries ((B, H, Nq, D) with layout="bhnd").
        k: (B, Nk, H, D) keys; Nk may differ from Nq.
        v: (B, Nk, H, Dv) values; Dv may differ from D.
        feature_map: "relu" (default), "elu" (elu + 1), "softmax" (over the head dim),
            "identity", a linattn.feature_maps.FeatureMap module (e.g. Hedgehog), or a pair
            (map for q, map for k).
        eps: added to the denominator; must be > 0.
        layout: "bnhd" or "bhnd"; read in place (strides), never copied.
        key_padding_mask: (B, Nk) bool, True = keep. Masked keys contribute nothing: whatever
            they hold (inf and NaN included) never reaches the output, and their gradients
            (dk, dv) are exactly 0. A batch row whose keys are all masked returns exactly 0
            for every query (S = 0, z = 0, so o = 0 / eps), and its queries' gradients are
            exactly 0 too. The same on every backend.
        backend: "auto" (fastest available for the device; LINATTN_BACKEND overrides),
            "reference" (float64 PyTorch oracle), "cpu", "triton".
        q_norm, k_norm: linattn.QKNorm: RMSNorm or LayerNorm of q / k over each head or over
            all heads of a token, with optional weight and bias (which get gradients).
        rope: linattn.RoPE: rotary embedding of q and k (interleaved pairs or halves), on the
            tokens its tables cover.

    Returns:
        (B, Nq, H, Dv) (or (B, H, Nq, Dv)) in q's dtype. Differentiable in q, k, v, the
        feature maps' parameters and the norms' weights and biases on every backend.
    """
    q_map, k_map = _resolve_maps(feature_map)
    compiling = torch.compiler.is_compiling()
    has_pre = q_norm is not None or k_norm is not None or rope is not None
    key = None if compiling else _call_key(q, k, v, layout, key_padding_mask, q_map, k_map,
                                           backend, has_pre)
    checked = None if key is None else _checked_calls.get(key)
    if checked is not None:
        check_eps(eps)
        problem, name = checked
        D, Dv, F = problem.head_dim, problem.value_dim, problem.feature_dim
    else:
        problem = validate(q, k, v, layout=layout, eps=eps, key_padding_mask=key_padding_mask,
                           q_map=q_map, k_map=k_map)
        D, Dv, F = problem.head_dim, problem.value_dim, problem.feature_dim
        if compiling:
            # Traced with dynamic shapes, the dims are symbolic: the backend choice specialises
            # on the head dims (the kernels do anyway), never on B or N. operator.index is what
            # dynamo turns into a constant (int() keeps the symbol).
            D, Dv, F = operator.index(D), operator.index(Dv), operator.index(F)
        # Norms and RoPE reach the kernels only where both maps have kernels (below).
        fused_pre = has_pre and q_map.kernel_name is not None and k_map.kernel_name is not None
        name = _choose_backend(backend, q.device, q.dtype,
                               D if q_map.kernel_name is not None else F, Dv, F,
                               _kernel_map_names(q_map, k_map), fused_pre)
        if key is not None:
            if len(_checked_calls) >= 4096:  # a process cycling through endless shapes
                _checked_calls.clear()
            _checked_calls[key] = (problem, name)
    # The norms and RoPE hold this call's tensors: checked every call (shapes, dtypes, devices
    # against the sizes above) and turned into the views the kernels take.
    pre = None if not has_pre else pre_attention.resolve(
        q_norm, k_norm, rope, batch=problem.batch, heads=problem.heads, head_dim=D,
        q_len=problem.q_len, kv_len=problem.kv_len, dtype=q.dtype, device=q.device)
    bhnd = layout == "bhnd"
    if bhnd:
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if name == REFERENCE:
        out = linear_attention_reference(q, k, v, q_map, k_map, eps, key_padding_mask, pre=pre)
        return out.transpose(1, 2).contiguous() if bhnd else out

    if pre is not None and (q_map.kernel_name is None or k_map.kernel_name is None):
        # A map no kernel knows runs in PyTorch (below), so the norms and RoPE before it must too.
        q = pre_reference.apply(q, pre.q_norm, pre.rope)
        k = pre_reference.apply(_without_masked_keys(k, key_padding_mask), pre.k_norm, pre.rope)
        pre = None
    # A map no kernel knows is applied here, in PyTorch (autograd differentiates it), and the
    # kernels run with the identity map on its output. Documented in feature_maps/base.py.
    q_name, k_name = _kernel_map_names(q_map, k_map)
    if q_map.kernel_name is None:
        q, q_map = q_map(q), _IDENTITY
    if k_map.kernel_name is None:
        k, k_map = k_map(_without_masked_keys(k, key_padding_mask)), _IDENTITY
    out = apply_kernels(q, k, v, key_padding_mask, q_map.kernel_params(), k_map.kernel_params(),
                        Settings(q_name, k_name, float(eps), bhnd, name), compiling, pre)
    return out.transpose(1, 2) if bhnd else out
