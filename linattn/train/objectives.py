"""Training objectives: ADM (method.md §4) and the plain velocity-MSE baseline.

Both take a batch of stored teacher trajectory points (x_t, t, t_next, cond, teacher velocity)
and velocity functions u(x, t, cond) (linattn.train.flow.FlowModel), and return a scalar loss
plus float diagnostics for the metrics log.

ADM, anytime distribution matching. The gradient of KL(q_t ‖ p_t) with respect to the student
θ is E[(s_q(x̂_t) − s_p(x̂_t)) · ∂x̂_t/∂θ] for x̂_t ~ q_t drawn differentiably. With the
rectified-flow score s(x) = −(x + (1 − t) u(x)) / t,

    g = s_q − s_p = ((1 − t) / t) · (u_teacher(x̂_t) − u_student(x̂_t)),

the student's own velocity standing in for the score of its marginal (no fake-score network).
The loss 0.5 · mean((x̂_t − stopgrad(x̂_t − g))²) has exactly that gradient, divided by the
number of elements per sample (so its scale does not depend on the video size).

[choice] x̂_t: one student Euler step, with gradient, from the stored teacher point at t' to
the next time t of the teacher's own schedule: x̂_t = x_{t'} + (t − t') · û_θ(x_{t'}, t').
[choice] The weight (1 − t)/t is infinite at t = 0 (the teacher's last step ends there).
"normalize" (the default) divides each sample's g by its mean absolute value: the weight then
cancels and every stored point counts alike. "clip" keeps the exact weight, (1 − t)/max(t, t_min).
Why normalize by default: diffusers' schedules end with a long step into t ≈ 0.009 (50 steps,
shift 3: 0.067 -> 0.009), where the clipped weight is ~20, so under "clip" that one step of each
trajectory carries most of the gradient. Measured on a tiny Wan (4 layers, all linear, 8-step
data): the cosine between the full-data ADM gradient and the velocity-matching gradient was 0.77
with "normalize" and 0.40 with "clip", and per time step ADM agreed with velocity matching on the
same points (cosine 0.74-0.95) under both, which is the sign check on a real model.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]


def _wide(x: Tensor) -> Tensor:
    """x in float32, or float64 when it already is: losses are never computed in bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def adm_weight(t: Tensor, t_min: float) -> Tensor:
    """(1 − t) / max(t, t_min): the score-difference weight, finite down to t = 0."""
    return (1.0 - t) / t.clamp_min(t_min)


def adm_loss(x_hat: Tensor, u_teacher: Tensor, u_student: Tensor, t: Tensor, *,
             weighting: str = "normalize", t_min: float = 0.05, eps: float = 1e-8) -> Tensor:
    """The ADM surrogate whose gradient is E[(s_q − s_p)(x̂_t) · ∂x̂_t/∂θ] / numel(sample).

    Args:
        x_hat: (B, ...) student samples at time t, differentiable in θ.
        u_teacher: (B, ...) teacher velocity at x_hat (no gradient is taken through it).
        u_student: (B, ...) student velocity at x_hat, the fake score (no gradient either).
        t: (B,) times of x_hat, in [0, 1].
        weighting: "clip" or "normalize" (see the module docstring).
        t_min: the clip of t in the weight ("clip" only).
    """
    if not (x_hat.shape == u_teacher.shape == u_student.shape):
        raise ValueError(f"x_hat, u_teacher, u_student: shapes must match, got "
                         f"{tuple(x_hat.shape)}, {tuple(u_teacher.shape)}, "
                         f"{tuple(u_student.shape)}")
    if t.shape != x_hat.shape[:1]:
        raise ValueError(f"t: expected shape ({x_hat.shape[0]},), got {tuple(t.shape)}")
    with torch.no_grad():
        diff = _wide(u_teacher) - _wide(u_student)
        if weighting == "clip":
            g = _per_sample(adm_weight(_wide(t), t_min), diff) * diff
        elif weighting == "normalize":
            scale = diff.abs().flatten(1).mean(dim=1) + eps
            g = diff / _per_sample(scale, diff)
        else:
            raise ValueError(f"weighting: expected 'clip' or 'normalize', got {weighting!r}")
        target = _wide(x_hat.detach()) - g
    return 0.5 * (_wide(x_hat) - target).square().mean()


def adm_objective(student: Velocity, teacher: Velocity, batch: dict, *,
                  weighting: str = "normalize", t_min: float = 0.05,
                  student_no_grad: Velocity | None = None) -> tuple[Tensor, dict]:
    """ADM on stored teacher points: a student Euler step t' -> t, then ``adm_loss``.

    ``batch`` holds x_t (B, ...), t (B,), t_next (B,) and cond. ``student`` is called once
    with gradient; the fake-score evaluation at x̂_t uses ``student_no_grad`` (the module
    without its DDP wrapper, so that no gradient-sync bookkeeping is started) or ``student``.
    """
    x, t, t_next, cond = batch["x_t"], batch["t"], batch["t_next"], batch["cond"]
    u_step = student(x, t, cond)
    x_hat = _wide(x) + _per_sample(t_next - t, x) * u_step
    with torch.no_grad():
        x_eval = x_hat.detach()
        u_teacher = teacher(x_eval, t_next, cond)
        u_student = (student_no_grad or student)(x_eval, t_next, cond)
    loss = adm_loss(x_hat, u_teacher, u_student, t_next, weighting=weighting, t_min=t_min)
    with torch.no_grad():
        gap = (u_teacher - u_student).square().mean()
    return loss, {"velocity_gap": float(gap)}


def velocity_mse_objective(student: Velocity, batch: dict) -> tuple[Tensor, dict]:
    """The baseline: mean ‖u_teacher(x_t) − û_θ(x_t, t)‖² on the stored points."""
    u = student(batch["x_t"], batch["t"], batch["cond"])
    loss = (_wide(u) - _wide(batch["velocity"])).square().mean()
    return loss, {"velocity_gap": float(loss.detach())}
