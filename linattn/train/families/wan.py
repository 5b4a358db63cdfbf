"""Wan 2.1 / 2.2 (WanTransformer3DModel): the trainer's conventions are Wan's own.

hidden_states (B, C, F, H, W); timestep t · num_train_timesteps (what WanPipeline passes: the
scheduler's timesteps); encoder_hidden_states the UMT5 embeddings (B, L, 4096), padding already
zeroed, no mask; the output is the velocity u = ε − x_0.
"""
from __future__ import annotations

from .base import ModelCall, Prompts


class WanCall(ModelCall):
    name = "wan"
    model_classes = ("WanTransformer3DModel",)

    def velocity(self, module, x, t, cond, dtype, num_train_timesteps):
        embeds = cond.embeds if isinstance(cond, Prompts) else cond
        out = module(hidden_states=x.to(dtype), timestep=t * num_train_timesteps,
                     encoder_hidden_states=embeds.to(dtype), return_dict=False)
        return out[0]
