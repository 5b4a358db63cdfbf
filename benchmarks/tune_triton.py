"""Regenerates linattn/kernels/triton/tuned_configs.py, the Triton backend's config table.

One config per (GPU architecture, kernel, padded D, padded Dv, bytes per element): the kernels
never sweep configs at run time. Two ways to choose it:

  --measure   on a GPU: every candidate that compiles without register spills and fits in
              shared memory is timed (triton.testing.do_bench, median) on a Wan-like problem
              (N = 32760 tokens, B·H = 12) and the fastest is kept.
  --static    without a GPU: candidates are compiled for --arch with Triton's own compiler
              (ptxas included) and the first one, in a fixed order of preference (larger blocks,
              more warps, more stages first), that spills no registers and fits in shared memory
              is kept. Its programs_per_sm is the occupancy ptxas' register and shared-memory
              counts allow (at most 2). This is what the shipped table is: resource-checked,
              not timed.

  --check-pre without a GPU: compiles the table's configs (plan.kernel_config) for --arch with
              each family's pre-attention work fused (q/k norms and RoPE: Wan/LTX-style RMSNorm
              over heads with pair tables, CogVideoX-style per-head LayerNorm with bias on the
              video tokens, HunyuanVideo-style per-head RMSNorm with full tables, half-rotation
              RoPE) and reports registers, spills and shared memory
              beside the same kernels without it, for the video-DiT classes.

Usage:
  python benchmarks/tune_triton.py --check-pre --arch sm90
  python benchmarks/tune_triton.py --static --arch sm90 --arch sm80 --write
  python benchmarks/tune_triton.py --measure --write          # on the GPU to tune for
  python benchmarks/tune_triton.py --static --arch sm90 --classes 128x128:2   # print only
  python benchmarks/tune_triton.py --measure --classes 128x128:2 --budget-seconds 200 --write

--budget-seconds bounds a run (benchmarks/gpu_check.py gives the tuner a fixed slice of a GPU
lease): once it is spent, a class being swept keeps the fastest candidate timed so far (in
--measure mode the table's current entry is timed first, so that is at least the baseline) and
classes not reached keep their current entries.

--write replaces the entries of the regenerated (architecture, kernel, class) keys in
tuned_configs.py and keeps all others.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from linattn.kernels.triton import backward as tbackward  # noqa: E402
from linattn.kernels.triton import forward as tforward  # noqa: E402
from linattn.kernels.triton import plan  # noqa: E402
from linattn.backends.base import PreCall  # noqa: E402
from linattn.kernels.triton.common import capture_launches  # noqa: E402
from linattn.kernels.triton.pre_attention import PreLaunch, norm_statistics  # noqa: E402
from linattn.pre_attention import NormCall, PreAttentionCall, RopeCall  # noqa: E402

TABLE_PATH = ROOT / "linattn" / "kernels" / "triton" / "tuned_configs.py"

#: Shape classes (padded D, padded Dv): the video DiTs of kernels.md (64, 128), SANA (32),
#: Hedgehog-width states (256 × 128) and Dv != D.
DEFAULT_CLASSES = [(32, 32), (64, 64), (128, 128), (256, 128), (128, 256), (64, 128), (128, 64)]
ITEMSIZES = {2: torch.bfloat16, 4: torch.float32}

#: Per-block limits: shared memory a block may use, shared memory per SM, registers per SM.
ARCH_LIMITS = {
    "sm90": dict(target=90, smem_block=232448, smem_sm=233472, regs_sm=65536),
    "sm80": dict(target=80, smem_block=166912, smem_sm=167936, regs_sm=65536),
    "sm89": dict(target=89, smem_block=101376, smem_sm=102400, regs_sm=65536),
    "sm86": dict(target=86, smem_block=101376, smem_sm=102400, regs_sm=65536),
}

#: The problem candidates are compiled (static) or timed (measure) on: Wan 2.1 1.3B at 480p.
TUNE_TOKENS, TUNE_HEADS = 32760, 12

#: time.monotonic() after which no further candidate is compiled or timed (--budget-seconds).
_deadline = math.inf


class BudgetSpent(RuntimeError):
    """--budget-seconds ran out before a class had any candidate measured."""


def _budget_spent() -> bool:
    return time.monotonic() > _deadline


def candidates(kind: str, d_pad: int, dv_pad: int, itemsize: int,
               max_block_n: int = 128) -> Iterator[plan.KernelConfig]:
    """Candidates in order of preference (the static mode keeps the first that fits), with at
    most max_block_n tokens per step."""
    kind = kind.removesuffix(plan.PRE_SUFFIX)
    widest = min(dv_pad, max(16, plan.ACC_ELEMENTS // d_pad))
    block_dvs = [bdv for bdv in (widest, widest // 2) if bdv >= 16]
    block_ns = (128, 64, 32, 16) if kind in ("output", "dkdv") else (64, 32, 16)
    if itemsize == 4:
        block_ns = tuple(n for n in block_ns if n <= 64)
    block_ns = tuple(n for n in block_ns if n <= max_block_n) or (16,)
    fused_options = (True, False) if kind == "dkdv" else (True,)
    for fused in fused_options:
        for block_dv in block_dvs:
            for block_n in block_ns:
                for warps in (8, 4):
                    for stages in (3, 2, 1):
                        yield plan.KernelConfig(block_n, block_dv, warps, stages, 1, fused)


@dataclass
class Problem:
    """Inputs and preallocated outputs of every kernel kind, on one device."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    mask: torch.Tensor
    state: torch.Tensor
    normaliser: torch.Tensor
    o: torch.Tensor
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor
    d_state: torch.Tensor
    d_normaliser: torch.Tensor
    centre: torch.Tensor

    @classmethod
    def make(cls, d: int, dv: int, dtype: torch.dtype, device: torch.device) -> "Problem":
        B, N, H = 1, TUNE_TOKENS, TUNE_HEADS
        meta = device.type == "meta"

        def tensor(*shape, dt=dtype, scale=1.0):
            if meta:
                return torch.empty(*shape, dtype=dt, device=device)
            return (torch.randn(*shape, device=device) * scale).to(dt)

        q, k, dq, dk = (tensor(B, N, H, d) for _ in range(4))
        v, do, o, dv_ = (tensor(B, N, H, dv) for _ in range(4))
        mask = (torch.empty(B, N, dtype=torch.bool, device=device) if meta
                else torch.rand(B, N, device=device) < 0.95)
        state, d_state = (tensor(B, H, d, dv, dt=torch.float32) for _ in range(2))
        normaliser = tensor(B, H, d, dt=torch.float32, scale=float(N)).abs()
        d_normaliser = tensor(B, H, d, dt=torch.float32)
        centre = tensor(B, H, dv, dt=torch.float32)
        return cls(q, k, v, do, mask, state, normaliser, o, dq, dk, dv_, d_state.view(-1),
                   d_normaliser.view(-1), centre.view(-1))


