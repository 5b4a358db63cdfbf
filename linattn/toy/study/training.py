"""Training one run of the study, cached: ``<root>/runs/<key>/run.json`` plus the saved model.

A training run is linattn.train.train on the toy config with the run's overrides; its teacher
data live in ``<root>/data/<hash of the data settings>`` and are shared by every run with the
same data settings. run.json records what the document needs (the linear layers, the gate
trajectory and loss curve from metrics.jsonl, the training time) and that the run finished:
when it exists the run is not trained again, and the model is reloaded from ``final/``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

from torch import nn

from .plan import Run

RUN_FILE = "run.json"
# Keys of metrics.jsonl kept in run.json, per step.
CURVE_KEYS = ("step", "objective", "loss", "l_con", "l_reg", "alpha", "gates", "phase",
              "n_linear_rounded", "step_time_s")


def run_dir(root: Path, run: Run) -> Path:
    return Path(root) / "runs" / run.key


def data_dir(root: Path, run: Run) -> Path:
    digest = hashlib.sha1(json.dumps(list(run.data)).encode()).hexdigest()[:10]
    return Path(root) / "data" / f"teacher-{digest}"


def read_json(path: Path) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write_json(path: Path, obj) -> None:
    """Atomically (a killed study never leaves a half-written cache entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def trained_record(root: Path, run: Run) -> Optional[dict]:
    """run.json of a finished training run, or None."""
    return read_json(run_dir(root, run) / RUN_FILE)


def train_run(root: Path, run: Run, teacher: nn.Module, progress: bool = True) -> dict:
    """Train ``run`` unless run.json says it finished; return run.json's content."""
    from ...train import train
    from ..linvideo import TOY_CONFIG, layer_names

    if run.kind != "train":
        raise ValueError(f"run {run.name!r}: kind {run.kind!r} is not trained")
    done = trained_record(root, run)
    if done is not None:
        return done
    out = run_dir(root, run)
    # A run without its own train.select_steps selects over the whole run (the paper's
    # recipe), whatever the toy config's default: its key names everything that decides it.
    pinned = ([] if any(o.startswith("train.select_steps=") for o in run.overrides)
              else ["train.select_steps=null"])
    start = time.perf_counter()
    with warnings.catch_warnings():
        # The trainer says when the rounded gates miss the target (the document shows the
        # gates), and torch's checkpointing that it saves in one process: both expected here.
        warnings.filterwarnings("ignore", message="linattn.train: .* gates round to linear",
                                category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        result = train(str(TOY_CONFIG), overrides=[
            f"data.dir={data_dir(root, run)}", f"output.dir={out / 'train'}",
            *run.train_overrides(), *pinned, f"output.checkpoint_every={run.steps}",
            "output.eval_every=0", "output.resume=auto"], teacher=teacher, progress=progress)
    seconds = time.perf_counter() - start
    names = layer_names(teacher)
    if result.selection is not None:
        linear = sorted(names.index(n) for n, kind in result.selection.items() if kind == "linear")
    elif run.layers is not None:
        linear = list(run.layers)
    else:                                   # mode linear on every layer
        linear = list(range(len(names)))
    with open(result.metrics_path) as f:
        curve = [{k: r[k] for k in CURVE_KEYS if k in r} for r in map(json.loads, f)]
    record = {"name": run.name, "settings": run.settings(), "linear_layers": linear,
              "final_dir": os.path.relpath(result.final_dir, out), "train_seconds": seconds,
              "curve": curve}
    write_json(out / RUN_FILE, record)
    shutil.rmtree(out / "train" / "checkpoints", ignore_errors=True)   # final/ is the model
    return record


def load_trained(root: Path, run: Run) -> nn.Module:
    """The finalized student of a finished run, in eval mode."""
    from ...dit import load_converted

    record = trained_record(root, run)
    if record is None:
        raise FileNotFoundError(f"run {run.name!r} ({run.key}) has not been trained under "
                                f"{root}")
    return load_converted(run_dir(root, run) / record["final_dir"]).eval()
