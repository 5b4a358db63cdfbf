"""Feature maps φ (method.md §2) and the interface a new map implements (base.py)."""
from __future__ import annotations

from typing import Union

from .base import ElementwiseMap, FeatureMap, map_width
from .builtin import BUILTIN_MAPS, ELU, Identity, ReLU, Softmax
from .hedgehog import Hedgehog

FeatureMapSpec = Union[str, FeatureMap]


def resolve(spec: FeatureMapSpec, argument: str = "feature_map") -> FeatureMap:
    """A FeatureMap instance from a name ("relu", "elu", "softmax", "identity") or a module."""
    if isinstance(spec, FeatureMap):
        return spec
    if isinstance(spec, str):
        try:
            return BUILTIN_MAPS[spec]()
        except KeyError:
            raise ValueError(f"{argument}: unknown feature map {spec!r}; expected one of "
                             f"{sorted(BUILTIN_MAPS)} or a linattn.feature_maps.FeatureMap "
                             f"(e.g. Hedgehog(num_heads, head_dim))") from None
    raise TypeError(f"{argument}: expected a feature-map name or a FeatureMap module, "
                    f"got {type(spec).__name__}")


__all__ = ["FeatureMap", "ElementwiseMap", "ReLU", "ELU", "Softmax", "Identity", "Hedgehog",
           "BUILTIN_MAPS", "resolve", "map_width", "FeatureMapSpec"]