#: The variant candidates are checked and timed with: the softmax map (a row max and sum more
#: than the elementwise maps: the most registers) and a key padding mask.
TUNE_MAP = "softmax"


def run_kind(kind: str, p: Problem, pre=None) -> None:
    """Calls the host function that launches the kernel of `kind` (plus its reductions), with
    the pre-attention work `pre` (a backend PreCall) fused when given."""
    qkv_size = tforward.qkv_bytes(p.q, p.k, p.v)
    q_pre, k_pre = PreLaunch(pre, "q"), PreLaunch(pre, "k")
    d_norm = (None, None)
    if pre is not None and pre.spec.q_norm is not None:
        d_norm = tuple(None if t is None else torch.empty_like(t)
                       for t in (pre.spec.q_norm.weight, pre.spec.q_norm.bias))
    if kind == "state":
        if k_pre.over_heads:  # the forward computes a norm over heads' statistics first
            norm_statistics(p.k, k_pre)
        tforward.compute_state(p.k, p.v, p.mask, TUNE_MAP, p.state, p.normaliser, qkv_size,
                               k_pre)
    elif kind == "output":
        tforward.compute_output(p.q, TUNE_MAP, 1e-6, p.state, p.normaliser, p.o, q_pre)
    elif kind == "dq":
        tbackward.state_gradients(p.do, p.q, TUNE_MAP, 1e-6, p.state, p.normaliser, p.dq,
                                  p.d_state, p.d_normaliser, p.centre, qkv_size, q_pre,
                                  d_norm)
    elif kind == "dkdv":
        tbackward.key_gradients(p.k, p.v, p.mask, TUNE_MAP, p.d_state, p.d_normaliser,
                                p.centre, p.dk, p.dv, k_pre, d_norm)
    else:
        raise ValueError(f"kind: {kind!r}")


