"""The native CPU backend: C++ kernels in csrc/cpu, reached through linattn._C."""
from __future__ import annotations

import torch

from .._native import load_error, native
from .base import Availability, KernelBackend


class CpuBackend(KernelBackend):
    name = "cpu"
    supported_maps = frozenset({"relu", "elu", "softmax", "identity"})
    supported_dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})

    def availability(self) -> Availability:
        if native is None:
            return Availability(False, load_error)
        return Availability(True, "native C++ kernels (OpenMP)")

    def check_device(self, device: torch.device):
        return None if device.type == "cpu" else f"it runs CPU tensors, got a {device.type} tensor"
