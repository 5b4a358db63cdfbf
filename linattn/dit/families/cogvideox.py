"""CogVideoX (CogVideoXTransformer3DModel): self-attention is ``transformer_blocks.N.attn1``.

Stock path (CogVideoXAttnProcessor2_0): joint attention over [text; video]; projections, split
heads into (B, H, N, D), per-head LayerNorm of q and k, RoPE on the video tokens only (the
pipeline passes it as image_rotary_emb), F.scaled_dot_product_attention, merge heads, to_out,
split back into (video, text). CogVideoX does not mask its padded text: every token is a key.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb

from ..selectors import Projection, Selector


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
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                             for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if rotary_emb is not None:
            # In place on the video slice, as the stock processor does.
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], rotary_emb)
            key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], rotary_emb)
        return Projection(query, key, value, "bhnd", context={"text_len": text_len})

    def softmax(self, attn, projection, processor):
        p = projection
        return F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=None, dropout_p=0.0,
                                              is_causal=False)

    def finish(self, attn, o, projection):
        batch, heads, _, head_dim = o.shape
        hidden_states = o.transpose(1, 2).reshape(batch, -1, heads * head_dim)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        text_len = projection.context["text_len"]
        encoder_hidden_states, hidden_states = hidden_states.split(
            [text_len, hidden_states.size(1) - text_len], dim=1)
        return hidden_states, encoder_hidden_states
