"""Times every Triton kernel launch of the op's forward and of its backward on its own.

Why. On the H200 the whole op reached 44% of its byte floor in the forward and 19% in forward +
backward at the Wan 1.3B shape (bf16, relu), and the forward's state kernel alone sat at 36-41%
of its own k + v floor; the whole-op numbers do not say which launch loses the time. This script
takes the op apart, launch by launch, so a GPU session can see where forward + backward goes.

How the launches are obtained: the op's own forward and backward (linattn.ops.execute.
run_forward / run_backward, which the autograd path calls, with the "triton" backend) run once
inside common.capture_launches, which records every launch the backend makes (kernel, grid,
arguments, config: planner, tuned table and scratch buffers exactly as the op sets them up)
instead of running it. Each recorded launch is then run on its own and timed; nothing about a
launch is re-derived here. Running the recorded launches in order must reproduce the op: the
outputs they write (o; dq, dk, dv and the Hedgehog weights' gradients) are compared with the
op's own forward and backward on the same inputs (torch.testing.assert_close; the outputs were
allocated NaN-filled, so an element no recorded launch writes fails the comparison).

Per launch it prints: ms (CUDA events, measure.cuda_median_seconds), the bytes the launch must
read and write at minimum (each tensor it reads once, each it writes once; launch_bytes says
per kernel which), GB/s, that byte count's share of the copy-bandwidth floor, and its share of
the summed time. Then the whole forward and forward + backward, timed the normal way (the op
called as a user calls it), and whole minus the sum of the parts: launch gaps, allocations and
host time that the kernels alone do not see.

    python benchmarks/kernel_breakdown.py [--out DIR] [--shapes "Wan 1.3B,Wan 14B"]
                                          [--feature-map relu|hedgehog|both]
                                          [--bandwidth-gbs 4300]
    python benchmarks/kernel_breakdown.py --dry-run   # tiny shape, CPU, Triton interpreted

The copy bandwidth is measured in the same run as gpu_check.py's ceilings stage measures it
(measure.copy_bandwidth: a 1 GiB device-to-device copy, bytes read + written), unless
--bandwidth-gbs gives it. Writes DIR/kernel_breakdown.json and prints markdown tables
(benchmarks/RESULTS.md's format).

Reading the numbers. triton's do_bench (under measure.cuda_median_seconds) clears the L2 cache
before every timed call, so each part is timed cold; inside the whole op a reduction that reads
partials just written may find them in L2, so whole − parts can come out below the launch gaps
(even negative for a short backward). The byte counts are floors per launch: a kernel that
re-reads a tensor (one pass per Dv tile, or per Hedgehog half) is still charged it once.

The dry run (CI: tests/test_kernel_breakdown.py) runs the tiny shape as planned and again with
its sequence forced into 2 splits (plan.forced), so the split reductions are launched and
checked too (the interpreter's planner never splits a sequence this short; the Hedgehog planner
ignores plan.forced, so a Hedgehog case is not repeated). Its times are single wall-clock runs
of interpreted kernels: they show the table works, nothing about a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

from split_sweep import SHAPES, device_and_shapes  # noqa: E402  (shapes and their choice, shared)

DEFAULT_SHAPES = ("Wan 1.3B", "Wan 14B")
#: Split counts the dry run forces beside the planned one (None: the planner's own).
DRY_RUN_SPLITS = (None, 2)
EPS = 1e-6


@dataclass
class Launch:
    phase: str          # "forward" or "backward"
    kernel: object      # the triton kernel (JITFunction, or the interpreter's wrapper)
    grid: tuple
    args: tuple
    kwargs: dict
    name: str = ""
    bytes: int = 0
    reads: str = ""     # what the byte count is made of, for the JSON
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    def run(self) -> None:
        # The same call common.launch makes when no observer is installed.
        self.kernel[self.grid](*self.args, **self.kwargs)


def wall_seconds(fn) -> tuple[object, float]:
    """(fn(), seconds it took on the wall clock)."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def kernel_name(kernel) -> str:
    return getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))


def named_arguments(kernel, args: tuple, kwargs: dict) -> dict:
    """The launch's arguments by the kernel's parameter names (positional ones first)."""
    names = getattr(kernel, "arg_names", None)
    if names is None:
        names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    return {**dict(zip(names, args)), **kwargs}


