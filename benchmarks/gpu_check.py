"""The GPU check: everything a short GPU lease should run, in one call, results written as it goes.

Stages, each in its own process group with its own time limit, so that one that fails or hangs
costs only its own results:

  environment  GPU, driver, clocks, torch / triton / CUDA versions, the commit
  install      pip install -e . --no-build-isolation --no-deps (builds linattn._C there)
  ceilings     device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate
               (8192³, random data), the two numbers every floor below is taken from
  tests        the test suite on the CUDA device: the backend-vs-float64 tests run the compiled
               Triton kernels (hardware bf16, fp16, 3xTF32 fp32), Hedgehog with dW, the long
               sequences; tests of the diffusers integration skip where diffusers is missing
  benchmarks   the video shapes of docs/kernels.md beside the PyTorch peers (ms, GB/s, share of
               the floor, speed-ups), CFG small under CUDA-graph replay, and issue 11's targets
  model        issue 13's latency projection: one Wan 2.1 1.3B transformer forward (480p x 81
               frames, bf16, random weights) with softmax everywhere, LinVideo's 16 layers or all
               30 linear (fused, fused + local mixing, unfused) and the zero-cost ceilings, then
               T = K * c * t_fwd for the 50-step guided original and the 4-step distilled
               generator; needs diffusers, which the image lacks: carry its wheel (below)
  tune         only with --tune: tune_triton.py --measure on the main classes, within a budget

How a session runs it through the device tool (H200: Python 3.12, torch 2.11 + CUDA 13,
triton 3.6, pybind11, cmake, ninja; no diffusers, no network):

    run(command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
                "--upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; "
                "PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT --commit <sha>",
        carry=[".whl"], timeout_s=570)

.whl holds the model stage's wheels (diffusers and importlib_metadata; every other package it
needs is in the image). Once per checkout, here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 importlib_metadata

Without them the model stage fails at once, saying so, and the tests of the diffusers
integration skip. The working tree travels; the install stage compiles linattn._C on the machine
(a module built here would not load there: other Python, other CPU). The default run fits in
8.5 minutes (--budget 510); --quick takes about 5. --tune adds --tune-seconds (default 240) and
is meant for a call of its own: `--stages tune --tune` (add `install` when the machine is fresh).
After a fix, rerun only what it touches, e.g. `--stages install,tests`.

What comes back under $OUT (the device tool returns at most 8 files):

  results.json      every stage: status (ok, failed, error, timeout, skipped), seconds, limit,
                    and its results (rewritten after each stage)
  summary.md        the same as tables, with issue 11's targets met or missed
  install.log       pip's output              tests.log       pytest's output
  benchmarks.log    one line per timed case   stages.log      environment, ceilings and model
  tune.log, tuned_configs.py   with --tune: the sweep and the regenerated table

--dry-run runs a tiny version of every stage on the CPU (Triton interpreted, tiny shapes, the
install only checked, the tuner compiling one class for sm_90 without timing it): CI runs it
(tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent

STAGES = ("environment", "install", "ceilings", "tests", "benchmarks", "model", "tune")
#: Seconds each stage may take, per mode. The default run sums to 510 s: 8.5 minutes with the
#: start-up of each stage's process, whatever hangs. (The native module is ~3k lines of C++: 90 s
#: is ample on 16 cores; the benchmarks compile a kernel family per dtype, head dim and map.)
LIMITS = {
    "full": dict(environment=20, install=90, ceilings=30, tests=150, benchmarks=130, model=90),
    "quick": dict(environment=20, install=120, ceilings=20, tests=90, benchmarks=50, model=50),
    # The dry run checks that every stage works, not how fast a CPU is: its limits only catch a
    # hang, so a loaded CI machine (a stage takes 4x longer there) does not fail it.
    "dry-run": dict(environment=120, install=240, ceilings=120, tests=300, benchmarks=300,
                    model=300, tune=60),
}
#: Where each stage's output goes (a file under --out).
LOGS = dict(environment="stages.log", install="install.log", ceilings="stages.log",
            tests="tests.log", benchmarks="benchmarks.log", model="stages.log", tune="tune.log")
#: Test files of --quick: the kernels against float64, nothing of the training stack.
QUICK_TESTS = ("tests/test_backends.py", "tests/test_triton_specific.py",
               "tests/test_hedgehog.py", "tests/test_long_sequence_accuracy.py")
#: Tests of --dry-run: one shape through both kernel backends and one Hedgehog case.
DRY_RUN_TESTS = ("tests/test_backends.py::test_backend_matches_reference",
                 "-k", "B2-Nq77-Nk77-H2-D32-Dv32-float32-relu-bnhd")
#: Test files the GPU run leaves out: they check the CPU dry run of this script and the packaging
#: (a wheel built and installed), CPU work only that CI runs; on the GPU they held a worker for
#: 100 s of a 150 s stage (2026-12-04).
CPU_ONLY_TESTS = ("tests/test_gpu_check.py", "tests/test_packaging.py")
#: Classes --tune sweeps: the video DiTs' head dims in bf16.
TUNE_CLASSES = "128x128:2,64x64:2"


# ---------------------------------------------------------------------------------------------
# The parent: runs each stage as a child process and merges what it wrote.


@dataclass
class StageRun:
    status: str      # ok | failed (ran, found failures) | error | timeout | skipped
    seconds: float
    limit_s: float
    returncode: Optional[int]


def run_process(command: list[str], timeout: float, log_path: Path, env: dict,
                cwd: Path = ROOT) -> StageRun:
    """Runs `command` in a new process group, output appended to log_path; on timeout the whole
    group (pip's compilers, pytest's workers) is ended, first politely."""
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n===== {' '.join(command)}  (limit {timeout:.0f} s)\n")
        log.flush()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            log.write(f"\n===== stopped at its {timeout:.0f} s limit\n")
            return StageRun("timeout", time.monotonic() - start, timeout, None)
    status = {0: "ok", 1: "failed"}.get(code, "error")
    return StageRun(status, time.monotonic() - start, timeout, code)


def stage_environment_variables(dry_run: bool, stage: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    if dry_run and stage != "tune":  # the tuner compiles for sm_90: never interpreted
        env["TRITON_INTERPRET"] = "1"
    return env


def read_stage_result(work: Path, stage: str) -> dict:
    """The stage's final result, or what it recorded before it stopped."""
    final = work / f"{stage}.json"
    if final.exists():
        return json.loads(final.read_text())
    records = read_records(work, stage)
    if stage == "tests":
        return {"partial": True, **summarize_tests(records)}
    return {"partial": True, "records": records}


