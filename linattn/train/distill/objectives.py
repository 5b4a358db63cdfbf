"""DMD2's two losses in rectified-flow notation (../docs/distill.md).

Generator (distribution matching). For a generator sample x (with gradient), a time t and
noise ε, x_t = (1 − t) x + t ε; the real score (the frozen teacher, with classifier-free
guidance) and the fake score (trained on the generator's samples) predict clean samples
x̂_0 = x_t − t u(x_t, t), and

    g = (x̂_0^fake − x̂_0^real) / mean_per_sample |x − x̂_0^real|
    L_G = 0.5 · mean((x − stopgrad(x − g))²),  so  ∇_x L_G = g / numel.

Why this descends the reverse KL(q_t ‖ p_t) between the generator's and the data's diffused
marginals: with the rectified-flow score s(x_t) = −(x_t − (1 − t) x̂_0(x_t)) / t²,
s_fake − s_real = (1 − t) (x̂_0^fake − x̂_0^real) / t², a positive multiple of the numerator of
g, and ∂x_t/∂x = (1 − t) > 0. The normaliser (DMD's) is the real score's error in recovering
the generator's own sample, which does not vanish as the generator converges (the clean sample
is never recoverable exactly from x_t at t > 0), so the push shrinks with the score difference;
the logged ``dmd_push`` = mean g² falls as the fake and real predictions agree.

Fake score (two time-scale rule): the ordinary flow-matching loss on the generator's samples,
detached, L_φ = mean ‖u_φ(x_t, t) − (ε − x)‖², so u_φ follows the velocity of the generator's
current distribution. It models the generator's (guidance-free) samples, so it takes the
conditioning only.

Times: t = U(t_min, t_max) mapped through the shift and clamped to [t_min, t_max] (the Wan
recipes: U(0.02, 0.98), shift as the pipeline).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..flow import combine_guidance
from ..objectives import _per_sample, _sample_mean, _wide, push_loss
from .sampler import shift_times

Velocity = Callable[[Tensor, Tensor, Tensor], Tensor]


def score_times(uniform: Tensor, *, t_min: float = 0.02, t_max: float = 0.98,
                shift: float = 1.0) -> Tensor:
    """Times from uniform draws in [0, 1): U(t_min, t_max), shifted, clamped to the range."""
    t = t_min + (t_max - t_min) * _wide(uniform)
    return shift_times(t, shift).clamp(t_min, t_max)


def noised(x: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t = (1 − t) x + t ε for per-sample times t (B,)."""
    t = _per_sample(_wide(t), x)
    return (1.0 - t) * _wide(x) + t * _wide(noise)


@torch.no_grad()
def dmd_push(x: Tensor, x_t: Tensor, t: Tensor, u_real: Tensor, u_fake: Tensor, *,
             eps: float = 1e-8) -> Tensor:
    """g = (x̂_0^fake − x̂_0^real) / mean_per_sample |x − x̂_0^real| (module docstring).

    Args:
        x: (B, ...) the generator's samples (clean predictions) the push applies to.
        x_t: (B, ...) those samples noised to t.
        t: (B,) the times, in (0, 1).
        u_real: (B, ...) the real score's (guided) velocity at x_t.
        u_fake: (B, ...) the fake score's velocity at x_t.
    """
    if not x.shape == x_t.shape == u_real.shape == u_fake.shape:
        raise ValueError(f"x, x_t, u_real, u_fake: shapes must match, got {tuple(x.shape)}, "
                         f"{tuple(x_t.shape)}, {tuple(u_real.shape)}, {tuple(u_fake.shape)}")
    if t.shape != x.shape[:1]:
        raise ValueError(f"t: expected shape ({x.shape[0]},), got {tuple(t.shape)}")
    tt = _per_sample(_wide(t), x)
    x0_real = _wide(x_t) - tt * _wide(u_real)
    x0_fake = _wide(x_t) - tt * _wide(u_fake)
    normaliser = _sample_mean((_wide(x) - x0_real).abs())
    g = (x0_fake - x0_real) / _per_sample(normaliser + eps, x)
    return torch.nan_to_num(g)


def dmd_generator_loss(x: Tensor, real: Velocity, fake: Velocity, cond: Tensor, *,
                       t: Tensor, noise: Tensor, negative_cond: Optional[Tensor] = None,
                       guidance_scale: float = 1.0) -> tuple[Tensor, dict]:
    """The generator's distribution-matching loss at its samples ``x`` (with gradient).

    ``real`` and ``fake`` are velocity functions u(x, t, cond) (linattn.train.flow.FlowModel);
    both are evaluated without gradient. The real score is guided,
    u_uncond + guidance_scale (u_cond − u_uncond), both branches in one forward; the fake score
    is conditional. Returns (loss, info) with dmd_push (mean g²), dmd_grad_abs (mean |g|) and
    score_gap (mean (u_real − u_fake)²).
    """
    with torch.no_grad():
        x_t = noised(x.detach(), t, noise)
        t_model = _wide(t).float()
        if guidance_scale == 1.0:
            u_real = real(x_t, t_model, cond)
        else:
            if negative_cond is None:
                raise ValueError("negative_cond: guidance_scale > 1 needs the unconditional "
                                 "branch's conditioning")
            both = real(torch.cat([x_t, x_t]), torch.cat([t_model, t_model]),
                        torch.cat([cond, negative_cond.expand_as(cond)]))
            u_cond, u_uncond = both.chunk(2)
            u_real = combine_guidance(u_cond, u_uncond, guidance_scale)
        u_fake = fake(x_t, t_model, cond)
        g = dmd_push(x.detach(), x_t, t, u_real, u_fake)
        info = {"dmd_push": float(g.square().mean()), "dmd_grad_abs": float(g.abs().mean()),
                "score_gap": float((_wide(u_real) - _wide(u_fake)).square().mean())}
    return push_loss(x, g), info


def flow_matching_loss(model: Velocity, x: Tensor, cond: Tensor, *, t: Tensor,
                       noise: Tensor) -> Tensor:
    """mean ‖u(x_t, t) − (ε − x)‖² on samples x (detached): the fake score's loss."""
    x = x.detach()
    x_t = noised(x, t, noise)
    return flow_matching_error(model(x_t, _wide(t).float(), cond), x, noise)


def flow_matching_error(u: Tensor, x: Tensor, noise: Tensor) -> Tensor:
    """mean ‖u − (ε − x)‖² for a velocity u predicted at x noised with ε."""
    return (_wide(u) - (_wide(noise) - _wide(x.detach()))).square().mean()
