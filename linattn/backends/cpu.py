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
from .base import Availability, KernelBackend, MapCall

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

    def availability(self) -> Availability:
        return _AVAILABILITY

    def check_device(self, device: torch.device):
        return None if device.type == "cpu" else f"it runs CPU tensors, got a {device.type} tensor"

    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                q_map: MapCall, k_map: MapCall, eps: float,
                o: Tensor, state: Tensor, normaliser: Tensor) -> None:
        # One comprehension for all views: per call of a small problem, Python's function
        # calls are a visible share of the host time.
        q_, k_, v_, o_, s_, z_ = [(t.data_ptr(), _DTYPE_CODES[t.dtype], t.shape, t.stride())
                                  for t in (q, k, v, o, state, normaliser)]
        native.cpu_forward(
            q_, k_, v_, None if key_mask is None else _view(key_mask),
            q_map.name, _views(q_map.params) if q_map.params else (),
            k_map.name, _views(k_map.params) if k_map.params else (), eps,
            o_, s_, z_, torch.get_num_threads())

    def backward(self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                 q_map: MapCall, k_map: MapCall, eps: float, state: Tensor, normaliser: Tensor,
                 dq: Tensor, dk: Tensor, dv: Tensor,
                 d_q_params: Sequence[Tensor], d_k_params: Sequence[Tensor]) -> None:
        do_, q_, k_, v_, s_, z_, dq_, dk_, dv_ = [
            (t.data_ptr(), _DTYPE_CODES[t.dtype], t.shape, t.stride())
            for t in (do, q, k, v, state, normaliser, dq, dk, dv)]
        native.cpu_backward(
            do_, q_, k_, v_, None if key_mask is None else _view(key_mask),
            q_map.name, _views(q_map.params) if q_map.params else (),
            k_map.name, _views(k_map.params) if k_map.params else (), eps,
            s_, z_, dq_, dk_, dv_, _views(d_q_params) if d_q_params else (),
            _views(d_k_params) if d_k_params else (), torch.get_num_threads())
