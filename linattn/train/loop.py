"""What every post-training stage's loop shares: process group, micro-batching, the step loop
with its progress bar, logging, evaluation and checkpoint cadence, bit-exact resume, the
learning-rate schedule and bf16 autocast.

The stages (linearisation, linattn.train.trainer; few-step distillation,
linattn.train.distill) are subclasses of ``StageLoop`` that say what one optimiser step does,
what is evaluated, which models and optimisers a checkpoint holds and what the finished stage
saves. Everything a step depends on (learning rate, schedules, the data order, the random
draws) is a function of the step number, so a checkpoint's step plus the model, optimiser and
RNG states resume a run bit for bit.
"""
from __future__ import annotations

import abc
import contextlib
import math
import os
import random
from typing import Any, Optional

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed as D
from .metrics import MetricsLog


class StageLoop(abc.ABC):
    """The loop of one stage; subclasses fill in the hooks below.

    ``section`` is the stage's optimisation section (steps, global_batch_size,
    micro_batch_size, seed, device, strategy, mixed_precision, warmup_steps, lr_schedule),
    named ``section_name`` in messages; ``output`` is linattn.train.config.OutputSection; the
    subclass sets ``self.cfg`` (its whole config, with to_dict()).
    """

    desc = "linattn train"             # the progress bar's label

    def __init__(self, section: Any, output: Any, *, section_name: str = "train",
                 progress: bool = True, context_parallel: Optional[dict] = None):
        self.section = section
        self.output = output
        self.progress = progress
        self.ctx = D.setup(section.device)
        self.strategy = D.resolve_strategy(section.strategy, self.ctx.world_size)
        # Data replicas x context-parallel groups (distributed.make_mesh; context_parallel:
        # {ring, ulysses}, None for one process per group): batches split over the replicas, and
        # the processes of a group see the same samples and random draws.
        cp = context_parallel or {}
        self.mesh = D.make_mesh(self.ctx, cp.get("ring", 1), cp.get("ulysses", 1))
        self.out_dir = output.dir
        self.ckpt_root = os.path.join(output.dir, "checkpoints")
        self.metrics = MetricsLog(os.path.join(output.dir, "metrics.jsonl"), self.ctx.is_main)
        seed_everything(section.seed + self.mesh.data_rank)
        self.micro_batch, self.accumulation = micro_batching(
            section.global_batch_size, section.micro_batch_size, self.mesh.data_size,
            section_name)
        self.step = 0

    # ------------------------------------------------------------------ hooks

    @abc.abstractmethod
    def train_step(self) -> dict:
        """One optimiser step at self.step (not yet incremented); returns its log record,
        which has at least "loss"."""

    def evaluate(self) -> dict:
        """eval_* entries for the log (every rank calls it)."""
        return {}

    def start_record(self) -> dict:
        """The log record of step 0, before training (evaluation is added to it)."""
        return {"step": 0}

    @abc.abstractmethod
    def checkpoint_models(self) -> tuple[nn.Module, torch.optim.Optimizer, Optional[dict]]:
        """(module, optimiser, extra (name -> (module, optimiser)) or None) a checkpoint
        holds."""

    def checkpoint_tensors(self) -> dict:
        """Further named tensor groups a checkpoint holds (name -> {name: tensor}), restored
        in place on resume."""
        return {}

    def resume_keys(self) -> dict:
        """Settings a resumed run must share with the checkpoint (recorded in it)."""
        return {"global_batch_size": self.section.global_batch_size, "seed": self.section.seed,
                "steps": self.section.steps}

    def checkpoint_state(self) -> dict:
        """Further entries of trainer_state.json (for a reader; resume needs only the step)."""
        return {}

    def progress_postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.4g}"}

    def plot(self) -> bool:
        """Redraw the stage's plot from the metrics log (rank 0); False if nothing to draw."""
        return False

    @abc.abstractmethod
    def finish(self) -> Any:
        """Save the trained result after the last step; return the stage's result."""

    @abc.abstractmethod
    def stopped(self) -> Any:
        """The result of a run stopped early (stop_at_step), before finishing."""

    # ------------------------------------------------------------------ loop

    def run(self, stop_at_step: Optional[int] = None) -> Any:
        steps, oc = self.section.steps, self.output
        self.resume_or_start()
        bar = tqdm(total=steps, initial=self.step, desc=self.desc, unit="step",
                   disable=not (self.progress and self.ctx.is_main))
        with bar:
            while self.step < steps:
                if stop_at_step is not None and self.step >= stop_at_step:
                    return self.stopped()
                record = self.train_step()
                self.step += 1
                if oc.eval_every and self.step % oc.eval_every == 0:
                    record.update(self.evaluate())
                if self.step % oc.log_every == 0 or self.step == steps:
                    self.metrics.write(record)
                bar.update(1)
                bar.set_postfix(**self.progress_postfix(record))
                if self.step % oc.checkpoint_every == 0 or self.step == steps:
                    self.save_checkpoint()
        return self.finish()

    def resume_path(self) -> Optional[str]:
        """The checkpoint resume_or_start() resumes from: output.resume's folder, or with
        "auto" the latest in output.dir (None: none there, or "never"). Set-up work that a
        resumed run takes from its checkpoint checks it first."""
        resume = self.output.resume
        if resume == "auto":
            return ckpt.latest_checkpoint(self.ckpt_root)
        return None if resume == "never" else resume

    def resume_or_start(self) -> None:
        """Resume from output.resume (auto: the latest checkpoint), or start: write
        config.yaml, reset the log and log step 0 (with an evaluation if eval_every)."""
        oc = self.output
        path = self.resume_path()
        if oc.resume == "never":
            latest = ckpt.latest_checkpoint(self.ckpt_root)
            if latest is not None:
                # Starting over here would interleave this run's checkpoints with the old ones.
                raise ValueError(f"output.resume: 'never', but {self.ckpt_root!r} holds "
                                 f"checkpoints of an earlier run (latest "
                                 f"{os.path.basename(latest)}); use another output.dir or "
                                 f"remove them")
        path = D.broadcast_object(path, self.ctx)
        if path is not None:
            # Settings first: a checkpoint of another set-up may not even hold the same
            # tensors, and its mismatch says more than a missing key would.
            written = ckpt.read_trainer_state(path)
            for key, now in self.resume_keys().items():
                if written.get(key) != now:
                    raise ValueError(f"output.resume: checkpoint {path!r} was written with "
                                     f"{key}={written.get(key)!r}, this run has {now!r}; the "
                                     f"data order and schedules would not continue the same run")
            module, optimizer, extra = self.checkpoint_models()
            state = ckpt.load_checkpoint(path, module, optimizer, self.ctx, extra=extra,
                                         tensors=self.checkpoint_tensors())
            self.step = state["step"]
            if self.ctx.is_main:
                self.metrics.truncate_after(self.step)
            return
        if self.ctx.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            with open(os.path.join(self.out_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(self.config_dict(), f, sort_keys=False)
            self.metrics.reset()
        record = self.start_record()
        if self.output.eval_every:
            record.update(self.evaluate())
        self.metrics.write(record)

    def config_dict(self) -> dict:
        """The run's whole configuration, written to output.dir/config.yaml."""
        return self.cfg.to_dict()

    def save_checkpoint(self) -> str:
        module, optimizer, extra = self.checkpoint_models()
        state = {"step": self.step, **self.checkpoint_state(), **self.resume_keys()}
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, module, optimizer, state,
                                    self.ctx, self.output.keep_checkpoints, extra=extra,
                                    tensors=self.checkpoint_tensors())
        if self.ctx.is_main:
            self.plot()
        return path

    def lr_scale(self, step: int) -> float:
        """The learning-rate factor at ``step``: linear warmup, then constant or a cosine
        decay to 0 at the last step."""
        s = self.section
        if step < s.warmup_steps:
            return (step + 1) / s.warmup_steps
        if s.lr_schedule == "cosine":
            span = max(s.steps - s.warmup_steps - 1, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min((step - s.warmup_steps) / span, 1.0)))
        return 1.0

    def autocast(self):
        if self.section.mixed_precision == "bf16":
            return torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.ctx.device, non_blocking=True) for k, v in batch.items()}

    def close(self) -> None:
        D.teardown(self.ctx)


def micro_batching(global_batch_size: int, micro_batch_size: Optional[int],
                   world_size: int, section_name: str = "train") -> tuple[int, int]:
    """(micro-batch per process, micro-batches accumulated per step); world_size: the
    data-parallel replicas (the processes, without context parallelism)."""
    micro = micro_batch_size or global_batch_size // world_size
    per_rank = global_batch_size // world_size
    if global_batch_size % world_size or micro < 1 or per_rank % micro:
        raise ValueError(f"{section_name}.global_batch_size: {global_batch_size} must split into "
                         f"{world_size} data-parallel replicas x whole micro-batches of "
                         f"{micro}")
    return micro, per_rank // micro


def save_model(model: nn.Module, directory: str) -> None:
    """save_pretrained for a diffusers model (linattn.load_converted reads it back); the state
    dict as model.safetensors for another module."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(directory)
        return
    from safetensors.torch import save_model as save_safetensors

    os.makedirs(directory, exist_ok=True)
    save_safetensors(model, os.path.join(directory, "model.safetensors"))


def clip_grad(params: list, max_norm: float) -> float:
    """Clip the gradients of ``params`` to a total norm; return the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
