"""DMD's regression anchor: the generator also regresses onto the teacher's own samples.

Distribution matching alone is mode-seeking (reverse KL): a generator that starts in a mode of
the teacher, or in a region where the real and fake scores agree, may stay there. On the toy
teacher every distilled model fell into blank videos, a fixed point of the teacher's denoiser
(../../../docs/distill.md). DMD (Yin et al. 2024, §3.3) anchors the one-step generator with a
regression loss on pairs (noise z, the teacher's deterministic ODE sample x(z)); this module
carries that to the K-step generator of DMD2's backward simulation:

* step 0 (t = 1) takes the pair's own noise z, and its target is x(z): DMD's regression,
  exactly (the teacher's ODE is deterministic, so the target is a function of the input);
* step k ≥ 1 (t_k < 1) takes what it takes at inference if the steps before had produced the
  teacher's sample, (1 − t_k) x(z) + t_k ε with fresh ε, and its target is x(z): the
  generator's x̂_0 at that input is pulled to the teacher's sample, so no later step can erase
  what step 0 drew.

    L_reg = mean ‖G_k(input_k) − x(z)‖²,  L_G = L_DMD + distill.regression_weight · L_reg

The pairs are a teacher-data folder (linattn.train.teacher_data: the first stage's data.dir or
``linattn generate-data``): each trajectory's starting noise, its conditioning row and its final
guided sample. They must be sampled at the real score's guidance and the generator's latent
shape, or the anchor would pull toward another distribution than DMD's; both are checked.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..data import TeacherDataset
from ..objectives import _wide
from ..teacher_data import trajectory_noise
from .sampler import renoise


class RegressionPairs:
    """The (noise, sample, conditioning) pairs of a teacher-data folder."""

    def __init__(self, data_dir: str, *, latent_shape: Sequence[int], guidance_scale: float):
        self.dataset = TeacherDataset(data_dir)
        spec = self.dataset.spec
        if tuple(spec.latent_shape) != tuple(latent_shape):
            raise ValueError(f"distill.regression_data: {data_dir!r} holds latents of shape "
                             f"{tuple(spec.latent_shape)}, distill.latent_shape is "
                             f"{tuple(latent_shape)}")
        if float(spec.guidance_scale) != float(guidance_scale):
            raise ValueError(f"distill.regression_data: {data_dir!r} was sampled with guidance "
                             f"{spec.guidance_scale}, the real score uses "
                             f"distill.guidance_scale {guidance_scale}; the anchor must target "
                             f"the distribution DMD matches")

    def __len__(self) -> int:
        return self.dataset.spec.num_trajectories

    def batch(self, trajectories: Sequence[int], device: torch.device):
        """(noise, sample, cond) of the given trajectories: noise and sample (n, C, F, H, W)
        float32, cond the trajectories' conditioning rows, all on ``device``."""
        spec = self.dataset.spec
        noise = torch.stack([trajectory_noise(spec.seed, int(i), spec.latent_shape)
                             for i in trajectories])
        sample = self.dataset.samples([int(i) for i in trajectories])
        cond = self.dataset.conditioning([int(i) for i in trajectories])
        return noise.to(device), sample.to(device), cond.to(device)


def regression_input(noise: Tensor, sample: Tensor, t: float, fresh: Tensor) -> Tensor:
    """The generator's input at time t for a pair: its noise at t = 1, else the teacher's
    sample carried to t with the fresh noise ``fresh`` (module docstring)."""
    if float(t) == 1.0:
        return noise.float()
    return renoise(sample.float(), float(t), fresh)


def regression_loss(prediction: Tensor, sample: Tensor) -> Tensor:
    """mean ‖x̂_0 − x(z)‖² (float32 or wider)."""
    return (_wide(prediction) - _wide(sample)).square().mean()
