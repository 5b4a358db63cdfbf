"""Times the forward state kernel at the split count the planner picks and at its neighbours.

The planner (linattn/kernels/triton/plan.py, split_count) chooses how many programs share one
(batch, head)'s sequence from a timing model whose constant, PROGRAM_OVERHEAD_BLOCKS (a
program's fixed cost in blocks streamed), was estimated from byte counts, not timed. This
script settles it on a GPU: for each video shape it times the state kernel (k, v -> S, z, the
reduction included) at the planned count, at the counts that fill 1 to 4 whole waves, at the
old rule's count (one program per SM, rounded up: can leave a tail wave) and at half and twice
the plan, and prints ms, share of the kernel's byte floor (k and v read once) and the ratio to
the planned count's time. A neighbour that beats the plan by more than the timing noise
(rerun: the planned count is timed twice) says the model's constant is off.

    python benchmarks/split_sweep.py [--out DIR] [--shapes "HunyuanVideo,Wan 14B"]
    python benchmarks/split_sweep.py --dry-run        # tiny shape, CPU, Triton interpreted

Writes DIR/split_sweep.json and prints a markdown table (benchmarks/RESULTS.md's format).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

#: (name, (B, N, H, D)), as in gpu_check.VIDEO_SHAPES: the long ones, where the split matters.
SHAPES = {
    "HunyuanVideo": (1, 119040, 24, 128),
    "Wan 14B": (1, 75600, 40, 128),
    "Wan 1.3B": (1, 32760, 12, 128),
    "CogVideoX-5B": (2, 17776, 48, 64),
}
DRY_RUN_SHAPE = ("tiny", (1, 512, 2, 32))


def neighbour_counts(planned: int, programs_per_split: int, slots: int, blocks: int) -> list:
    """The counts worth timing beside the planned one, each at least 1 and at most one block
    per split."""
    whole_waves = [w * slots // programs_per_split for w in (1, 2, 3, 4)]
    old_rule = -(-slots // programs_per_split)
    counts = {planned, max(1, planned // 2), 2 * planned, old_rule, *whole_waves}
    return sorted(c for c in counts if 1 <= c <= blocks)


def time_seconds(fn, device) -> float:
    """Median seconds: CUDA events on the GPU (measure.py), one wall-clock call for a dry run."""
    if device.type == "cuda":
        from measure import cuda_median_seconds
        return cuda_median_seconds(fn)
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sweep_shape(name: str, shape: tuple, device, bandwidth: float) -> list[dict]:
    import torch
    from linattn.kernels.triton import forward as tforward
    from linattn.kernels.triton import plan

    B, N, H, D = shape
    k, v = (torch.randn(B, N, H, D, device=device, dtype=torch.bfloat16) for _ in range(2))
    state = torch.empty(B, H, D, D, device=device, dtype=torch.float32)
    normaliser = torch.empty(B, H, D, device=device, dtype=torch.float32)
    qkv = 3 * k.numel() * k.element_size()
    p = plan.plan_kernel("state", device, N, B * H, D, D, 2, reduces=True, qkv_bytes=qkv)
    programs_per_split = B * H * p.tiles
    slots = plan.sm_count(device) * p.config.programs_per_sm
    blocks = -(-N // p.config.block_n)
    floor = 2 * k.numel() * k.element_size() / bandwidth

    def run():
        tforward.compute_state(k, v, None, "relu", state, normaliser, qkv)

    reference = None
    rows = []
    planned_s = time_seconds(run, device)
    # The same launch through plan.forced: the forced path must time like the planned one.
    for count in neighbour_counts(p.split.count, programs_per_split, slots, blocks):
        with plan.forced(splits=count):
            seconds = time_seconds(run, device)
            if reference is None:
                reference = state.clone()
            else:  # every count computes the same sums (a check, not a benchmark)
                error = ((state - reference).norm() / reference.norm()).item()
                if not error < 1e-3:
                    raise AssertionError(f"{name}: splits={count} changed the state "
                                         f"(relative error {error:.2e})")
        programs = count * programs_per_split
        rows.append(dict(shape=f"{name} {shape}", splits=count, programs=programs,
                         waves=programs / slots, planned=count == p.split.count,
                         seconds=seconds, share_of_floor=floor / seconds,
                         ratio_to_plan=None))
    for row in rows:
        row["ratio_to_plan"] = row["seconds"] / planned_s
    rows.append(dict(shape=f"{name} {shape}", splits=p.split.count, programs=None, waves=None,
                     planned=True, seconds=planned_s, share_of_floor=floor / planned_s,
                     ratio_to_plan=1.0, note="planned, unforced"))
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| shape | splits | programs | waves | ms | % of floor | × planned time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        label = f"**{r['splits']}** (plan)" if r["planned"] else str(r["splits"])
        if r.get("note"):
            label = f"{r['splits']} ({r['note']})"
        programs = "-" if r["programs"] is None else str(r["programs"])
        waves = "-" if r["waves"] is None else f"{r['waves']:.2f}"
        lines.append(f"| {r['shape']} | {label} | {programs} | {waves} | "
                     f"{r['seconds'] * 1e3:.4f} | {100 * r['share_of_floor']:.1f}% | "
                     f"{r['ratio_to_plan']:.3f} |")
    return "\n".join(lines)


def device_and_shapes(parser, options) -> tuple:
    """(device, [(name, (B, N, H, D))]) of a GPU script's run: the CPU and the tiny shape for
    --dry-run, else the CUDA device and the --shapes named (parser.error on an unknown name or
    no GPU). kernel_breakdown.py chooses the same way."""
    import torch
    if options.dry_run:
        return torch.device("cpu"), [DRY_RUN_SHAPE]
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --dry-run)")
    unknown = [s for s in options.shapes.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; choose from {list(SHAPES)}")
    return torch.device("cuda"), [(s, SHAPES[s]) for s in options.shapes.split(",")]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shapes", default=",".join(SHAPES),
                        help=f"comma-separated names from {list(SHAPES)}")
    parser.add_argument("--dry-run", action="store_true",
                        help="a tiny shape on the CPU under the Triton interpreter")
    options = parser.parse_args(argv)
    if options.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    from measure import copy_bandwidth

    device, shapes = device_and_shapes(parser, options)
    bandwidth = copy_bandwidth(device)
    rows = []
    for name, shape in shapes:
        rows += sweep_shape(name, shape, device, bandwidth)
        print(table([r for r in rows if r["shape"].startswith(name)]), flush=True)
    if options.out is not None:
        options.out.mkdir(parents=True, exist_ok=True)
        (options.out / "split_sweep.json").write_text(json.dumps(
            dict(bandwidth_TBps=bandwidth / 1e12, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
