"""Fused Hedgehog linear attention on Triton (method.md §2), one module per job:

* launch: the entry points the "triton" backend calls (checks, scratch, launches)
* forward_kernels / backward_kernels: the state, output and gradient kernels
* helpers: device functions they share (the fused feature map, its gradient, state loads)
* plan: block sizes, split counts and size limits
* resources: ahead-of-time compilation report (shared memory, registers, spills) for sm_90
"""
from .launch import (hedgehog_backward, hedgehog_forward, hedgehog_key_grads, hedgehog_output,
                     hedgehog_query_grads, hedgehog_state, hedgehog_unsupported)

__all__ = ["hedgehog_forward", "hedgehog_backward", "hedgehog_unsupported", "hedgehog_state",
           "hedgehog_output", "hedgehog_query_grads", "hedgehog_key_grads"]
