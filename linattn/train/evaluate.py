"""How close the student's samples are to the teacher's, from the same noise and conditioning.

The metric is the relative squared error of the final samples, per sample then averaged:
rel_mse = mean_i ‖x_student,i − x_teacher,i‖² / ‖x_teacher,i‖², both produced by the same Euler
sampler (no guidance) from the same noise. 0 means identical samples.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .flow import FlowModel, euler_sample


def relative_mse(x: Tensor, reference: Tensor) -> float:
    err = (x.float() - reference.float()).flatten(1).square().sum(1)
    return float((err / reference.float().flatten(1).square().sum(1).clamp_min(1e-12)).mean())


@torch.no_grad()
def sample_distance(teacher: FlowModel, student: FlowModel, noise: Tensor, cond: Tensor,
                    sigmas: Tensor, teacher_samples: Tensor | None = None) -> float:
    """rel_mse between the student's and the teacher's samples from ``noise``.

    ``teacher_samples`` may be passed when already computed (they do not change in training).
    """
    if teacher_samples is None:
        teacher_samples = euler_sample(teacher, noise, cond, sigmas)
    return relative_mse(euler_sample(student, noise, cond, sigmas), teacher_samples)


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
