"""Checkpoints that resume bit-exact, on one process or many, under DDP or FSDP2.

A checkpoint is a folder ``step-NNNNNNNN`` under output.dir/checkpoints holding:

* ``state/``: model (gates included) and optimiser, any further trained model with its
  optimiser (ADM's trained fake score) and any further named tensors (the distillation's
  weight average), written with torch.distributed.checkpoint from
  get_state_dict, so each FSDP2 rank writes its own shards and a checkpoint loads under a
  different number of processes too;
* ``rng/rank-R.pt``: every random generator of rank R (Python, NumPy, torch CPU, CUDA);
* ``trainer_state.json``: the step, the data position, α and the gate values at that step.

The learning rate, α and the data order are functions of the step, so the step restores them.
A checkpoint is written to ``step-NNNNNNNN.partial`` and renamed when every rank has finished:
a run killed while saving leaves no half checkpoint that ``latest_checkpoint`` could pick.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from typing import Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from .distributed import DistContext

_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def latest_checkpoint(root: str) -> Optional[str]:
    """The complete checkpoint with the highest step under ``root``, or None."""
    if not os.path.isdir(root):
        return None
    steps = [int(m.group(1)) for name in os.listdir(root) if (m := _NAME.match(name))
             and os.path.isfile(os.path.join(root, name, "trainer_state.json"))]
    return checkpoint_dir(root, max(steps)) if steps else None


def rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


Pairs = dict[str, tuple[nn.Module, torch.optim.Optimizer]]
Tensors = dict[str, dict[str, torch.Tensor]]


def _states(model: nn.Module, optimizer: torch.optim.Optimizer,
            extra: Optional[Pairs], tensors: Optional[Tensors] = None) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    for name, (m, o) in (extra or {}).items():
        state[f"{name}_model"], state[f"{name}_optim"] = get_state_dict(m, o)
    for name, group in (tensors or {}).items():
        if name in state:
            raise ValueError(f"checkpoint: tensors {name!r} would overwrite the state's own "
                             f"entry of that name")
        # The group's own tensors: dcp.load fills them in place.
        state[name] = group
    return state


def save_checkpoint(root: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict, ctx: DistContext, keep: int,
                    extra: Optional[Pairs] = None, tensors: Optional[Tensors] = None) -> str:
    """Write the checkpoint of ``step`` (every rank calls this); return its folder.
    ``extra``: further (model, optimiser) pairs by name, saved beside the student's;
    ``tensors``: further groups of named tensors (plain or DTensor shards) by name."""
    final = checkpoint_dir(root, step)
    partial = final + ".partial"
    if ctx.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
    ctx.barrier()
    dcp.save(_states(model, optimizer, extra, tensors),
             checkpoint_id=os.path.join(partial, "state"), no_dist=not ctx.distributed)
    torch.save(rng_state(ctx.device), os.path.join(partial, "rng", f"rank-{ctx.rank}.pt"))
    ctx.barrier()
    if ctx.is_main:
        state = dict(trainer_state, world_size=ctx.world_size)
        with open(os.path.join(partial, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _prune(root, keep)
    ctx.barrier()
    return final


def _prune(root: str, keep: int) -> None:
    steps = sorted(int(m.group(1)) for name in os.listdir(root) if (m := _NAME.match(name)))
    for step in steps[:-keep]:
        shutil.rmtree(checkpoint_dir(root, step), ignore_errors=True)


def read_trainer_state(path: str) -> dict:
    """A checkpoint's trainer_state.json (its step and the settings it was written with)."""
    state_file = os.path.join(path, "trainer_state.json")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"output.resume: {path!r} is not a complete checkpoint (no "
                                f"trainer_state.json)")
    with open(state_file) as f:
        return json.load(f)


def load_checkpoint(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                    ctx: DistContext, extra: Optional[Pairs] = None,
                    tensors: Optional[Tensors] = None) -> dict:
    """Restore model, optimiser, ``tensors`` (in place) and this rank's RNG from ``path``;
    return the trainer state."""
    trainer_state = read_trainer_state(path)
    state = _states(model, optimizer, extra, tensors)
    dcp.load(state, checkpoint_id=os.path.join(path, "state"), no_dist=not ctx.distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    for name, (m, o) in (extra or {}).items():
        set_state_dict(m, o, model_state_dict=state[f"{name}_model"],
                       optim_state_dict=state[f"{name}_optim"])
    rng_file = os.path.join(path, "rng", f"rank-{ctx.rank}.pt")
    if trainer_state.get("world_size") == ctx.world_size and os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False), ctx.device)
    else:
        warnings.warn(f"linattn.train: checkpoint {path!r} was written by "
                      f"{trainer_state.get('world_size')} processes and is resumed by "
                      f"{ctx.world_size}; model, optimiser and data order are restored, but "
                      f"the random generators are not (the run is not bit-exact)",
                      RuntimeWarning, stacklevel=2)
    return trainer_state
