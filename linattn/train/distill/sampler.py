"""The distilled generator's K-step sampler, and backward simulation (training on its own
inputs).

Conventions are linattn.train.flow's: x_t = (1 − t) x_0 + t ε, velocity u = ε − x_0, t = 1 is
noise, so the clean-sample prediction at x_t is x̂_0 = x_t − t u(x_t, t). The generator's
step k at time t_k predicts x̂_0 from x_{t_k}; the next input is that prediction noised again
to t_{k+1} with fresh noise, x_{t_{k+1}} = (1 − t_{k+1}) x̂_0 + t_{k+1} ε_{k+1}, and the last
step's x̂_0 is the sample (DMD2's multi-step generator; ../docs/distill.md). With the step
rule "implied" (distill.renoise; ``step_rule`` here) the next input takes instead the noise
the step's own input implies, ε̂ = (x_t − (1 − t_k) x̂_0) / t_k:
x_{t_{k+1}} = (1 − t_{k+1}) x̂_0 + t_{k+1} ε̂, a deterministic DDIM step, the same as an
Euler step along the generator's velocity (x_t + (t_{k+1} − t_k) u). A generator that learned
the teacher's flow map (the ODE initialisation, linattn.train.distill.regression) then follows
a trajectory of the teacher's instead of drawing a new one at every step (measured on the toy
teacher: docs/distill.md). The generator runs without classifier-free guidance: one forward per step, guidance having been distilled in
from the real score.

Times: K unshifted times (1, 0.75, 0.5, 0.25 for K = 4) mapped through the pipeline's shift
t -> s t / (1 + (s − 1) t), the map diffusers' flow-matching schedulers apply (s = 3: 1, 0.9,
0.75, 0.5).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..flow import FlowModel
from ..teacher_data import sampling_noise
from .config import RENOISE           # the step rules (module docstring)

StepNoise = Callable[[int], Tensor]   # k -> (B, ...) noise the generator's step k starts from


def shift_times(t, shift: float):
    """s t / (1 + (s − 1) t): the flow-matching shift (a float or a tensor)."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def generator_times(times: Sequence[float], shift: float) -> list[float]:
    """The generator's K times after the shift."""
    return [float(shift_times(float(t), shift)) for t in times]


def clean_prediction(model: FlowModel, x: Tensor, t: float, cond: Tensor) -> Tensor:
    """x̂_0 = x − t u(x, t, cond), in float32."""
    t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
    return x.float() - t * model(x, t_vec, cond)


def renoise(x0: Tensor, t: float, noise: Tensor) -> Tensor:
    """(1 − t) x0 + t ε: a clean prediction carried to time t with fresh noise."""
    return (1.0 - t) * x0 + t * noise.to(x0.dtype)


def implied_noise(x: Tensor, x0: Tensor, t: float) -> Tensor:
    """ε̂ = (x_t − (1 − t) x̂_0) / t: the noise an input x_t at time t > 0 implies, given the
    clean prediction x̂_0 made from it."""
    return (x.float() - (1.0 - t) * x0) / t


def next_input(x: Tensor, x0: Tensor, t: float, t_next: float, rule: str,
               fresh: Callable[[], Tensor]) -> Tensor:
    """The generator's input at t_next after predicting x0 from x at t, by the step rule
    "fresh" or "implied" (``fresh()`` is called only for "fresh", so the implied rule draws
    nothing)."""
    noise = fresh() if rule == "fresh" else implied_noise(x, x0, t)
    return renoise(x0, t_next, noise)


def few_step_sample(model: FlowModel, noise: Tensor, cond: Tensor, times: Sequence[float],
                    step_noise: Optional[StepNoise] = None, *, step_rule: str = "fresh") -> Tensor:
    """The generator's sample (B, ...) float32 from ``noise`` at times[0] (= 1), no gradient.

    ``step_noise(k)`` gives the fresh noise step k >= 1 starts from (default: torch.randn,
    from the global generator); ``step_rule`` is "fresh" or "implied" (module docstring)."""
    with torch.no_grad():
        return backward_simulation(model, model, noise, cond, times, step_noise,
                                   exit_step=len(times) - 1, grad=False, step_rule=step_rule)


