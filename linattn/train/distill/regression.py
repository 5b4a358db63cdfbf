"""DMD's regression anchor: the generator also regresses onto the teacher's own samples.

Distribution matching alone is mode-seeking (reverse KL): a generator that starts in a mode of
the teacher, or in a region where the real and fake scores agree, may stay there. On the toy
teacher every distilled model fell into blank videos, a fixed point of the teacher's denoiser
(../../../docs/distill.md). DMD (Yin et al. 2024, §3.3) anchors the one-step generator with a
regression loss on pairs (noise z, the teacher's deterministic ODE sample x(z)); this module
carries that to the K-step generator of DMD2's backward simulation:

* step 0 (t = 1) takes the pair's own noise z, and its target is x(z): DMD's regression,
  exactly (the teacher's ODE is deterministic, so the target is a function of the input);
* step k ≥ 1 (t_k < 1), with distill.regression_inputs "renoised" (the default), takes what
  it takes at inference if the steps before had produced the teacher's sample,
  (1 − t_k) x(z) + t_k ε with fresh ε, and its target is x(z): the generator's x̂_0 at that
  input is pulled to the teacher's sample, so no later step can erase what step 0 drew. The
  target is not a function of that input (ε is fresh), so the pull is toward the mean of the
  samples that input could come from: a blurred x̂_0 at large t_k.
* with "trajectory", step k takes the teacher's own trajectory from z at t_k, the point its
  sampler passes through there, and its target is x(z), a function of that input: the
  generator learns the teacher's flow map from each of its K times to the end (the "ODE
  initialisation" of a few-step generator in CausVid, Yin et al. 2025, which Self-Forcing's
  DMD starts from). The stored trajectories are the teacher's discrete sampler: with the
  Euler sampler the path between two stored points is the straight step x_t + (τ − t) u_step, so the point at any τ is exact;
  other samplers' points are exact only at their own times, and a generator time between them
  is refused. Run with distill.dmd_weight 0 and distill.fake_score_updates 0, this is the ODE
  initialisation itself (no fake score, no DMD); with DMD it is an anchor that does not blur.
* with "generated", step k takes what the generator itself hands it at inference: its own
  steps 0..k−1 from z, without gradient and joined by its step rule (distill.renoise), and
  the target is x(z). "trajectory" trains each step on the teacher's states, which the
  generator never sees once its earlier steps err (exposure bias); here every step learns to
  finish from where the generator's own earlier steps left it, so the loss is the K-step
  sample's error against the teacher's (with the "implied" rule a function of z alone, the
  deterministic map the sampler computes). Started from the ODE initialisation, it is the
  regression form of DMD2's backward simulation. Costs up to K − 1 forwards more per sample.

    L_reg = mean ‖G_k(input_k) − x(z)‖²,  L_G = L_DMD + distill.regression_weight · L_reg

The pairs are a teacher-data folder (linattn.train.teacher_data: the first stage's data.dir or
``linattn generate-data``): each trajectory's starting noise, its conditioning row and its final
guided sample (and, for "trajectory" inputs, its stored points). They must be sampled at the
real score's guidance and the generator's latent shape, or the anchor would pull toward another
distribution than DMD's; both are checked.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..data import TeacherDataset
from ..flow import combine_guidance
from ..objectives import _wide
from ..teacher_data import trajectory_noise
from .config import REGRESSION_INPUTS as INPUTS   # distill.regression_inputs (docstring above)
from .sampler import renoise

TIME_TOLERANCE = 1e-6                 # a generator time "is" a stored point's time within this


class RegressionPairs:
    """The (noise, sample, conditioning) pairs of a teacher-data folder, and the generator's
    input for a pair at each of its times (``inputs``: module docstring)."""

    def __init__(self, data_dir: str, *, latent_shape: Sequence[int], guidance_scale: float,
                 inputs: str = "renoised", times: Sequence[float] = (),
                 field: str = "distill.regression_data"):
        if inputs not in INPUTS:
            raise ValueError(f"distill.regression_inputs: expected one of {INPUTS}, got "
                             f"{inputs!r}")
        self.inputs = inputs
        self.dataset = TeacherDataset(data_dir)
        spec = self.dataset.spec
        if tuple(spec.latent_shape) != tuple(latent_shape):
            raise ValueError(f"{field}: {data_dir!r} holds latents of shape "
                             f"{tuple(spec.latent_shape)}, distill.latent_shape is "
                             f"{tuple(latent_shape)}")
        if float(spec.guidance_scale) != float(guidance_scale):
            raise ValueError(f"{field}: {data_dir!r} was sampled with guidance "
                             f"{spec.guidance_scale}, the real score uses "
                             f"distill.guidance_scale {guidance_scale}; the anchor must target "
                             f"the distribution DMD matches")
        sigmas = self.dataset.sigmas
        self.points_per_trajectory = len(sigmas) - 1
        if inputs == "trajectory":
            for t in times:
                if float(t) != 1.0:       # t = 1 takes the pair's noise itself
                    self._segment(float(t))   # refuses a time the stored points cannot give

    def _segment(self, t: float) -> int:
        """The stored point j whose sampler step covers time t (sigmas[j] >= t >= sigmas[j+1]),
        the one at t itself when t is a stored time."""
        sigmas = self.dataset.sigmas.tolist()
        for j in range(len(sigmas) - 1):
            if abs(sigmas[j] - t) <= TIME_TOLERANCE:
                return j
        if self.dataset.spec.sampler != "euler":
            raise ValueError(
                f"distill.regression_inputs: 'trajectory' needs the teacher's points at the "
                f"generator's times, and {self.dataset.data_dir!r} was sampled with "
                f"{self.dataset.spec.sampler!r}, whose path between its stored times is not a "
                f"straight step; time {t:.6g} is not one of them (sample the data with "
                f"'euler', or use 'renoised')")
        for j in range(len(sigmas) - 1):
            if sigmas[j] >= t >= sigmas[j + 1]:
                return j
        raise ValueError(f"distill.regression_inputs: time {t:.6g} lies outside the stored "
                         f"trajectories' times [{sigmas[-1]:.6g}, {sigmas[0]:.6g}]")

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

    def trajectory_points(self, trajectories: Sequence[int], t: float) -> Tensor:
        """The teacher's trajectories at time t: (n, C, F, H, W) float32, the stored point
        carried along its sampler step, x_t + (t − t_j) u_step (exact for Euler; t a stored
        time otherwise)."""
        j = self._segment(float(t))
        rows = [int(i) * self.points_per_trajectory + j for i in trajectories]
        points = self.dataset.batch(rows)
        expected = float(self.dataset.sigmas[j])
        if not torch.all((points["t"] - expected).abs() <= TIME_TOLERANCE):
            raise ValueError(f"distill.regression_data: {self.dataset.data_dir!r} does not hold "
                             f"{self.points_per_trajectory} points per trajectory in sampler "
                             f"order; regenerate it with linattn generate-data")
        t_j = points["t"].view(-1, *([1] * (points["x_t"].dim() - 1)))
        if self.dataset.guided:
            step = combine_guidance(points["velocity"], points["velocity_uncond"],
                                    self.dataset.guidance_scale)
        else:
            step = points["velocity"]
        return points["x_t"] + (float(t) - t_j) * step

    def inputs_at(self, trajectories: Sequence[int], noise: Tensor, sample: Tensor, t: float,
                  fresh: Callable[[], Tensor],
                  generated: Optional[Callable[[], Tensor]] = None) -> Tensor:
        """The generator's input at time t for these pairs (their noise, sample from
        ``batch``): the noise at t = 1, else by ``self.inputs`` (module docstring);
        ``fresh()`` gives the renoised input's noise and is called only for that input,
        ``generated()`` the generator's own input at t from the pairs' noise (linattn.train.
        distill.sampler.generator_input) and is called only for "generated" inputs."""
        if float(t) == 1.0:
            return noise.float()
        if self.inputs == "renoised":
            return regression_input(noise, sample, t, fresh())
        if self.inputs == "generated":
            if generated is None:
                raise ValueError("distill.regression_inputs: 'generated' inputs need the "
                                 "generator's own steps (the generated= callable)")
            return generated().float()
        return self.trajectory_points(trajectories, t).to(noise.device)


def regression_input(noise: Tensor, sample: Tensor, t: float, fresh: Tensor) -> Tensor:
    """The generator's input at time t for a pair: its noise at t = 1, else the teacher's
    sample carried to t with the fresh noise ``fresh`` (module docstring)."""
    if float(t) == 1.0:
        return noise.float()
    return renoise(sample.float(), float(t), fresh)


def regression_loss(prediction: Tensor, sample: Tensor) -> Tensor:
    """mean ‖x̂_0 − x(z)‖² (float32 or wider)."""
    return (_wide(prediction) - _wide(sample)).square().mean()