def record_launches(kind: str, config: plan.KernelConfig, d: int, dv: int,
                    dtype: torch.dtype, splits: int = 2, pre_variant: Optional[str] = None) -> list:
    """The launches the host code makes for `kind` with `config` (on meta tensors: nothing
    runs; two sequence splits, so the reduction launch is among them)."""
    problem = Problem.make(d, dv, dtype, torch.device("meta"))
    pre = None if pre_variant is None else PRE_VARIANTS[pre_variant](problem)
    with plan.forced(splits=splits, configs={kind: config}), capture_launches() as launches:
        run_kind(kind, problem, pre)
    return launches


# --- the pre-attention work of the DiT families, on a problem's meta tensors ------------------

def _table(*shape, device) -> torch.Tensor:
    """Nothing on meta tensors (compile only); values in [0, 1) where the kernels will run."""
    if device.type == "meta":
        return torch.empty(*shape, device=device)
    return torch.rand(*shape, device=device)


def _pre_call(p: Problem, norm: NormCall, rope: RopeCall) -> PreCall:
    B, N = p.q.shape[:2]
    stats = _table(B, N, 2, device=p.q.device) if norm.over_heads else None
    return PreCall(PreAttentionCall(norm, norm, rope), stats, stats)


def _wan_pre(p: Problem) -> PreCall:
    """RMSNorm over all heads (weight (H·D,)), interleaved RoPE from pair tables (Wan, LTX)."""
    B, N, H, D = p.q.shape
    weight = _table(H * D, device=p.q.device).view(H, D)
    table = _table(1, N, 1, D, device=p.q.device)
    return _pre_call(p, NormCall(1, True, 1e-6, 0, N, weight, None),
                     RopeCall(1, table[..., 0::2], table[..., 1::2], 0, True))


def _cogvideox_pre(p: Problem) -> PreCall:
    """Per-head LayerNorm with weight and bias (D,), RoPE from full tables on the video tokens
    after 226 text tokens (CogVideoX; HunyuanVideo's and Mochi's norms are per-head RMSNorms)."""
    B, N, H, D = p.q.shape
    weight, bias = (_table(D, device=p.q.device).expand(H, D) for _ in range(2))
    table = _table(N - 226, D, device=p.q.device)[None, :, None, :]
    return _pre_call(p, NormCall(2, False, 1e-6, 0, N, weight, bias),
                     RopeCall(1, table, table, 226, False))


def _hunyuan_pre(p: Problem) -> PreCall:
    """Per-head RMSNorm with a (D,) weight on the video tokens (the text after them has its own
    norms in dual-stream blocks), RoPE from full (S, D) tables (HunyuanVideo)."""
    B, N, H, D = p.q.shape
    weight = _table(D, device=p.q.device).expand(H, D)
    table = _table(N - 256, D, device=p.q.device)[None, :, None, :]
    return _pre_call(p, NormCall(1, False, 1e-6, 0, N - 256, weight, None),
                     RopeCall(1, table, table, 0, False))


def _half_pre(p: Problem) -> PreCall:
    """Per-head RMSNorm and half-rotation RoPE (columns loaded in interleaved order)."""
    B, N, H, D = p.q.shape
    weight = _table(D, device=p.q.device).expand(H, D)
    table = _table(N, D, device=p.q.device)[None, :, None, :]
    return _pre_call(p, NormCall(1, False, 1e-6, 0, N, weight, None),
                     RopeCall(2, table, table, 0, False))


PRE_VARIANTS = {"wan": _wan_pre, "cogvideox": _cogvideox_pre, "hunyuan": _hunyuan_pre,
                "half": _half_pre}