def backward_simulation(model_no_grad: FlowModel, model: FlowModel, noise: Tensor, cond: Tensor,
                        times: Sequence[float], step_noise: Optional[StepNoise], exit_step: int,
                        *, grad: bool = True, step_rule: str = "fresh") -> Tensor:
    """x̂_0 of the generator's step ``exit_step``, its input produced by the generator itself
    from ``noise`` over the steps before (DMD2's backward simulation: training sees what
    inference sees).

    The steps before run ``model_no_grad`` without gradient; the exit step runs ``model``
    (the wrapped module, for DDP's gradient synchronisation) with gradient if ``grad``.
    ``step_rule`` is the rule between steps ("fresh" or "implied", module docstring), as at
    inference.
    """
    x = generator_input(model_no_grad, noise, cond, times, step_noise, exit_step,
                        step_rule=step_rule)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return clean_prediction(model, x, float(times[exit_step]), cond)


def generator_input(model: FlowModel, noise: Tensor, cond: Tensor, times: Sequence[float],
                    step_noise: Optional[StepNoise], exit_step: int, *,
                    step_rule: str = "fresh") -> Tensor:
    """The input (B, ...) float32 the generator's step ``exit_step`` receives when it runs
    from ``noise`` at times[0] = 1 (the noise itself for step 0): the steps before run
    ``model`` without gradient and are joined by ``step_rule``, as at inference."""
    if step_rule not in RENOISE:
        raise ValueError(f"step_rule: expected one of {RENOISE}, got {step_rule!r}")
    if not 0 <= exit_step < len(times):
        raise ValueError(f"exit_step: expected 0 <= exit_step < {len(times)}, got {exit_step}")
    if float(times[0]) != 1.0:
        raise ValueError(f"times: the generator starts from pure noise at t = 1, got "
                         f"times[0] = {times[0]}")
    x = noise.float()
    with torch.no_grad():
        for k in range(exit_step):
            x0 = clean_prediction(model, x, float(times[k]), cond)
            draw = ((lambda k=k: step_noise(k + 1)) if step_noise is not None
                    else (lambda: torch.randn_like(x0)))
            x = next_input(x, x0, float(times[k]), float(times[k + 1]), step_rule, draw)
    return x


def sample_step_noise(seed: int, indices: Sequence[int], step: int, shape,
                      device: Optional[torch.device] = None) -> Tensor:
    """Inference noise: (len(indices), *shape) float32. Step 0 is
    linattn.train.teacher_data.sampling_noise(seed, i), the noise linattn.toy's sample i
    starts from (so a distilled and a many-step model compare on the same starting noise), never
    a teacher-data trajectory's; step k >= 1 is drawn from (seed, i, k)."""
    if step == 0:
        rows = [sampling_noise(seed, i, shape) for i in indices]
    else:
        rows = []
        for i in indices:
            state = np.random.SeedSequence([seed, i, step]).generate_state(2, dtype=np.uint32)
            gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
            rows.append(torch.randn(tuple(shape), generator=gen, dtype=torch.float32))
    out = torch.stack(rows)
    return out.to(device) if device is not None else out


def seeded_sample(model: FlowModel, cond: Tensor, times: Sequence[float], *, seed: int,
                  indices: Optional[Sequence[int]] = None, shape,
                  step_rule: str = "fresh") -> Tensor:
    """The generator's samples for conditioning rows ``cond`` (B, L, D), sample i's noise
    from (seed, indices[i]) (default indices 0..B−1) by ``sample_step_noise``."""
    indices = list(range(cond.shape[0])) if indices is None else list(indices)
    if len(indices) != cond.shape[0]:
        raise ValueError(f"indices: expected {cond.shape[0]} (one per conditioning row), got "
                         f"{len(indices)}")
    device = cond.device
    noise = sample_step_noise(seed, indices, 0, shape, device)
    return few_step_sample(model, noise, cond, times,
                           lambda k: sample_step_noise(seed, indices, k, shape, device),
                           step_rule=step_rule)
