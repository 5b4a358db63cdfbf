"""Rectified-flow conventions shared by data generation, training and evaluation.

The convention is method.md §4's, which is also diffusers' flow-matching schedulers':
x_t = (1 − t) x_0 + t ε with t = 1 pure noise, the network predicts the velocity u = ε − x_0,
and one Euler step from t to t' is x_{t'} = x_t + (t' − t) u.

Timestep scaling: diffusers' flow transformers (Wan, HunyuanVideo, ...) were trained with the
timestep t · num_train_timesteps (num_train_timesteps = 1000), which is what the schedulers'
``timesteps`` hold and the pipelines pass as ``timestep``. Here t is always the continuous sigma
in [0, 1]; FlowModel alone multiplies it by num_train_timesteps, right where the transformer is
called.

The teacher's sampler (``data.sampler``), the one its trajectories are stored from and the
evaluation samples with:

* "euler": diffusers' FlowMatchEulerDiscreteScheduler (first-order Euler on its shifted sigma
  grid), the scheduler of HunyuanVideo's, LTX's and Mochi's pipelines. The student's ADM step is
  an Euler step on the same grid.
* "unipc": UniPCMultistepScheduler configured as WanPipeline's own scheduler (Wan 2.1's
  scheduler_config.json: flow_prediction, flow sigmas with flow_shift = data.shift, order 2,
  bh2, final sigma 0), stepped by diffusers' own code, and the transformer queried at the
  scheduler's integer timesteps exactly as WanPipeline does. Its grid is UniPC's
  (linspace(1, 1/1000) shifted), not the Euler scheduler's.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .families import (Conditioning, cat_conditioning, expand_conditioning,
                       model_call_for)

SAMPLERS = ("euler", "unipc")


def make_scheduler(sampler: str, num_steps: int, shift: float,
                   num_train_timesteps: int = 1000):
    """The diffusers scheduler of ``sampler`` (module docstring), with its timesteps set."""
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    if sampler == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps,
                                                    shift=shift)
    elif sampler == "unipc":
        from diffusers import UniPCMultistepScheduler

        # WanPipeline's scheduler (Wan-AI/Wan2.1-T2V-*-Diffusers scheduler_config.json).
        scheduler = UniPCMultistepScheduler(
            num_train_timesteps=num_train_timesteps, prediction_type="flow_prediction",
            use_flow_sigmas=True, flow_shift=shift, solver_order=2, solver_type="bh2",
            predict_x0=True, lower_order_final=True, final_sigmas_type="zero")
    else:
        raise ValueError(f"sampler: expected one of {list(SAMPLERS)}, got {sampler!r}")
    scheduler.set_timesteps(num_steps, device="cpu")
    return scheduler


def flow_sigmas(num_steps: int, shift: float, num_train_timesteps: int = 1000,
                sampler: str = "euler") -> Tensor:
    """The sampler's t grid: (num_steps + 1,) float32, from (about) 1 down to a final 0, as the
    diffusers scheduler of ``sampler`` computes it (Wan: shift 3.0 at 480p, 5.0 at 720p)."""
    scheduler = make_scheduler(sampler, num_steps, shift, num_train_timesteps)
    return scheduler.sigmas.to(torch.float32).clone()


class FlowModel:
    """A diffusers video transformer as a velocity function u(x, t, cond).

    ``call`` (linattn.train.families) is the family's forward call in this module's convention:
    Wan's is module(hidden_states=x, timestep=t * num_train_timesteps,
    encoder_hidden_states=cond, return_dict=False)[0]; the others reorder or pack the latents,
    map t to their timestep, pass their conditioning inputs (text mask, pooled embeddings,
    embedded guidance) and turn their output into u. Default: the call of ``module``'s class
    (``module`` may be a DDP or FSDP wrapper). x and cond are cast to ``input_dtype`` (the
    teacher's dtype when it is kept in bf16; float32 for a student under autocast); the
    velocity comes back in float32 so that losses and Euler steps are computed in float32.
    cond: (B, L, D) embeddings or a families.Prompts batch.
    """

    def __init__(self, module: nn.Module, num_train_timesteps: int = 1000,
                 input_dtype: Optional[torch.dtype] = None, call=None):
        self.module = module
        self.num_train_timesteps = num_train_timesteps
        self.input_dtype = input_dtype if input_dtype is not None else _param_dtype(module)
        self.call = call if call is not None else model_call_for(module)

    def __call__(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        if t.ndim != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t: expected shape ({x.shape[0]},) (one time per sample), got "
                             f"{tuple(t.shape)}")
        u = self.call.velocity(self.module, x, t.to(torch.float32), cond, self.input_dtype,
                               self.num_train_timesteps)
        return u.float()


def _param_dtype(module: nn.Module) -> torch.dtype:
    """The dtype most of the parameters have: a bf16 Wan keeps some modules (its time embedder,
    norms, scale_shift_table, registered first) in float32, and its input layer is bf16."""
    counts: dict[torch.dtype, int] = {}
    for p in module.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


class TrajectoryPoint(NamedTuple):
    x_t: Tensor        # (B, ...) float32 state at time t
    t: float
    t_next: float
    velocity: Tensor   # (B, ...) float32 conditional velocity u(x_t, t, cond)
    velocity_uncond: Optional[Tensor] = None  # (B, ...) unconditional velocity (guidance only)


def branch_velocities(model, x: Tensor, t: Tensor, cond: Conditioning,
                      negative_cond: Conditioning) -> tuple[Tensor, Tensor]:
    """(conditional, unconditional) velocity, both branches in one forward of 2B samples."""
    if negative_cond is None:
        raise ValueError("negative_cond: guidance_scale > 1 needs negative conditioning")
    negative_cond = expand_conditioning(negative_cond, x.shape[0])
    both = model(torch.cat([x, x]), torch.cat([t, t]), cat_conditioning(cond, negative_cond))
    u_cond, u_uncond = both.chunk(2)
    return u_cond, u_uncond


def combine_guidance(u_cond: Tensor, u_uncond: Tensor, guidance_scale: float) -> Tensor:
    """Classifier-free guidance: u_uncond + s · (u_cond − u_uncond)."""
    return u_uncond + guidance_scale * (u_cond - u_uncond)


def guided_velocity(model: FlowModel, x: Tensor, t: Tensor, cond: Conditioning,
                    negative_cond: Optional[Conditioning],
                    guidance_scale: float) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """(velocity the sampler steps with, conditional velocity, unconditional velocity).

    With guidance_scale == 1 the first two are u(x, t, cond) and the third is None. Otherwise
    classifier-free guidance, conditional and unconditional halves in one forward.
    """
    if guidance_scale == 1.0:
        u = model(x, t, cond)
        return u, u, None
    u_cond, u_uncond = branch_velocities(model, x, t, cond, negative_cond)
    return combine_guidance(u_cond, u_uncond, guidance_scale), u_cond, u_uncond


@torch.no_grad()
def euler_sample(model: FlowModel, noise: Tensor, cond: Conditioning, sigmas: Tensor, *,
                 negative_cond: Optional[Conditioning] = None,
                 guidance_scale: float = 1.0,
                 on_point: Optional[Callable[[TrajectoryPoint], None]] = None) -> Tensor:
    """Run the Euler sampler from ``noise`` at sigmas[0]; return the sample at sigmas[-1]
    (float32).

    ``on_point`` sees every trajectory point (x_t, t, t_next, conditional and, with guidance,
    unconditional velocity) before the step is taken; data generation stores them. The state
    is float32 whatever the model's dtype.
    """
    x = noise.to(torch.float32)
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=torch.float32)
        step_u, cond_u, uncond_u = guided_velocity(model, x, t_vec, cond, negative_cond,
                                                   guidance_scale)
        if on_point is not None:
            on_point(TrajectoryPoint(x, t, t_next, cond_u, uncond_u))
        x = x + (t_next - t) * step_u
    return x


@torch.no_grad()
def scheduler_sample(model: FlowModel, noise: Tensor, cond: Conditioning, scheduler, *,
                     negative_cond: Optional[Conditioning] = None,
                     guidance_scale: float = 1.0,
                     on_point: Optional[Callable[[TrajectoryPoint], None]] = None) -> Tensor:
    """Sample as a diffusers pipeline does: the model is queried at scheduler.timesteps[i]
    (divided by the model's num_train_timesteps, so FlowModel passes exactly that timestep)
    and scheduler.step() advances the state. Points are reported with t = sigmas[i], the
    state's noise level. The scheduler must be freshly set (it keeps multistep history)."""
    x = noise.to(torch.float32)
    sigmas = scheduler.sigmas
    for i, timestep in enumerate(scheduler.timesteps):
        t_vec = torch.full((x.shape[0],), float(timestep) / model.num_train_timesteps,
                           device=x.device, dtype=torch.float32)
        step_u, cond_u, uncond_u = guided_velocity(model, x, t_vec, cond, negative_cond,
                                                   guidance_scale)
        if on_point is not None:
            on_point(TrajectoryPoint(x, float(sigmas[i]), float(sigmas[i + 1]), cond_u,
                                     uncond_u))
        x = scheduler.step(step_u, timestep, x, return_dict=False)[0].to(torch.float32)
    return x


def teacher_sample(model: FlowModel, noise: Tensor, cond: Conditioning, *, sampler: str,
                   num_steps: int, shift: float, negative_cond: Optional[Conditioning] = None,
                   guidance_scale: float = 1.0,
                   on_point: Optional[Callable[[TrajectoryPoint], None]] = None) -> Tensor:
    """Sample with ``sampler`` ("euler" or "unipc", module docstring) over ``num_steps``."""
    scheduler = make_scheduler(sampler, num_steps, shift, model.num_train_timesteps)
    if sampler == "euler":
        return euler_sample(model, noise, cond, scheduler.sigmas.to(torch.float32),
                            negative_cond=negative_cond, guidance_scale=guidance_scale,
                            on_point=on_point)
    return scheduler_sample(model, noise, cond, scheduler, negative_cond=negative_cond,
                            guidance_scale=guidance_scale, on_point=on_point)
