"""linattn.LinearAttention: the op as an nn.Module that owns its feature maps' parameters."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from . import feature_maps
from .backends import BACKEND_NAMES
from .feature_maps import FeatureMap, Hedgehog
from .ops import linear_attention
from .pre_attention import QKNorm, RoPE
from .ops.validation import LAYOUTS

MapSpec = Union[str, FeatureMap]


class LinearAttention(nn.Module):
    """Non-causal linear attention o_i = φ_q(q_i)ᵀS / (φ_q(q_i)ᵀz + eps) over (B, N, H, D)
    heads (see linattn.linear_attention), with learnable maps held as submodules so that
    ``parameters()``, ``state_dict()`` and ``.to()`` see them.

    Args:
        num_heads, head_dim: the H and D of the inputs.
        feature_map: "hedgehog" (default: two separate Hedgehog maps, one for q and one for k,
            identity-initialised, method.md §2), a parameter-free name ("relu", "elu",
            "softmax", "identity"), a FeatureMap module (used for both q and k, so one
            Hedgehog module passed here ties the two maps), or a pair (map for q, map for k)
            of names or modules; a "hedgehog" name in a pair builds its own map.
        feature_dim: F of the Hedgehog maps built from the name "hedgehog" (default head_dim;
            φ then has 2F features). Only valid with that name.
        eps, layout, backend: passed to linattn.linear_attention on every call.
        device, dtype: where and in which dtype Hedgehog maps built here keep W
            (default: PyTorch's default device, float32).
    """

    def __init__(self, num_heads: int, head_dim: int,
                 feature_map: Union[MapSpec, Sequence[MapSpec]] = "hedgehog",
                 feature_dim: Optional[int] = None, eps: float = 1e-6, layout: str = "bnhd",
                 backend: str = "auto", *, device=None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        for name, size in (("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {size!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
                or eps <= 0:
            raise ValueError(f"eps: expected a finite number > 0, got {eps!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected 'auto' or one of {list(BACKEND_NAMES)}, "
                             f"got {backend!r}")
        self.num_heads, self.head_dim = num_heads, head_dim
        self.eps, self.layout, self.backend = float(eps), layout, backend

        hedgehog_kwargs = dict(feature_dim=feature_dim, device=device,
                               dtype=torch.float32 if dtype is None else dtype)
        if isinstance(feature_map, (tuple, list)):
            if len(feature_map) != 2:
                raise ValueError(f"feature_map: a sequence must be (map for q, map for k), "
                                 f"got {len(feature_map)} entries")
            specs = ((feature_map[0], "feature_map[0] (for q)"),
                     (feature_map[1], "feature_map[1] (for k)"))
        else:
            specs = ((feature_map, "feature_map"), (feature_map, "feature_map"))
        uses_hedgehog_name = any(spec == "hedgehog" for spec, _ in specs)
        if feature_dim is not None and not uses_hedgehog_name:
            raise ValueError(f"feature_dim: only applies to maps built from the name "
                             f"'hedgehog', got feature_dim={feature_dim} with "
                             f"feature_map={feature_map!r}")
        (q_spec, q_arg), (k_spec, k_arg) = specs
        q_map = self._build_map(q_spec, q_arg, hedgehog_kwargs)
        # One module given for both: q and k share it (and its parameters).
        k_map = q_map if k_spec is q_spec and isinstance(q_spec, FeatureMap) \
            else self._build_map(k_spec, k_arg, hedgehog_kwargs)
        for fmap, argument in ((q_map, q_arg), (k_map, k_arg)):
            fmap.check_input(num_heads, head_dim, argument)
        width_q, width_k = q_map.output_dim(head_dim), k_map.output_dim(head_dim)
        if width_q != width_k:
            raise ValueError(f"feature_map: φ(q) and φ(k) must have the same width, got "
                             f"{width_q} and {width_k}")
        self.q_map, self.k_map = q_map, k_map

    def _build_map(self, spec, argument: str, hedgehog_kwargs: dict) -> FeatureMap:
        if spec == "hedgehog":
            return Hedgehog(self.num_heads, self.head_dim, **hedgehog_kwargs)
        return feature_maps.resolve(spec, argument)

    def forward(self, q: Tensor, k: Tensor, v: Tensor,
                key_padding_mask: Optional[Tensor] = None, *, q_norm: Optional[QKNorm] = None,
                k_norm: Optional[QKNorm] = None, rope: Optional[RoPE] = None) -> Tensor:
        """q (B, Nq, H, D), k (B, Nk, H, D), v (B, Nk, H, Dv) ((B, H, N, ·) with
        layout="bhnd"); key_padding_mask (B, Nk) bool, True = keep; q_norm, k_norm, rope: the
        q/k norms and RoPE the kernels apply before φ (linattn.linear_attention). Returns o like
        q with Dv."""
        return linear_attention(q, k, v, feature_map=(self.q_map, self.k_map), eps=self.eps,
                                layout=self.layout, key_padding_mask=key_padding_mask,
                                backend=self.backend, q_norm=q_norm, k_norm=k_norm, rope=rope)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, eps={self.eps}, "
                f"layout={self.layout!r}, backend={self.backend!r}")
