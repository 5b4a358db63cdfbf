"""The processor a converted self-attention layer runs: linear, or hybrid with a gate r.

It is an nn.Module set as the layer's diffusers processor, so its feature maps and gate are
registered under the model (``blocks.3.attn1.processor.q_map.weight``, ``...processor.gate``):
state_dict, save_pretrained, DDP and FSDP see them like any other parameter.

mode "linear": o = LinearAttn(q, k, v) through linattn.linear_attention; under diffusers'
    context parallelism (a parallel config set by enable_parallelism), through
    linattn.distributed.linear_attention over the context-parallel group (context_parallel.py).
mode "hybrid": o = r · SoftmaxAttn(q, k, v) + (1 − r) · LinearAttn(q, k, v)  (method.md §3), r a
    scalar parameter initialised to 1, so a freshly converted model equals the original exactly
    (r·x = x and (1 − r)·y = 0 in floating point for finite y).
With local mixing (local_mixing.py, off by default) LinearAttn(q, k, v) + DWConv3d(v) is the
linear branch, the convolution over the video token grid that the model's forward pre-hook sets.

The family-specific parts (q/k/v path, the stock softmax call, the output path) come from the
layer's selector; this module only chooses and mixes the branches.

Where the selector hands over q and k as projected with their norm and RoPE (Projection.pre),
the linear branch passes them to the op, whose kernels apply norm -> RoPE -> φ while loading q
and k (``fuse_pre_attention = True``, the default), under diffusers' context parallelism too
(each process's norms and its rows of the RoPE tables, linattn.distributed). With ``fuse_pre_attention = False`` it runs
the stock norm and RoPE in PyTorch first, then the op: the same maths, unfused (for comparisons
and benchmarks). RoPE tables that need gradients (Mochi's, built from a learnable parameter,
while training it) also take the unfused path: the kernels give no gradient to tables.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from ..distributed import linear_attention as sharded_linear_attention
from ..feature_maps import FeatureMap
from ..ops import linear_attention
from .context_parallel import context_parallel_group
from .local_mixing import LocalMixing
from .selectors import Selector

MODES = ("linear", "hybrid")


class LinAttnProcessor(nn.Module):
    # diffusers' set_attention_backend() and context parallelism set these on a layer's processor;
    # the softmax branch passes them on exactly as the stock processor does.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, selector: Selector, mode: str, q_map: FeatureMap, k_map: FeatureMap,
                 original: Any, backend: str = "auto", device: Optional[torch.device] = None,
                 fuse_pre_attention: bool = True, local_mixing: Optional[LocalMixing] = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        self.selector = selector
        self.mode = mode
        self.backend = backend
        self.fuse_pre_attention = bool(fuse_pre_attention)
        self.q_map = q_map
        self.k_map = k_map
        self.local_mixing = local_mixing
        if mode == "hybrid":
            self.gate = nn.Parameter(torch.ones((), dtype=torch.float32, device=device))
        else:
            self.gate = None
        # The processor this one replaced, restored by revert() and by finalize() for layers that
        # keep softmax. Kept out of _modules so that it is neither a child nor in the state dict.
        self.__dict__["original"] = original
        # (sink, layer name) while linattn.dit.map_fitting.recording() runs, else None.
        self.__dict__["map_fitting"] = None
        # (frames, height, width) of the current call's tokens, set by the model's forward
        # pre-hook when the layer has local mixing (local_mixing.set_token_grid).
        self.__dict__["token_grid"] = None
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)

    def as_linear(self) -> "LinAttnProcessor":
        """A linear-only processor sharing this one's maps (finalize() of a layer with r → 0)."""
        linear = LinAttnProcessor(self.selector, "linear", self.q_map, self.k_map, self.original,
                                  self.backend, fuse_pre_attention=self.fuse_pre_attention,
                                  local_mixing=self.local_mixing)
        linear._attention_backend = self._attention_backend
        linear._parallel_config = self._parallel_config
        return linear

    def __call__(self, attn: nn.Module, hidden_states: Tensor,
                 encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, image_rotary_emb: Any = None):
        # diffusers' Attention and LTXAttention pass on only the keyword arguments named in
        # inspect.signature(processor.__call__); nn.Module.__call__ is (*args, **kwargs), so the
        # names are spelled out here or image_rotary_emb would be dropped.
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask,
                                image_rotary_emb)

    def forward(self, attn: nn.Module, hidden_states: Tensor,
                encoder_hidden_states: Optional[Tensor], attention_mask: Optional[Tensor],
                image_rotary_emb: Any):
        p = self.selector.project(attn, hidden_states, encoder_hidden_states, attention_mask,
                                  image_rotary_emb)
        if self.map_fitting is not None:
            return self._fitting_forward(attn, p)
        o = self._linear(attn, p)
        if self.mode == "hybrid":
            r = self.gate
            o = r * self.selector.softmax(attn, p, self) + (1 - r) * o
        return self.selector.finish(attn, o, p)

    def _fitting_forward(self, attn: nn.Module, p):
        """Feature-map fitting (map_fitting.py): record the linear branch's error against the
        softmax output and pass the softmax output on, so later layers see the original's inputs."""
        sink, name = self.map_fitting
        with torch.no_grad():
            softmax = self.selector.softmax(attn, p, self)
        sink.add(name, self._linear(attn, p), softmax)
        return self.selector.finish(attn, softmax, p)

    def _linear(self, attn: nn.Module, p) -> Tensor:
        if p.pre is not None and self.fuse_pre_attention and not _learns_rope(p.pre):
            q, k, pre = p.q, p.k, p.pre.kwargs()
        else:
            (q, k), pre = self.selector.attention_qk(attn, p), {}
        group = context_parallel_group(self._parallel_config)
        if self.local_mixing is not None:
            if group is not None:
                raise ValueError("local mixing: a converted layer with local mixing cannot run "
                                 "under context parallelism (its convolution needs the "
                                 "neighbouring tokens other processes hold); convert without "
                                 "local_mixing or run without a parallel config")
            if p.key_padding_mask is not None:
                raise ValueError("local mixing: this call pads its keys (an attention mask); the "
                                 "convolution would mix padded tokens into real ones, so a "
                                 "layer with local mixing takes unpadded inputs only")
            if self.token_grid is None:
                raise RuntimeError("local mixing: this layer has no token grid; it is set by the "
                                   "converted transformer's forward pre-hook, so call the "
                                   "transformer, not the attention layer alone")
            mixed = self.local_mixing(p.v, p.layout, self.token_grid)
        if group is not None:
            # This process holds its own tokens' q, k, v: S and z are summed over the group.
            # The norms are per token and diffusers' plans shard the RoPE tables with the
            # tokens, so the layer's specs are this process's own (token_offset None): the
            # sharded op fuses them as the single-process op does.
            return sharded_linear_attention(
                q, k, p.v, group=group, feature_map=(self.q_map, self.k_map),
                key_padding_mask=p.key_padding_mask, layout=p.layout, backend=self.backend,
                **pre)
        o = linear_attention(q, k, p.v, feature_map=(self.q_map, self.k_map),
                             key_padding_mask=p.key_padding_mask, layout=p.layout,
                             backend=self.backend, **pre)
        return o if self.local_mixing is None else o + mixed.to(o.dtype)

    def extra_repr(self) -> str:
        gate = f", r={self.gate.item():.4f}" if self.gate is not None else ""
        fused = "" if self.fuse_pre_attention else ", fuse_pre_attention=False"
        return (f"selector={self.selector.name!r}, mode={self.mode!r}{gate}, "
                f"backend={self.backend!r}{fused}")


