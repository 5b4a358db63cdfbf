"""linattn.distributed: the op with its sequence sharded over a process group (context
parallelism).

Non-causal linear attention parallelises over the sequence with one all-reduce of its state:

    S = Σ_j φ(k_j) v_jᵀ and z = Σ_j φ(k_j) are sums over the keys, so each process sums its own
    keys, one fp32 all-reduce adds the partial (S, z) of every process, and each process computes
    the outputs of its own queries. The backward is the same shape: each process sums
    dS = Σ_i φ(q_i) dnum_iᵀ and dz over its own queries, one all-reduce adds them, and each
    process computes dk, dv of its own keys.

The bytes exchanged per call are B·H·D'·(Dv + 1) state elements (4 bytes each) in each
direction, whatever the sequence length; softmax context parallelism (ring, Ulysses) moves the
keys and values themselves. ``state_bytes`` computes the figure.

    from linattn.distributed import linear_attention
    o_local = linear_attention(q_local, k_local, v_local, group=group, feature_map="relu")

q/k norms and RoPE are fused as in the single-process op; ``token_offset`` says whether their
positions are this process's own or the whole sequence's (shard_pre.py).

Modules: op (the public function: checks, backend choice), autograd (the kernels' phases with
the all-reduces between them), reference (the float64 path, differentiated by autograd through
an all-reduce), collectives (the all-reduce with its autograd rule), shard_pre (each process's
side of the norms and RoPE).
"""
from .op import linear_attention, state_bytes

__all__ = ["linear_attention", "state_bytes"]
