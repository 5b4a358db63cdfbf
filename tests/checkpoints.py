"""Reading a training run back in the tests: its distributed checkpoint gathered into one dict,
flattened to tensor leaves, and its metrics without the fields that depend on the clock.

Shared by the first stage's and the distillation stage's resume and sharding tests, which compare
runs leaf by leaf."""
from __future__ import annotations

import os

import torch


def checkpoint_state(run_dir, step: int) -> dict:
    """The run's checkpoint at `step` ({"model": ..., "optim": ..., ...}) as one dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(run_dir, f"gathered-{step}.pt")
    dcp_to_torch_save(os.path.join(run_dir, "checkpoints", f"step-{step:08d}", "state"), out)
    return torch.load(out, weights_only=False)


def flat(state: dict, prefix: str = "") -> dict:
    """The tensor leaves of a nested dict, keyed by their dotted paths (other leaves dropped)."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out


def without_timing(records: list) -> list:
    """metrics.jsonl records without their wall-clock fields, which no two runs share."""
    return [{k: v for k, v in r.items() if k not in ("step_time_s", "samples_per_s")}
            for r in records]
