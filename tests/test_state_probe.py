"""benchmarks/state_probe.py (what holds the state kernel under its byte floor on the GPU), its
dry run: every kernel it times runs on the library's grid, and the stripped state kernels compute
the S and z they stand in for (the probe checks them against torch before timing them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "state_probe.py"


def test_dry_run_times_each_variant_after_checking_it(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "state_probe.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["library", "read", "mma+z", "mma+z-tile", "mma", "bmm"]
    assert all(r["ms"] > 0 for r in rows)
    # Checked before timing: the stripped kernels' S matched the fp32 reference.
    assert all(r["s_err"] < 1e-5 for r in rows if r["impl"].startswith("mma"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="runs the stripped kernel on CPU tensors (interpreter only)")
def test_a_wrong_stripped_kernel_is_refused(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    import state_probe
    real = state_probe._stripped_state_kernel

    class HalfWrong:  # the real kernel, then S scaled: a kernel computing something else
        def __getitem__(self, grid):
            def run(k, v, s_part, *args, **kwargs):
                real[grid](k, v, s_part, *args, **kwargs)
                s_part.mul_(1.5)
            return run

    monkeypatch.setattr(state_probe, "_stripped_state_kernel", HalfWrong())
    with pytest.raises(AssertionError, match="S off by"):
        state_probe.probe_shape("tiny", (1, 64, 2, 16), torch.device("cpu"), 1e10, True)
