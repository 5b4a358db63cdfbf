"""Training objectives: ADM (method.md §4) and the plain velocity-MSE baseline.

Both take a batch of stored teacher trajectory points (x_t, t, t_next, cond, teacher velocity;
with classifier-free guidance also negative_cond and the teacher's unconditional velocity) and
velocity functions u(x, t, cond) (linattn.train.flow.FlowModel), and return a scalar loss plus
float diagnostics for the metrics log.

ADM, anytime distribution matching. The gradient of KL(q_t ‖ p_t) with respect to the student
θ is E[(s_q(x̂_t) − s_p(x̂_t)) · ∂x̂_t/∂θ] for x̂_t ~ q_t drawn differentiably. With the
rectified-flow score s(x) = −(x + (1 − t) u(x)) / t,

    s_q − s_p = ((1 − t) / t) · (u_teacher(x̂_t) − u_fake(x̂_t)),

u_fake being the student's own velocity (the paper's construction, no fake-score network) or a
separately trained score model (``fake_score_loss``). The surrogate 0.5 · mean((x̂_t −
stopgrad(x̂_t − g))²) has gradient g · ∂x̂_t/∂θ / numel(sample), and its value is 0.5 · mean(g²):
the logged "adm_push", the size of the push the student gets.

[choice] x̂_t: one student Euler step, with gradient, from the stored teacher point at t' to
the next time t of the teacher's own schedule: x̂_t = x_{t'} + (t − t') · û_θ(x_{t'}, t').
With guidance the step, the teacher and the fake score all use the guided velocity
u_uncond + w (u_cond − u_uncond): the student is trained on what inference runs.

The push g (``train.adm_weighting``) is the score difference times a per-sample positive
weight, so every choice descends a weighted sum of the per-time KLs:

* "dmd" (default): DMD's normaliser. With the clean predictions x̂_0 = x̂_t − t u,
  g = (x̂_0^fake − x̂_0^real) / mean|x̂_t − x̂_0^real| = t (u_teacher − u_fake) / (t mean|u_teacher|).
  The normaliser is the size of the teacher's velocity, which does not vanish as the student
  converges, so the push shrinks with the student's error and the logged push falls as fidelity
  improves. At t = 0 both clean predictions equal x̂_t and g = 0.
* "clip": the exact weight (1 − t) / max(t, t_min). Schedules end with a long step into t ≈ 0
  (50 steps, shift 3: 0.067 -> 0.009), where the clipped weight is 1/t_min: that step of each
  trajectory carries most of the gradient.
* "normalize": g divided by its own per-sample mean |g|. Every push has full size however close
  the student is, so rounding noise of a bf16 teacher becomes a full-size push and the logged
  loss sits near 0.8 whatever the fidelity. Kept for comparison; it drifts (method.md §4).

Anchors (method.md §4). The self-estimated score is the score of the student's marginal only
while the student is a consistent flow of its own samples; nothing in the update pulls it back
when it is not, and a student whose velocity at one time has parameters of its own (the
per-time-step Gaussian toy of tests/test_train_stability.py) drifts without bound: the update of
the parameters at t' is driven only by the error at the next time t, so the linearised dynamics
have no restoring term at all. Two anchors restore it, each an option:

* ``velocity_weight`` λ_v: adds λ_v · ‖û_θ(x_{t'}, t') − u_teacher(x_{t'}, t')‖² at the stored
  point. It costs nothing (the step already evaluates û_θ there and the data store u_teacher).
* ``fake_score``: a separately trained score model (the paper's ablated variant, DMD's fake
  score). It is trained on the student's own samples, so it tracks their marginal whatever the
  student's velocity is; see ``fake_score_loss`` for how it learns from x̂_t without clean data.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .flow import branch_velocities, combine_guidance

Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]
WEIGHTINGS = ("dmd", "clip", "normalize")


def _wide(x: Tensor) -> Tensor:
    """x in float32, or float64 when it already is: losses are never computed in bf16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) broadcastable against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _sample_mean(v: Tensor) -> Tensor:
    """(B, ...) -> (B,) mean over each sample's elements."""
    return v.flatten(1).mean(dim=1)


