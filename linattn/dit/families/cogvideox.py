"""CogVideoX (CogVideoXTransformer3DModel): self-attention is ``transformer_blocks.N.attn1``.

Stock path (CogVideoXAttnProcessor2_0): joint attention over [text; video]; projections, split
heads into (B, H, N, D), per-head LayerNorm of q and k, RoPE on the video tokens only (the
pipeline passes it as image_rotary_emb), F.scaled_dot_product_attention, merge heads, to_out,
split back into (video, text). CogVideoX does not mask its padded text: every token is a key.

The projection hands the op q and k as projected, (B, N, H, D) views of the joint projection,
with the per-head LayerNorms and RoPE from the (S, D) tables on the tokens after the text
(diffusers' apply_rotary_emb: interleaved pairs, one angle per dim).

Context parallelism: diffusers ships no _cp_plan for CogVideoX; ``context_parallel_plan`` is
linattn's. It shards the video and the text tokens over the processes at the first block's
inputs (so each process's joint sequence is [its text; its video], every token a key exactly
once), the RoPE tables with the video tokens, and gathers the video at proj_out. The stock
processor calls SDPA itself, so under context parallelism every self-attention layer must be
converted; the softmax branch of a hybrid layer then runs through diffusers' dispatcher with the
layer's parallel config (Ulysses or ring), which attends over the whole joint sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from ...pre_attention import PreAttention, QKNorm, RoPE
from ..selectors import Projection, Selector
from .dispatch import dispatch_softmax


def _norm(module):
    return None if module is None else QKNorm.from_module(module, over="head")


class CogVideoXSelector(Selector):
    name = "cogvideox"
    stock_processors = ("CogVideoXAttnProcessor2_0",)

    def layers(self, model):
        return [(f"transformer_blocks.{i}.attn1", block.attn1)
                for i, block in enumerate(model.transformer_blocks)]

    def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        if attention_mask is not None:
            raise ValueError("cogvideox: CogVideoXTransformer3DModel passes no attention mask to "
                             "its self-attention; a converted layer does not take one")
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        # The stock processor's views, kept (B, N, H, D): it transposes them to (B, H, N, D).
        query, key, value = (t.view(batch, -1, attn.heads, head_dim) for t in (query, key, value))
        rope = None if rotary_emb is None else RoPE(*rotary_emb, style="interleaved",
                                                    start=text_len)
        pre = PreAttention(_norm(attn.norm_q), _norm(attn.norm_k), rope)
        return Projection(query, key, value, "bnhd", pre=pre,
                          context={"text_len": text_len, "rotary_emb": rotary_emb})

    def attention_qk(self, attn, projection):
        """The stock processor's norms and RoPE (CogVideoXAttnProcessor2_0), bit for bit, in
        its (B, H, N, D) tensors, returned as (B, N, H, D) views."""
        p = projection
        if "attention_qk" not in p.context:
            # Copies where there is no norm: the RoPE below writes in place, and the projection
            # (which the op may have saved for its backward) must keep its values.
            query = p.q.transpose(1, 2) if attn.norm_q is not None else p.q.transpose(1, 2).clone()
            key = p.k.transpose(1, 2) if attn.norm_k is not None else p.k.transpose(1, 2).clone()
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            rotary_emb, text_len = p.context["rotary_emb"], p.context["text_len"]
            if rotary_emb is not None:
                # In place on the video slice, as the stock processor does.
                query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], rotary_emb)
                key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], rotary_emb)
            p.context["attention_qk"] = (query.transpose(1, 2), key.transpose(1, 2))
        return p.context["attention_qk"]

    def softmax(self, attn, projection, processor):
        query, key = self.attention_qk(attn, projection)
        if processor._parallel_config is not None:
            return dispatch_softmax(query, key, projection, processor)
        o = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                           projection.v.transpose(1, 2), attn_mask=None,
                                           dropout_p=0.0, is_causal=False)
        return o.transpose(1, 2)

    def context_parallel_plan(self, model):
        from diffusers.models._modeling_parallel import (ContextParallelInput,
                                                         ContextParallelOutput)

        tokens = ContextParallelInput(split_dim=1, expected_dims=3)
        rope = ContextParallelInput(split_dim=0, expected_dims=2)  # (N_video, D) cos and sin
        return {
            "": {"image_rotary_emb": (rope, rope)},
            "transformer_blocks.0": {"hidden_states": tokens, "encoder_hidden_states": tokens},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        }

    def finish(self, attn, o, projection):
        batch, _, heads, head_dim = o.shape
        hidden_states = o.reshape(batch, -1, heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        text_len = projection.context["text_len"]
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_len, hidden_states.size(1) - text_len], dim=1)
        return hidden_states, encoder_hidden_states