def set_processor(attn: nn.Module, processor: Any) -> None:
    """Install `processor` on an attention module, module processors included."""
    if hasattr(attn, "set_processor"):
        attn.set_processor(processor)  # diffusers drops a module processor from _modules itself
        return
    # MochiAttention has no set_processor, and nn.Module refuses to replace a child module with a
    # plain object, so the registered child goes first.
    registered = attn._modules.get("processor")
    if isinstance(registered, nn.Module) and not isinstance(processor, nn.Module):
        del attn._modules["processor"]
    attn.processor = processor


def restore_original(attn: nn.Module, processor: LinAttnProcessor) -> None:
    """Put back the processor `processor` replaced, with any attention backend set meanwhile."""
    original = processor.original
    for attribute in ("_attention_backend", "_parallel_config"):
        if hasattr(original, attribute):
            setattr(original, attribute, getattr(processor, attribute))
    set_processor(attn, original)


def _learns_rope(pre) -> bool:
    """Whether the RoPE tables must get gradients (Mochi builds them from a learnable parameter,
    pos_frequencies): the kernels give none, so such a call runs its norm and RoPE in PyTorch."""
    return (pre.rope is not None and torch.is_grad_enabled()
            and (pre.rope.cos.requires_grad or pre.rope.sin.requires_grad))


def set_fuse_pre_attention(model: nn.Module, enabled: bool) -> None:
    """Turn the fused q/k norm and RoPE of every converted layer of `model` on or off (off: the
    stock norm and RoPE run in PyTorch before the op; results agree to rounding)."""
    for _, _, processor in converted_layers(model):
        processor.fuse_pre_attention = bool(enabled)


def converted_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, LinAttnProcessor]]:
    """(name, attention module, processor) of every converted layer, in model order."""
    for name, module in model.named_modules():
        processor = module._modules.get("processor")
        if isinstance(processor, LinAttnProcessor):
            yield name, module, processor
