"""The Triton backend: kernels in linattn/kernels/triton, on CUDA GPUs (or the CPU under
TRITON_INTERPRET=1, which is how CI checks them)."""
from __future__ import annotations

import os

import torch

from .base import Availability, KernelBackend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


class TritonBackend(KernelBackend):
    name = "triton"
    supported_maps = frozenset({"relu", "elu", "softmax", "identity"})
    supported_dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})

    def availability(self) -> Availability:
        try:
            import triton  # noqa: F401
        except ImportError as error:
            return Availability(False, f"triton is not importable ({error})")
        if _interpreting():
            return Availability(True, "Triton interpreter on the CPU (TRITON_INTERPRET=1)")
        if not torch.cuda.is_available():
            return Availability(False, "torch sees no CUDA device (set TRITON_INTERPRET=1 to run "
                                       "the kernels interpreted on the CPU)")
        return Availability(True, "Triton kernels on CUDA")

    def check_device(self, device: torch.device):
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _interpreting():
            return None
        return f"it runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device.type}"
