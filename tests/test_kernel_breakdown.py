"""benchmarks/kernel_breakdown.py (the per-launch timing of the op's forward and backward on the
GPU), its dry run: the launches it times are the ones the op makes (run in order they give the
op's output and gradients; the script checks it), one row per launch, each timed and sized."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "kernel_breakdown.py"

PLANNED = ["_state_kernel", "_output_kernel", "_dq_kernel", "_dkdv_kernel"]
#: With the sequence forced into 2 splits, each reducing kernel is followed by the ordered sum.
SPLIT = ["_state_kernel", "_sum_splits_kernel", "_output_kernel", "_dq_kernel",
         "_sum_splits_kernel", "_dkdv_kernel"]


def test_dry_run_times_every_launch_of_the_op(tmp_path):
    # --bandwidth-gbs: the given bandwidth instead of a CPU copy measurement (saves a second).
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--bandwidth-gbs", "10",
                           "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "kernel_breakdown.json").read_text())
    assert result["bandwidth_GBps"] == 10 and result["bandwidth_source"] == "--bandwidth-gbs"
    rows, totals = result["rows"], result["totals"]
    assert len(totals) == 2
    for case, expected in zip(totals, (PLANNED, SPLIT)):
        mine = [r for r in rows if r["shape"] == case["shape"]]
        assert [r["kernel"] for r in mine] == expected, case["shape"]
        assert len(mine) == case["launches_forward"] + case["launches_backward"]
        assert [r["phase"] for r in mine].count("forward") == case["launches_forward"]
        assert all(r["seconds"] > 0 and r["bytes"] > 0 for r in mine)
        assert abs(sum(r["share_of_sum"] for r in mine) - 1) < 1e-9
        # Run in order, the recorded launches reproduced the op's o, dq, dk and dv.
        assert case["composed_matches"]
        assert case["forward_whole_s"] > 0 and case["both_whole_s"] > 0
    # The state kernel's minimum: k and v read (bf16), S and z written (fp32), unsplit.
    B, N, H, D = 1, 512, 2, 32
    state = next(r for r in rows if r["kernel"] == "_state_kernel")
    assert state["bytes"] == 2 * B * N * H * D * 2 + B * H * D * (D + 1) * 4
    assert "| _state_kernel |" in done.stdout and "whole − parts ms" in done.stdout
