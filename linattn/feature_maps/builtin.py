"""The parameter-free feature maps of method.md §2: relu, elu (+1), softmax, identity."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .base import ElementwiseMap, FeatureMap


class ReLU(ElementwiseMap):
    """φ(x) = max(x, 0): SANA's map and LinVideo's ablation baseline."""

    kernel_name = "relu"

    def apply(self, x: Tensor, params: Sequence[Tensor]) -> Tensor:
        return torch.relu(x)


class ELU(ElementwiseMap):
    """φ(x) = elu(x) + 1, strictly positive, of the classic linear transformers."""

    kernel_name = "elu"

    def apply(self, x: Tensor, params: Sequence[Tensor]) -> Tensor:
        return torch.nn.functional.elu(x) + 1.0


class Identity(ElementwiseMap):
    """φ(x) = x: for callers who applied their own map. Non-positive features can make the
    denominator φ(q)ᵀz + eps vanish or change sign; that is the caller's responsibility."""

    kernel_name = "identity"

    def apply(self, x: Tensor, params: Sequence[Tensor]) -> Tensor:
        return x


class Softmax(FeatureMap):
    """φ(x) = softmax(x) over the head dim (SLA's default): positive and sums to one."""

    kernel_name = "softmax"
    elementwise = False

    def apply(self, x: Tensor, params: Sequence[Tensor]) -> Tensor:
        return torch.softmax(x, dim=-1)


BUILTIN_MAPS = {cls.kernel_name: cls for cls in (ReLU, ELU, Softmax, Identity)}
