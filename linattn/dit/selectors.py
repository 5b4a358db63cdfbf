"""Selectors: which modules of a DiT are self-attention, and how one attention call runs.

A selector is what lets linattn convert a model. It answers three questions for one model family:

1. ``layers(model)``: the self-attention modules, in model order, as (name, module) pairs. Cross-
   attention and text-only attention are never listed, so they are never converted.
2. ``project(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)``: q, k, v
   exactly as the stock processor computes them, after its q/k normalisation and RoPE (φ is applied
   to what softmax attention would see, method.md §2 [choice]), returned as a ``Projection``.
   A selector may instead return q and k as projected, before the norm and RoPE, with
   ``Projection.pre`` saying what they are (a linattn.PreAttention of QKNorm and RoPE specs): the
   linear branch then hands them to the op, whose kernels apply norm -> RoPE -> φ while loading q
   and k (nothing normalised or rotated is written to memory), and ``attention_qk`` gives the
   normalised, rotated q and k wherever they are needed in PyTorch (the softmax branch, and the
   unfused path of a layer with ``fuse_pre_attention = False``). The built-in families do this.
3. ``finish(attn, o, projection)``: the stock processor's output path (merge heads, output
   projection, split joint sequences) applied to the attention output o.

``softmax(attn, projection, processor)`` runs the stock softmax attention on a projection
(returning its output in the projection's layout); a hybrid layer mixes it with the linear
branch. The base class runs ``F.scaled_dot_product_attention`` honouring the key padding mask;
the built-in families override it with the exact call of their stock processor, so that a hybrid
layer with r = 1 reproduces the original model bit for bit.

``token_grid(model, args, kwargs)`` (optional) gives the (frames, height, width) grid of the
self-attention tokens of one model call, which local mixing needs (local_mixing.py); Wan and
LTX-Video give it, the joint video-text families do not.

The modules a selector lists must follow diffusers' processor protocol: the module calls
``self.processor(self, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)``
(positionally or by these names), and has ``set_processor(p)`` or a plain ``processor`` attribute.

A user's own DiT is converted by writing a small selector::

    class MyDiTSelector(linattn.dit.Selector):
        name = "my_dit"                       # recorded in checkpoints; load_converted matches it

        def layers(self, model):
            return [(f"blocks.{i}.self_attn", b.self_attn) for i, b in enumerate(model.blocks)]

        def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
            q, k, v = (f(hidden_states).unflatten(-1, (attn.heads, -1))
                       for f in (attn.to_q, attn.to_k, attn.to_v))
            q, k = apply_my_rope(q, rotary_emb), apply_my_rope(k, rotary_emb)
            return Projection(q, k, v, layout="bnhd")

        def finish(self, attn, o, projection):
            return attn.to_out(o.flatten(2, 3))

    linattn.convert(model, layers="all", selector=MyDiTSelector())

To have the kernels apply the layer's q/k norm and RoPE (no normalised or rotated q, k in
memory), return them unapplied and say what they are::

        def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb):
            q, k, v = (f(hidden_states).unflatten(-1, (attn.heads, -1))
                       for f in (attn.to_q, attn.to_k, attn.to_v))
            pre = linattn.PreAttention(QKNorm.from_module(attn.norm_q, over="head"),
                                       QKNorm.from_module(attn.norm_k, over="head"),
                                       RoPE(*rotary_emb, style="interleaved"))
            return Projection(q, k, v, layout="bnhd", pre=pre)

(``attention_qk`` then applies them in PyTorch where the softmax branch needs them.)
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pre_attention import PreAttention
from ..pre_attention import reference as pre_reference


@dataclass
class Projection:
    """q, k, v of one attention call, laid out (B, N, H, D) ("bnhd") or (B, H, N, D) ("bhnd").

    key_padding_mask: (B, Nk) bool, True = a real key; padded keys add nothing to the linear
        branch's S and z. None: every key is real.
    softmax_mask: whatever the family's softmax branch passes as its attention mask.
    context: what the family's finish() needs (sequence lengths of joint streams, ...).
    pre: None when q and k are what attention sees; else q and k are as projected and `pre` is
        the norm and RoPE still to apply (see Selector.attention_qk).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    layout: str = "bnhd"
    key_padding_mask: Optional[Tensor] = None
    softmax_mask: Any = None
    context: dict = field(default_factory=dict)
    pre: Optional[PreAttention] = None


