"""The softmax branch of the families whose stock processor calls diffusers' dispatcher."""
from __future__ import annotations

from diffusers.models.attention_dispatch import dispatch_attention_fn


def dispatch_softmax(query, key, projection, processor):
    """dispatch_attention_fn on (B, N, H, D) q, k and the projection's v, with the layer's
    attention backend and context-parallel config, exactly as the Wan, HunyuanVideo and LTX
    processors call it."""
    p = projection
    return dispatch_attention_fn(query, key, p.v, attn_mask=p.softmax_mask, dropout_p=0.0,
                                 is_causal=False, backend=processor._attention_backend,
                                 parallel_config=processor._parallel_config)