def nbytes(*tensors) -> int:
    """Bytes of the distinct tensors given (None skipped): a buffer passed to two pointers,
    like the partials that hold both S and z, counts once."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _columns(a: dict, grid: tuple) -> int:
    """Value columns (of Dv) a builtin dq or dk/dv launch covers: its grid's third axis counts
    BLOCK_DV tiles from first_tile on; the last tile may be partial."""
    first = a["first_tile"] * a["BLOCK_DV"]
    return min(a["DV"], first + grid[2] * a["BLOCK_DV"]) - first


def launch_bytes(name: str, a: dict, grid: tuple) -> tuple[int, str]:
    """(bytes, what) a launch must move at minimum: every tensor it reads once and every one it
    writes once. A kernel that re-reads a tensor (one pass per Dv tile, or per Hedgehog half)
    is charged once: the count is the floor, not the kernel's traffic."""
    if name == "_state_kernel":
        # Reads k (B·N·H·D) and v (B·N·H·Dv); writes S (B·H·D·Dv) and z (B·H·D) in fp32, or,
        # split, one fp32 partial of each per split (s_ptr and z_ptr are then one buffer).
        return (nbytes(a["k_ptr"], a["v_ptr"], a["mask_ptr"], a["s_ptr"], a["z_ptr"]),
                "k, v read; S, z (or their per-split partials) written")
    if name == "_sum_splits_kernel":
        # Reads every split's partial (splits × (B·H·D·Dv + B·H·D) fp32); writes the sums.
        return (nbytes(a["part_ptr"], a["a_ptr"], a["b_ptr"]),
                "partials read; the reduced pair (S, z or dS, dz') written")
    if name == "_output_kernel":
        # Reads q and the fp32 S, z of every head; writes o (B·N·H·Dv).
        return nbytes(a["q_ptr"], a["s_ptr"], a["z_ptr"], a["o_ptr"]), "q, S, z read; o written"
    if name == "_dq_kernel":
        q, do, B_H = a["q_ptr"], a["do_ptr"], grid[0]
        D, cols, splits = a["D"], _columns(a, grid), grid[1]
        # The dS columns of this launch, one fp32 partial per split (the whole dS when
        # unsplit, where ds_ptr is d_state itself).
        ds_cols = splits * B_H * D * cols * 4
        if a["COMPUTE_DQ"]:
            # Reads q, do (all Dv columns: dq needs g = S do), S and z; writes dq, its dS
            # columns, dz' = dz + dS m (per split) and the centre m (B·H·Dv fp32).
            dz = splits * B_H * D * 4
            return (nbytes(q, do, a["s_ptr"], a["z_ptr"], a["dq_ptr"], a["m_ptr"]) + ds_cols
                    + dz,
                    "q, do, S, z read; dq, dS (its tile), dz', m written")
        # A further Dv tile's dS only: reads q (for φ(q)), z and do's columns of the tile.
        do_cols = do.numel() // do.shape[-1] * cols * do.element_size()
        return (nbytes(q, a["z_ptr"]) + do_cols + ds_cols,
                "q, z, do (tile columns) read; dS (tile) written")
    if name == "_dkdv_kernel":
        k, v, cols = a["k_ptr"], a["v_ptr"], _columns(a, grid)
        total, what = nbytes(k, a["mask_ptr"]), ["k read"]
        if a["COMPUTE_DK"]:
            # dφ(k) = dS v + dz: reads v, the whole dS, dz' and m; writes dk.
            total += nbytes(v, a["ds_ptr"], a["dz_ptr"], a["m_ptr"], a["dk_ptr"])
            what += ["v, dS, dz', m read; dk written"]
        if a["COMPUTE_DV"]:
            # dv = dSᵀ φ(k): reads dS's columns of the tile (already counted with dk) and
            # writes those columns of dv.
            dv = a["dv_ptr"]
            if not a["COMPUTE_DK"]:
                total += a["ds_ptr"].numel() // a["DV"] * cols * 4
            total += dv.numel() // dv.shape[-1] * cols * dv.element_size()
            what += ["dS (tile) read; dv (tile) written"]
        return total, "; ".join(what)
    if name == "hedgehog_state_kernel":
        # Reads k, v and W_k (H·D·F); writes S (B·H·2F·Dv), z (B·H·2F) or per-split partials.
        return (nbytes(a["k_ptr"], a["v_ptr"], a["mask_ptr"], a["w_ptr"], a["s_ptr"],
                       a["z_ptr"]), "k, v, W_k read; S, z (or partials) written")
    if name == "hedgehog_output_kernel":
        return (nbytes(a["q_ptr"], a["w_ptr"], a["s_ptr"], a["z_ptr"], a["o_ptr"]),
                "q, W_q, S, z read; o written")
    if name == "hedgehog_query_grad_kernel":
        # Pass 1: reads q, do, W_q, S, z; writes dq, dW_q (or per-split partials), the
        # per-query 1/den and dden' (B·H·2·Nq fp32) and the centre m.
        return (nbytes(a["q_ptr"], a["do_ptr"], a["w_ptr"], a["s_ptr"], a["z_ptr"],
                       a["dq_ptr"], a["dw_ptr"], a["tok_ptr"], a["m_ptr"]),
                "q, do, W_q, S, z read; dq, dW_q (partials), per-query terms, m written")
    if name == "hedgehog_state_grad_kernel":
        # Pass 2: reads q, do, W_q and the per-query terms; writes dS, dz' (or partials).
        return (nbytes(a["q_ptr"], a["do_ptr"], a["w_ptr"], a["tok_ptr"], a["ds_ptr"],
                       a["dz_ptr"]), "q, do, W_q, per-query terms read; dS, dz' written")
    if name == "hedgehog_key_grad_kernel":
        # Pass 3: reads k, v, W_k, dS, dz', m; writes dk, dv and dW_k (or partials).
        return (nbytes(a["k_ptr"], a["v_ptr"], a["mask_ptr"], a["w_ptr"], a["ds_ptr"],
                       a["dz_ptr"], a["m_ptr"], a["dk_ptr"], a["dv_ptr"], a["dw_ptr"]),
                "k, v, W_k, dS, dz', m read; dk, dv, dW_k (partials) written")
    if name == "sum_partials_kernel":
        # Reads num_partials rows of each buffer's first numel elements; writes the sums in the
        # outputs' dtype (the second buffer is unused when b_numel is 0).
        rows = a["num_partials"]
        total = rows * a["a_numel"] * 4 + a["a_numel"] * a["a_out_ptr"].element_size()
        total += rows * a["b_numel"] * 4 + a["b_numel"] * a["b_out_ptr"].element_size()
        return total, "partials read; their sums written"
    raise KeyError(f"kernel_breakdown.launch_bytes: no byte count for kernel {name!r}; add "
                   f"one (a new launch in the backend)")


