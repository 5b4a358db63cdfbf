"""CogVideoX (CogVideoXTransformer3DModel): a v-prediction DDPM model, run as a flow.

CogVideoX was trained as a diffusion model with a discrete schedule ᾱ_τ (τ = 0 ... 999;
CogVideoXDDIMScheduler: scaled-linear betas, zero terminal SNR, an SNR shift) and predicts
v = √ᾱ ε − √(1 − ᾱ) x_0 from x_τ = √ᾱ x_0 + √(1 − ᾱ) ε. The flow state x_t = (1 − t) x_0 + t ε
is the same point scaled: with s = √((1 − t)² + t²), x_τ = x_t / s at √ᾱ = (1 − t) / s, and the
timestep τ is where the schedule reaches that ᾱ (interpolated: the time embedding takes any real
τ). From the model's v, x̂_0 = √ᾱ x_τ − √(1 − ᾱ) v and ε̂ = √(1 − ᾱ) x_τ + √ᾱ v, so the
velocity is u = ε̂ − x̂_0. A deterministic DDIM step is an Euler step of this flow, which is why
linattn's Euler sampler samples CogVideoX like its pipeline's DDIM (up to the time grid).

The schedule: the pipeline folder's scheduler config when model.pretrained is a CogVideoX
pipeline, else CogVideoX-2B's (snr_shift_scale 3.0; CogVideoX-5B's is 1.0: set
model.call_options.snr_shift_scale). Inputs: hidden_states (B, F, C, H, W) (frames before
channels, unlike the trainer's (B, C, F, H, W)); encoder_hidden_states the T5 embeddings
(B, 226, 4096), no mask; image_rotary_emb computed here as CogVideoXPipeline does, when the model
uses RoPE. Text-to-video only (the image-to-video models' ofs input is not passed).
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

from .base import ModelCall, Prompts

# CogVideoX-2B's scheduler (THUDM/CogVideoX-2b, scheduler/scheduler_config.json).
_SCHEDULER_2B = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     num_train_timesteps=1000, prediction_type="v_prediction",
                     rescale_betas_zero_snr=True, set_alpha_to_one=True, snr_shift_scale=3.0,
                     timestep_spacing="trailing", clip_sample=False)


@functools.lru_cache(maxsize=8)
def _alphas_cumprod(pretrained: Optional[str], snr_shift_scale: Optional[float]) -> torch.Tensor:
    """ᾱ_τ, τ = 0 ... T − 1 (float64), of the pipeline's scheduler or CogVideoX-2B's."""
    from diffusers import CogVideoXDDIMScheduler

    config = dict(_SCHEDULER_2B)
    if pretrained is not None:
        try:
            config = dict(CogVideoXDDIMScheduler.load_config(pretrained, subfolder="scheduler"))
        except (OSError, ValueError) as error:
            warnings.warn(f"cogvideox: no scheduler config under {pretrained!r} ({error}); "
                          f"training uses CogVideoX-2B's schedule (snr_shift_scale "
                          f"{config['snr_shift_scale']}; set model.call_options.snr_shift_scale "
                          f"for another)", RuntimeWarning, stacklevel=2)
    if snr_shift_scale is not None:
        config["snr_shift_scale"] = snr_shift_scale
    scheduler = CogVideoXDDIMScheduler.from_config(config)
    return scheduler.alphas_cumprod.to(torch.float64)


def rotary_embedding(config, frames: int, height: int, width: int, device: torch.device):
    """CogVideoXPipeline._prepare_rotary_positional_embeddings for a latent grid of
    frames x height x width (the pipeline's pixel sizes divided by the VAE's factor)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p, p_t = config.patch_size, config.patch_size_t
    grid_h, grid_w = height // p, width // p
    base_w, base_h = config.sample_width // p, config.sample_height // p
    if p_t is None:
        crops = get_resize_crop_region_for_grid((grid_h, grid_w), base_w, base_h)
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops,
                                       grid_size=(grid_h, grid_w), temporal_size=frames,
                                       device=device)
    return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None,
                                   grid_size=(grid_h, grid_w),
                                   temporal_size=(frames + p_t - 1) // p_t, grid_type="slice",
                                   max_size=(base_h, base_w), device=device)


class CogVideoXCall(ModelCall):
    name = "cogvideox"
    model_classes = ("CogVideoXTransformer3DModel",)
    OPTIONS = {"snr_shift_scale": None}

    def schedule(self) -> torch.Tensor:
        return _alphas_cumprod(self.pretrained, self.options["snr_shift_scale"])

    def timestep(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """τ where the schedule's ᾱ equals alpha_bar (linear interpolation; ᾱ decreases in τ,
        values past either end clamp to τ = 0 or T − 1)."""
        table = self.schedule().to(alpha_bar.device)
        taus = torch.arange(len(table), dtype=torch.float64, device=alpha_bar.device)
        a = alpha_bar.to(torch.float64).clamp(float(table[-1]), float(table[0]))
        upper = torch.searchsorted(-table, -a).clamp(1, len(table) - 1)  # first ᾱ_τ <= a
        lo, hi = table[upper - 1], table[upper]
        frac = torch.where(lo > hi, (lo - a) / (lo - hi), torch.zeros_like(a))
        return taus[upper - 1] + frac

    def velocity(self, module, x, t, cond, dtype, num_train_timesteps):
        config = self.config_of(module)
        if getattr(config, "ofs_embed_dim", None):
            raise ValueError("cogvideox: image-to-video models (ofs_embed_dim) are not supported "
                             "for training; text-to-video CogVideoX only")
        embeds = (cond.embeds if isinstance(cond, Prompts) else cond).to(dtype)
        t = t.to(torch.float32)
        scale = torch.sqrt((1 - t) ** 2 + t ** 2)
        root_a, root_1ma = (1 - t) / scale, t / scale         # √ᾱ, √(1 − ᾱ)
        shape = (-1, 1, 1, 1, 1)
        x_tau = x.to(torch.float32) / scale.view(shape)
        rope = None
        if config.use_rotary_positional_embeddings:
            _, _, frames, height, width = x.shape
            rope = rotary_embedding(config, frames, height, width, x.device)
        v = module(hidden_states=x_tau.permute(0, 2, 1, 3, 4).to(dtype),
                   encoder_hidden_states=embeds,
                   timestep=self.timestep(root_a ** 2).to(torch.float32),
                   image_rotary_emb=rope, return_dict=False)[0]
        v = v.permute(0, 2, 1, 3, 4).to(torch.float32)
        a, b = root_a.view(shape), root_1ma.view(shape)
        x0 = a * x_tau - b * v
        eps = b * x_tau + a * v
        return eps - x0
