"""HunyuanVideo (HunyuanVideoTransformer3DModel): self-attention is ``transformer_blocks.N.attn``
(dual stream: video and text have their own projections) and ``single_transformer_blocks.N.attn``
(single stream over [video; text]). The text-only attention of ``context_embedder.token_refiner``
is never listed.

Stock path (HunyuanVideoAttnProcessor2_0): projections, split heads (B, N, H, D), q/k RMSNorm,
RoPE on the video tokens, text projections and norms appended after the video, joint
dispatch_attention_fn with the model's boolean mask (B, 1, 1, N) hiding padded text keys, merge
heads, split into (video, text), output projections. The linear branch takes the same mask as its
key padding mask, so padded text adds nothing to S and z.

The projection hands the op the video q and k as projected, with the per-head RMSNorm and RoPE
(interleaved pairs, one angle per dim) on the video tokens [0, N_video). Single-stream blocks
normalise the text with the same norm (all tokens); dual-stream blocks normalise their text with
its own norms (norm_added_q, norm_added_k) in PyTorch, a few hundred tokens, and the op
normalises only the video range.
"""
from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ...pre_attention import PreAttention, QKNorm, RoPE
from ..selectors import Projection, Selector, key_padding_mask_from
from .dispatch import dispatch_softmax


class HunyuanVideoSelector(Selector):
    name = "hunyuan_video"
    stock_processors = ("HunyuanVideoAttnProcessor2_0",)
    stock_processor_is_context_parallel = True  # dispatch_attention_fn

    def layers(self, model):
        return ([(f"transformer_blocks.{i}.attn", block.attn)
                 for i, block in enumerate(model.transformer_blocks)]
                + [(f"single_transformer_blocks.{i}.attn", block.attn)
                   for i, block in enumerate(model.single_transformer_blocks)])

    def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = (f(hidden_states).unflatten(2, (attn.heads, -1))
                             for f in (attn.to_q, attn.to_k, attn.to_v))
        text_len = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        video_len = query.shape[1] - (text_len if single_stream else 0)
        context = {"text_len": text_len, "single_stream": single_stream,
                   "rotary_emb": rotary_emb, "video": (query, key)}
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            context["text"] = (encoder_query, encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)
        # Single stream: one norm for every token; dual stream: the op normalises the video.
        tokens = None if single_stream or text_len is None else (0, video_len)
        norms = [None if m is None else QKNorm.from_module(m, over="head", tokens=tokens)
                 for m in (attn.norm_q, attn.norm_k)]
        rope = None if rotary_emb is None else RoPE(*rotary_emb, style="interleaved")
        padding = key_padding_mask_from(attention_mask, key.shape[0], key.shape[1], "hunyuan_video")
        return Projection(query, key, value, "bnhd", key_padding_mask=padding,
                          softmax_mask=attention_mask, pre=PreAttention(*norms, rope),
                          context=context)

    def attention_qk(self, attn, projection):
        """The stock processor's norms and RoPE (HunyuanVideoAttnProcessor2_0), bit for bit."""
        p = projection
        if "attention_qk" not in p.context:
            query, key = p.context["video"]
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            rotary_emb, text_len = p.context["rotary_emb"], p.context["text_len"]
            if rotary_emb is not None:
                if p.context["single_stream"]:
                    query = torch.cat([apply_rotary_emb(query[:, :-text_len], rotary_emb,
                                                        sequence_dim=1), query[:, -text_len:]],
                                      dim=1)
                    key = torch.cat([apply_rotary_emb(key[:, :-text_len], rotary_emb,
                                                      sequence_dim=1), key[:, -text_len:]], dim=1)
                else:
                    query = apply_rotary_emb(query, rotary_emb, sequence_dim=1)
                    key = apply_rotary_emb(key, rotary_emb, sequence_dim=1)
            if "text" in p.context:
                encoder_query, encoder_key = p.context["text"]
                query = torch.cat([query, encoder_query], dim=1)
                key = torch.cat([key, encoder_key], dim=1)
            p.context["attention_qk"] = (query, key)
        return p.context["attention_qk"]

    def softmax(self, attn, projection, processor):
        query, key = self.attention_qk(attn, projection)
        return dispatch_softmax(query, key, projection, processor)

    def finish(self, attn, o, projection):
        hidden_states = o.flatten(2, 3).to(self.output_dtype(projection, o))
        text_len = projection.context["text_len"]
        encoder_hidden_states = None
        if text_len is not None:
            hidden_states, encoder_hidden_states = (hidden_states[:, :-text_len],
                                                    hidden_states[:, -text_len:])
            if getattr(attn, "to_out", None) is not None:
                hidden_states = attn.to_out[0](hidden_states)
                hidden_states = attn.to_out[1](hidden_states)
            if getattr(attn, "to_add_out", None) is not None:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
