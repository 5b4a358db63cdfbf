"""LTX-Video (LTXVideoTransformer3DModel): self-attention is ``transformer_blocks.N.attn1``
(LTXAttention has no is_cross_attention flag, so the layers are named; attn2 is cross-attention).

Stock path (LTXVideoAttnProcessor): projections, RMSNorm across heads, RoPE applied before the
heads are split, dispatch_attention_fn in (B, N, H, D), merge heads, to_out.

The projection hands the op q and k as projected, with the RMSNorm over heads and RoPE from the
(B, S, H·D) tables viewed as (B, S, H, D) (one angle per dim; pairs never straddle heads since D
is even).
"""
from __future__ import annotations

import inspect

from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from ...pre_attention import PreAttention, QKNorm, RoPE
from ..selectors import Projection, Selector
from .dispatch import dispatch_softmax


class LTXVideoSelector(Selector):
    name = "ltx_video"
    stock_processors = ("LTXVideoAttnProcessor",)
    stock_processor_is_context_parallel = True  # dispatch_attention_fn

    def layers(self, model):
        return [(f"transformer_blocks.{i}.attn1", block.attn1)
                for i, block in enumerate(model.transformer_blocks)]

    def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        if attention_mask is not None or encoder_hidden_states is not None:
            raise ValueError("ltx_video: LTXVideoTransformer3DModel calls its self-attention "
                             "without a mask or encoder states; a converted layer takes neither")
        query, key, value = (f(hidden_states).unflatten(2, (attn.heads, -1))
                             for f in (attn.to_q, attn.to_k, attn.to_v))
        rope = None
        if rotary_emb is not None:
            cos, sin = (t.unflatten(-1, (attn.heads, -1)) for t in rotary_emb)
            rope = RoPE(cos, sin, style="interleaved")
        pre = PreAttention(QKNorm.from_module(attn.norm_q, over="heads"),
                           QKNorm.from_module(attn.norm_k, over="heads"), rope)
        return Projection(query, key, value, "bnhd", pre=pre, context={"rotary_emb": rotary_emb})

    def token_grid(self, model, args, kwargs):
        """(num_frames, height, width) of the call: the grid LTX's RoPE lays the tokens out on,
        frame-major (LTXVideoRotaryPosEmbed). Explicit video_coords may place tokens elsewhere,
        so a call that passes them is refused."""
        bound = inspect.signature(type(model).forward).bind(model, *args, **kwargs).arguments
        if bound.get("video_coords") is not None:
            raise ValueError("local_mixing: this LTX-Video call passes video_coords, so its "
                             "tokens need not lie on the num_frames × height × width grid the "
                             "convolution assumes")
        grid = tuple(bound.get(name) for name in ("num_frames", "height", "width"))
        if any(n is None for n in grid):
            raise ValueError("local_mixing: an LTX-Video call without num_frames, height and "
                             "width gives no token grid")
        return tuple(int(n) for n in grid)

    def attention_qk(self, attn, projection):
        """The stock processor's norm and RoPE (LTXVideoAttnProcessor), bit for bit."""
        p = projection
        if "attention_qk" not in p.context:
            query = attn.norm_q(p.q.flatten(2, 3))
            key = attn.norm_k(p.k.flatten(2, 3))
            if p.context["rotary_emb"] is not None:
                query = apply_rotary_emb(query, p.context["rotary_emb"])
                key = apply_rotary_emb(key, p.context["rotary_emb"])
            p.context["attention_qk"] = tuple(t.unflatten(2, (attn.heads, -1))
                                              for t in (query, key))
        return p.context["attention_qk"]

    def softmax(self, attn, projection, processor):
        query, key = self.attention_qk(attn, projection)
        return dispatch_softmax(query, key, projection, processor)

    def finish(self, attn, o, projection):
        hidden_states = o.flatten(2, 3).to(self.output_dtype(projection, o))
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
