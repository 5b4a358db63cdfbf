"""Mochi (MochiTransformer3DModel): self-attention is ``transformer_blocks.N.attn1``
(MochiAttention, joint attention over [video; valid text]; it has no set_processor, so the
processor attribute is assigned).

Stock path (MochiAttnProcessor2_0): video and text projections, per-head RMSNorms, RoPE on the
video q and k, heads moved to (B, H, N, D); then, per sample, softmax attention over the video and
that sample's valid text tokens (encoder_attention_mask), zero rows for the padded text; merge
heads, split (video, text), output projections. The linear branch runs the whole batch at once
with the text mask as its key padding mask, so padded text adds nothing to S and z; outputs of
padded text queries never reach a valid token (they are masked as keys in every layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import MochiAttention

from ..selectors import Projection, Selector


def _rope_pairs(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor):
    """Mochi's RoPE (a closure inside MochiAttnProcessor2_0, so not importable), with the same
    operations in the same order, hence bit-identical results."""
    x_even = x[..., 0::2].float()
    x_odd = x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


class MochiSelector(Selector):
    name = "mochi"
    stock_processors = ("MochiAttnProcessor2_0",)

    def layers(self, model):
        return [(name, module) for name, module in model.named_modules()
                if isinstance(module, MochiAttention)]

    def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
        if attention_mask is None:
            raise ValueError("mochi: the self-attention needs the text mask (the model passes "
                             "encoder_attention_mask); got attention_mask=None")
        query, key, value = (f(hidden_states).unflatten(2, (attn.heads, -1))
                             for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_q, text_k, text_v = (f(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                                  for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        if rotary_emb is not None:
            query = _rope_pairs(query, *rotary_emb)
            key = _rope_pairs(key, *rotary_emb)
        video = tuple(t.transpose(1, 2) for t in (query, key, value))
        text = tuple(t.transpose(1, 2) for t in (text_q, text_k, text_v))
        joint = [torch.cat([a, b], dim=2) for a, b in zip(video, text)]
        batch, video_len = hidden_states.shape[:2]
        video_keys = torch.ones(batch, video_len, dtype=torch.bool, device=hidden_states.device)
        padding = torch.cat([video_keys, attention_mask.bool()], dim=1)
        return Projection(*joint, layout="bhnd", key_padding_mask=padding,
                          softmax_mask=attention_mask,
                          context={"video": video, "text": text, "video_len": video_len})

    def softmax(self, attn, projection, processor):
        (query, key, value), (text_q, text_k, text_v) = (projection.context["video"],
                                                         projection.context["text"])
        mask = projection.softmax_mask
        total = query.size(2) + text_q.size(2)
        outputs = []
        for idx in range(query.shape[0]):
            valid = torch.nonzero(mask[idx][None, :].flatten(), as_tuple=False).flatten()
            q = torch.cat([query[idx:idx + 1], text_q[idx:idx + 1, :, valid, :]], dim=2)
            k = torch.cat([key[idx:idx + 1], text_k[idx:idx + 1, :, valid, :]], dim=2)
            v = torch.cat([value[idx:idx + 1], text_v[idx:idx + 1, :, valid, :]], dim=2)
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
            outputs.append(F.pad(o, (0, 0, 0, total - o.size(2))))
        return torch.cat(outputs, dim=0)

    def finish(self, attn, o, projection):
        video_len = projection.context["video_len"]
        hidden_states = o.transpose(1, 2).flatten(2, 3)
        hidden_states, encoder_hidden_states = hidden_states.split_with_sizes(
            (video_len, hidden_states.size(1) - video_len), dim=1)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