def adm_weight(t: Tensor, t_min: float) -> Tensor:
    """(1 − t) / max(t, t_min): the score-difference weight, finite down to t = 0."""
    return (1.0 - t) / t.clamp_min(t_min)


@torch.no_grad()
def adm_push(u_teacher: Tensor, u_fake: Tensor, t: Tensor, *, weighting: str = "dmd",
             t_min: float = 0.05, eps: float = 1e-8) -> Tensor:
    """g, the weighted score difference s_q − s_p at samples of time t (module docstring).

    Args:
        u_teacher: (B, ...) teacher velocity at the samples.
        u_fake: (B, ...) the fake score's velocity there (the student's own, or a trained one).
        t: (B,) times of the samples, in [0, 1].
        weighting: "dmd", "clip" or "normalize".
        t_min: the clip of t in the exact weight ("clip" only).
    """
    if u_teacher.shape != u_fake.shape:
        raise ValueError(f"u_teacher, u_fake: shapes must match, got {tuple(u_teacher.shape)}, "
                         f"{tuple(u_fake.shape)}")
    if t.shape != u_teacher.shape[:1]:
        raise ValueError(f"t: expected shape ({u_teacher.shape[0]},), got {tuple(t.shape)}")
    diff = _wide(u_teacher) - _wide(u_fake)
    t = _wide(t)
    if weighting == "dmd":
        # x̂_0^fake − x̂_0^real = t · diff over mean|x̂_t − x̂_0^real| = t · mean|u_teacher|.
        scale = t * _sample_mean(_wide(u_teacher).abs())
        return diff * _per_sample(t / (scale + eps), diff)
    if weighting == "clip":
        return _per_sample(adm_weight(t, t_min), diff) * diff
    if weighting == "normalize":
        return diff / _per_sample(_sample_mean(diff.abs()) + eps, diff)
    raise ValueError(f"weighting: expected one of {list(WEIGHTINGS)}, got {weighting!r}")


def adm_loss(x_hat: Tensor, u_teacher: Tensor, u_student: Tensor, t: Tensor, *,
             weighting: str = "dmd", t_min: float = 0.05, eps: float = 1e-8) -> Tensor:
    """The ADM surrogate whose gradient is E[g · ∂x̂_t/∂θ] / numel(sample) and whose value is
    0.5 · mean(g²).

    Args:
        x_hat: (B, ...) student samples at time t, differentiable in θ.
        u_teacher: (B, ...) teacher velocity at x_hat (no gradient is taken through it).
        u_student: (B, ...) the fake score's velocity at x_hat (no gradient either).
        t: (B,) times of x_hat, in [0, 1].
        weighting, t_min: see ``adm_push``.
    """
    if x_hat.shape != u_teacher.shape:
        raise ValueError(f"x_hat, u_teacher, u_student: shapes must match, got "
                         f"{tuple(x_hat.shape)}, {tuple(u_teacher.shape)}, "
                         f"{tuple(u_student.shape)}")
    g = adm_push(u_teacher, u_student, t, weighting=weighting, t_min=t_min, eps=eps)
    return push_loss(x_hat, g)


def push_loss(x: Tensor, g: Tensor) -> Tensor:
    """0.5 · mean((x − stopgrad(x − g))²), the DMD-style surrogate of a push g on samples x:
    its value is 0.5 · mean(g²) and its gradient with respect to x is g / numel(x). Shared by
    ADM and the distillation stage's generator loss (linattn.train.distill)."""
    target = _wide(x.detach()) - g
    return 0.5 * (_wide(x) - target).square().mean()


