"""The feature-map interface every φ implements.

A feature map turns a query or key head vector x (length D) into non-negative features φ(x)
(length D'). The op needs three facts about a map, which every map declares:

* ``output_dim(head_dim)``: D', the width of φ(x). φ(q) and φ(k) must have the same width.
* ``elementwise``: whether φ acts on each coordinate alone (relu, elu) or mixes a whole head
  vector (softmax, hedgehog). Kernels use it to pick how they apply φ and its derivative.
* ``kernel_params()``: the tensors the map's maths depends on (hedgehog: its projection W).
  They are passed to the kernels as plain tensors, which is what lets the op be a
  ``torch.library`` custom op, and their gradients come back from the kernels' backward.

``kernel_name`` names the map for the fused kernels. A map whose kernel_name is None is not
known to any kernel: the op then applies it in PyTorch (autograd differentiates it) and runs the
kernels with the identity map. That is how a user's own map works on every backend.

``apply(x, params)`` is the readable definition: the float64 reference calls it with float64
copies of x and params, so the same code is the oracle for the fused kernels.
"""
from __future__ import annotations

from typing import ClassVar, Optional, Sequence

import torch
from torch import Tensor, nn


class FeatureMap(nn.Module):
    """Base class of φ. Inputs to ``forward``/``apply`` are laid out (..., H, D)."""

    kernel_name: ClassVar[Optional[str]] = None
    elementwise: ClassVar[bool] = True

    def output_dim(self, head_dim: int) -> int:
        return head_dim

    def kernel_params(self) -> tuple[Tensor, ...]:
        return ()

    def apply(self, x: Tensor, params: Sequence[Tensor]) -> Tensor:  # noqa: A003 - maths name
        raise NotImplementedError(f"{type(self).__name__} must define apply(x, params)")

    def check_input(self, num_heads: int, head_dim: int, argument: str) -> None:
        """Raise ValueError when this map cannot take (H, D) heads; `argument` names the input."""

    def forward(self, x: Tensor) -> Tensor:
        return self.apply(x, self.kernel_params())

    def extra_repr(self) -> str:
        return f"kernel_name={self.kernel_name!r}, elementwise={self.elementwise}"


class ElementwiseMap(FeatureMap):
    """A parameter-free map applied to each coordinate; D' = D."""

    elementwise = True


def map_width(kernel_name: str, params: Sequence[Tensor], head_dim: int) -> int:
    """D' for a kernel-known map, from its name and parameters alone.

    Used where only the custom op's plain arguments are at hand (its fake implementation).
    """
    if kernel_name == "hedgehog":
        return 2 * params[0].shape[-1]
    return head_dim


def as_float64(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.to(torch.float64) for p in params]
