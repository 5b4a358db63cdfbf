"""Widen the Hedgehog maps of a converted model without changing what it computes.

A Hedgehog map of width F has 2F features, softmax(xW) ⊕ softmax(−xW), each half normalised
over its F features. Repeating every column of W m times (F' = m·F) splits each softmax
probability into m equal parts, so φ'(q)·φ'(k) = φ(q)·φ(k) / m for every pair. Linear
attention divides by φ(q)·Σφ(k), so the factor cancels: the widened model gives the same
output up to the op's eps (eps / m against φ(q)·z, which is of order N·2/F). It then has m
times the feature rank to learn with: the use is more capacity for a later stage (the 4-step
generator of the distillation stage, docs/distill.md) started from a finalized model.

Exact copies get equal gradients and would stay copies, so the copies after the first are
perturbed by ``noise`` · (the std of the layer's W) · N(0, 1), drawn from ``seed``; noise = 0
keeps the output exact (and the copies tied until something else breaks the symmetry). The
default 0.5 moved the toy teacher's 5-linear first stage by rel-MSE 2.7e-4 at F 32 -> 64
(1.0: 1.7e-3).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..feature_maps import Hedgehog
from . import record
from .processor import converted_layers


def widen_hedgehog(fmap: Hedgehog, feature_dim: int, *, noise: float = 0.0,
                   generator: Optional[torch.Generator] = None) -> Hedgehog:
    """A new Hedgehog of width `feature_dim` (a multiple of fmap.feature_dim) whose kernel is
    fmap's divided by the multiple, so linear attention's output is unchanged (see the module
    docstring); copies after the first perturbed by `noise` relative to W's std."""
    if type(fmap) is not Hedgehog:
        raise TypeError(f"fmap: expected a linattn Hedgehog map, got {type(fmap).__name__}")
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
        raise ValueError(f"feature_dim: expected a positive int, got {feature_dim!r}")
    if feature_dim % fmap.feature_dim:
        raise ValueError(f"feature_dim: {feature_dim} is not a multiple of the map's width "
                         f"{fmap.feature_dim}; only whole copies keep the output unchanged")
    if not noise >= 0.0:
        raise ValueError(f"noise: expected a number >= 0, got {noise!r}")
    repeats = feature_dim // fmap.feature_dim
    weight = fmap.weight.detach()
    wide = Hedgehog(fmap.num_heads, fmap.head_dim, feature_dim=feature_dim, dtype=weight.dtype,
                    device=weight.device)
    # (H, D, F) -> (H, D, m, F): copy c of column f is wide column c·F + f, so copy 0 is fmap's
    # W exactly and the copies are whole blocks.
    copies = weight.unsqueeze(2).expand(-1, -1, repeats, -1).clone()
    if noise > 0.0 and repeats > 1:
        scale = noise * weight.float().std().item()
        draw = torch.randn(copies[:, :, 1:].shape, generator=generator, dtype=torch.float32)
        copies[:, :, 1:] += (scale * draw).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        wide.weight.copy_(copies.reshape(fmap.num_heads, fmap.head_dim, feature_dim))
    wide.weight.requires_grad_(fmap.weight.requires_grad)
    return wide


def widen_feature_maps(model: nn.Module, feature_dim: int, *, noise: float = 0.5,
                       seed: int = 0) -> int:
    """Widen the q and k Hedgehog maps of every converted layer of `model` to `feature_dim`
    in place (widen_hedgehog; layers in model order draw their perturbation from one
    generator seeded with `seed`), and rewrite the conversion record so that save_pretrained
    and load_converted carry the new width. Returns the number of layers widened.

    Raises ValueError when `model` has no converted layer, or a layer's map is not a Hedgehog
    map (the builtin maps have no width), or `feature_dim` is no multiple of a map's width."""
    layers = list(converted_layers(model))
    if not layers:
        raise ValueError("model: has no linattn-converted layer (convert it, or load it with "
                         "linattn.load_converted)")
    for name, _, processor in layers:
        for role in ("q_map", "k_map"):
            fmap = getattr(processor, role)
            if type(fmap) is not Hedgehog:
                raise ValueError(f"model: layer {name!r} has a {type(fmap).__name__} {role}; "
                                 f"only Hedgehog maps have a width to widen")
            if feature_dim % fmap.feature_dim:
                raise ValueError(f"feature_dim: {feature_dim} is not a multiple of layer "
                                 f"{name!r}'s Hedgehog width {fmap.feature_dim}")
    generator = torch.Generator().manual_seed(seed)
    for _, _, processor in layers:
        # Assigning a module attribute replaces the registered submodule; a hybrid layer's
        # as_linear() reads the maps from here, so it shares the wide ones too.
        processor.q_map = widen_hedgehog(processor.q_map, feature_dim, noise=noise,
                                         generator=generator)
        processor.k_map = widen_hedgehog(processor.k_map, feature_dim, noise=noise,
                                         generator=generator)
    record.sync(model)
    return len(layers)
