"""Wan 2.1 / 2.2 (WanTransformer3DModel): self-attention is ``blocks.N.attn1``.

Stock path (WanAttnProcessor): q/k/v projections (fused or not), RMSNorm over all heads, split
heads, RoPE on interleaved pairs, dispatch_attention_fn in (B, N, H, D), merge heads, to_out.
``attn2`` (cross-attention to text, and to the image in I2V) is never listed.

The projection hands the op q and k as projected (views of a fused qkv projection when the layer
has one), with RMSNorm over heads (norm_q, norm_k) and RoPE from Wan's tables: its rotation
uses cos[..., 0::2] and sin[..., 1::2] of the (1, S, 1, D) tables, one angle per pair, passed as
those strided views.
"""
from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttention, _get_qkv_projections

from ...pre_attention import PreAttention, QKNorm, RoPE
from ..selectors import Projection, Selector, key_padding_mask_from
from .dispatch import dispatch_softmax


def _rope_interleaved(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor):
    """Wan's RoPE (a closure inside WanAttnProcessor, so not importable), with the same
    operations in the same order, hence bit-identical results."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSelector(Selector):
    name = "wan"
    stock_processors = ("WanAttnProcessor",)
    stock_processor_is_context_parallel = True  # dispatch_attention_fn

    def layers(self, model):
        return [(name, module) for name, module in model.named_modules()
                if isinstance(module, WanAttention) and not module.is_cross_attention
                and module.add_k_proj is None]

    def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        if encoder_hidden_states is not None:
            raise ValueError("wan: a converted self-attention layer got encoder_hidden_states; "
                             "only self-attention (attn1) can be converted")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        rope = None
        if rotary_emb is not None:
            freqs_cos, freqs_sin = rotary_emb
            rope = RoPE(freqs_cos[..., 0::2], freqs_sin[..., 1::2], style="interleaved")
        pre = PreAttention(QKNorm.from_module(attn.norm_q, over="heads"),
                           QKNorm.from_module(attn.norm_k, over="heads"), rope)
        padding = key_padding_mask_from(attention_mask, key.shape[0], key.shape[1], "wan")
        return Projection(query, key, value, "bnhd", key_padding_mask=padding,
                          softmax_mask=attention_mask, pre=pre,
                          context={"rotary_emb": rotary_emb})

    def token_grid(self, model, args, kwargs):
        """The latent (B, C, F, H, W) over config.patch_size: patch_embedding's Conv3d output
        flattened frame-major, the order of attn1's tokens."""
        latent = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        patch = model.config.patch_size
        return tuple(int(n) // int(p) for n, p in zip(latent.shape[2:], patch))

    def attention_qk(self, attn, projection):
        """The stock processor's norm and RoPE (WanAttnProcessor), bit for bit."""
        p = projection
        if "attention_qk" not in p.context:
            query = attn.norm_q(p.q.flatten(2, 3)).unflatten(2, (attn.heads, -1))
            key = attn.norm_k(p.k.flatten(2, 3)).unflatten(2, (attn.heads, -1))
            if p.context["rotary_emb"] is not None:
                query = _rope_interleaved(query, *p.context["rotary_emb"])
                key = _rope_interleaved(key, *p.context["rotary_emb"])
            p.context["attention_qk"] = (query, key)
        return p.context["attention_qk"]

    def softmax(self, attn, projection, processor):
        query, key = self.attention_qk(attn, projection)
        return dispatch_softmax(query, key, projection, processor)

    def finish(self, attn, o, projection):
        hidden_states = o.flatten(2, 3).to(self.output_dtype(projection, o))
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)
