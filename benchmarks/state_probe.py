"""What holds the forward's state kernel at ~40% of its k + v byte floor on the H200?

The state kernel (forward.py's _state_kernel: S = Σ φ(k) vᵀ, z = Σ φ(k)) reached 36-41% of the
floor of reading k and v once, whatever the grid (benchmarks/RESULTS.md, split sweep). ptxas
reports C7515 for it at the tuned sm_90 config ("wgmma.mma_async instructions are serialized
due to non wgmma instructions defining accumulator registers"): every HGMMA waits for the one
before, so the loads, the feature map and the tensor-core work of a step do not overlap. The
sm_90 audit left open whether that serialisation is the cause. This probe settles it by timing,
over the library's own grid (its planned split count and chunk), kernels that do less:

  library      the op's state-kernel launch alone (recorded through capture_launches, as the
               op makes it: planned config, tuned table)
  read         the same k and v blocks streamed over the same grid and only summed: what this
               access pattern reaches with no arithmetic at all
  mma+z        a stripped state kernel: relu, no mask, no q/k pre-attention work, D a
               constexpr; the φ(k)ᵀ v product on tensor cores and z summed per step as the
               library does (ptxas: not serialised at 32 tokens / 4 warps / 3 stages)
  mma          the same without z (ptxas: serialised)
  mma+z-tile   z kept as a (BLOCK_N, D) fp32 tile and reduced once at the end
  bmm          torch.bmm of kᵀ and v per head (cuBLAS; no feature map, no z), fp32 result

and reports for each Triton kernel whether ptxas flags C7515 on the kernel it compiled (ptxas
-v over its PTX). The stripped kernels' S and z are checked against an fp32 torch computation
before they are timed, so a fast wrong kernel cannot win.

    python3 benchmarks/state_probe.py [--shapes "Wan 1.3B,Wan 14B"] [--out DIR]   # GPU, ~1 min
    python benchmarks/state_probe.py --dry-run   # CPU, interpreter, tiny shape (CI)

Reading it: if `read` is near the floor and `mma+z` (not serialised) is far above `library`,
the serialisation (or another of the library kernel's extras) costs the gap; if `mma+z` is as
slow as `library`, the structure itself (φ(k) transposed through shared memory into the
register operand, one barrier-bound step per block) is the limit, not C7515.

Measured on the H200 (2026-12-04, benchmarks/RESULTS.md): neither. Serialised or not, the
variants that sum z per step ran at 35-56% of the floor and those that do not at 58-97%: the
per-step sum over the block's tokens (a cross-warp reduction) was the cost. The library kernel
now computes z on the tensor cores (common.unit_columns), and its `library` row is that kernel.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
import triton.language as tl

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

from split_sweep import SHAPES, device_and_shapes  # noqa: E402
from linattn.kernels.triton.common import split_range  # noqa: E402

#: (variant, block_n, num_warps, num_stages) of the stripped kernels timed.
VARIANTS = {"mma+z": 0, "mma+z-tile": 1, "mma": 2}
CONFIGS = ((32, 4, 3), (64, 8, 3), (64, 4, 2))
DRY_RUN_CONFIGS = ((32, 4, 1),)


@triton.jit
def _head_bases(k_ptr, v_ptr, bh, H, N, D: tl.constexpr):
    """k and v at the first token of head bh of a contiguous (B, N, H, D) pair."""
    offset = ((bh // H).to(tl.int64) * N * H + bh % H) * D
    return k_ptr + offset, v_ptr + offset


@triton.jit
def _kv_block(k_base, v_base, n0, end, s_kn, s_vn, D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The k and v rows [n0, min(n0 + BLOCK_N, end)) of one head, zero past end."""
    rows = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    keep = (rows < end - n0)[:, None]
    k = tl.load(k_base + (n0 + rows)[:, None] * s_kn + d[None, :], mask=keep, other=0.0)
    v = tl.load(v_base + (n0 + rows)[:, None] * s_vn + d[None, :], mask=keep, other=0.0)
    return k, v


