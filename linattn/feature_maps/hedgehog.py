"""LinVideo's learnable map (LoLCATs' Hedgehog): φ(x) = softmax(x W) ⊕ softmax(−x W).

Per head h, W_h is (head_dim × feature_dim); each half is normalised over its own
feature_dim features, so φ has 2·feature_dim features. method.md §2 [choice]: separate maps for
q and k, W initialised to the identity (φ starts as [softmax(x), softmax(−x)]).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .base import FeatureMap


class Hedgehog(FeatureMap):
    kernel_name = "hedgehog"
    elementwise = False

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None,
                 init: str = "identity", dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        feature_dim = head_dim if feature_dim is None else feature_dim
        if num_heads < 1 or head_dim < 1 or feature_dim < 1:
            raise ValueError(f"Hedgehog: num_heads, head_dim and feature_dim must be >= 1, got "
                             f"{num_heads}, {head_dim}, {feature_dim}")
        self.num_heads, self.head_dim, self.feature_dim = num_heads, head_dim, feature_dim
        weight = torch.empty(num_heads, head_dim, feature_dim, dtype=dtype, device=device)
        if init == "identity":
            # Identity on the first min(D, F) features; extra features start at zero logits.
            weight.zero_()
            eye = torch.eye(head_dim, feature_dim, dtype=dtype, device=device)
            weight.copy_(eye.expand(num_heads, head_dim, feature_dim))
        elif init == "random":
            nn.init.normal_(weight, std=head_dim ** -0.5)
        else:
            raise ValueError(f"Hedgehog: init must be 'identity' or 'random', got {init!r}")
        self.weight = nn.Parameter(weight)

    def output_dim(self, head_dim: int) -> int:
        return 2 * self.feature_dim

    def kernel_params(self) -> tuple[Tensor, ...]:
        return (self.weight,)

    def check_input(self, num_heads: int, head_dim: int, argument: str) -> None:
        if (num_heads, head_dim) != (self.num_heads, self.head_dim):
            raise ValueError(
                f"{argument}: Hedgehog map was built for {self.num_heads} heads of dim "
                f"{self.head_dim}, but the input has {num_heads} heads of dim {head_dim}")

    def apply(self, x: Tensor, params: Sequence[Tensor]) -> Tensor:
        (weight,) = params
        logits = torch.einsum("...hd,hdf->...hf", x, weight.to(x.dtype))
        return torch.cat([torch.softmax(logits, dim=-1), torch.softmax(-logits, dim=-1)], dim=-1)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"
