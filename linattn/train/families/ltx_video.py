"""LTX-Video (LTXVideoTransformer3DModel), as LTXPipeline calls it.

The model takes packed latents: (B, C, F, H, W) cut into patch_size_t x patch_size x
patch_size patches, one token each, (B, N, C·p_t·p·p) (LTXPipeline._pack_latents), with the
latent grid (num_frames, height, width) after patching and the RoPE scale
(vae_temporal_compression / frame_rate, vae_spatial_compression, vae_spatial_compression)
(model.call_options: frame_rate 25, vae_temporal_compression 8, vae_spatial_compression 32, the
pipeline's). timestep t · num_train_timesteps; encoder_hidden_states the T5 embeddings with
encoder_attention_mask; the output is the packed velocity, unpacked here.
"""
from __future__ import annotations

from .base import ModelCall


def pack(latents, p: int, p_t: int):
    """(B, C, F, H, W) -> (B, F/p_t · H/p · W/p, C · p_t · p · p), LTXPipeline's order."""
    B, C, F, H, W = latents.shape
    x = latents.reshape(B, C, F // p_t, p_t, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack(tokens, frames: int, height: int, width: int, p: int, p_t: int):
    """The inverse of pack, for a grid of frames x height x width tokens."""
    B = tokens.size(0)
    x = tokens.reshape(B, frames, height, width, -1, p_t, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class LTXVideoCall(ModelCall):
    name = "ltx_video"
    model_classes = ("LTXVideoTransformer3DModel",)
    takes_mask = True
    OPTIONS = {"frame_rate": 25.0, "vae_temporal_compression": 8, "vae_spatial_compression": 32}

    def velocity(self, module, x, t, cond, dtype, num_train_timesteps):
        prompts = self.prompts(cond, dtype)
        config = self.config_of(module)
        p, p_t = config.patch_size, config.patch_size_t
        _, _, F, H, W = x.shape
        if F % p_t or H % p or W % p:
            raise ValueError(f"ltx_video: latent (F, H, W) = {(F, H, W)} must be multiples of "
                             f"the patch ({p_t}, {p}, {p})")
        grid = (F // p_t, H // p, W // p)
        o = self.options
        rope_scale = (o["vae_temporal_compression"] / o["frame_rate"],
                      o["vae_spatial_compression"], o["vae_spatial_compression"])
        out = module(hidden_states=pack(x, p, p_t).to(dtype),
                     encoder_hidden_states=prompts.embeds,
                     timestep=(t * num_train_timesteps).to(dtype),
                     encoder_attention_mask=prompts.mask, num_frames=grid[0], height=grid[1],
                     width=grid[2], rope_interpolation_scale=rope_scale, return_dict=False)
        return unpack(out[0], *grid, p, p_t)
