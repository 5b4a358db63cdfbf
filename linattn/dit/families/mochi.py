"""Mochi (MochiTransformer3DModel): self-attention is ``transformer_blocks.N.attn1``
(MochiAttention, joint attention over [video; valid text]; it has no set_processor, so the
processor attribute is assigned).

Stock path (MochiAttnProcessor2_0): video and text projections, per-head RMSNorms, RoPE on the
video q and k, heads moved to (B, H, N, D); then, per sample, softmax attention over the video and
that sample's valid text tokens (encoder_attention_mask), zero rows for the padded text; merge
heads, split (video, text), output projections. The linear branch runs the whole batch at once
with the text mask as its key padding mask, so padded text adds nothing to S and z; outputs of
padded text queries never reach a valid token (they are masked as keys in every layer).

The projection hands the op [video; text] in (B, N, H, D): the video q and k as projected, with
the per-head RMSNorm and RoPE (interleaved pairs from Mochi's per-head (S, H, D/2) tables) on the
video tokens; the text q and k normalised in PyTorch by their own norms (a few hundred tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import MochiAttention

from ...pre_attention import PreAttention, QKNorm, RoPE
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
        text_q, text_k, text_v = (f(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                                  for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        batch, video_len = hidden_states.shape[:2]
        tokens = (0, video_len)
        norms = [None if m is None else QKNorm.from_module(m, over="head", tokens=tokens)
                 for m in (attn.norm_q, attn.norm_k)]
        rope = None if rotary_emb is None else RoPE(*rotary_emb, style="interleaved")
        video_keys = torch.ones(batch, video_len, dtype=torch.bool, device=hidden_states.device)
        padding = torch.cat([video_keys, attention_mask.bool()], dim=1)
        joint = [torch.cat([a, b], dim=1) for a, b in
                 zip((query, key, value), (text_q, text_k, text_v))]
        return Projection(*joint, layout="bnhd", key_padding_mask=padding,
                          softmax_mask=attention_mask, pre=PreAttention(*norms, rope),
                          context={"raw_video": (query, key, value),
                                   "text": (text_q, text_k, text_v), "video_len": video_len,
                                   "rotary_emb": rotary_emb})

    def _stock_video_text(self, attn, projection):
        """The stock processor's (B, H, N, D) video and text q, k, v: norms and RoPE, bit for
        bit."""
        p = projection
        if "stock" not in p.context:
            query, key, value = p.context["raw_video"]
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            if p.context["rotary_emb"] is not None:
                query = _rope_pairs(query, *p.context["rotary_emb"])
                key = _rope_pairs(key, *p.context["rotary_emb"])
            video = tuple(t.transpose(1, 2) for t in (query, key, value))
            text = tuple(t.transpose(1, 2) for t in p.context["text"])
            p.context["stock"] = (video, text)
        return p.context["stock"]

    def attention_qk(self, attn, projection):
        p = projection
        if "attention_qk" not in p.context:
            (query, key, _), (text_q, text_k, _) = self._stock_video_text(attn, p)
            p.context["attention_qk"] = tuple(torch.cat([a, b], dim=2).transpose(1, 2)
                                              for a, b in ((query, text_q), (key, text_k)))
        return p.context["attention_qk"]

    def softmax(self, attn, projection, processor):
        (query, key, value), (text_q, text_k, text_v) = self._stock_video_text(attn, projection)
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
        return torch.cat(outputs, dim=0).transpose(1, 2)

    def finish(self, attn, o, projection):
        video_len = projection.context["video_len"]
        hidden_states = o.flatten(2, 3)
        hidden_states, encoder_hidden_states = hidden_states.split_with_sizes(
            (video_len, hidden_states.size(1) - video_len), dim=1)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
