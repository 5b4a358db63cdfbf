"""The native CPU backend: C++ kernels in csrc/cpu, reached through linattn._C.

The module does not link against torch: each tensor crosses as a plain tuple (data pointer,
dtype code, shape, strides in elements; csrc/bindings.cpp also takes ``_C.View`` objects, but
building one per tensor costs several times more), and the kernels read any strides, so inputs
are never copied. The tensors stay referenced here for the whole call, which is what keeps the pointers
valid. The kernels use torch's thread count (torch.get_num_threads()).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .._native import load_error, native
from .base import Availability, KernelBackend, MapCall, PreCall

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                torch.float64: "float64", torch.bool: "bool"}
# The binding's dtype codes, looked up once (an attribute lookup on the enum per tensor costs
# as much as the rest of the view).
_DTYPE_CODES = {} if native is None else {
    dtype: getattr(native.DType, name) for dtype, name in _DTYPE_NAMES.items()}


def _view(t: Tensor) -> tuple:
    return (t.data_ptr(), _DTYPE_CODES[t.dtype], t.shape, t.stride())


def _views(ts: Sequence[Tensor]) -> list:
    return [_view(t) for t in ts]


def _optional_view(t: Optional[Tensor]):
    return None if t is None else _view(t)


def _norm_arg(norm) -> Optional[tuple]:
    if norm is None:
        return None
    return (norm.kind, norm.over_heads, norm.eps, norm.start, norm.stop,
            _optional_view(norm.weight), _optional_view(norm.bias))


def _pre_args(pre: Optional[PreCall]) -> Optional[tuple]:
    """The native pre argument of a call: None (nothing applied before φ), or the tuple
    (q_norm, k_norm, rope, q_stats, k_stats) csrc/bindings.cpp reads into PreArgs."""
    if pre is None:
        return None
    spec = pre.spec
    rope = spec.rope
    if rope is not None:
        rope = (rope.style, rope.start, _view(rope.cos), _view(rope.sin))
    return (_norm_arg(spec.q_norm), _norm_arg(spec.k_norm), rope,
            _optional_view(pre.q_stats), _optional_view(pre.k_stats))


def _describe_build() -> str:
    info = native.build_info()
    simd = f"{info['vector_bytes'] * 8}-bit vectors" + (", FMA" if info["fma"] else "")
    return f"native C++ kernels (OpenMP, {simd})"


# Read once here: availability() runs inside torch.compile'd code, where dynamo cannot trace a
# call into the extension module, only Python values.
_AVAILABILITY = (Availability(False, load_error) if native is None
                 else Availability(True, _describe_build()))


class CpuBackend(KernelBackend):
    name = "cpu"
    supported_maps = frozenset({"relu", "elu", "softmax", "identity", "hedgehog"})
    supported_dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
    supports_pre_attention = True

    def availability(self) -> Availability:
        return _AVAILABILITY

    def check_device(self, device: torch.device):
        return None if device.type == "cpu" else f"it runs CPU tensors, got a {device.type} tensor"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                q_map: MapCall, k_map: MapCall, eps: float,
                o: Tensor, state: Tensor, normaliser: Tensor,
                pre: Optional[PreCall] = None) -> None:
        # One comprehension for all views: per call of a small problem, Python's function
        # calls are a visible share of the host time.
        q_, k_, v_, o_, s_, z_ = [(t.data_ptr(), _DTYPE_CODES[t.dtype], t.shape, t.stride())
                                  for t in (q, k, v, o, state, normaliser)]
        native.cpu_forward(
            q_, k_, v_, None if key_mask is None else _view(key_mask),
            q_map.name, _views(q_map.params) if q_map.params else (),
            k_map.name, _views(k_map.params) if k_map.params else (), eps,
            o_, s_, z_, torch.get_num_threads(), None if pre is None else _pre_args(pre))

    def backward(self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                 q_map: MapCall, k_map: MapCall, eps: float, state: Tensor, normaliser: Tensor,
                 dq: Tensor, dk: Tensor, dv: Tensor,
                 d_q_params: Sequence[Tensor], d_k_params: Sequence[Tensor],
                 pre: Optional[PreCall] = None,
                 d_pre: Sequence[Optional[Tensor]] = (None, None, None, None)) -> None:
        do_, q_, k_, v_, s_, z_, dq_, dk_, dv_ = [
            (t.data_ptr(), _DTYPE_CODES[t.dtype], t.shape, t.stride())
            for t in (do, q, k, v, state, normaliser, dq, dk, dv)]
        if pre is None:
            pre_args = (None, None, None, None, None)
        else:
            pre_args = (_pre_args(pre), *(_optional_view(t) for t in d_pre))
        native.cpu_backward(
            do_, q_, k_, v_, None if key_mask is None else _view(key_mask),
            q_map.name, _views(q_map.params) if q_map.params else (),
            k_map.name, _views(k_map.params) if k_map.params else (), eps,
            s_, z_, dq_, dk_, dv_, _views(d_q_params) if d_q_params else (),
            _views(d_k_params) if d_k_params else (), torch.get_num_threads(), *pre_args)

    def forward_state(self, k: Tensor, v: Tensor, key_mask: Optional[Tensor], k_map: MapCall,
                      state: Tensor, normaliser: Tensor, pre: Optional[PreCall] = None) -> None:
        native.cpu_forward_state(
            _view(k), _view(v), None if key_mask is None else _view(key_mask), k_map.name,
            _views(k_map.params), _view(state), _view(normaliser), torch.get_num_threads(),
            _pre_args(pre))

    def forward_output(self, q: Tensor, q_map: MapCall, eps: float, state: Tensor,
                       normaliser: Tensor, o: Tensor, pre: Optional[PreCall] = None) -> None:
        native.cpu_forward_output(
            _view(q), q_map.name, _views(q_map.params), eps, _view(state), _view(normaliser),
            _view(o), torch.get_num_threads(), _pre_args(pre))

    # The cpu kernels keep S and dS in the state dtype throughout: no operand rounding to undo,
    # so they do not centre (base.py): the query pass writes m = 0 and dz' = dz.

    def backward_queries(self, do: Tensor, q: Tensor, q_map: MapCall, eps: float,
                         state: Tensor, normaliser: Tensor, dq: Tensor, d_state: Tensor,
                         d_normaliser: Tensor, centre: Tensor,
                         d_q_params: Sequence[Tensor], pre: Optional[PreCall] = None,
                         d_pre: Sequence[Optional[Tensor]] = (None, None)) -> None:
        native.cpu_backward_queries(
            _view(do), _view(q), q_map.name, _views(q_map.params), eps, _view(state),
            _view(normaliser), _view(dq), _view(d_state), _view(d_normaliser),
            _views(d_q_params), torch.get_num_threads(), _pre_args(pre),
            *(_optional_view(t) for t in d_pre))
        centre.zero_()

    def backward_keys(self, k: Tensor, v: Tensor, key_mask: Optional[Tensor], k_map: MapCall,
                      d_state: Tensor, d_normaliser: Tensor, centre: Tensor, dk: Tensor,
                      dv: Tensor, d_k_params: Sequence[Tensor], pre: Optional[PreCall] = None,
                      d_pre: Sequence[Optional[Tensor]] = (None, None)) -> None:
        # dz = dz' − dS m. The m this backend writes is 0, whose product is exactly 0: this is
        # only the contract's arithmetic (B·H·D'·Dv multiply-adds), kept so any m is right.
        d_normaliser = torch.baddbmm(
            d_normaliser.flatten(0, 1).unsqueeze(-1), d_state.flatten(0, 1),
            centre.flatten(0, 1).unsqueeze(-1), alpha=-1).view_as(d_normaliser)
        native.cpu_backward_keys(
            _view(k), _view(v), None if key_mask is None else _view(key_mask), k_map.name,
            _views(k_map.params), _view(d_state), _view(d_normaliser), _view(dk), _view(dv),
            _views(d_k_params), torch.get_num_threads(), _pre_args(pre),
            *(_optional_view(t) for t in d_pre))