def _guided(model: Velocity, x: Tensor, t: Tensor, batch: dict,
            guidance_scale: float) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(guided velocity, conditional branch, unconditional branch); the branches are None
    without guidance (the guided velocity is then the conditional one)."""
    if guidance_scale == 1.0:
        return model(x, t, batch["cond"]), None, None
    u_cond, u_uncond = branch_velocities(model, x, t, batch["cond"], batch["negative_cond"])
    return combine_guidance(u_cond, u_uncond, guidance_scale), u_cond, u_uncond


def _velocity_error(u: Tensor, u_cond: Optional[Tensor], u_uncond: Optional[Tensor],
                    batch: dict) -> Tensor:
    """Mean squared error of the student's velocity at the stored points against the
    teacher's: both branches (averaged) under guidance, so each is pinned to its teacher."""
    if u_cond is None:
        return (_wide(u) - _wide(batch["velocity"])).square().mean()
    return 0.5 * ((_wide(u_cond) - _wide(batch["velocity"])).square().mean()
                  + (_wide(u_uncond) - _wide(batch["velocity_uncond"])).square().mean())


def _check_guidance_batch(batch: dict, guidance_scale: float) -> None:
    if guidance_scale < 1.0:
        raise ValueError(f"guidance_scale: must be >= 1, got {guidance_scale}")
    if guidance_scale != 1.0:
        missing = [k for k in ("negative_cond", "velocity_uncond") if batch.get(k) is None]
        if missing:
            raise ValueError(f"batch: guidance_scale {guidance_scale} needs {missing} (teacher "
                             f"data generated with guidance)")


def _student_step(student: Velocity, batch: dict, guidance_scale: float):
    """x̂_t = x_{t'} + (t − t') û(x_{t'}, t'), one Euler step of the student's (guided) velocity
    from the stored points; returns (x̂_t, û, û_cond, û_uncond) (branches None unguided)."""
    x, t, t_next = batch["x_t"], batch["t"], batch["t_next"]
    u_step, u_cond, u_uncond = _guided(student, x, t, batch, guidance_scale)
    x_hat = _wide(x) + _per_sample(_wide(t_next - t), x) * _wide(u_step)
    return x_hat, u_step, u_cond, u_uncond


@torch.no_grad()
def student_samples(student: Velocity, batch: dict, *, guidance_scale: float = 1.0) -> Tensor:
    """The student's samples x̂_t at batch["t_next"] (no gradient): what a trained fake score
    is fitted to (``fake_score_loss``)."""
    _check_guidance_batch(batch, guidance_scale)
    return _student_step(student, batch, guidance_scale)[0]


