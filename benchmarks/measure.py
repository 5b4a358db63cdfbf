"""Timing, the memory floor and peak extra memory, for CPU and CUDA alike.

* Time: the median of repeated calls. On CUDA, CUDA events around each call after warm-up
  (triton.testing.do_bench, median); on the CPU, pytest-benchmark's own median.
* Floor: bytes the op must move (each input read once, each output written once) over the copy
  bandwidth measured in the same run (a large tensor copy, bytes read + written).
* Peak extra memory: on CUDA, torch.cuda.max_memory_allocated above what was allocated before the
  call, less the outputs; on the CPU, the growth of the process's peak resident set (VmHWM, reset
  through /proc/self/clear_refs), less the outputs.
"""
from __future__ import annotations

import ctypes
import gc
import time

import torch


def _return_freed_memory_to_the_os() -> None:
    """Make glibc serve every allocation of 64 KiB or more with its own mmap, released on free.

    By default glibc raises its mmap threshold after the first large free and then recycles
    freed heap memory that stays resident, so a new output can land on pages already counted in
    the RSS and the CPU peak-memory reading comes out too low (even negative)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024)


_return_freed_memory_to_the_os()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read and written."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton.testing
        seconds = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") / 1e3
    else:
        times = []
        for _ in range(7):
            start = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
    return 2 * nbytes / seconds


def cuda_median_seconds(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=50, rep=400, return_mode="median") / 1e3


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_extra_bytes(fn, output_bytes: int, device: torch.device) -> int | None:
    """Peak memory `fn` needs beyond its inputs and `output_bytes` of outputs (None: unknown)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak - output_bytes
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _proc_kib("VmRSS") * 1024
    result = fn()
    peak = _proc_kib("VmHWM") * 1024 - before
    del result
    return peak - output_bytes
