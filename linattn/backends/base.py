"""What a kernel backend implements, and how the op calls it.

The op layer (linattn/ops/execute.py) validates inputs, allocates every output and calls a
backend's ``forward`` / ``backward``, which only fill those outputs. All tensors are views in
(B, N, H, D) index order with arbitrary strides (a (B, H, N, D) input arrives as a permuted
view, not a copy): a backend reads strides, it never calls ``.contiguous()`` on q, k, v or do.

Shapes and dtypes a backend receives:
  q (B, Nq, H, D), k (B, Nk, H, D), v (B, Nk, H, Dv), do (B, Nq, H, Dv): one dtype, one device.
  key_mask: None or (B, Nk) bool, True = keep. Masked keys add nothing to S, z; their dk, dv are 0.
  q_map, k_map: MapCall(name, params). name is a kernel name of linattn.feature_maps ("relu",
    "elu", "softmax", "identity", "hedgehog"); params are the map's tensors (hedgehog: W of shape
    (H, D, F), float32 or the input dtype). D' = feature width (hedgehog: 2F, else D).
  eps: float > 0.
  Outputs, preallocated by the op: o like (B, Nq, H, Dv) in q's dtype; state S (B, H, D', Dv) and
    normaliser z (B, H, D') in the state dtype (float32, float64 for float64 inputs); dq, dk, dv
    like q, k, v; d_q_params / d_k_params like each param (float32 for float32 params).
  backward receives the S and z its forward wrote.
  pre: None, or a PreCall: the q/k norms and RoPE (linattn.pre_attention.PreAttentionCall,
    canonical: norm weight and bias (H, D) views, RoPE tables (B | 1, Nr, H | 1, W) views) that
    φ must see applied, RoPE(norm(x)), and, for a norm over all heads, the (B, N, 2) statistics tensor of
    that side, in the state dtype: the forward writes every element (mean and rstd of each
    normalised token), the backward reads it. Only backends with supports_pre_attention get one.
  d_pre: the backward's (d q weight, d q bias, d k weight, d k bias), (H, D) like the norm
    parameters, None where the parameter is absent.

A backend must write every element of its outputs: the tests fill them with NaN beforehand.

The phases. forward is two passes and backward two (kernels.md): the state pass (S, z from the
keys), the output pass (o from the queries and S, z), the query pass of the backward (dq, and dS,
dz and the q map's parameter gradient summed over the queries) and the key pass (dk, dv and the k
map's parameter gradient from dS, dz). Context parallelism (linattn/distributed) runs them one by
one with an all-reduce of S, z (and dS, dz) between, each process on its own tokens, so a backend
also exposes each pass on its own: ``forward_state``, ``forward_output``, ``backward_queries``
and ``backward_keys``. They run the same kernels as forward and backward; forward and backward
stay single calls so that one process pays for no hand-over between the passes. In the phases,
S, z, dS and dz are contiguous tensors in the state dtype that the caller allocates (it packs
them into one buffer for one all-reduce), and Nq of the query phases may differ from Nk of the
key phases (each process holds its own number of tokens). A backend with supports_pre_attention
takes a PreCall in the phases too, and each phase applies its own side of it: forward_state and
backward_keys k's norm and the RoPE, forward_output and backward_queries q's. A forward phase
writes its side's statistics (q_stats or k_stats, for a norm over all heads), the backward
phase of that side reads them, and a backward phase's d_pre is its side's (d weight, d bias),
summed over its own tokens.

The centre. A backend may centre the state in its backward (the Triton kernels do:
kernels/triton/backward.py): the query pass then writes a vector m (B, H, Dv), a function of the
forward's S and z only, into ``centre`` and sums dz' = dz + dS m instead of dz; the key pass
takes dS, dz' and m back and uses dS v + dz = dS (v − m) + dz'. A backend that does not centre
writes m = 0 (then dz' = dz). dz' is linear in the per-token terms like dS, so a caller may sum
dS and dz' over processes as it would dS and dz, provided every process passes the same m: it
does when S and z are the same everywhere (all-reduced), as m depends on nothing else.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..pre_attention import PreAttentionCall


class MapCall(NamedTuple):
    name: str
    params: tuple[Tensor, ...]


class PreCall(NamedTuple):
    """The pre-attention work of one call (see the module docstring)."""
    spec: "PreAttentionCall"
    q_stats: Optional[Tensor]
    k_stats: Optional[Tensor]


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # why not, or what it runs on


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run these inputs; the message says why."""


