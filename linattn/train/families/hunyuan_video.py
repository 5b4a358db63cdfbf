"""HunyuanVideo (HunyuanVideoTransformer3DModel), as HunyuanVideoPipeline calls it.

hidden_states (B, C, F, H, W); timestep t · num_train_timesteps; encoder_hidden_states the
LLaMA embeddings (B, L, 4096) with encoder_attention_mask (B, L); pooled_projections the CLIP
pooled embeddings (B, 768); guidance: HunyuanVideo is guidance-distilled, the pipeline's
guidance_scale enters the model as ``guidance = scale · 1000`` (model.call_options.guidance,
default 6.0, the pipeline's default) when the model has guidance_embeds. True classifier-free
guidance with a negative prompt is data.guidance_scale as for every family (1 = off, the
pipeline's default). The output is the velocity.
"""
from __future__ import annotations

import torch

from .base import ModelCall


class HunyuanVideoCall(ModelCall):
    name = "hunyuan_video"
    model_classes = ("HunyuanVideoTransformer3DModel",)
    takes_mask = True
    pooled_dim_key = "pooled_projection_dim"
    OPTIONS = {"guidance": 6.0}

    def velocity(self, module, x, t, cond, dtype, num_train_timesteps):
        prompts = self.prompts(cond, dtype)
        guidance = None
        if self.config_of(module).guidance_embeds:
            guidance = torch.full_like(t, float(self.options["guidance"]) * 1000.0).to(dtype)
        out = module(hidden_states=x.to(dtype), timestep=(t * num_train_timesteps).to(dtype),
                     encoder_hidden_states=prompts.embeds, encoder_attention_mask=prompts.mask,
                     pooled_projections=prompts.pooled, guidance=guidance, return_dict=False)
        return out[0]