class Selector(abc.ABC):
    """Which modules are self-attention, and how to get q, k, v from them (module docstring)."""

    #: Recorded in saved checkpoints; load_converted rebuilds a model with the selector of this name.
    name: ClassVar[str] = ""
    #: Whether the stock processor runs softmax attention through diffusers' dispatcher with its
    #: context-parallel config (Wan, HunyuanVideo, LTX-Video): only then may a layer keep it
    #: under context parallelism (context_parallel.py).
    stock_processor_is_context_parallel: ClassVar[bool] = False
    #: Class names of the stock processors whose q/k/v path ``project`` reproduces. A layer whose
    #: processor is none of them (a fused or user-set processor) is refused at conversion, since
    #: its outputs would silently change. Empty: any processor is accepted.
    stock_processors: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The self-attention modules of `model`, in model order, as (name, module)."""

    @abc.abstractmethod
    def project(self, attn: nn.Module, hidden_states: Tensor,
                encoder_hidden_states: Optional[Tensor], attention_mask: Optional[Tensor],
                rotary_emb: Any) -> Projection:
        """q, k, v (after the stock q/k norm and RoPE) of one call of `attn`."""

    @abc.abstractmethod
    def finish(self, attn: nn.Module, o: Tensor, projection: Projection) -> Any:
        """The stock output path applied to the attention output o (projection's layout)."""

    def attention_qk(self, attn: nn.Module, projection: Projection) -> tuple[Tensor, Tensor]:
        """q and k as attention sees them, in the projection's layout: projection.q and .k, or,
        with projection.pre, those after the norm and RoPE. This default applies `pre` with
        linattn's PyTorch definition (linattn/pre_attention/reference.py); the built-in families
        override it with their stock processor's own code, so that softmax layers and hybrid
        layers at r = 1 stay bit-identical to the original. Computed once per projection."""
        p = projection
        if p.pre is None:
            return p.q, p.k
        if "attention_qk" not in p.context:
            from ..ops.validation import to_bnhd
            from ..pre_attention import resolve
            qb, kb = to_bnhd(p.q, p.layout), to_bnhd(p.k, p.layout)
            B, Nq, H, D = qb.shape
            call = resolve(p.pre.q_norm, p.pre.k_norm, p.pre.rope, batch=B, heads=H, head_dim=D,
                           q_len=Nq, kv_len=kb.shape[1], dtype=qb.dtype, device=qb.device)
            q = pre_reference.apply(qb, call.q_norm, call.rope)
            k = pre_reference.apply(kb, call.k_norm, call.rope)
            p.context["attention_qk"] = (to_bnhd(q, p.layout), to_bnhd(k, p.layout))
        return p.context["attention_qk"]

    def output_dtype(self, projection: Projection, o: Tensor) -> torch.dtype:
        """The dtype a stock processor casts the attention output to, its q's: that of
        attention_qk's q where it was computed (the softmax branch, the unfused path), else o's
        (the op returns its q's dtype)."""
        computed = projection.context.get("attention_qk")
        if computed is not None:
            return computed[0].dtype
        return projection.q.dtype if projection.pre is None else o.dtype

    def softmax(self, attn: nn.Module, projection: Projection, processor: nn.Module) -> Tensor:
        """Softmax attention on a projection, in its layout. Override with the stock call."""
        p = projection
        q, k = self.attention_qk(attn, p)
        q, k, v = (t if p.layout == "bhnd" else t.transpose(1, 2) for t in (q, k, p.v))
        mask = None if p.key_padding_mask is None else p.key_padding_mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return o if p.layout == "bhnd" else o.transpose(1, 2)

    def context_parallel_plan(self, model: nn.Module) -> Optional[dict]:
        """How diffusers' context parallelism shards the model's sequence (a diffusers
        ContextParallelModelPlan), for families whose model class ships no _cp_plan; None when
        the family has none. The softmax branch must then also run through diffusers'
        dispatcher under the layer's parallel config (see CogVideoXSelector)."""
        return None

    def head_shape(self, attn: nn.Module) -> tuple[int, int]:
        """(heads, head dim) of `attn`, to build per-head feature maps. diffusers' attention
        modules (Attention, WanAttention, LTXAttention, MochiAttention) all keep ``heads`` and
        ``inner_dim``."""
        try:
            heads, inner = int(attn.heads), int(attn.inner_dim)
        except AttributeError:
            raise TypeError(f"selector {self.name!r}: {type(attn).__name__} has no `heads` and "
                            f"`inner_dim` attributes; override Selector.head_shape") from None
        return heads, inner // heads

    def token_grid(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        """(frames, height, width) of the self-attention tokens of ``model(*args, **kwargs)``, in
        the order the tokens are laid out (frame-major), for local mixing (local_mixing.py).
        Families whose self-attention sees only the video tokens override it."""
        raise ValueError(f"local_mixing: selector {self.name!r} does not give the video token "
                         f"grid that the convolution needs; override Selector.token_grid")

    @classmethod
    def has_token_grid(cls) -> bool:
        return cls.token_grid is not Selector.token_grid

    def check_layer(self, name: str, attn: nn.Module) -> None:
        """Raise when `attn` cannot be converted faithfully by this selector."""
        if not hasattr(attn, "processor"):
            raise TypeError(f"layer {name!r}: {type(attn).__name__} has no `processor`; linattn "
                            f"converts modules that follow diffusers' processor protocol")
        current = type(attn.processor).__name__
        if self.stock_processors and current not in self.stock_processors:
            raise ValueError(
                f"layer {name!r} runs processor {current}, but selector {self.name!r} reproduces "
                f"the q/k/v path of {list(self.stock_processors)} only (fused QKV projections or "
                f"a user-set processor change that path); restore the stock processor first")
        held = [n for n, _ in attn.processor.named_parameters()] \
            if isinstance(attn.processor, nn.Module) else []
        if held:
            raise ValueError(f"layer {name!r}: its processor {current} holds parameters {held}, "
                             f"which converting would drop from the model")


def key_padding_mask_from(mask: Optional[Tensor], batch: int, kv_len: int,
                          family: str) -> Optional[Tensor]:
    """A (B, Nk) bool key padding mask from a boolean attention mask that only hides keys:
    (B, Nk), (B, 1, Nk) or (B, 1, 1, Nk). Linear attention has no score matrix, so a mask that
    varies over queries or adds a bias cannot be honoured; it is refused with its shape."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"{family}: the linear branch takes a boolean key padding mask (True = "
                         f"keep); got an attention mask of dtype {mask.dtype}, shape "
                         f"{tuple(mask.shape)}")
    squeezed = mask
    while squeezed.dim() > 2 and squeezed.shape[1] == 1:
        squeezed = squeezed.squeeze(1)
    if tuple(squeezed.shape) != (batch, kv_len):
        raise ValueError(f"{family}: the linear branch takes a key padding mask (B, Nk) = "
                         f"{(batch, kv_len)} (or with singleton query/head dims); got an "
                         f"attention mask of shape {tuple(mask.shape)}")
    return squeezed


# Built-in families: model class name -> "module:Selector class", imported on first use so that
# `import linattn` does not import diffusers.
_BUILTIN = {
    "wan": ("WanTransformer3DModel", "linattn.dit.families.wan:WanSelector"),
    "cogvideox": ("CogVideoXTransformer3DModel", "linattn.dit.families.cogvideox:CogVideoXSelector"),
    "hunyuan_video": ("HunyuanVideoTransformer3DModel",
                      "linattn.dit.families.hunyuan_video:HunyuanVideoSelector"),
    "ltx_video": ("LTXVideoTransformer3DModel", "linattn.dit.families.ltx_video:LTXVideoSelector"),
    "mochi": ("MochiTransformer3DModel", "linattn.dit.families.mochi:MochiSelector"),
}


def builtin_selector(name: str) -> Selector:
    """The built-in selector registered under `name` ("wan", "cogvideox", ...)."""
    try:
        _, target = _BUILTIN[name]
    except KeyError:
        raise ValueError(f"selector: no built-in selector named {name!r}; built-in: "
                         f"{sorted(_BUILTIN)}, or pass a linattn.dit.Selector instance") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)()


def resolve_selector(model: nn.Module, selector: Union[None, str, Selector]) -> Selector:
    """`selector` as an instance; None picks the built-in family of `model`'s class (or a base)."""
    if isinstance(selector, Selector):
        if not isinstance(selector.name, str) or not selector.name:
            raise ValueError(f"selector: {type(selector).__name__} sets no `name` (a non-empty "
                             f"string, recorded in checkpoints so that load_converted can match it)")
        return selector
    if isinstance(selector, str):
        return builtin_selector(selector)
    if selector is not None:
        raise TypeError(f"selector: expected None, a built-in name or a linattn.dit.Selector, "
                        f"got {type(selector).__name__}")
    lineage = {cls.__name__ for cls in type(model).__mro__}
    for name, (model_class, _) in _BUILTIN.items():
        if model_class in lineage:
            return builtin_selector(name)
    raise ValueError(
        f"selector: linattn has no built-in selector for {type(model).__name__} (built-in: "
        f"{sorted(m for m, _ in _BUILTIN.values())}); write a linattn.dit.Selector that lists its "
        f"self-attention modules and computes their q, k, v, and pass selector=")