class KernelBackend(abc.ABC):
    name: str = ""
    #: Feature maps whose φ the kernels fuse.
    supported_maps: frozenset = frozenset()
    supported_dtypes: frozenset = frozenset()
    #: Whether forward/backward take a PreCall (q/k norms and RoPE fused into the loads).
    supports_pre_attention: bool = False

    @abc.abstractmethod
    def availability(self) -> Availability:
        """Whether this backend can run at all here (built, importable, a device present)."""
        raise NotImplementedError

    @abc.abstractmethod
    def check_device(self, device: torch.device) -> Optional[str]:
        """None when the backend runs tensors on `device`; else the reason it cannot."""
        raise NotImplementedError

    def unsupported(self, dtype: torch.dtype, head_dim: int, value_dim: int, feature_dim: int,
                    map_names: Sequence[str], pre_attention: bool = False) -> Optional[str]:
        """None when the kernels take these inputs; else the reason (dtype, dims, map, whether
        q/k norms and RoPE must be fused)."""
        if pre_attention and not self.supports_pre_attention:
            return ("q_norm / k_norm / rope are not fused by this backend's kernels "
                    "(the cpu and triton backends fuse them)")
        if dtype not in self.supported_dtypes:
            names = sorted(str(d).replace("torch.", "") for d in self.supported_dtypes)
            return f"dtype {str(dtype).replace('torch.', '')} is not supported (supported: {names})"
        for name in map_names:
            if name not in self.supported_maps:
                return (f"feature map {name!r} has no fused kernel in this backend "
                        f"(fused: {sorted(self.supported_maps)})")
        return None

    @abc.abstractmethod
    def forward(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                q_map: MapCall, k_map: MapCall, eps: float,
                o: Tensor, state: Tensor, normaliser: Tensor,
                pre: Optional[PreCall] = None) -> None:
        raise NotImplementedError

    @abc.abstractmethod
    def backward(self, do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                 q_map: MapCall, k_map: MapCall, eps: float, state: Tensor, normaliser: Tensor,
                 dq: Tensor, dk: Tensor, dv: Tensor,
                 d_q_params: Sequence[Tensor], d_k_params: Sequence[Tensor],
                 pre: Optional[PreCall] = None,
                 d_pre: Sequence[Optional[Tensor]] = (None, None, None, None)) -> None:
        raise NotImplementedError

    # The phases (module docstring).

    @abc.abstractmethod
    def forward_state(self, k: Tensor, v: Tensor, key_mask: Optional[Tensor], k_map: MapCall,
                      state: Tensor, normaliser: Tensor, pre: Optional[PreCall] = None) -> None:
        """state <- Σ_j φ(k_j) v_jᵀ and normaliser <- Σ_j φ(k_j) over the kept keys (φ of
        RoPE(k_norm(k)) with pre; pre.k_stats written)."""
        raise NotImplementedError

    @abc.abstractmethod
    def forward_output(self, q: Tensor, q_map: MapCall, eps: float, state: Tensor,
                       normaliser: Tensor, o: Tensor, pre: Optional[PreCall] = None) -> None:
        """o <- φ(q)ᵀ S / (φ(q)ᵀ z + eps) for the given S (state) and z (normaliser) (φ of
        RoPE(q_norm(q)) with pre; pre.q_stats written)."""
        raise NotImplementedError

    @abc.abstractmethod
    def backward_queries(self, do: Tensor, q: Tensor, q_map: MapCall, eps: float,
                         state: Tensor, normaliser: Tensor, dq: Tensor, d_state: Tensor,
                         d_normaliser: Tensor, centre: Tensor,
                         d_q_params: Sequence[Tensor], pre: Optional[PreCall] = None,
                         d_pre: Sequence[Optional[Tensor]] = (None, None)) -> None:
        """dq; centre <- m (B, H, Dv) (module docstring; 0 where the backend does not centre);
        d_state <- Σ_i φ(q_i) (do_i / den_i)ᵀ and d_normaliser <- Σ_i φ(q_i) dden_i + dS m
        over these queries; the q map's parameter gradients over these queries; with pre, the
        q norm's (weight, bias) gradients over these queries into d_pre."""
        raise NotImplementedError

    @abc.abstractmethod
    def backward_keys(self, k: Tensor, v: Tensor, key_mask: Optional[Tensor], k_map: MapCall,
                      d_state: Tensor, d_normaliser: Tensor, centre: Tensor, dk: Tensor,
                      dv: Tensor, d_k_params: Sequence[Tensor], pre: Optional[PreCall] = None,
                      d_pre: Sequence[Optional[Tensor]] = (None, None)) -> None:
        """dk, dv (0 for masked keys) and the k map's parameter gradients over these keys,
        from the given dS (d_state), dz' (d_normaliser) and m (centre) of backward_queries;
        with pre, the k norm's (weight, bias) gradients over these keys into d_pre."""
        raise NotImplementedError