def diffuse(x_hat: Tensor, t: Tensor, s: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Carry samples of time t forward to the noisier time s >= t of the rectified flow:
    x_s = α x̂_t + β ε with α = (1 − s)/(1 − t) and β² = s² − α² t², so that a sample
    (1 − t) x_0 + t ε' becomes (1 − s) x_0 + s ε''. Returns (x_s, β)."""
    t, s = _wide(t), _wide(s)
    alpha = (1.0 - s) / (1.0 - t).clamp_min(1e-12)
    beta = (s.square() - (alpha * t).square()).clamp_min(0.0).sqrt()
    x_s = _per_sample(alpha, x_hat) * _wide(x_hat) + _per_sample(beta, x_hat) * _wide(noise)
    return x_s, beta


def fake_score_times(t: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """s ~ U(t, 1): the noisier times the trained fake score is queried and trained at."""
    r = torch.rand(t.shape, generator=generator, device=t.device, dtype=_wide(t).dtype)
    return _wide(t) + (1.0 - _wide(t)) * r


def fake_score_loss(fake: Velocity, x_hat: Tensor, t: Tensor, cond: Tensor, *,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """Train a fake score on the student's samples x̂_t (detached) without clean data.

    x̂_t is diffused to s ~ U(t, 1) with fresh noise ε (``diffuse``); the conditional score of
    x_s given x̂_t is −ε/β, so denoising score matching trains the model's score
    −(x_s + (1 − s) u)/s to the marginal score of the diffused student samples. Written as a
    prediction of ε, ε̂ = β (x_s + (1 − s) u) / s, the target has unit variance:
    L = mean((ε̂ − ε)²). At the minimum u is the velocity of the student's marginal at s.
    """
    x_hat = x_hat.detach()
    s = fake_score_times(t.detach(), generator)
    noise = torch.randn(x_hat.shape, generator=generator, device=x_hat.device,
                        dtype=_wide(x_hat).dtype)
    x_s, beta = diffuse(x_hat, t.detach(), s, noise)
    u = _wide(fake(x_s, s, cond))
    eps_hat = _per_sample(beta / s, x_s) * (x_s + _per_sample(1.0 - s, x_s) * u)
    return (eps_hat - noise).square().mean()


def adm_objective(student: Velocity, teacher: Velocity, batch: dict, *,
                  weighting: str = "dmd", t_min: float = 0.05, velocity_weight: float = 0.0,
                  guidance_scale: float = 1.0, fake_score: Optional[Velocity] = None,
                  generator: Optional[torch.Generator] = None,
                  student_no_grad: Velocity | None = None) -> tuple[Tensor, dict]:
    """ADM on stored teacher points: a student Euler step t' -> t, then the push at x̂_t.

    ``batch`` holds x_t (B, ...), t (B,), t_next (B,), cond, velocity (the teacher's at x_t),
    and with guidance negative_cond and velocity_uncond. ``student`` is called once with
    gradient; the fake-score evaluation at x̂_t uses ``student_no_grad`` (the module without
    its DDP wrapper, so that no gradient-sync bookkeeping is started) or ``student``.

    With ``fake_score`` (a trained score model, ``fake_score_loss``) x̂_t is first diffused to
    s ~ U(t, 1) and the push is taken there (∂x_s/∂θ = α ∂x̂_t/∂θ), where the fake score was
    trained; the fake score models the student's (guided) samples, so it takes cond only.

    Returns (loss, info): info has adm_push (mean g², falls as the student nears the teacher
    under "dmd" and "clip"), velocity_error (the student's velocity error at the stored points,
    both branches under guidance) and velocity_gap (teacher − fake velocity where g is taken).
    """
    _check_guidance_batch(batch, guidance_scale)
    t_next, cond = batch["t_next"], batch["cond"]
    x_hat, u_step, u_cond, u_uncond = _student_step(student, batch, guidance_scale)
    t_eval = t_next
    if fake_score is not None:
        t_eval = fake_score_times(t_next, generator)
        noise = torch.randn(x_hat.shape, generator=generator, device=x_hat.device,
                            dtype=x_hat.dtype)
        x_hat, _ = diffuse(x_hat, t_next, t_eval, noise)
    with torch.no_grad():
        x_eval = x_hat.detach()
        u_teacher, _, _ = _guided(teacher, x_eval, t_eval, batch, guidance_scale)
        if fake_score is not None:
            u_fake = fake_score(x_eval, t_eval, cond)
        else:
            u_fake, _, _ = _guided(student_no_grad or student, x_eval, t_eval, batch,
                                   guidance_scale)
    loss = adm_loss(x_hat, u_teacher, u_fake, t_eval, weighting=weighting, t_min=t_min)
    with torch.no_grad():
        gap = (_wide(u_teacher) - _wide(u_fake)).square().mean()
        info = {"velocity_gap": float(gap), "adm_push": float(2.0 * loss.detach())}
    if "velocity" in batch:  # the stored teacher velocity (always there in stored data)
        velocity_error = _velocity_error(u_step, u_cond, u_uncond, batch)
        info["velocity_error"] = float(velocity_error.detach())
        if velocity_weight:
            loss = loss + velocity_weight * velocity_error
    elif velocity_weight:
        raise ValueError("batch: velocity_weight > 0 needs the teacher's velocity "
                         "batch['velocity'] at the stored points")
    return loss, info


def velocity_mse_objective(student: Velocity, batch: dict, *,
                           guidance_scale: float = 1.0) -> tuple[Tensor, dict]:
    """The baseline: mean ‖u_teacher(x_t) − û_θ(x_t, t)‖² on the stored points; with guidance
    each branch against the teacher's branch (averaged), which pins the guided combination."""
    _check_guidance_batch(batch, guidance_scale)
    u, u_cond, u_uncond = _guided(student, batch["x_t"], batch["t"], batch, guidance_scale)
    loss = _velocity_error(u, u_cond, u_uncond, batch)
    value = float(loss.detach())
    return loss, {"velocity_gap": value, "velocity_error": value}