#: The classes the DiT families run (kernels.md): D = Dv = 64 (CogVideoX, LTX) and 128 (Wan,
#: HunyuanVideo, Mochi), bf16 and fp32.
PRE_CLASSES = [(64, 64, 2), (128, 128, 2), (64, 64, 4), (128, 128, 4)]


def check_pre(arch: str, classes: list, kinds: list) -> list[str]:
    """Compiles the table's config of every (class, kind) with and without each pre-attention
    variant; prints their resources and returns the launches that spill or do not fit."""
    limits = ARCH_LIMITS[arch]
    problems = []
    for d, dv, size in classes:
        for kind in kinds:
            for variant in (None, *PRE_VARIANTS):
                table_kind = kind if variant is None else kind + plan.PRE_SUFFIX
                entry = read_table()[0].get((arch, table_kind, d, dv, size))
                config = (plan.KernelConfig(*entry) if entry is not None
                          else plan.heuristic_config(arch, table_kind, d, dv, size, TUNE_TOKENS))
                launches = [launch for launch in record_launches(
                    kind, config, d, dv, ITEMSIZES[size], pre_variant=variant)
                    if launch[0].__name__ != "_sum_splits_kernel"]
                if variant is not None:
                    print(f"  ({table_kind} config {config.as_tuple()})", flush=True)
                for kernel, _grid, args, kwargs in launches:
                    usage = compile_launch(kernel, args, kwargs, arch)
                    fits = usage.stack == 0 and usage.smem <= limits["smem_block"]
                    line = (f"{arch} {kind:6s} D{d} Dv{dv} {size}B {variant or 'none':9s} "
                            f"{kernel.__name__:16s} regs {usage.regs:3d} stack {usage.stack:4d} "
                            f"smem {usage.smem // 1024:3d} KiB {'ok' if fits else 'SPILLS/NO FIT'}")
                    print(line, flush=True)
                    if not fits:
                        problems.append(line)
    return problems


# --- static mode: compile for an architecture this machine need not have ---------------------

class NoFit(RuntimeError):
    """No candidate config of a class can run on the architecture."""


@dataclass
class Usage:
    regs: int
    stack: int
    smem: int
    seconds: float


