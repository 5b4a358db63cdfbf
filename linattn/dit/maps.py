"""Per-layer feature maps for converted layers, and their description in saved checkpoints.

convert(feature_map=...) accepts:
  * "hedgehog" (default): separate q and k Hedgehog maps per layer, identity-initialised,
    D' = D (method.md §2 [choice]);
  * "relu", "elu", "softmax", "identity": parameter-free maps;
  * a FeatureMap module used as a template: each layer gets its own deep copies for q and k;
  * a factory ``f(num_heads, head_dim) -> FeatureMap``, called once for q and once for k.

A map is recorded as a small dict (``spec``) so that load_converted can rebuild it: built-in maps
and Hedgehog by name and width; any other map by its class path, rebuilt with the factory or
template the caller passes again.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Union

import torch

from ..feature_maps import BUILTIN_MAPS, FeatureMap, Hedgehog

FeatureMapArg = Union[str, FeatureMap, Callable[[int, int], FeatureMap]]


def _class_path(fmap: FeatureMap) -> str:
    return f"{type(fmap).__module__}.{type(fmap).__qualname__}"


def _from_arg(feature_map: FeatureMapArg, heads: int, head_dim: int) -> FeatureMap:
    if isinstance(feature_map, str):
        if feature_map == "hedgehog":
            return Hedgehog(heads, head_dim)
        if feature_map in BUILTIN_MAPS:
            return BUILTIN_MAPS[feature_map]()
        raise ValueError(f"feature_map: unknown name {feature_map!r}; expected 'hedgehog', one of "
                         f"{sorted(BUILTIN_MAPS)}, a FeatureMap module or a factory "
                         f"f(num_heads, head_dim) -> FeatureMap")
    if isinstance(feature_map, FeatureMap):
        return copy.deepcopy(feature_map)
    if callable(feature_map):
        fmap = feature_map(heads, head_dim)
        if not isinstance(fmap, FeatureMap):
            raise TypeError(f"feature_map: the factory returned {type(fmap).__name__}, expected a "
                            f"linattn.feature_maps.FeatureMap")
        return fmap
    raise TypeError(f"feature_map: expected a name, a FeatureMap or a factory, got "
                    f"{type(feature_map).__name__}")


def build_pair(feature_map: FeatureMapArg, heads: int, head_dim: int, layer: str,
               device: Optional[torch.device]) -> tuple[FeatureMap, FeatureMap]:
    """Fresh (q map, k map) for one layer of `heads` heads of dim `head_dim`."""
    pair = []
    for role in ("q", "k"):
        fmap = _from_arg(feature_map, heads, head_dim)
        fmap.check_input(heads, head_dim, f"feature_map ({role} map of layer {layer!r})")
        pair.append(fmap.to(device) if device is not None else fmap)
    width_q, width_k = (m.output_dim(head_dim) for m in pair)
    if width_q != width_k:
        raise ValueError(f"feature_map: layer {layer!r} got q and k maps of widths {width_q} and "
                         f"{width_k}; they must be equal")
    return pair[0], pair[1]


def spec(fmap: FeatureMap) -> dict[str, Any]:
    """What a checkpoint records about `fmap` (JSON-serialisable)."""
    if type(fmap) is Hedgehog:
        return {"name": "hedgehog", "feature_dim": fmap.feature_dim}
    name = fmap.kernel_name
    if name in BUILTIN_MAPS and type(fmap) is BUILTIN_MAPS[name]:
        return {"name": name}
    return {"name": "custom", "class": _class_path(fmap)}


def describe(fmap: FeatureMap) -> str:
    """A short label for reports: 'hedgehog(F=64)', 'relu', or the class name."""
    s = spec(fmap)
    if s["name"] == "hedgehog":
        return f"hedgehog(F={s['feature_dim']})"
    if s["name"] == "custom":
        return type(fmap).__name__
    return s["name"]


def from_spec(map_spec: dict[str, Any], heads: int, head_dim: int, layer: str,
              custom: Optional[FeatureMapArg], device: Optional[torch.device]) -> FeatureMap:
    """Rebuild a map recorded by spec() (its parameters are loaded afterwards)."""
    name = map_spec.get("name")
    if name == "hedgehog":
        fmap: FeatureMap = Hedgehog(heads, head_dim, feature_dim=int(map_spec["feature_dim"]))
    elif name in BUILTIN_MAPS:
        fmap = BUILTIN_MAPS[name]()
    elif name == "custom":
        if custom is None:
            raise ValueError(f"layer {layer!r} was saved with the custom feature map "
                             f"{map_spec.get('class')}; pass feature_map= (the same factory or "
                             f"template used at conversion) to load_converted")
        fmap = _from_arg(custom, heads, head_dim)
        if _class_path(fmap) != map_spec.get("class"):
            raise ValueError(f"layer {layer!r} was saved with feature map {map_spec.get('class')}, "
                             f"but feature_map= builds {_class_path(fmap)}")
    else:
        raise ValueError(f"layer {layer!r}: the checkpoint records an unknown feature map "
                         f"{map_spec!r}")
    return fmap.to(device) if device is not None else fmap
