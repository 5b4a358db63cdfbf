"""benchmarks/gpu_check.py, the one-call GPU check: its --dry-run runs every stage on the CPU,
and a stage that hangs is stopped at its limit without losing what the others wrote."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def load_gpu_check():
    if "gpu_check" not in sys.modules:  # dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = module
        spec.loader.exec_module(module)
    return sys.modules["gpu_check"]


def test_dry_run_runs_every_stage(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    stages = results["stages"]
    assert list(stages) == list(load_gpu_check().STAGES)
    assert {name: s["status"] for name, s in stages.items()} == dict.fromkeys(stages, "ok")
    assert stages["install"]["result"]["backends"]["cpu"]["available"]
    assert stages["tests"]["result"]["counts"] == {"passed": 2}
    rows = stages["benchmarks"]["result"]["rows"]
    timed = {(r["impl"], r["mode"], r["feature_map"]) for r in rows if r.get("seconds")}
    assert {("linattn-triton", "forward+backward", "relu"), ("linattn-cpu", "forward+backward",
            "relu"), ("linattn-triton", "forward", "hedgehog")} <= timed
    assert any(r.get("error") == "needs CUDA" for r in rows)  # the graph case says why not
    assert stages["tune"]["result"]["entries"], "the tuner compiled no class for sm_90"
    forwards = {r["variant"]: r for r in stages["model"]["result"]["rows"]}
    assert {"all-SDPA", "k linear, fused", "k linear, fused + local mixing",
            "k ceiling"} <= set(forwards)
    assert all(r["seconds"] > 0 for r in forwards.values())
    summary = (tmp_path / "summary.md").read_text()
    for heading in ("## Tests", "## Benchmarks", "## Issue 11 targets",
                    "## Issue 13 latency projection", "## Tuner"):
        assert heading in summary
    # The device tool returns at most 8 files from $OUT, named in letters, digits, . _ -.
    files = [p.name for p in tmp_path.iterdir()]
    assert len(files) <= 8 and all(p.is_file() for p in tmp_path.iterdir()), files


def test_projection_multiplies_one_forward_by_the_steps_and_forwards():
    gpu_check = load_gpu_check()
    rows = [dict(model="Wan", variant="all-SDPA", layers="0/30", dtype="bf16", seconds=0.5),
            dict(model="Wan", variant="k linear, fused", layers="16/30", dtype="bf16",
                 seconds=0.25)]
    lines = gpu_check.projection_lines(dict(rows=rows))
    assert "| original, 50 steps, guided | 100 | 50.00 | 1.0 |" in lines
    assert "| 16/30 linear, 50 steps, guided | 100 | 25.00 | 2.0 |" in lines
    assert "| 16/30 linear, 4 steps distilled | 4 | 1.00 | 50.0 |" in lines
    assert any("at the zero-cost ceiling" in line and "| not timed |" in line
               for line in lines)
    assert gpu_check.projection_lines(dict(error="diffusers is not installed")) == [
        "diffusers is not installed"]


def test_a_hanging_stage_is_stopped_with_its_children(tmp_path):
    gpu_check = load_gpu_check()
    pid_file = tmp_path / "child.pid"
    hang = ("import subprocess, sys, time; "
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
            f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(120)")
    start = time.monotonic()
    run = gpu_check.run_process([sys.executable, "-c", hang], 3, tmp_path / "hang.log",
                                dict(os.environ))
    assert run.status == "timeout" and time.monotonic() - start < 30
    assert "stopped at its 3 s limit" in (tmp_path / "hang.log").read_text()
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild (pip's compiler, a pytest worker) went with it
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"process {child} of the stopped stage is still running")


def test_a_stopped_test_stage_still_reports_what_ran(tmp_path):
    gpu_check = load_gpu_check()
    rows = [dict(test="tests/a.py::ok", outcome="passed", when="call", seconds=1.0),
            dict(test="tests/a.py::bad", outcome="failed", when="call", seconds=0.5,
                 message="E assert 1 == 2")]
    (tmp_path / "tests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = gpu_check.read_stage_result(tmp_path, "tests")
    assert result["partial"] and result["counts"] == {"passed": 1, "failed": 1}
    assert result["failures"][0]["test"] == "tests/a.py::bad"
    summary = gpu_check.render_summary(dict(mode="full", started="now", commit="abc", stages={
        "tests": dict(status="timeout", seconds=150, limit_s=150, result=result)}))
    assert "1 failed, 1 passed (stopped at the limit: partial)" in summary
    assert "FAILED `tests/a.py::bad`: E assert 1 == 2" in summary


def test_split_sweep_times_the_plan_and_its_neighbours(tmp_path):
    """benchmarks/split_sweep.py (the split model's calibration on the GPU), its dry run: the
    planned count is among the forced ones, every count gives the same state (the script
    checks it), and the times are written."""
    script = ROOT / "benchmarks" / "split_sweep.py"
    done = subprocess.run([sys.executable, str(script), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "split_sweep.json").read_text())["rows"]
    forced = [r for r in rows if "note" not in r]
    assert len(forced) >= 2 and sum(r["planned"] for r in forced) == 1
    assert len({r["splits"] for r in forced}) == len(forced)
    assert all(r["seconds"] > 0 for r in rows)


def test_gpu_faults_dry_run_reaches_every_diagnosis():
    """benchmarks/gpu_faults.py (the H200 faults, localised in the next GPU call) runs its tiny
    cases on the CPU: the lifted refusal reaches the kernels, both diagnoses print."""
    script = ROOT / "benchmarks" / "gpu_faults.py"
    done = subprocess.run([sys.executable, str(script), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert sum(line.startswith("pre ") for line in lines) == 2
    assert sum(line.startswith("fp16 ") for line in lines) == 2
    assert "NaN False" in done.stdout


def test_model_stage_without_diffusers_says_so(tmp_path, monkeypatch):
    import importlib.util
    gpu_check = load_gpu_check()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "diffusers" else real(name, *a))
    options = type("Options", (), dict(dry_run=True, quick=False, work=tmp_path))()
    result, ok = gpu_check.stage_model(options)
    assert not ok and "diffusers is not installed" in result["error"]
