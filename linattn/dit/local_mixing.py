"""Local mixing: a depthwise convolution of V over the video token grid, added to linear attention.

Linear attention's output at a token is Σ_j φ(q)·φ(k_j) v_j / Σ_j φ(q)·φ(k_j), a weighting of
every token by a kernel of rank 2F: it cannot concentrate on a token's few neighbours the way a
peaked softmax row does. On the toy teacher the converted layers lose exactly that: single small
objects blur away (docs/toy_study.md §1). FLatten Transformer (Han et al., 2023) adds a
depthwise convolution of V to restore the rank and the local detail; here it is

    o = LinearAttn(q, k, v) + DWConv3d(v)   over the (frames, height, width) grid of the tokens,

one k_t × k_h × k_w filter per channel (heads × head dim), no bias, zero-initialised so that a
freshly converted layer computes exactly the plain linear attention it did before. In a hybrid
layer the convolution is part of the linear branch (it is mixed by 1 − r). LinVideo has no such
term; it is our option (convert(local_mixing=3)), off by default.

The grid is not in an attention call's arguments: a forward pre-hook on the transformer reads it
from the model's own inputs (Selector.token_grid: Wan's latent over its patch size, LTX-Video's
RoPE grid) and hands it to every converted layer before the blocks run. The hook is a module
function and finds the layers through the module it is called on, so a deepcopy of the model
(the trainer's student) carries a working hook.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KernelArg = Union[int, Sequence[int]]


def kernel_size(value: KernelArg, where: str = "local_mixing") -> tuple[int, int, int]:
    """(k_t, k_h, k_w) from an int or three ints, each odd and >= 1 (an odd size keeps the
    output aligned with its token: padding k // 2 each side)."""
    sizes = (value,) * 3 if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        sizes = tuple(sizes)
    except TypeError:
        raise TypeError(f"{where}: expected an odd int or three odd ints (frames, height, width), "
                        f"got {value!r}") from None
    if len(sizes) != 3 or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0
                              for k in sizes):
        raise ValueError(f"{where}: expected an odd int >= 1 or three of them (frames, height, "
                         f"width), got {value!r}")
    return sizes


class LocalMixing(nn.Module):
    """A zero-initialised depthwise 3-D convolution of V (heads × head dim channels)."""

    def __init__(self, channels: int, kernel: KernelArg = 3, *,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels: expected an int >= 1, got {channels!r}")
        self.channels = channels
        self.kernel = kernel_size(kernel)
        self.weight = nn.Parameter(torch.zeros(channels, 1, *self.kernel, device=device,
                                               dtype=dtype))

    def forward(self, v: Tensor, layout: str, grid: Sequence[int]) -> Tensor:
        """DWConv3d(v) in v's layout ("bnhd" or "bhnd"); `grid` is (frames, height, width) of
        the N tokens, which are ordered frame-major, then row, then column."""
        if layout not in ("bnhd", "bhnd"):
            raise ValueError(f"layout: expected 'bnhd' or 'bhnd', got {layout!r}")
        vb = v if layout == "bnhd" else v.transpose(1, 2)
        B, N, H, D = vb.shape
        if H * D != self.channels:
            raise ValueError(f"v: {H} heads × {D} dims = {H * D} channels, but this local "
                             f"mixing was built for {self.channels} channels")
        frames, height, width = (int(g) for g in grid)
        if frames * height * width != N:
            raise ValueError(f"local mixing: the token grid {frames} × {height} × {width} = "
                             f"{frames * height * width} tokens does not match the {N} tokens of "
                             f"this attention call")
        # (B, F, H, W, C) viewed as (B, C, F, H, W) is channels-last 3-D: the convolution reads
        # v in place and writes its output in that format, so neither side copies V's size.
        x = vb.reshape(B, frames, height, width, H * D).permute(0, 4, 1, 2, 3)
        padding = tuple(k // 2 for k in self.kernel)
        y = F.conv3d(x, self.weight.to(x.dtype), padding=padding, groups=self.channels)
        y = y.permute(0, 2, 3, 4, 1).reshape(B, N, H, D)
        return y if layout == "bnhd" else y.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel={self.kernel}"


def spec(mixing: Optional[LocalMixing]) -> Optional[dict[str, Any]]:
    """The record entry of a layer's local mixing (record.py), None without one."""
    return None if mixing is None else {"kernel": list(mixing.kernel)}


def from_spec(entry: Optional[dict], channels: int, where: str,
              device: Optional[torch.device] = None) -> Optional[LocalMixing]:
    if entry is None:
        return None
    if not isinstance(entry, dict) or "kernel" not in entry:
        raise ValueError(f"{where}: malformed local_mixing record {entry!r} (expected "
                         f"{{'kernel': [k_t, k_h, k_w]}})")
    return LocalMixing(channels, kernel_size(entry["kernel"], f"{where}: local_mixing kernel"),
                       device=device)


def set_token_grid(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """The transformer's forward pre-hook: give every converted layer with local mixing the
    token grid of this call's input (Selector.token_grid)."""
    from .processor import converted_layers

    layers = [p for _, _, p in converted_layers(model) if p.local_mixing is not None]
    if not layers:
        return None
    grid = layers[0].selector.token_grid(model, args, kwargs)
    for processor in layers:
        processor.__dict__["token_grid"] = grid
    return None


def _hook_ids(model: nn.Module) -> list[int]:
    return [key for key, hook in model._forward_pre_hooks.items() if hook is set_token_grid]


def sync_hook(model: nn.Module) -> None:
    """Register the grid hook on `model` when a converted layer has local mixing, and remove
    it when none has (called with the record after every convert / revert / finalize)."""
    from .processor import converted_layers

    wanted = any(p.local_mixing is not None for _, _, p in converted_layers(model))
    present = _hook_ids(model)
    if wanted and not present:
        model.register_forward_pre_hook(set_token_grid, with_kwargs=True)
    elif not wanted:
        for key in present:
            del model._forward_pre_hooks[key]
            model._forward_pre_hooks_with_kwargs.pop(key, None)
