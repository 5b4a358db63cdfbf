"""Mochi (MochiTransformer3DModel), as MochiPipeline calls it.

Mochi runs its flow backwards: its scheduler inverts the sigmas (invert_sigmas=True), so the
model gets timestep (1 − t) · num_train_timesteps and predicts x_0 − ε, the negative of the
velocity (the pipeline steps x + (σ − σ_next) · prediction). hidden_states (B, C, F, H, W);
encoder_hidden_states the T5 embeddings (B, L, 4096) with encoder_attention_mask (B, L).
"""
from __future__ import annotations

from .base import ModelCall


class MochiCall(ModelCall):
    name = "mochi"
    model_classes = ("MochiTransformer3DModel",)
    takes_mask = True

    def velocity(self, module, x, t, cond, dtype, num_train_timesteps):
        prompts = self.prompts(cond, dtype)
        out = module(hidden_states=x.to(dtype),
                     timestep=((1.0 - t) * num_train_timesteps).to(dtype),
                     encoder_hidden_states=prompts.embeds,
                     encoder_attention_mask=prompts.mask.bool(), return_dict=False)
        return -out[0]