def capture(call) -> tuple[list, object]:
    """(launches, result) of call(): every Triton launch it makes, recorded and not run.
    Outputs are allocated NaN-filled (alloc.poison_outputs), so whatever no recorded launch
    writes stays NaN and fails the comparison with the op."""
    from linattn.kernels.triton import common
    from linattn.ops import alloc
    with alloc.poison_outputs(), common.capture_launches() as recorded:
        result = call()
    return recorded, result


def make_inputs(shape: tuple, feature_map: str, device):
    import torch
    from linattn.feature_maps import Hedgehog
    B, N, H, D = shape
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(B, N, H, D, device=device, dtype=torch.bfloat16)
                   for _ in range(4))
    if feature_map == "hedgehog":
        maps = tuple(Hedgehog(H, D, init="random").to(device) for _ in range(2))
    else:
        maps = (feature_map, feature_map)
    return q, k, v, do, maps


def map_call(feature_map) -> tuple[str, tuple]:
    """(kernel name, kernel params) of a map as linear_attention hands them to the kernels."""
    if isinstance(feature_map, str):
        return feature_map, ()
    return feature_map.kernel_name, tuple(feature_map.kernel_params())


def breakdown_case(shape_name: str, shape: tuple, feature_map: str, device, bandwidth: float,
                   splits=None) -> tuple[list, dict]:
    """(kernel rows, totals) of one case; raises if the recorded launches, run in order, do not
    reproduce the op's output and gradients."""
    import torch
    from linattn import linear_attention
    from linattn.kernels.triton import plan
    from linattn.ops.execute import Settings, run_backward, run_forward

    q, k, v, do, maps = make_inputs(shape, feature_map, device)
    (q_name, q_params), (k_name, k_params) = map_call(maps[0]), map_call(maps[1])
    params = (*q_params, *k_params)
    fm = maps[0] if q_name == k_name == "relu" and isinstance(maps[0], str) else maps
    op = functools.partial(linear_attention, feature_map=fm, eps=EPS, backend="triton")
    label = f"{shape_name} {shape}" + (f", {splits} splits forced" if splits else "")
    with plan.forced(splits=splits) if splits else contextlib.nullcontext():
        # The op as a user calls it: its output and gradients are what the parts must give.
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

        def forward_and_backward():
            o = op(qg, kg, vg)
            return o, torch.autograd.grad(o, (qg, kg, vg, *params), do)

        (o_op, grads_op), both_s = wall_seconds(forward_and_backward)

        # The same calls the autograd path makes (linattn/ops/autograd.py), launches recorded.
        settings = Settings(q_name, k_name, EPS, False, "triton")
        with torch.no_grad():
            forward, (o, state, normaliser, *_) = capture(
                lambda: run_forward(q, k, v, None, q_params, k_params, settings))
            launches = [Launch("forward", *r) for r in forward]
            for launch in launches:
                launch.seconds = wall_seconds(launch.run)[1]
            backward, (dq, dk, dv, d_q_params, d_k_params, _) = capture(
                lambda: run_backward(do, q, k, v, None, q_params, k_params, state, normaliser,
                                     settings))
            launches += [Launch("backward", *r) for r in backward]
            for launch in launches[len(forward):]:
                launch.seconds = wall_seconds(launch.run)[1]
        parts = (o, dq, dk, dv, *d_q_params, *d_k_params)
        whole = (o_op, *grads_op)
        names = ("o", "dq", "dk", "dv", *("dW_q" for _ in d_q_params),
                 *("dW_k" for _ in d_k_params))
        bitwise = True
        for what, mine, theirs in zip(names, parts, whole):
            torch.testing.assert_close(mine, theirs, msg=lambda m, what=what: (
                f"{label} {feature_map}: {what} of the recorded launches run in order differs "
                f"from the op's: {m}"))
            bitwise = bitwise and torch.equal(mine, theirs)

        for launch in launches:
            launch.name = kernel_name(launch.kernel)
            a = named_arguments(launch.kernel, launch.args, launch.kwargs)
            launch.bytes, launch.reads = launch_bytes(launch.name, a, launch.grid)
            launch.meta = {key: a[key] for key in ("BLOCK_N", "BLOCK_DV", "num_warps",
                                                   "num_stages", "COMPUTE_DQ", "COMPUTE_DK",
                                                   "COMPUTE_DV") if key in a}
        # Timing. On the GPU: CUDA events after warm-up (measure.py, as split_sweep.py times),
        # each launch alone, then the op called the normal way. On the CPU (the dry run, where
        # times say nothing about a GPU) the one wall-clock run of each launch above and of
        # the op's forward and backward stand, so the interpreter runs every kernel once less.
        with torch.no_grad():
            if device.type == "cuda":
                from measure import cuda_median_seconds
                for launch in launches:
                    launch.seconds = cuda_median_seconds(launch.run)
                forward_s = cuda_median_seconds(lambda: op(q, k, v))
            else:
                forward_s = wall_seconds(lambda: op(q, k, v))[1]
        if device.type == "cuda":
            both_s = cuda_median_seconds(forward_and_backward)

    sums = {phase: sum(x.seconds for x in launches if x.phase == phase)
            for phase in ("forward", "backward")}
    total = sums["forward"] + sums["backward"]
    rows = []
    for index, x in enumerate(launches):
        rows.append(dict(shape=label, feature_map=feature_map, phase=x.phase, index=index,
                         kernel=x.name, grid=list(x.grid), config=x.meta, bytes=x.bytes,
                         bytes_are=x.reads, seconds=x.seconds,
                         GBps=x.bytes / x.seconds / 1e9,
                         share_of_floor=x.bytes / bandwidth / x.seconds,
                         share_of_phase=x.seconds / sums[x.phase],
                         share_of_sum=x.seconds / total))
    B, N, H, D = shape
    tensor = B * N * H * D * q.element_size()
    totals = dict(shape=label, feature_map=feature_map, launches_forward=len(forward),
                  launches_backward=len(backward),
                  forward_parts_s=sums["forward"], forward_whole_s=forward_s,
                  forward_gap_s=forward_s - sums["forward"],
                  both_parts_s=total, both_whole_s=both_s, both_gap_s=both_s - total,
                  # The op's floor as gpu_check.io_bytes counts it: 4 tensors forward, 11 for
                  # forward + backward.
                  forward_share_of_floor=4 * tensor / bandwidth / forward_s,
                  both_share_of_floor=11 * tensor / bandwidth / both_s,
                  composed_matches=True, composed_bitwise=bitwise)
    return rows, totals


