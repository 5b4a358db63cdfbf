"""How close the student's samples are to the teacher's, from the same noise and conditioning.

The trainer's evaluation samples the teacher once (cached) and the student at every eval step,
both with the teacher data's sampler and classifier-free guidance (what inference runs), from
held-out noise, and hands the samples to a list of metric functions. A metric function takes
(student samples, EvalSet) and returns {name: float}; the trainer logs each entry as
``eval_<name>`` (and ``eval_<name>_rounded`` for the model with its gates rounded). The default
list is [``rel_mse_metric``] (on the toy teacher, linattn.toy.TrainerMetrics: every fidelity
figure with its spread); pass ``eval_metrics=`` to ``linattn.train.train`` for others.

rel_mse = mean_i ‖x_student,i − x_teacher,i‖² / ‖x_teacher,i‖². 0 means identical samples.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from .families import Conditioning
from .flow import FlowModel, euler_sample, teacher_sample


def relative_mse(x: Tensor, reference: Tensor) -> float:
    err = (x.float() - reference.float()).flatten(1).square().sum(1)
    return float((err / reference.float().flatten(1).square().sum(1).clamp_min(1e-12)).mean())


@dataclass
class EvalSet:
    """What every evaluation of a run shares: held-out noise and conditioning, the sampler
    settings, and the teacher's samples from that noise."""

    noise: Tensor                      # (n, C, F, H, W)
    cond: Conditioning                 # (n, L, D), or Prompts (families.base)
    negative_cond: Optional[Conditioning]  # the same with guidance, else None
    guidance_scale: float
    sampler: str
    num_steps: int
    shift: float
    trajectories: list                 # the held-out trajectory numbers (conditioning rows)
    teacher_samples: Optional[Tensor] = None

    def sample(self, model: FlowModel) -> Tensor:
        """Samples of ``model`` from this set's noise, with its sampler and guidance."""
        return teacher_sample(model, self.noise, self.cond, sampler=self.sampler,
                              num_steps=self.num_steps, shift=self.shift,
                              negative_cond=self.negative_cond,
                              guidance_scale=self.guidance_scale)


EvalMetric = Callable[[Tensor, EvalSet], dict]


def rel_mse_metric(samples: Tensor, eval_set: EvalSet) -> dict:
    """{"rel_mse": relative_mse(samples, teacher's samples)}."""
    return {"rel_mse": relative_mse(samples, eval_set.teacher_samples)}


def default_eval_metrics(config) -> list:
    """The eval metrics of a run that passes none: rel_mse, and on the toy teacher
    (model.pretrained "linattn:toy") all of the toy's fidelity figures with their spread
    (linattn.toy.TrainerMetrics, which include rel_mse)."""
    from .config import TOY_SOURCE

    if config.model.pretrained == TOY_SOURCE:
        from ..toy.fidelity import TrainerMetrics

        return [TrainerMetrics()]
    return [rel_mse_metric]


def run_metrics(metrics: Sequence[EvalMetric], samples: Tensor, eval_set: EvalSet,
                suffix: str = "") -> dict:
    """Every metric's entries as eval_<name><suffix>; two metrics may not share a name."""
    out = {}
    for metric in metrics:
        for name, value in metric(samples, eval_set).items():
            key = f"eval_{name}{suffix}"
            if key in out:
                raise ValueError(f"eval_metrics: two metrics report {name!r}")
            out[key] = float(value)
    return out


@torch.no_grad()
def sample_distance(teacher: FlowModel, student: FlowModel, noise: Tensor, cond: Conditioning,
                    sigmas: Tensor, teacher_samples: Tensor | None = None, *,
                    negative_cond: Optional[Conditioning] = None,
                    guidance_scale: float = 1.0) -> float:
    """rel_mse between the student's and the teacher's Euler samples from ``noise``.

    ``teacher_samples`` may be passed when already computed (they do not change in training).
    """
    kw = dict(negative_cond=negative_cond, guidance_scale=guidance_scale)
    if teacher_samples is None:
        teacher_samples = euler_sample(teacher, noise, cond, sigmas, **kw)
    return relative_mse(euler_sample(student, noise, cond, sigmas, **kw), teacher_samples)


@contextlib.contextmanager
def rounded_gates(gates: Sequence[nn.Parameter]) -> Iterator[None]:
    """Temporarily set every gate r_l to round(r_l): the model finalize() would produce."""
    saved = [g.detach().clone() for g in gates]
    try:
        with torch.no_grad():
            for g in gates:
                g.copy_(torch.round(g))
        yield
    finally:
        with torch.no_grad():
            for g, s in zip(gates, saved):
                g.copy_(s)
