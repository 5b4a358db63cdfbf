"""Rectified-flow conventions shared by data generation, training and evaluation.

The convention is method.md §4's, which is also diffusers' FlowMatchEulerDiscreteScheduler's:
x_t = (1 − t) x_0 + t ε with t = 1 pure noise, the network predicts the velocity u = ε − x_0,
and one Euler step from t to t' is x_{t'} = x_t + (t' − t) u.

Timestep scaling: diffusers' flow transformers (Wan, HunyuanVideo, ...) were trained with the
timestep t · num_train_timesteps (num_train_timesteps = 1000), which is what
FlowMatchEulerDiscreteScheduler.timesteps holds and WanPipeline passes as ``timestep``. Here t
is always the continuous sigma in [0, 1]; FlowModel alone multiplies it by
num_train_timesteps, right where the transformer is called.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn


def flow_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> Tensor:
    """The teacher sampler's t grid: (num_steps + 1,) float32, from 1 down to a final 0.

    Taken from diffusers' FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(), so the
    teacher samples with exactly the schedule its pipeline uses (Wan: shift 3.0 at 480p, 5.0
    at 720p).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps,
                                                shift=shift)
    scheduler.set_timesteps(num_steps, device="cpu")
    return scheduler.sigmas.to(torch.float32).clone()


class FlowModel:
    """A diffusers flow transformer as a velocity function u(x, t, cond).

    ``module`` is called as module(hidden_states=x, timestep=t * num_train_timesteps,
    encoder_hidden_states=cond, return_dict=False)[0] (it may be a DDP or FSDP wrapper).
    x and cond are cast to ``input_dtype`` (the teacher's dtype when it is kept in bf16;
    float32 for a student under autocast); the velocity comes back in float32 so that
    losses and Euler steps are computed in float32.
    """

    def __init__(self, module: nn.Module, num_train_timesteps: int = 1000,
                 input_dtype: Optional[torch.dtype] = None):
        self.module = module
        self.num_train_timesteps = num_train_timesteps
        self.input_dtype = input_dtype if input_dtype is not None else _param_dtype(module)

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t: expected shape ({x.shape[0]},) (one time per sample), got "
                             f"{tuple(t.shape)}")
        timestep = t.to(torch.float32) * self.num_train_timesteps
        out = self.module(hidden_states=x.to(self.input_dtype), timestep=timestep,
                          encoder_hidden_states=cond.to(self.input_dtype), return_dict=False)
        return out[0].float()


def _param_dtype(module: nn.Module) -> torch.dtype:
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


class TrajectoryPoint(NamedTuple):
    x_t: Tensor        # (B, ...) float32 state at time t
    t: float
    t_next: float
    velocity: Tensor   # (B, ...) float32 conditional velocity u(x_t, t, cond)


def guided_velocity(model: FlowModel, x: Tensor, t: Tensor, cond: Tensor,
                    negative_cond: Optional[Tensor],
                    guidance_scale: float) -> tuple[Tensor, Tensor]:
    """(velocity the sampler steps with, conditional velocity).

    With guidance_scale == 1 both are u(x, t, cond). Otherwise classifier-free guidance:
    u_uncond + s · (u_cond − u_uncond), conditional and unconditional halves in one forward.
    """
    if guidance_scale == 1.0:
        u = model(x, t, cond)
        return u, u
    if negative_cond is None:
        raise ValueError("negative_cond: guidance_scale > 1 needs negative conditioning")
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, negative_cond]))
    u_cond, u_uncond = both.chunk(2)
    return u_uncond + guidance_scale * (u_cond - u_uncond), u_cond


@torch.no_grad()
def euler_sample(model: FlowModel, noise: Tensor, cond: Tensor, sigmas: Tensor, *,
                 negative_cond: Optional[Tensor] = None, guidance_scale: float = 1.0,
                 on_point: Optional[Callable[[TrajectoryPoint], None]] = None) -> Tensor:
    """Run the teacher's Euler sampler from ``noise`` at sigmas[0]; return the sample at
    sigmas[-1] (float32).

    ``on_point`` sees every trajectory point (x_t, t, t_next, conditional velocity) before the
    step is taken; data generation stores them. The state is float32 whatever the model's dtype.
    """
    x = noise.to(torch.float32)
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        step_u, cond_u = guided_velocity(model, x, t_vec, cond, negative_cond, guidance_scale)
        if on_point is not None:
            on_point(TrajectoryPoint(x, t, t_next, cond_u))
        x = x + (t_next - t) * step_u
    return x