def kernel_table(rows: list[dict]) -> str:
    lines = ["| shape | map | phase | kernel | grid | ms | min MB | GB/s | % of floor | "
             "% of phase | % of fwd+bwd |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flags = "".join(f" {k[8:].lower()}" for k, v in r["config"].items()
                        if k.startswith("COMPUTE_") and v)
        lines.append(f"| {r['shape']} | {r['feature_map']} | {r['phase']} | "
                     f"{r['kernel']}{flags} | {tuple(r['grid'])} | {r['seconds'] * 1e3:.4f} | "
                     f"{r['bytes'] / 1e6:.2f} | {r['GBps']:.1f} | "
                     f"{100 * r['share_of_floor']:.1f}% | {100 * r['share_of_phase']:.1f}% | "
                     f"{100 * r['share_of_sum']:.1f}% |")
    return "\n".join(lines)


def totals_table(totals: list[dict]) -> str:
    lines = ["| shape | map | what | launches | sum of parts ms | whole ms | whole − parts ms | "
             "whole % of floor | parts match the op |", "|---|---|---|---|---|---|---|---|---|"]
    for t in totals:
        match = "bitwise" if t["composed_bitwise"] else "within tolerance"
        for what, key, launches, share in (
                ("forward", "forward", t["launches_forward"], t["forward_share_of_floor"]),
                ("forward+backward", "both", t["launches_forward"] + t["launches_backward"],
                 t["both_share_of_floor"])):
            lines.append(f"| {t['shape']} | {t['feature_map']} | {what} | {launches} | "
                         f"{t[key + '_parts_s'] * 1e3:.4f} | {t[key + '_whole_s'] * 1e3:.4f} | "
                         f"{t[key + '_gap_s'] * 1e3:+.4f} | {100 * share:.1f}% | {match} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES),
                        help=f"comma-separated names from {list(SHAPES)}")
    parser.add_argument("--feature-map", choices=("relu", "hedgehog", "both"), default="relu")
    parser.add_argument("--bandwidth-gbs", type=float, default=None,
                        help="copy bandwidth in GB/s (read + write counted); default: measured")
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny shape on the CPU under the Triton interpreter")
    options = parser.parse_args(argv)
    if options.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from linattn.kernels.triton import plan
    from measure import copy_bandwidth

    if plan.atomic_reduce():
        # Atomic reductions zero their targets with torch fills between the launches, and a
        # launch run twice adds twice: neither timing it alone nor composing it holds.
        parser.error(f"{plan.ATOMIC_ENV}=1: the breakdown covers the ordered reduction only")
    maps = ("relu", "hedgehog") if options.feature_map == "both" else (options.feature_map,)
    device, shapes = device_and_shapes(parser, options)
    cases = [(name, shape, splits) for name, shape in shapes
             for splits in (DRY_RUN_SPLITS if options.dry_run else (None,))]
    if options.bandwidth_gbs is not None:
        bandwidth, source = options.bandwidth_gbs * 1e9, "--bandwidth-gbs"
    else:
        bandwidth, source = copy_bandwidth(device), "measured (measure.copy_bandwidth)"
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, {source}", flush=True)
    rows, totals = [], []
    for name, shape, splits in cases:
        for feature_map in maps:
            if splits and feature_map == "hedgehog":
                # plan.forced does not reach the Hedgehog planner (hedgehog/plan.py takes a
                # num_splits argument the backend never passes), and the interpreter never
                # splits its sequences: the case would repeat the planned one.
                continue
            case_rows, case_totals = breakdown_case(name, shape, feature_map, device, bandwidth,
                                                    splits)
            rows += case_rows
            totals.append(case_totals)
            print(f"\n{case_totals['shape']}, bfloat16, {feature_map}\n", flush=True)
            print(kernel_table(case_rows), "\n", totals_table([case_totals]), sep="\n",
                  flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if options.out is not None:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "kernel_breakdown.json").write_text(json.dumps(
            dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 dtype="bfloat16", bandwidth_GBps=bandwidth / 1e9, bandwidth_source=source,
                 rows=rows, totals=totals), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
