"""The work a DiT layer does on q and k before attention (q/k normalisation and RoPE), as
arguments of linattn.linear_attention that the kernels fuse into their loads of q and k.

spec.py: the public specs (QKNorm, RoPE), their checks and the canonical form backends receive;
reference.py: the readable PyTorch definition, the oracle of the kernels.
"""
from .spec import (NO_PRE_ATTENTION, NormCall, PreAttention, PreAttentionCall, QKNorm, RopeCall,
                   RoPE, resolve)

__all__ = ["QKNorm", "RoPE", "PreAttention", "PreAttentionCall", "NormCall", "RopeCall", "resolve",
           "NO_PRE_ATTENTION"]
