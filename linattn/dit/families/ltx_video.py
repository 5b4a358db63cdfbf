"""LTX-Video (LTXVideoTransformer3DModel): self-attention is ``transformer_blocks.N.attn1``
(LTXAttention has no is_cross_attention flag, so the layers are named; attn2 is cross-attention).

Stock path (LTXVideoAttnProcessor): projections, RMSNorm across heads, RoPE applied before the
heads are split, dispatch_attention_fn in (B, N, H, D), merge heads, to_out.
"""
from __future__ import annotations

from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from ..selectors import Projection, Selector
from .dispatch import dispatch_softmax


class LTXVideoSelector(Selector):
    name = "ltx_video"
    stock_processors = ("LTXVideoAttnProcessor",)

    def layers(self, model):
        return [(f"transformer_blocks.{i}.attn1", block.attn1)
                for i, block in enumerate(model.transformer_blocks)]

    def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        if attention_mask is not None or encoder_hidden_states is not None:
            raise ValueError("ltx_video: LTXVideoTransformer3DModel calls its self-attention "
                             "without a mask or encoder states; a converted layer takes neither")
        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if rotary_emb is not None:
            query = apply_rotary_emb(query, rotary_emb)
            key = apply_rotary_emb(key, rotary_emb)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        return Projection(query, key, value, "bnhd")

    def softmax(self, attn, projection, processor):
        return dispatch_softmax(projection, processor)

    def finish(self, attn, o, projection):
        hidden_states = o.flatten(2, 3).to(projection.q.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
