"""Benchmark session: shapes per device, the measured floor, and a side-by-side summary.

`pytest benchmarks/ --benchmark-only` times every implementation on every shape (CPU: small
shapes; CUDA: the video-DiT shapes of kernels.md) and ends with a table: time, achieved
bandwidth, share of the floor, and each linattn backend's speed-up over every peer measured in
the same run. The table is also written to .benchmarks/summary.md for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import os
import platform
import subprocess
from collections import defaultdict
from datetime import date
from pathlib import Path

import pytest
import torch

from measure import copy_bandwidth

ROWS: list[dict] = []
OVERHEAD_ROWS: list[dict] = []
#: One row per whole-model step (test_model_step.py).
MODEL_ROWS: list[dict] = []


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def bandwidth(device) -> float:
    return copy_bandwidth(device)


def record(**row) -> None:
    ROWS.append(row)


def record_overhead(*, what: str, impl: str, seconds: float, min_seconds: float,
                    peer: str | None) -> None:
    """A per-call host time (test_overhead.py); `peer`: the impl it is compared with."""
    OVERHEAD_ROWS.append(dict(what=what, impl=impl, seconds=seconds, min_seconds=min_seconds,
                              peer=peer))


def overhead_table(rows: list[dict]) -> str:
    """Per-call host time in µs (median and fastest round), and each linattn row's ratio to
    its peer's median in the same run."""
    lines = ["\nPer-call host time (median of rounds; fastest round in brackets)\n",
             "| what | impl | µs per call | ratio to peer |", "|---|---|---|---|"]
    for r in rows:
        ratio = ""
        if r["peer"] is not None and r["impl"] != r["peer"]:
            peer = next((p for p in rows if p["impl"] == r["peer"] and p["what"] == r["what"]),
                        None)
            if peer is not None:
                ratio = (f"{r['seconds'] / peer['seconds']:.2f} "
                         f"({r['min_seconds'] / peer['min_seconds']:.2f})")
        lines.append(f"| {r['what']} | {r['impl']} | {r['seconds'] * 1e6:.1f} "
                     f"({r['min_seconds'] * 1e6:.1f}) | {ratio} |")
    return "\n".join(lines)


def record_model_step(**row) -> None:
    MODEL_ROWS.append(row)


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summary_table(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for row in rows:
        groups[(row["shape"], row["dtype"], row["feature_map"], row["mode"])].append(row)
    lines = []
    for (shape, dtype, fmap, mode), group in groups.items():
        peers = [r for r in group if not r["impl"].startswith("linattn")]
        header = "| impl | ms | GB/s | % of floor | peak extra MB | " + " | ".join(
            f"× vs {p['impl']}" for p in peers) + " |"
        lines += [f"\n{shape}, {dtype}, {fmap}, {mode} (floor {group[0]['floor_ms']:.3f} ms)\n",
                  header, "|" + "---|" * (5 + len(peers))]
        for r in group:
            ratios = " | ".join(f"{p['seconds'] / r['seconds']:.2f}" for p in peers)
            extra = "n/a" if r["extra_bytes"] is None else f"{r['extra_bytes'] / 1e6:.1f}"
            lines.append(f"| {r['impl']} | {r['seconds'] * 1e3:.3f} | {r['bytes'] / r['seconds'] / 1e9:.1f} "
                         f"| {100 * r['floor_ms'] / (r['seconds'] * 1e3):.1f}% | {extra} | {ratios} |")
    return "\n".join(lines)


def model_step_table(rows: list[dict]) -> str:
    """Per (model, step, mode): ms per step and per block, × vs all-SDPA of the same group, and
    the share of the ceiling reached: the row's speed-up over the speed-up of the free
    stand-in (o = v) on the same layers."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["step"], row["mode"])].append(row)
    lines = []
    for (model, step, mode), group in groups.items():
        blocks = group[0]["blocks"]
        sdpa = next((r for r in group if r["how"] == "sdpa"), None)
        ceilings = {r["layers"]: r for r in group if r["how"] == "ceiling"}
        lines += [f"\n{model}{f' ({blocks})' if blocks else ''}, {step}, {mode}\n",
                  "| variant | layers | ms | ms per block | × vs all-SDPA | share of ceiling |",
                  "|---|---|---|---|---|---|"]
        for r in group:
            ms = r["seconds"] * 1e3
            per_block = f"{ms / r['block_count']:.2f}" if r["block_count"] else "n/a"
            speedup = sdpa["seconds"] / r["seconds"] if sdpa else None
            ceiling = ceilings.get(r["layers"])
            share = "n/a"
            if speedup and ceiling and r["how"] in ("fused", "fused-mixing", "unfused"):
                share = f"{100 * speedup / (sdpa['seconds'] / ceiling['seconds']):.0f}%"
            lines.append(f"| {r['variant']} | {r['layers']} | {ms:.1f} | {per_block} | "
                         f"{'n/a' if speedup is None else f'{speedup:.2f}'} | {share} |")
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not ROWS and not OVERHEAD_ROWS and not MODEL_ROWS:
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    title = (f"linattn benchmarks: {_machine(device)}, torch {torch.__version__}, "
             f"{date.today().isoformat()}, commit {_commit()}")
    out = Path(config.rootpath) / ".benchmarks"
    out.mkdir(exist_ok=True)
    if ROWS or OVERHEAD_ROWS:
        text = title + "\n" + summary_table(ROWS)
        if OVERHEAD_ROWS:
            text += "\n" + overhead_table(OVERHEAD_ROWS)
        terminalreporter.write_sep("=", "linattn side-by-side")
        terminalreporter.write_line(text)
        (out / "summary.md").write_text(text + "\n")
    if MODEL_ROWS:
        text = title + "\n" + model_step_table(MODEL_ROWS)
        terminalreporter.write_sep("=", "linattn whole-model steps")
        terminalreporter.write_line(text)
        (out / "model_step.md").write_text(text + "\n")
