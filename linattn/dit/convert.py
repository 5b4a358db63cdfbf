"""linattn.convert and linattn.revert: swap a DiT's self-attention processors in place."""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Union

from torch import nn

from ..backends import BACKEND_NAMES
from . import maps, record
from .local_mixing import KernelArg, LocalMixing, kernel_size
from .processor import MODES, LinAttnProcessor, converted_layers, restore_original, set_processor
from .selectors import Selector, resolve_selector

LayersArg = Union[str, Iterable[int], Callable[[int, str], bool]]
#: (layer name, attention module, mode, q map, k map, local mixing or None): one layer to install.
Plan = list[tuple[str, nn.Module, str, nn.Module, nn.Module, Optional[LocalMixing]]]


def convert(transformer: nn.Module, layers: LayersArg = "all",
            feature_map: maps.FeatureMapArg = "hedgehog", mode: str = "linear", *,
            selector: Union[None, str, Selector] = None, backend: str = "auto",
            fuse_pre_attention: bool = True,
            local_mixing: Optional[KernelArg] = None) -> nn.Module:
    """Convert the chosen self-attention layers of `transformer` to linear attention, in place.

    Args:
        transformer: a diffusers video DiT (Wan, CogVideoX, HunyuanVideo, LTX-Video, Mochi) or any
            model a `selector` describes.
        layers: "all", indices into the model's self-attention layers (in model order; see
            ``linattn.summary``), or a predicate ``f(index, name) -> bool``. Only self-attention
            is ever listed: cross-attention and text-only attention stay untouched.
        feature_map: "hedgehog" (default: separate identity-initialised q and k maps per layer),
            "relu", "elu", "softmax", "identity", a FeatureMap template copied per layer, or a
            factory ``f(num_heads, head_dim) -> FeatureMap``.
        mode: "linear" (the layer runs the linear-attention op only) or "hybrid" (both branches,
            mixed by a learnable gate r initialised to 1, so outputs start equal to the original).
        selector: None (the built-in selector of the model's family), a built-in name, or a
            linattn.dit.Selector for a user's own DiT.
        backend: the linattn.linear_attention backend the layers use ("auto" by default).
        fuse_pre_attention: the linear branch hands the layer's q/k norm and RoPE to the op's
            kernels, which apply them while loading q and k (True, the default, for selectors
            that describe them, as the built-in ones do), or runs them in PyTorch first (False;
            linattn.dit.set_fuse_pre_attention switches a converted model).
        local_mixing: None (default: plain linear attention) or the kernel size (an odd int, or
            three for frames, height, width) of a zero-initialised depthwise convolution of V
            over the video token grid added to the linear branch (linattn/dit/local_mixing.py;
            FLatten's DWC; not part of LinVideo). Needs a selector that gives the token grid
            (Wan, LTX-Video: the families whose self-attention sees only video tokens) and
            runs neither under context parallelism nor with padded keys.

    Returns the same model. Feature maps and gates become trainable parameters under it.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    check_backend(backend)
    sel = resolve_selector(transformer, selector)
    kernel = None if local_mixing is None else kernel_size(local_mixing)
    plan: Plan = []
    for name, attn in _choose(sel.layers(transformer), layers):
        check_convertible(name, attn, sel)
        heads, head_dim = sel.head_shape(attn)
        q_map, k_map = maps.build_pair(feature_map, heads, head_dim, name, device_of(attn))
        mixing = (None if kernel is None
                  else LocalMixing(heads * head_dim, kernel, device=device_of(attn)))
        plan.append((name, attn, mode, q_map, k_map, mixing))
    install(transformer, sel, plan, backend, fuse_pre_attention)
    return transformer


def revert(transformer: nn.Module) -> nn.Module:
    """Restore the original processor of every converted layer (their maps and gates are
    dropped). Returns the same model; a model with no converted layer is left as it is."""
    for _, attn, processor in list(converted_layers(transformer)):
        restore_original(attn, processor)
    record.sync(transformer)
    return transformer


def check_convertible(name: str, attn: nn.Module, selector: Selector) -> None:
    if isinstance(getattr(attn, "processor", None), LinAttnProcessor):
        raise ValueError(f"layer {name!r} is already converted ({attn.processor.mode}); call "
                         f"linattn.revert(model) first to convert it differently")
    selector.check_layer(name, attn)


def check_backend(backend: str) -> None:
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise ValueError(f"backend: expected 'auto' or one of {list(BACKEND_NAMES)}, "
                         f"got {backend!r}")


def device_of(attn: nn.Module):
    """Where a converted layer's new parameters (maps, gate) go: the layer's device, except for
    a layer on the meta device (a model built without storage, to be loaded shard by shard:
    linattn/train/sharded_load.py), whose new parameters are made on the CPU with their initial
    values, which nothing would load later (None: the default device)."""
    device = next((p.device for p in attn.parameters()), None)
    return None if device is not None and device.type == "meta" else device


def install(model: nn.Module, selector: Selector, plan: Plan, backend: str,
            fuse_pre_attention: bool = True) -> None:
    """Set a LinAttnProcessor on every planned layer and rewrite the model's record."""
    if any(mixing is not None for *_, mixing in plan) and not selector.has_token_grid():
        # Here, not in convert(), so that load_converted refuses such a checkpoint the same way.
        raise ValueError(f"local_mixing: selector {selector.name!r} does not give the video "
                         f"token grid the convolution needs (built in for 'wan' and "
                         f"'ltx_video'); convert without it or override Selector.token_grid")
    others = {p.selector.name for _, _, p in converted_layers(model)} - {selector.name}
    if plan and others:
        raise ValueError(f"selector: the model already has layers converted with selector "
                         f"{sorted(others)}, not {selector.name!r}; one model uses one selector")
    for _, attn, mode, q_map, k_map, mixing in plan:
        set_processor(attn, LinAttnProcessor(selector, mode, q_map, k_map, attn.processor,
                                             backend, device_of(attn), fuse_pre_attention,
                                             local_mixing=mixing))
    record.sync(model)


def _choose(candidates: list[tuple[str, nn.Module]],
            layers: LayersArg) -> list[tuple[str, nn.Module]]:
    count = len(candidates)
    if isinstance(layers, str):
        if layers == "all":
            return list(candidates)
        raise ValueError(f"layers: expected 'all', a list of indices or a predicate, got {layers!r}")
    if callable(layers):
        return [(name, attn) for i, (name, attn) in enumerate(candidates) if layers(i, name)]
    try:
        indices = list(layers)
    except TypeError:
        raise TypeError(f"layers: expected 'all', a list of indices or a predicate "
                        f"f(index, name) -> bool, got {type(layers).__name__}") from None
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int):
            raise TypeError(f"layers: indices must be ints, got {i!r}")
        if not 0 <= i < count:
            raise ValueError(f"layers: index {i} is out of range; the model has {count} "
                             f"self-attention layers (0 to {count - 1})")
    if len(set(indices)) != len(indices):
        raise ValueError(f"layers: duplicate indices in {indices}")
    return [candidates[i] for i in sorted(indices)]
