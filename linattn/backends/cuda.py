"""The CUDA C++ backend: kernels in csrc/cuda, compiled when CMake finds nvcc."""
from __future__ import annotations

import torch

from .._native import load_error, native
from .base import Availability, KernelBackend


class CudaBackend(KernelBackend):
    name = "cuda"
    supported_maps = frozenset()
    supported_dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})

    def availability(self) -> Availability:
        if native is None:
            return Availability(False, load_error)
        if not getattr(native, "has_cuda_kernels", False):
            return Availability(False, "this build of linattn._C has no CUDA C++ kernels "
                                       "(csrc/cuda holds none yet, or nvcc was not found)")
        if not torch.cuda.is_available():
            return Availability(False, "torch sees no CUDA device")
        return Availability(True, "CUDA C++ kernels")

    def check_device(self, device: torch.device):
        return None if device.type == "cuda" else f"it runs CUDA tensors, got a {device.type} tensor"
