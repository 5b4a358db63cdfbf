"""The backend registry: which implementations exist, which can run here, and why not.

"reference" is plain PyTorch in float64 (linattn/ops/reference.py) and runs everywhere. The
kernel backends ("cpu": native C++ in csrc/cpu; "triton": linattn/kernels/triton) implement
linattn.backends.base.KernelBackend.

backend="auto" picks, for the tensors' device, the first available of AUTO_ORDER; the
environment variable LINATTN_BACKEND overrides "auto". An explicitly requested backend that
cannot run raises BackendUnavailableError saying why; nothing falls back silently.

choose_backend is what the op calls: resolve_backend plus the kernels' check of the inputs
(dtype, dims, maps), cached, since the answer depends only on (request, device, dtype, dims,
map names). Availability is taken to be fixed for the life of the process (a module that
failed to import stays failed; a GPU does not appear); clear_cache() forgets every answer, for
tests that pretend otherwise.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .base import Availability, BackendUnavailableError, KernelBackend, MapCall, PreCall
from .cpu import CpuBackend
from .triton import TritonBackend

REFERENCE = "reference"
KERNEL_BACKENDS: dict[str, KernelBackend] = {b.name: b for b in (CpuBackend(), TritonBackend())}
AUTO_ORDER = {"cuda": ("triton",), "cpu": ("cpu",)}
ENV_VARIABLE = "LINATTN_BACKEND"
BACKEND_NAMES = (REFERENCE, *KERNEL_BACKENDS)


@dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str


def backends() -> list[BackendInfo]:
    """Every backend, whether it can run on this machine, and why (not)."""
    infos = [BackendInfo(REFERENCE, True, "plain PyTorch in float64; runs on any device")]
    for name, backend in KERNEL_BACKENDS.items():
        a = backend.availability()
        infos.append(BackendInfo(name, a.available, a.reason))
    return infos


def _unusable_reason(name: str, device: torch.device) -> str | None:
    backend = KERNEL_BACKENDS[name]
    a = backend.availability()
    if not a.available:
        return a.reason
    return backend.check_device(device)


_warned_auto_reference: set[tuple] = set()


def resolve_backend(requested: str, device: torch.device,
                    why_inputs_unsupported: Callable[[KernelBackend], Optional[str]] = lambda b: None,
                    stacklevel: int = 3) -> str:
    """The concrete backend name for `requested` ("auto" or a name) on `device`.

    For "auto", `why_inputs_unsupported(backend)` (None, or the reason the backend's kernels do
    not take these inputs: dtype, dims, feature map) rules out backends that would refuse them.
    """
    if requested == "auto":
        requested = os.environ.get(ENV_VARIABLE, "auto") or "auto"
        if requested != "auto" and requested not in BACKEND_NAMES:
            raise ValueError(f"LINATTN_BACKEND={requested!r} is not a backend; expected one of "
                             f"{list(BACKEND_NAMES)} or 'auto'")
    if requested == "auto":
        reasons = []
        for name in AUTO_ORDER.get(device.type, ()):
            why_not = _unusable_reason(name, device)
            if why_not is None:
                why_not = why_inputs_unsupported(KERNEL_BACKENDS[name])
            if why_not is None:
                return name
            reasons.append(f"{name}: {why_not}")
        # The reference is correct everywhere but slow: say so once per device type and reason.
        if (device.type, tuple(reasons)) not in _warned_auto_reference:
            _warned_auto_reference.add((device.type, tuple(reasons)))
            detail = "; ".join(reasons) or f"no kernel backend handles device type {device.type!r}"
            warnings.warn(f"linattn: backend='auto' uses the slow float64 reference on "
                          f"{device.type} because no kernel backend can run ({detail})",
                          RuntimeWarning, stacklevel=stacklevel)
        return REFERENCE
    if requested == REFERENCE:
        return REFERENCE
    if requested not in KERNEL_BACKENDS:
        raise ValueError(f"backend: unknown backend {requested!r}; expected 'auto' or one of "
                         f"{list(BACKEND_NAMES)}")
    why_not = _unusable_reason(requested, device)
    if why_not is not None:
        raise BackendUnavailableError(f"backend={requested!r} cannot run here: {why_not}")
    return requested


def get_kernel_backend(name: str) -> KernelBackend:
    return KERNEL_BACKENDS[name]


_chosen: dict[tuple, str] = {}


def choose_backend(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                   value_dim: int, feature_dim: int, map_names: tuple[str, str],
                   stacklevel: int = 4, pre_attention: bool = False) -> str:
    """The backend that runs a call: resolve_backend(requested, device), which for "auto" also
    passes over kernels that refuse the inputs, then, for a kernel backend asked for by name,
    its refusal as a BackendUnavailableError. head_dim is the width the kernels receive (the
    map's output width where the op applies an unfused map itself). stacklevel: of the
    warning that "auto" falls back to the reference, counted from resolve_backend.
    pre_attention: the call has q/k norms or RoPE for the kernels to fuse.

    Answers are cached per (request, LINATTN_BACKEND, device, dtype, dims, map names,
    pre_attention); errors
    are not (they are raised again, with their message, on every call)."""
    env = os.environ.get(ENV_VARIABLE) if requested == "auto" else None
    key = (requested, env, device, dtype, head_dim, value_dim, feature_dim, map_names,
           pre_attention)
    name = _chosen.get(key)
    if name is not None:
        return name

    def why_unsupported(kernel: KernelBackend) -> Optional[str]:
        return kernel.unsupported(dtype, head_dim, value_dim, feature_dim, map_names,
                                  pre_attention)

    # stacklevel: where the warning points (the caller of linear_attention, by default).
    name = resolve_backend(requested, device, why_unsupported, stacklevel=stacklevel)
    if name != REFERENCE:
        why_not = why_unsupported(KERNEL_BACKENDS[name])
        if why_not is not None:
            raise BackendUnavailableError(f"backend={name!r} cannot run these inputs: {why_not}")
    if len(_chosen) >= _CACHE_LIMIT:  # a process cycling through endless shapes
        _chosen.clear()
    _chosen[key] = name
    return name


_CACHE_LIMIT = 4096


_clear_hooks: list[Callable[[], None]] = []


def on_clear_cache(hook: Callable[[], None]) -> None:
    """Call `hook` whenever clear_cache() runs (for caches built on choose_backend's answers)."""
    _clear_hooks.append(hook)


def clear_cache() -> None:
    """Forget every cached choose_backend answer (after changing what a backend can run), and
    every cache built on them."""
    _chosen.clear()
    for hook in _clear_hooks:
        hook()


__all__ = ["backends", "BackendInfo", "resolve_backend", "choose_backend", "clear_cache",
           "on_clear_cache",
           "get_kernel_backend", "KernelBackend", "MapCall", "PreCall", "Availability",
           "BackendUnavailableError", "REFERENCE", "BACKEND_NAMES"]