def read_records(work: Path, stage: str) -> list[dict]:
    path = work / f"{stage}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="folder for the results")
    parser.add_argument("--quick", action="store_true", help="fewer tests and shapes")
    parser.add_argument("--dry-run", action="store_true", help="tiny stages on the CPU (CI)")
    parser.add_argument("--tune", action="store_true", help="add the tuner stage")
    parser.add_argument("--tune-seconds", type=float, default=240)
    parser.add_argument("--stages", default=None,
                        help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run (a stage never outlasts it; default "
                             "510 on the GPU, the sum of the stage limits for --dry-run)")
    parser.add_argument("--commit", default=None, help="the commit the tree is (no .git there)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)      # child: run this stage
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.stage:
        return run_stage_here(options)

    mode = "dry-run" if options.dry_run else "quick" if options.quick else "full"
    limits = dict(LIMITS[mode])
    if options.budget is None:
        options.budget = sum(limits.values()) if options.dry_run else 510.0
    if options.tune and not options.dry_run:
        limits["tune"] = options.tune_seconds
    wanted = STAGES if options.stages is None else tuple(options.stages.split(","))
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        parser.error(f"--stages: unknown {unknown}; choose from {list(STAGES)}")
    if "tune" in wanted and "tune" not in limits:
        if options.stages is not None:
            parser.error("--stages tune needs --tune")
    options.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    results = {"mode": mode, "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "commit": options.commit or git_commit(), "budget_s": options.budget,
               "stages": {}}
    deadline = time.monotonic() + options.budget
    for stage in STAGES:
        if stage not in wanted or stage not in limits:
            continue
        left = deadline - time.monotonic()
        limit = min(limits[stage], left)
        if limit < 5:
            results["stages"][stage] = {"status": "skipped", "seconds": 0.0, "limit_s": 0.0,
                                        "why": "no time left in --budget"}
        else:
            command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage,
                       "--work", str(work), "--out", str(options.out)]
            command += ["--quick"] * options.quick + ["--dry-run"] * options.dry_run
            command += ["--tune-seconds", str(limit)]
            print(f"[gpu_check] {stage}: limit {limit:.0f} s", flush=True)
            run = run_process(command, limit, options.out / LOGS[stage],
                              stage_environment_variables(options.dry_run, stage))
            results["stages"][stage] = {"status": run.status, "seconds": round(run.seconds, 1),
                                        "limit_s": round(run.limit_s, 1),
                                        "returncode": run.returncode,
                                        "result": read_stage_result(work, stage)}
            print(f"[gpu_check] {stage}: {run.status} in {run.seconds:.0f} s", flush=True)
        write_outputs(results, options.out)
    shutil.rmtree(work, ignore_errors=True)
    print(render_summary(results), flush=True)
    return 0 if all(s["status"] == "ok" for s in results["stages"].values()) else 1


def write_outputs(results: dict, out: Path) -> None:
    """results.json and summary.md, replaced atomically (a reader never sees half a file)."""
    for name, text in (("results.json", json.dumps(results, indent=1, default=str)),
                       ("summary.md", render_summary(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, out / name)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (pass --commit)"


# ---------------------------------------------------------------------------------------------
# The child: one stage, its result in WORK/<stage>.json, records in WORK/<stage>.jsonl as it goes.


def run_stage_here(options) -> int:
    stage = options.stage
    functions: dict[str, Callable] = dict(
        environment=stage_environment, install=stage_install, ceilings=stage_ceilings,
        tests=stage_tests, benchmarks=stage_benchmarks, model=stage_model, tune=stage_tune)
    result, ok = functions[stage](options)
    (options.work / f"{stage}.json").write_text(json.dumps(result, indent=1, default=str))
    return 0 if ok else 1


def record(options, stage: str, row: dict) -> None:
    with open(options.work / f"{stage}.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def device_of(options):
    import torch
    return torch.device("cpu" if options.dry_run else "cuda")


def stage_environment(options) -> tuple[dict, bool]:
    import torch
    import triton
    info = dict(python=platform.python_version(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.version.cuda, cpus=os.cpu_count(),
                machine=platform.machine())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sm_count=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1),
                    l2_mib=round(getattr(props, "L2_cache_size", 0) / 2**20, 1))
    try:
        query = ("name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,"
                 "power.draw,utilization.gpu")
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True,
            text=True, timeout=15).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        info["nvidia_smi"] = f"not available ({error})"
    print(json.dumps(info, indent=1))
    return info, options.dry_run or torch.cuda.is_available()


def stage_install(options) -> tuple[dict, bool]:
    pip = [sys.executable, "-m", "pip", "install", "-e", ".", "--no-build-isolation",
           "--no-deps"]
    result: dict = {"command": " ".join(pip[1:])}
    ok = True
    if options.dry_run:
        result["pip"] = "not run (dry run: the environment is the CI's)"
    else:
        start = time.monotonic()
        done = subprocess.run(pip, cwd=ROOT)
        result.update(pip_returncode=done.returncode, pip_seconds=round(time.monotonic() - start))
        ok = done.returncode == 0
    # What a fresh process makes of the package: the backends and why (not).
    check = subprocess.run(
        [sys.executable, "-c", "import json, linattn; print(json.dumps("
         "[(b.name, b.available, b.reason) for b in linattn.backends()]))"],
        cwd=ROOT, capture_output=True, text=True)
    print(check.stdout, check.stderr)
    if check.returncode == 0:
        result["backends"] = {name: {"available": a, "reason": r}
                              for name, a, r in json.loads(check.stdout.strip().splitlines()[-1])}
        ok = ok and result["backends"].get("cpu", {}).get("available", False)
    else:
        result["import_error"] = check.stderr[-2000:]
        ok = False
    return result, ok


def stage_ceilings(options) -> tuple[dict, bool]:
    import torch
    sys.path.insert(0, str(BENCH_DIR))
    from measure import copy_bandwidth
    device = device_of(options)
    bandwidth = copy_bandwidth(device)
    n = 256 if options.dry_run else 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = time_call(lambda: a @ b, device, options)
    result = dict(device=str(device), copy_bandwidth_TBps=bandwidth / 1e12,
                  matmul_bf16_TFLOPs=2 * n**3 / seconds / 1e12, matmul_n=n)
    print(json.dumps(result, indent=1))
    return result, True


class TestRecorder:
    """pytest plugin: one JSON line per test phase that decides an outcome, written as the run
    goes (in the controller process under xdist), so a run stopped at its limit still says what
    passed and what failed."""

    def __init__(self, path: Path):
        self.path = path

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            outcome = report.outcome
            if report.when != "call" and outcome == "failed":
                outcome = "error"
            row = dict(test=report.nodeid, outcome=outcome, when=report.when,
                       seconds=round(report.duration, 2))
            if report.outcome != "passed":
                row["message"] = _short_message(report)
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def pytest_collectreport(self, report):
        if report.outcome != "passed":
            with open(self.path, "a") as f:
                f.write(json.dumps(dict(test=report.nodeid or "<collection>",
                                        outcome="error" if report.failed else "skipped",
                                        when="collect",
                                        message=_short_message(report))) + "\n")


def _short_message(report) -> str:
    text = getattr(report, "longreprtext", "") or str(report.longrepr or "")
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("E ")]
    return "\n".join((errors or lines)[-6:])[-1500:]


def summarize_tests(rows: list[dict]) -> dict:
    counts: dict[str, int] = {}
    by_file: dict[str, dict[str, int]] = {}  # a stage stopped at its limit says what it covered
    for row in rows:
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
        file = by_file.setdefault(row["test"].split("::")[0], {})
        file[row["outcome"]] = file.get(row["outcome"], 0) + 1
    problems = [r for r in rows if r["outcome"] in ("failed", "error")]
    slowest = sorted((r for r in rows if r["outcome"] == "passed"),
                     key=lambda r: -r.get("seconds", 0))[:5]
    return dict(counts=counts, failures=problems[:50],
                skipped=sorted({r.get("message", "")[:200] for r in rows
                                if r["outcome"] == "skipped"})[:20],
                slowest=[(r["test"], r["seconds"]) for r in slowest], by_file=by_file)


def stage_tests(options) -> tuple[dict, bool]:
    import importlib.util
    import pytest
    if options.dry_run:
        targets = list(DRY_RUN_TESTS)
    elif options.quick:
        targets = list(QUICK_TESTS)
    else:
        targets = ["tests/"]
    args = [*targets, "-q", "-rfEs", "-p", "no:cacheprovider", "-o", "addopts="]
    if not options.dry_run:
        args += [f"--ignore={path}" for path in CPU_ONLY_TESTS]
    if not options.dry_run and importlib.util.find_spec("xdist") is not None:
        args += ["-n", "12"]  # 16 cores: the CPU-side tests and Triton's compilations overlap
    if importlib.util.find_spec("pytest_timeout") is not None:
        args += ["--timeout", "120"]
    # Import the working tree's linattn and tests, not this folder's conftest.
    sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
    os.chdir(ROOT)
    code = pytest.main(args, plugins=[TestRecorder(options.work / "tests.jsonl")])
    result = summarize_tests(read_records(options.work, "tests"))
    result.update(pytest_exit_code=int(code), arguments=args)
    return result, int(code) == 0


# --- benchmarks ------------------------------------------------------------------------------

#: (name, (B, N, H, D)): kernels.md's video shapes, most important first (a stage stopped at its
#: limit loses the last ones).
VIDEO_SHAPES = [
    ("Wan 1.3B", (1, 32760, 12, 128)),
    ("CFG small", (2, 4096, 12, 64)),
    ("HunyuanVideo", (1, 119040, 24, 128)),
    ("Wan 14B", (1, 75600, 40, 128)),
    ("CogVideoX-5B", (2, 17776, 48, 64)),
]


@dataclass(frozen=True)
class BenchCase:
    shape_name: str
    shape: tuple
    dtype: str = "bfloat16"
    feature_map: str = "relu"       # or "hedgehog" (F = D)
    mode: str = "forward"           # or "forward+backward"
    impls: tuple = ("linattn-triton", "einsum-fp32", "matmul-bf16", "sdpa-softmax")
    graph: bool = False             # also time linattn-triton under CUDA-graph replay


def benchmark_cases(options) -> list[BenchCase]:
    if options.dry_run:
        tiny = ("tiny", (1, 256, 2, 32))
        return [BenchCase(*tiny, mode="forward+backward",
                          impls=("linattn-triton", "linattn-cpu", "einsum-fp32")),
                BenchCase(*tiny, feature_map="hedgehog", impls=("linattn-triton",
                                                                "hedgehog-torch")),
                BenchCase(*tiny, graph=True, impls=("linattn-triton",))]
    shapes = dict(VIDEO_SHAPES)
    both = ("forward", "forward+backward")
    cases = [BenchCase("Wan 1.3B", shapes["Wan 1.3B"], mode=m) for m in both]
    cases += [BenchCase("CFG small", shapes["CFG small"], mode=m, graph=True) for m in both]
    cases += [BenchCase("Wan 1.3B", shapes["Wan 1.3B"], feature_map="hedgehog", mode=m,
                        impls=("linattn-triton", "hedgehog-torch")) for m in both]
    no_sdpa = ("linattn-triton", "einsum-fp32", "matmul-bf16")
    for name in ("HunyuanVideo", "Wan 14B"):
        cases += [BenchCase(name, shapes[name]),
                  BenchCase(name, shapes[name], mode="forward+backward", impls=no_sdpa)]
    if not options.quick:
        cases += [BenchCase("Wan 1.3B", shapes["Wan 1.3B"], dtype="float32", mode=m,
                            impls=("linattn-triton", "einsum-fp32")) for m in both]
        cases += [BenchCase("CogVideoX-5B", shapes["CogVideoX-5B"], mode=m, impls=no_sdpa)
                  for m in both]
    return cases


def io_bytes(shape: tuple, itemsize: int, mode: str) -> int:
    """Compulsory bytes (benchmarks/test_linear_attention.py): forward reads q, k, v and writes
    o; forward + backward also reads do and writes dq, dk, dv (11 tensors; o is not re-read)."""
    B, N, H, D = shape
    return (4 if mode == "forward" else 11) * B * N * H * D * itemsize


def time_call(fn, device, options) -> float:
    """Median seconds of fn(): CUDA events through triton's do_bench on the GPU, a wall clock
    on the CPU (dry run)."""
    if device.type == "cuda":
        import triton.testing
        rep = 30 if options.quick else 60
        return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median") / 1e3
    fn()  # warm-up; one timed call is all a dry run needs (it checks the path, not the speed)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def implementation(name: str, case: BenchCase, maps):
    import functools
    import linattn
    import peers
    if name.startswith("linattn-"):
        feature_map = maps if case.feature_map == "hedgehog" else case.feature_map
        return functools.partial(linattn.linear_attention, feature_map=feature_map,
                                 backend=name.removeprefix("linattn-"))
    if name == "hedgehog-torch":
        return functools.partial(peers.hedgehog_torch, phi_q=maps[0], phi_k=maps[1])
    return dict(einsum_fp32=peers.einsum_fp32, matmul_bf16=peers.matmul_bf16,
                sdpa_softmax=peers.sdpa_softmax)[name.replace("-", "_")]


def graph_replay_seconds(call, device, options) -> float:
    """fn captured in a CUDA graph (after warm-up on a side stream), its replay timed."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return time_call(graph.replay, device, options)


def run_case(case: BenchCase, options, bandwidth: float) -> list[dict]:
    import torch
    from linattn.feature_maps import Hedgehog
    device = device_of(options)
    dtype = getattr(torch, case.dtype)
    B, N, H, D = case.shape
    q, k, v = (torch.randn(B, N, H, D, device=device, dtype=dtype) for _ in range(3))
    maps = params = ()
    if case.feature_map == "hedgehog":
        maps = tuple(Hedgehog(H, D, init="random").to(device) for _ in range(2))
        params = tuple(m.weight for m in maps)
    backward = case.mode != "forward"
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        grad_out = torch.randn_like(q)
    nbytes = io_bytes(case.shape, q.element_size(), case.mode)
    floor = nbytes / bandwidth
    rows, outputs = [], {}
    for name in case.impls:
        fn = implementation(name, case, maps)
        if backward:
            def call(fn=fn):
                return torch.autograd.grad(fn(q, k, v), (q, k, v, *params), grad_out)
        else:
            def call(fn=fn):
                return fn(q, k, v)
        row = dict(shape=f"{case.shape_name} {case.shape}", dtype=case.dtype,
                   feature_map=case.feature_map, mode=case.mode, impl=name, bytes=nbytes,
                   floor_ms=floor * 1e3, extra_bytes=None)
        try:
            with contextlib.nullcontext() if backward else torch.no_grad():
                if not backward and name in ("linattn-triton", "einsum-fp32", "hedgehog-torch"):
                    outputs[name] = call().float()
                seconds = time_call(call, device, options)
            row.update(seconds=seconds, share_of_floor=floor / seconds)
        except Exception as error:  # noqa: BLE001 - recorded; the next implementation runs
            row.update(seconds=None, error=f"{type(error).__name__}: {str(error)[:300]}")
        rows.append(row)
        if case.graph and name == "linattn-triton" and row.get("seconds"):
            graphed = dict(row, impl="linattn-triton (CUDA graph)")
            if device.type != "cuda":
                graphed.update(seconds=None, error="needs CUDA")
            else:
                try:
                    seconds = graph_replay_seconds(call, device, options)
                    graphed.update(seconds=seconds, share_of_floor=floor / seconds)
                except Exception as error:  # noqa: BLE001
                    graphed.update(seconds=None,
                                   error=f"{type(error).__name__}: {str(error)[:300]}")
            rows.append(graphed)
    peer = "hedgehog-torch" if case.feature_map == "hedgehog" else "einsum-fp32"
    if "linattn-triton" in outputs and peer in outputs:
        # A correctness spot check at the real size: the fp32 peer is far more exact than bf16.
        ours, theirs = outputs["linattn-triton"], outputs[peer]
        row = next(r for r in rows if r["impl"] == "linattn-triton")
        row["rel_rms_vs_fp32_peer"] = ((ours - theirs).norm() / theirs.norm()).item()
    return rows


def stage_benchmarks(options) -> tuple[dict, bool]:
    import torch
    sys.path.insert(0, str(BENCH_DIR))
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    from measure import copy_bandwidth
    device = device_of(options)
    ceilings = options.work / "ceilings.json"
    bandwidth = (json.loads(ceilings.read_text())["copy_bandwidth_TBps"] * 1e12
                 if ceilings.exists() else copy_bandwidth(device))
    all_rows, ok = [], True
    for case in benchmark_cases(options):
        try:
            rows = run_case(case, options, bandwidth)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory making the inputs
            rows = [dict(shape=f"{case.shape_name} {case.shape}", mode=case.mode,
                         impl="(inputs)", error=f"{type(error).__name__}: {error}")]
        for row in rows:
            record(options, "benchmarks", row)
            # A linattn call that fails is a failure; a peer's (out of memory) or a graph
            # capture's (recorded in the table) is not.
            if row["impl"] in ("linattn-triton", "linattn-cpu") and "error" in row:
                ok = False
            ms = "-" if row.get("seconds") is None else f"{row['seconds'] * 1e3:.3f} ms"
            print(f"{row['shape']} {row.get('dtype', '')} {row.get('feature_map', '')} "
                  f"{row['mode']} {row['impl']}: {ms} {row.get('error', '')}", flush=True)
        all_rows += rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dict(bandwidth_TBps=bandwidth / 1e12, rows=all_rows), ok


# --- model: issue 13's latency projection ------------------------------------------------------

#: The projection's rows: (label, its {layers} from the timed row, variant of
#: test_model_step.VARIANTS, K sampling steps, c transformer forwards per step). The original
#: samples 50 guided steps (both branches); the distilled generator 4 steps with its guidance
#: distilled in (docs/distill.md).
PROJECTION = (("original, 50 steps, guided", "all-SDPA", 50, 2),
              ("{layers} linear, 50 steps, guided", "k linear, fused", 50, 2),
              ("{layers} linear, 4 steps distilled", "k linear, fused", 4, 1),
              ("{layers} linear + local mixing, 4 steps distilled",
               "k linear, fused + local mixing", 4, 1),
              ("{layers} linear, 4 steps distilled", "all linear, fused", 4, 1),
              ("{layers} at the zero-cost ceiling, 4 steps distilled", "k ceiling", 4, 1))


def stage_model(options) -> tuple[dict, bool]:
    """One transformer forward of Wan 2.1 1.3B per variant of the whole-model benchmark
    (benchmarks/test_model_step.py: its model, inputs, variants and set-up, timed here as in the
    benchmarks stage); the projection is drawn from these rows in summary.md."""
    import importlib.util
    if importlib.util.find_spec("diffusers") is None:
        why = ("diffusers is not installed: carry its wheel (.whl, see this script's docstring); "
               "nothing timed")
        print(why)
        return dict(error=why), False
    import torch
    sys.path[:0] = [str(BENCH_DIR), str(ROOT)]
    os.chdir(ROOT)
    import test_model_step as bench
    device = device_of(options)
    spec_index = next(i for i, s in enumerate(bench.SPECS) if s.name.startswith("Wan"))
    spec = bench.SPECS[spec_index]
    model = bench._model(spec_index, device)
    inputs = spec.inputs(model, device, bench.DTYPE)
    wanted = {variant for _, variant, _, _ in PROJECTION} | {"k linear, unfused",
                                                             "all ceiling"}
    rows, ok = [], True
    for name, which, how in bench.VARIANTS:
        if name not in wanted:
            continue
        layers = bench._layers(model, spec, which)
        row = dict(model=spec.name, variant=name, layers=f"{len(layers)}/"
                   f"{bench.self_attention_count(model)}", dtype=str(bench.DTYPE))
        undo = bench._set_up(model, layers, how)
        try:
            row["seconds"] = time_call(bench._step_fn(model, inputs, "inference"), device,
                                       options)
        except Exception as error:  # noqa: BLE001 - recorded; the other variants still run
            row["error"] = f"{type(error).__name__}: {error}"
            ok = False
        finally:
            undo()
        record(options, "model", row)
        timed = row.get("error") or f"{row['seconds'] * 1e3:.1f} ms"
        print(f"{name} ({row['layers']}): {timed}", flush=True)
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return dict(model=spec.name, rows=rows), ok


def projection_lines(model: dict) -> list[str]:
    """The forwards of the model stage as a table, then T = K · c · t_fwd per PROJECTION row
    (the transformer's share: the text encoder and the VAE decode are not in it)."""
    rows = model.get("rows") or model.get("records") or []
    if not rows:
        return [model.get("error", "no forward timed")]
    times = {r["variant"]: r["seconds"] for r in rows if r.get("seconds")}
    layers = {r["variant"]: r["layers"] for r in rows}
    sdpa = times.get("all-SDPA")
    lines = [f"{rows[0]['model']}, one transformer forward, batch 1, {rows[0]['dtype']}, "
             "random weights, eager; linear layers: Hedgehog maps (test_model_step.py)", "",
             "| variant | layers | ms | × vs all-SDPA |",
             "|---|---|---|---|"]
    for r in rows:
        ms = f"{r['seconds'] * 1e3:.1f}" if r.get("seconds") else r.get("error", "-")
        ratio = f"{sdpa / r['seconds']:.2f}" if sdpa and r.get("seconds") else "-"
        lines.append(f"| {r['variant']} | {r['layers']} | {ms} | {ratio} |")
    original = sdpa and 100 * sdpa
    lines += ["", "T = K · c · t_fwd (transformer only; text encode and VAE decode not "
              "included)", "", "| sampling | K · c | seconds | × vs original |",
              "|---|---|---|---|"]
    for label, variant, steps, forwards in PROJECTION:
        label = label.format(layers=layers.get(variant, "?"))
        t = times.get(variant)
        if t is None:
            lines.append(f"| {label} | {steps * forwards} | not timed | - |")
            continue
        total = steps * forwards * t
        lines.append(f"| {label} | {steps * forwards} | {total:.2f} | "
                     f"{f'{original / total:.1f}' if original else '-'} |")
    return lines


def stage_tune(options) -> tuple[dict, bool]:
    script = [sys.executable, str(BENCH_DIR / "tune_triton.py")]
    if options.dry_run:
        # Compile one class for sm_90 (ptxas needs no GPU); nothing is timed or written.
        command = script + ["--static", "--arch", "sm90", "--classes", "32x32:2", "--kinds",
                            "output"]
    else:
        command = script + ["--measure", "--write", "--classes", TUNE_CLASSES,
                            "--budget-seconds", str(max(10, options.tune_seconds - 40))]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    print(done.stdout, done.stderr)
    entries = [line for line in done.stdout.splitlines() if line.startswith("('sm")]
    result = dict(command=" ".join(command[1:]), returncode=done.returncode, entries=entries)
    table = ROOT / "linattn" / "kernels" / "triton" / "tuned_configs.py"
    if not options.dry_run and done.returncode == 0:
        shutil.copy(table, options.out / "tuned_configs.py")
        result["table"] = "tuned_configs.py"
    return result, done.returncode == 0


# ---------------------------------------------------------------------------------------------
# summary.md


def render_summary(results: dict) -> str:
    stages = results["stages"]
    env = stages.get("environment", {}).get("result", {})
    lines = [f"# GPU check ({results['mode']}), {results['started']}, commit {results['commit']}",
             "", f"{env.get('gpu', 'no GPU')}, torch {env.get('torch', '?')}, triton "
             f"{env.get('triton', '?')}, CUDA {env.get('cuda', '?')}", "",
             "| stage | status | seconds | limit |", "|---|---|---|---|"]
    for name, s in stages.items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']} | {s['limit_s']} |")
    ceil = stages.get("ceilings", {}).get("result", {})
    if "copy_bandwidth_TBps" in ceil:
        lines += ["", f"Ceilings: copy {ceil['copy_bandwidth_TBps']:.3g} TB/s (read + write), "
                      f"bf16 matmul {ceil['matmul_bf16_TFLOPs']:.3g} TFLOP/s "
                      f"({ceil['matmul_n']}³, random data)."]
    install = stages.get("install", {}).get("result", {})
    if install.get("backends"):
        lines += ["", "Backends: " + "; ".join(
            f"{n}: {'yes' if b['available'] else 'no'} ({b['reason']})"
            for n, b in install["backends"].items())]
    tests = stages.get("tests", {}).get("result", {})
    if "counts" in tests:
        lines += ["", "## Tests", "", ", ".join(f"{v} {k}" for k, v in
                                                 sorted(tests["counts"].items()))
                  + (" (stopped at the limit: partial)" if tests.get("partial") else "")]
        if tests.get("by_file"):
            lines.append("")
            lines.append("Per file: " + "; ".join(
                f"{Path(f).name} " + "/".join(f"{n} {o}" for o, n in sorted(c.items()))
                for f, c in sorted(tests["by_file"].items())))
        for failure in tests.get("failures", []):
            message = failure.get("message", "").replace("\n", " / ")[:400]
            lines.append(f"- {failure['outcome'].upper()} `{failure['test']}`: {message}")
    bench = stages.get("benchmarks", {}).get("result", {})
    rows = bench.get("rows") or bench.get("records") or []
    if rows:
        lines += ["", "## Benchmarks", "", *benchmark_tables(rows), "", "## Issue 11 targets",
                  "", *target_lines(rows)]
    if "model" in stages:
        lines += ["", "## Issue 13 latency projection", "",
                  *projection_lines(stages["model"].get("result") or {})]
    tune = stages.get("tune", {}).get("result", {})
    if tune.get("entries"):
        lines += ["", "## Tuner", "", *[f"    {e}" for e in tune["entries"]]]
    return "\n".join(lines)


def benchmark_tables(rows: list[dict]) -> list[str]:
    groups: dict = {}
    for row in rows:
        if "feature_map" in row:
            groups.setdefault((row["shape"], row["dtype"], row["feature_map"], row["mode"]),
                              []).append(row)
    lines = []
    for (shape, dtype, fmap, mode), group in groups.items():
        peers = [r for r in group if not r["impl"].startswith("linattn") and r.get("seconds")]
        lines += ["", f"{shape}, {dtype}, {fmap}, {mode} (floor {group[0]['floor_ms']:.3f} ms)",
                  "", "| " + " | ".join(["impl", "ms", "GB/s", "% of floor",
                                         *[f"× vs {p['impl']}" for p in peers]]) + " |",
                  "|" + "---|" * (4 + len(peers))]
        for r in group:
            if not r.get("seconds"):
                lines.append(f"| {r['impl']} | {r.get('error', 'no time')} |")
                continue
            cells = [r["impl"], f"{r['seconds'] * 1e3:.3f}",
                     f"{r['bytes'] / r['seconds'] / 1e9:.0f}",
                     f"{100 * r['share_of_floor']:.1f}%",
                     *[f"{p['seconds'] / r['seconds']:.2f}" for p in peers]]
            lines.append("| " + " | ".join(cells) + " |")
        checked = [r for r in group if "rel_rms_vs_fp32_peer" in r]
        for r in checked:
            lines.append(f"\n{r['impl']} output against the fp32 peer: relative RMS "
                         f"{r['rel_rms_vs_fp32_peer']:.2e}")
    return lines


def target_lines(rows: list[dict]) -> list[str]:
    """Issue 11's targets (bf16, relu unless named) against this run's rows."""
    def find(shape, mode, impl="linattn-triton", fmap="relu"):
        for r in rows:
            if (r.get("shape", "").startswith(shape) and r.get("mode") == mode
                    and r.get("impl") == impl and r.get("feature_map") == fmap
                    and r.get("dtype") == "bfloat16" and r.get("seconds")):
                return r
        return None

    def line(what, bar, got, met):
        verdict = "not measured" if not got else "met" if met else "NOT met"
        return f"| {what} | {bar} | {got or '-'} | {verdict} |"

    lines = ["| target | bar | this run | |", "|---|---|---|---|"]
    for shape, mode, target in (("Wan 1.3B", "forward", 0.90),
                                ("Wan 1.3B", "forward+backward", 0.80),
                                ("Wan 14B", "forward", 0.85), ("HunyuanVideo", "forward", 0.85)):
        r = find(shape, mode)
        lines.append(line(f"{shape} {mode}", f"≥ {100 * target:.0f}% of floor",
                          r and f"{100 * r['share_of_floor']:.0f}%",
                          r is not None and r["share_of_floor"] >= target))
    for mode, target in (("forward", 2), ("forward+backward", 2.5)):
        hh, relu = find("Wan 1.3B", mode, fmap="hedgehog"), find("Wan 1.3B", mode)
        both = hh is not None and relu is not None
        lines.append(line(f"Hedgehog Wan 1.3B {mode}", f"≤ {target}× relu",
                          both and f"{hh['seconds'] / relu['seconds']:.2f}×",
                          both and hh["seconds"] <= target * relu["seconds"]))
    graph = find("CFG small", "forward", "linattn-triton (CUDA graph)")
    lines.append(line("CFG small forward, CUDA graph", "≤ 2× floor",
                      graph and f"{1 / graph['share_of_floor']:.2f}× floor",
                      graph is not None and graph["share_of_floor"] >= 0.5))
    return lines


if __name__ == "__main__":
    sys.exit(main())