def compile_launch(kernel, args, kwargs, arch: str) -> Usage:
    """Compiles one recorded launch for `arch` as Triton's launcher would specialise it."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
    given = dict(zip(kernel.arg_names, args))
    given.update({key: value for key, value in kwargs.items() if key not in options})
    signature, constexprs, attrs = {}, {}, {}
    for index, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        value = given[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif spec:
            attrs[(index,)] = CUDABackend.parse_attr(spec)
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", ARCH_LIMITS[arch]["target"], 32),
                              options=options)
    seconds = time.perf_counter() - start
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as cubin:
        cubin.write(compiled.asm["cubin"])
    try:
        text = subprocess.run([str(cuobjdump), "-res-usage", cubin.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(cubin.name)
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if found is None:
        raise RuntimeError(f"cuobjdump printed no resource usage for {kernel.__name__}: {text}")
    return Usage(int(found.group(1)), int(found.group(2)), compiled.metadata.shared, seconds)


#: Launches a config does not shape (reductions and the per-token kernels of norms over heads).
_NOT_CONFIGURED = ("_sum_splits_kernel", "_stats_kernel", "_finish_kernel")


def configured_launches(kind: str, config: plan.KernelConfig, d_pad: int, dv_pad: int,
                        dtype: torch.dtype) -> list:
    """The launches `config` shapes; a "+pre" kind's are those of every pre-attention variant
    (its config must fit them all)."""
    if kind.endswith(plan.PRE_SUFFIX):
        base = kind.removesuffix(plan.PRE_SUFFIX)
        launches = [launch for variant in PRE_VARIANTS
                    for launch in record_launches(base, config, d_pad, dv_pad, dtype,
                                                  pre_variant=variant)]
    else:
        launches = record_launches(kind, config, d_pad, dv_pad, dtype)
    return [launch for launch in launches if launch[0].__name__ not in _NOT_CONFIGURED]


def _max_block_n(kind: str, d_pad: int, dv_pad: int, itemsize: int, arch: str) -> int:
    """A "+pre" kernel holds more token tiles live than the plain one, whose chosen config
    (the table's) already used what the registers allow: its search starts at half the plain
    config's tokens per step. Other kinds search every size."""
    if not kind.endswith(plan.PRE_SUFFIX):
        return 128
    entry = read_table()[0].get((arch, kind.removesuffix(plan.PRE_SUFFIX), d_pad, dv_pad,
                                 itemsize))
    return 128 if entry is None else max(16, plan.KernelConfig(*entry).block_n // 2)


def static_choice(kind: str, d_pad: int, dv_pad: int, itemsize: int, arch: str,
                  verbose: bool) -> tuple[plan.KernelConfig, str]:
    limits = ARCH_LIMITS[arch]
    dtype = ITEMSIZES[itemsize]
    fallback = None
    for config in candidates(kind, d_pad, dv_pad, itemsize,
                             _max_block_n(kind, d_pad, dv_pad, itemsize, arch)):
        if _budget_spent():
            break
        launches = configured_launches(kind, config, d_pad, dv_pad, dtype)
        usages = [compile_launch(kernel, args, kwargs, arch)
                  for kernel, _grid, args, kwargs in launches]
        worst = max(usages, key=lambda u: (u.stack, u.smem, u.regs))
        fits = all(u.stack == 0 and u.smem <= limits["smem_block"] for u in usages)
        if verbose:
            print(f"  {arch} {kind} D{d_pad} Dv{dv_pad} {itemsize}B {config}: regs {worst.regs} "
                  f"stack {worst.stack} smem {worst.smem} "
                  f"compile {sum(u.seconds for u in usages):.1f}s {'fits' if fits else ''}",
                  flush=True)
        if fits:
            threads = 32 * config.num_warps
            by_regs = limits["regs_sm"] // (threads * (math.ceil(worst.regs / 8) * 8))
            by_smem = limits["smem_sm"] // max(worst.smem, 1)
            occupancy = max(1, min(2, by_regs, by_smem))
            chosen = plan.KernelConfig(config.block_n, config.block_dv, config.num_warps,
                                       config.num_stages, occupancy, config.fused)
            return chosen, (f"static: {worst.regs} regs, no spills, {worst.smem // 1024} KiB "
                            f"shared")
        if worst.smem <= limits["smem_block"] and (fallback is None or
                                                    worst.stack < fallback[1]):
            fallback = (config, worst.stack, worst.regs, worst.smem)
    if fallback is None and _budget_spent():
        raise BudgetSpent(f"{kind} D{d_pad} Dv{dv_pad} {itemsize}B: --budget-seconds spent "
                          f"before a candidate fitted")
    if fallback is None:
        raise NoFit(f"no candidate of {kind} D{d_pad} Dv{dv_pad} {itemsize}B fits the shared "
                    f"memory of {arch}")
    config, stack, regs, smem = fallback
    return config, (f"static: NO candidate without spills; least: {stack} B stack, {regs} regs, "
                    f"{smem // 1024} KiB shared")


# --- measure mode: time candidates on this machine's GPU --------------------------------------

def measure_choice(kind: str, d_pad: int, dv_pad: int, itemsize: int, arch: str,
                   verbose: bool) -> tuple[plan.KernelConfig, str]:
    import triton.testing
    problem = Problem.make(d_pad, dv_pad, ITEMSIZES[itemsize], torch.device("cuda"))
    dtype = ITEMSIZES[itemsize]
    limits = ARCH_LIMITS[arch]
    best = None
    current = read_table()[0].get((arch, kind, d_pad, dv_pad, itemsize))
    first = [plan.KernelConfig(*current)] if current is not None else []
    timed = 0
    for config in [*first, *candidates(kind, d_pad, dv_pad, itemsize)]:
        if _budget_spent():
            break
        usages = [compile_launch(kernel, args, kwargs, arch) for kernel, _g, args, kwargs in
                  configured_launches(kind, config, d_pad, dv_pad, dtype)]
        if any(u.stack or u.smem > limits["smem_block"] for u in usages):
            continue
        for programs_per_sm in (1, 2):
            trial = plan.KernelConfig(config.block_n, config.block_dv, config.num_warps,
                                      config.num_stages, programs_per_sm, config.fused)
            base = kind.removesuffix(plan.PRE_SUFFIX)
            # A "+pre" config is timed with Wan's pre-attention work (RMSNorm over heads, RoPE).
            pre = PRE_VARIANTS["wan"](problem) if base != kind else None
            with plan.forced(configs={kind: trial}):
                ms = triton.testing.do_bench(lambda: run_kind(base, problem, pre), warmup=25,
                                             rep=100, return_mode="median")
            if verbose:
                print(f"  {kind} D{d_pad} Dv{dv_pad} {itemsize}B {trial}: {ms:.4f} ms", flush=True)
            if best is None or ms < best[1]:
                best = (trial, ms)
        timed += 1
    if best is None:
        if _budget_spent():
            raise BudgetSpent(f"{kind} D{d_pad} Dv{dv_pad} {itemsize}B: --budget-seconds spent "
                              f"before any candidate was timed")
        raise NoFit(f"no candidate of {kind} D{d_pad} Dv{dv_pad} {itemsize}B compiles without "
                    f"spills on this GPU")
    name = torch.cuda.get_device_name()
    partial = f", budget spent after {timed} candidates" if _budget_spent() else ""
    return best[0], (f"measured: {best[1]:.4f} ms at N={TUNE_TOKENS}, B*H={TUNE_HEADS} "
                      f"on {name}{partial}")


# --- the table file -----------------------------------------------------------------------------

def read_table() -> tuple[dict, dict, dict]:
    """(TABLE, NOTES, SOURCES) of the current table file."""
    namespace: dict = {}
    exec(TABLE_PATH.read_text(), namespace)  # noqa: S102 - our own generated file
    return (dict(namespace.get("TABLE", {})), dict(namespace.get("NOTES", {})),
            dict(namespace.get("SOURCES", {})))


def write_table(table: dict, notes: dict, sources: dict) -> None:
    lines = [
        '"""The Triton backend\'s config table, generated by benchmarks/tune_triton.py:',
        "do not edit by hand, rerun the script.",
        "",
        "Key: (architecture, kernel, padded head dim, padded value dim, bytes per element);",
        "a kernel with the suffix '+pre' is the same kernel applying fused q/k norms and RoPE",
        "(its config must fit every pre-attention variant of this script).",
        "Value: (block_n, block_dv, num_warps, num_stages, programs_per_sm, fused), the fields of",
        "linattn.kernels.triton.plan.KernelConfig. Classes missing here get",
        "plan.heuristic_config.",
        "",
        "SOURCES says how each architecture's entries were chosen. 'static' entries are NOT tuned:",
        "they are the first candidate, in the script's order of preference, that ptxas compiled",
        "without register spills and within the shared memory of the architecture; no kernel was",
        "timed. Rerun with --measure on the GPU to replace them with timed choices.",
        '"""',
        "",
        "SOURCES = {",
    ]
    lines += [f"    {arch!r}: {text!r}," for arch, text in sorted(sources.items())]
    lines += ["}", "", "TABLE = {"]
    for key in sorted(table):
        lines.append(f"    {key!r}: {tuple(table[key])!r},  # {notes.get(key, '')}".rstrip())
    lines += ["}", "", "NOTES = {"]
    lines += [f"    {key!r}: {notes[key]!r}," for key in sorted(notes)]
    lines += ["}", ""]
    TABLE_PATH.write_text("\n".join(lines))


def parse_classes(text: Optional[str]) -> list[tuple[int, int, int]]:
    """(padded D, padded Dv, bytes) classes; by default every DEFAULT_CLASSES size the kernels
    take in each dtype (plan.unsupported_dims refuses larger fp32 states before any launch)."""
    if not text:
        return [(d, dv, size) for d, dv in DEFAULT_CLASSES for size in ITEMSIZES
                if plan.unsupported_dims(d, dv, size) is None]
    classes = []
    for item in text.split(","):
        dims, _, size = item.partition(":")
        d, dv = (int(x) for x in dims.split("x"))
        classes.append((d, dv, int(size or 2)))
    return classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--static", action="store_true", help="compile-only choice (no GPU)")
    mode.add_argument("--measure", action="store_true", help="time candidates on this GPU")
    mode.add_argument("--check-pre", action="store_true",
                      help="compile the table's configs with fused q/k norms and RoPE (no GPU)")
    parser.add_argument("--arch", action="append", choices=sorted(ARCH_LIMITS),
                        help="static mode: architectures to compile for (repeatable)")
    parser.add_argument("--classes", help="e.g. 128x128:2,64x64:4 (padded D x Dv : bytes)")
    parser.add_argument("--kinds", default=",".join(plan.KINDS))
    parser.add_argument("--pre", action="store_true",
                        help="static mode: choose the configs of kernels with fused q/k norms and "
                             "RoPE (kinds with the '+pre' suffix; classes default to the "
                             "video-DiT ones)")
    parser.add_argument("--write", action="store_true", help=f"update {TABLE_PATH.name}")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="stop compiling/timing candidates after this long (see above)")
    parser.add_argument("--verbose", action="store_true")
    options = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter compiles nothing")

    if options.check_pre:
        classes = parse_classes(options.classes) if options.classes else PRE_CLASSES
        problems = []
        for arch in options.arch or ["sm90"]:
            problems += check_pre(arch, classes, options.kinds.split(","))
        if problems:
            sys.exit("launches that spill or do not fit:\n  " + "\n  ".join(problems))
        return

    if options.measure:
        if not torch.cuda.is_available():
            parser.error("--measure needs a CUDA GPU; use --static without one")
        major, minor = torch.cuda.get_device_capability()
        archs = [f"sm{major}{minor}"]
        if archs[0] not in ARCH_LIMITS:
            parser.error(f"{archs[0]} has no entry in ARCH_LIMITS; add its limits first")
        choose = measure_choice
        # A run covers some classes and kinds (--classes, --kinds, --budget-seconds): each
        # entry's note says whether it was timed; the others keep their earlier source.
        source = (f"entries noted 'measured' timed on {torch.cuda.get_device_name()} "
                  f"({time.strftime('%Y-%m-%d')}); the others compile-checked only (static)")
    else:
        archs = options.arch or ["sm90"]
        choose = static_choice
        source = (f"static: compile-checked with triton, not timed "
                  f"({time.strftime('%Y-%m-%d')}); UNTUNED")

    global _deadline
    if options.budget_seconds is not None:
        _deadline = time.monotonic() + options.budget_seconds
    table, notes, sources = read_table()
    kinds = options.kinds.split(",")
    if options.pre:
        kinds = [kind + plan.PRE_SUFFIX for kind in kinds]
        if not options.classes:
            options.classes = ",".join(f"{d}x{dv}:{size}" for d, dv, size in PRE_CLASSES)
    failures = []
    for arch in archs:
        for d, dv, size in parse_classes(options.classes):
            for kind in kinds:
                key = (arch, kind, d, dv, size)
                if _budget_spent():
                    print(f"{key}: not reached within --budget-seconds; entry kept", flush=True)
                    continue
                try:
                    config, note = choose(kind, d, dv, size, arch, options.verbose)
                except BudgetSpent as error:
                    print(f"{key}: {error}; entry kept", flush=True)
                    continue
                except NoFit as error:
                    # A regenerated class replaces its old entry, chosen or not.
                    table.pop(key, None)
                    notes.pop(key, None)
                    failures.append(str(error))
                    print(f"{key}: NO ENTRY ({error})", flush=True)
                    continue
                table[key], notes[key] = config.as_tuple(), note
                print(f"{key}: {config.as_tuple()}  # {note}", flush=True)
        sources[arch] = source
    if options.write:
        write_table(table, notes, sources)
        print(f"wrote {TABLE_PATH}")
    if failures:
        # Those classes keep plan.heuristic_config, which cannot run there either: narrow
        # plan.unsupported_dims (or the kernels) before shipping this table.
        sys.exit("classes without a fitting config:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