@triton.jit
def _read_kernel(k_ptr, v_ptr, out_ptr, H, N, chunk, s_kn, s_vn,
                 D: tl.constexpr, BLOCK_N: tl.constexpr):
    """Streams the k and v blocks of one (batch, head, split) and sums them: the state
    kernel's reads with no arithmetic."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    k_base, v_base = _head_bases(k_ptr, v_ptr, bh, H, N, D)
    d = tl.arange(0, D)
    start, end = split_range(split, chunk, N)
    total = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        x, y = _kv_block(k_base, v_base, n0, end, s_kn, s_vn, D, BLOCK_N)
        total += x.to(tl.float32) + y.to(tl.float32)
    tl.store(out_ptr + (split * tl.num_programs(0) + bh) * D + d, tl.sum(total, axis=0))


@triton.jit
def _stripped_state_kernel(k_ptr, v_ptr, s_ptr, z_ptr, H, N, chunk, s_kn, s_vn,
                           D: tl.constexpr, BLOCK_N: tl.constexpr, VARIANT: tl.constexpr):
    """Partial S and z of one (batch, head, split) for the relu map, with nothing else:
    VARIANT 0 sums z per step, 1 keeps a z tile and reduces it at the end, 2 skips z."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    k_base, v_base = _head_bases(k_ptr, v_ptr, bh, H, N, D)
    d = tl.arange(0, D)
    start, end = split_range(split, chunk, N)
    acc = tl.zeros((D, D), dtype=tl.float32)
    z = tl.zeros((D,), dtype=tl.float32)
    z_tile = tl.zeros((BLOCK_N, D), dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        x, vals = _kv_block(k_base, v_base, n0, end, s_kn, s_vn, D, BLOCK_N)
        phi = tl.maximum(x, 0.0).to(x.dtype)  # the 0.0 would make it fp32
        acc = tl.dot(tl.trans(phi), vals, acc)
        if VARIANT == 0:
            z += tl.sum(phi.to(tl.float32), axis=0)
        elif VARIANT == 1:
            z_tile += phi.to(tl.float32)
    if VARIANT == 1:
        z = tl.sum(z_tile, axis=0)
    part = split * tl.num_programs(0) + bh
    tl.store(s_ptr + part * D * D + d[:, None] * D + d[None, :], acc)
    tl.store(z_ptr + part * D + d, z)


def serialised(compiled) -> object:
    """True/False: ptxas -v over the compiled kernel's PTX reports C7515; None where there is
    no PTX (the interpreter) or ptxas did not run."""
    ptx = getattr(compiled, "asm", {}).get("ptx") if compiled is not None else None
    if not ptx:
        return None
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    arch = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        try:
            report = subprocess.run([str(ptxas), f"-arch={arch.group(1) if arch else 'sm_90a'}",
                                     "-v", "k.ptx", "-o", "k.cubin"], cwd=tmp,
                                    capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return None
    return "C7515" in report.stderr if report.returncode == 0 else None


def library_state_launch(k, v):
    """The op's state-kernel launch for (k, v), relu map, no mask: (run, grid, chunk,
    compiled-kernel getter)."""
    import torch
    from linattn.kernels.triton import common, forward, plan
    B, N, H, D = k.shape
    state = torch.empty(B, H, D, D, dtype=torch.float32, device=k.device)
    normaliser = torch.empty(B, H, D, dtype=torch.float32, device=k.device)
    with common.capture_launches() as recorded:
        forward.compute_state(k, v, None, "relu", state, normaliser,
                              forward.qkv_bytes(k, k, v))
    kernel, grid, args, kwargs = next(r for r in recorded if r[0] is forward._state_kernel)
    p = plan.plan_kernel("state", k.device, N, B * H, D, D, k.element_size(), reduces=True,
                         qkv_bytes=forward.qkv_bytes(k, k, v))
    return (lambda: kernel[grid](*args, **kwargs)), grid, p.split.chunk, p.config


def probe_shape(name: str, shape: tuple, device, bandwidth: float, dry_run: bool) -> list[dict]:
    import torch
    from measure import cuda_median_seconds
    B, N, H, D = shape
    dtype = torch.float32 if dry_run else torch.bfloat16  # the interpreter's bf16 dot is wrong
    torch.manual_seed(0)
    k, v = (torch.randn(B, N, H, D, device=device, dtype=dtype) for _ in range(2))
    floor_bytes = (k.numel() + v.numel()) * k.element_size()
    timer = (lambda fn: _wall_median(fn)) if dry_run else cuda_median_seconds

    run_library, grid, chunk, config = library_state_launch(k, v)
    splits = grid[1]
    bh = B * H
    s_kn, s_vn = k.stride(1), v.stride(1)
    rows = []

    def row(impl: str, seconds: float, **extra) -> None:
        rows.append({"shape": name, "impl": impl, "ms": seconds * 1e3,
                     "floor_share": floor_bytes / bandwidth / seconds, **extra})

    compiled = run_library()
    row("library", timer(run_library), config=f"{config.block_n}/{config.num_warps}w/"
        f"{config.num_stages}s", serialised=serialised(compiled), splits=splits)

    out = torch.empty(splits, bh, D, dtype=torch.float32, device=device)
    for block_n, warps, stages in (DRY_RUN_CONFIGS if dry_run else CONFIGS):
        def run_read():
            return _read_kernel[(bh, splits)](k, v, out, H, N, chunk, s_kn, s_vn, D=D,
                                              BLOCK_N=block_n, num_warps=warps,
                                              num_stages=stages)
        run_read()
        row("read", timer(run_read), config=f"{block_n}/{warps}w/{stages}s")

    phi = torch.relu(k.float()).permute(0, 2, 3, 1).reshape(bh, D, N)
    vals = v.float().permute(0, 2, 1, 3).reshape(bh, N, D)
    s_ref, z_ref = torch.bmm(phi, vals), phi.sum(-1)
    s_part = torch.empty(splits, bh, D, D, dtype=torch.float32, device=device)
    z_part = torch.empty(splits, bh, D, dtype=torch.float32, device=device)
    for variant, code in VARIANTS.items():
        for block_n, warps, stages in (DRY_RUN_CONFIGS if dry_run else CONFIGS):
            def run_stripped():
                return _stripped_state_kernel[(bh, splits)](
                    k, v, s_part, z_part, H, N, chunk, s_kn, s_vn, D=D, BLOCK_N=block_n,
                    VARIANT=code, num_warps=warps, num_stages=stages)
            s_part.fill_(float("nan"))
            z_part.fill_(float("nan"))
            compiled = run_stripped()
            s_err = ((s_part.sum(0) - s_ref).norm() / s_ref.norm()).item()
            z_err = ((z_part.sum(0) - z_ref).norm() / z_ref.norm()).item()
            if not s_err < 2e-2 or (code != 2 and not z_err < 2e-2):
                raise AssertionError(f"{variant} {block_n}/{warps}w/{stages}s on {name}: S off "
                                     f"by {s_err:.2e}, z by {z_err:.2e}")
            row(variant, timer(run_stripped), config=f"{block_n}/{warps}w/{stages}s",
                serialised=serialised(compiled), s_err=s_err)

    k_t = k.permute(0, 2, 3, 1).reshape(bh, D, N)   # views: bmm reads the strided layout
    v_t = v.permute(0, 2, 1, 3).reshape(bh, N, D)
    s_out = torch.empty(bh, D, D, dtype=torch.float32 if dry_run else torch.bfloat16,
                        device=device)
    row("bmm", timer(lambda: torch.bmm(k_t, v_t, out=s_out)))
    return rows


def _wall_median(fn) -> float:
    import time
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def table(rows: list[dict]) -> str:
    lines = ["| shape | impl | config | ms | % of k+v floor | C7515 |", "|---|---|---|---|---|---|"]
    for r in rows:
        flag = {True: "serialised", False: "no", None: "-"}[r.get("serialised")]
        lines.append(f"| {r['shape']} | {r['impl']} | {r.get('config', '-')} | {r['ms']:.4f} | "
                     f"{100 * r['floor_share']:.1f}% | {flag} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="Wan 1.3B,Wan 14B",
                        help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shape on the CPU, Triton interpreted (CI)")
    options = parser.parse_args(argv)
    device, shapes = device_and_shapes(parser, options)
    from measure import copy_bandwidth
    bandwidth = copy_bandwidth(device)
    rows = [r for name, shape in shapes
            for r in probe_shape(name, shape, device, bandwidth, options.dry_run)]
    text = table(rows)
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s\n{text}")
    if options.out is not None:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "state_probe.json").write_text(
            json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
