"""What a DiT does to q and k before attention, as the op's arguments: QKNorm and RoPE.

A video DiT's attention layer normalises its projected q and k and rotates them (RoPE) before
softmax attention sees them. Done in PyTorch that is several full passes over q and k per layer;
passed to linattn.linear_attention as ``q_norm=``, ``k_norm=`` and ``rope=``, the kernels apply
norm -> RoPE -> φ while loading q and k, and neither the normalised nor the rotated q, k is ever
written to memory (kernels.md, issue 12).

* ``QKNorm``: RMSNorm or LayerNorm, over the D values of each head (``over="head"``: HunyuanVideo,
  Mochi, CogVideoX) or over all H·D values of a token (``over="heads"``: Wan, LTX-Video), with an
  optional weight and bias, applied to the tokens in ``tokens`` (all by default; a dual-stream DiT
  whose text tokens have their own norm normalises only the video range here).
* ``RoPE``: x·cos + rot(x)·sin with rot pairing (2i, 2i+1) (``style="interleaved"``, what every
  diffusers video DiT uses: diffusers' apply_rotary_emb, Wan, Mochi, LTX-Video) or (i, i + D/2)
  (``style="half"``, GPT-NeoX style), applied to the tokens [start, start + len(table)) only, so
  text tokens concatenated before or after the video keep their values.

``PreAttention`` bundles the three for a layer to pass around. This module checks the specs
against the inputs and turns them into the canonical form every backend receives
(``PreAttentionCall``: per side a ``NormCall``, and one shared ``RopeCall``), whose
tensors are views (never copies) built with differentiable PyTorch ops, so that autograd maps the
kernels' (H, D) weight gradients back onto a weight of shape (D,) or (H·D,).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor

NORM_KINDS = {"rms": 1, "layer": 2}
NORM_OVER = ("head", "heads")
ROPE_STYLES = {"interleaved": 1, "half": 2}


@dataclass(frozen=True, eq=False)
class QKNorm:
    """A q or k normalisation: y = (x − mean)·rsqrt(var + eps)·weight + bias.

    Args:
        kind: "rms" (mean taken as 0, var = mean(x²)) or "layer" (mean and biased variance).
        weight: None, or (D,) / (H, D) for over="head", (H·D,) / (H, D) for over="heads".
            Any floating dtype; it receives a gradient in its own dtype.
        bias: None, or shaped like weight.
        eps: added to the variance; None takes torch.finfo(q.dtype).eps (torch.nn.RMSNorm's
            default when built with eps=None).
        over: "head" (each head's D values) or "heads" (all H·D values of a token).
        tokens: (start, stop): only these tokens are normalised; None: all of them (every
            token of q for q_norm, of k for k_norm, whatever their lengths).
    """

    kind: str
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    eps: Optional[float] = 1e-6
    over: str = "head"
    tokens: Optional[tuple[int, int]] = None

    @classmethod
    def from_module(cls, module, over: str, tokens: Optional[tuple[int, int]] = None) -> "QKNorm":
        """The QKNorm a normalisation module computes: torch.nn.RMSNorm, torch.nn.LayerNorm and
        diffusers' RMSNorm, MochiRMSNorm and FP32LayerNorm."""
        name = type(module).__name__
        if name in ("RMSNorm", "MochiRMSNorm"):
            kind = "rms"
        elif isinstance(module, torch.nn.LayerNorm) or name == "FP32LayerNorm":
            kind = "layer"
        else:
            raise TypeError(f"QKNorm.from_module: {name} is not a normalisation linattn knows "
                            f"(torch.nn.RMSNorm, torch.nn.LayerNorm, diffusers' RMSNorm, "
                            f"MochiRMSNorm, FP32LayerNorm); build a QKNorm by hand")
        return cls(kind, weight=getattr(module, "weight", None), bias=getattr(module, "bias", None),
                   eps=module.eps, over=over, tokens=tokens)


@dataclass(frozen=True, eq=False)
class RoPE:
    """Rotary position embedding of q and k: x·cos + rot(x)·sin, in float32 (or better).

    Args:
        cos, sin: tables of one shape: (Nr, W), (Nr, H, W) or (B | 1, Nr, H | 1, W), with W = D
            (one angle per dim, as diffusers builds them) or W = D/2 (one per rotated pair, e.g.
            Wan's cos[..., 0::2] and sin[..., 1::2], or Mochi's per-head tables). Any strides.
        style: "interleaved" (rotates pairs (2i, 2i+1): rot(x) = (−x₁, x₀, −x₃, x₂, ...)) or
            "half" (pairs (i, i + D/2): rot(x) = (−x[D/2:], x[:D/2])).
        start: the tables' row r rotates token start + r; other tokens are not rotated.
    """

    cos: Tensor
    sin: Tensor
    style: str = "interleaved"
    start: int = 0


@dataclass(frozen=True, eq=False)
class PreAttention:
    """The pre-attention work of one attention call, bundled: what a DiT layer hands to
    linattn.linear_attention as ``**pre.kwargs()`` (linattn.dit's selectors return one)."""

    q_norm: Optional[QKNorm] = None
    k_norm: Optional[QKNorm] = None
    rope: Optional[RoPE] = None

    def kwargs(self) -> dict:
        return dict(q_norm=self.q_norm, k_norm=self.k_norm, rope=self.rope)


class NormCall(NamedTuple):
    """One side's normalisation as the kernels take it."""
    kind: int                 # NORM_KINDS value
    over_heads: bool
    eps: float
    start: int
    stop: Optional[int]       # None: through the side's last token (bounded() fills it in)
    weight: Optional[Tensor]  # (H, D) view (head stride 0 when shared by every head)
    bias: Optional[Tensor]    # (H, D) view


class RopeCall(NamedTuple):
    style: int                # ROPE_STYLES value
    cos: Tensor               # (B | 1, Nr, H | 1, W) view
    sin: Tensor
    start: int
    pairs: bool               # W = D/2: one angle per rotated pair (else one per dim)

    @property
    def length(self) -> int:
        return self.cos.shape[1]


class PreAttentionCall(NamedTuple):
    """Everything applied to q and k before φ, checked and in canonical form; None parts are
    identities. A backend receives this (or None when there is nothing to apply)."""
    q_norm: Optional[NormCall]
    k_norm: Optional[NormCall]
    rope: Optional[RopeCall]

    @property
    def norm_over_heads(self) -> tuple[bool, bool]:
        """(q, k): whether that side needs the per-token statistics of a norm over all heads."""
        return tuple(n is not None and n.over_heads for n in (self.q_norm, self.k_norm))

    def tensors(self) -> tuple[Optional[Tensor], ...]:
        """(q weight, q bias, k weight, k bias, cos, sin), None where absent."""
        q, k, r = self.q_norm, self.k_norm, self.rope
        return (q and q.weight, q and q.bias, k and k.weight, k and k.bias,
                r and r.cos, r and r.sin)

    def bounded(self, q_len: int, kv_len: int) -> "PreAttentionCall":
        """With every norm's stop an int: a norm over all tokens (stop None, which keeps the
        sequence length out of code() and so out of a traced graph's constants) ends at its
        side's length. What the backends receive (linattn/ops/execute.py)."""
        q, k = self.q_norm, self.k_norm
        q_open = q is not None and q.stop is None
        k_open = k is not None and k.stop is None
        if not (q_open or k_open):
            return self
        return self._replace(q_norm=q._replace(stop=q_len) if q_open else q,
                             k_norm=k._replace(stop=kv_len) if k_open else k)

    def code(self) -> str:
        """Everything but the tensors, as one string (a custom op's plain argument)."""
        def norm(n: Optional[NormCall]) -> str:
            if n is None:
                return "-"
            stop = "" if n.stop is None else n.stop
            return f"{n.kind},{int(n.over_heads)},{n.eps!r},{n.start},{stop}"
        rope = "-" if self.rope is None else f"{self.rope.style},{self.rope.start}"
        return f"{norm(self.q_norm)};{norm(self.k_norm)};{rope}"

    @staticmethod
    def decode(code: str, head_dim: int, q_weight: Optional[Tensor], q_bias: Optional[Tensor],
               k_weight: Optional[Tensor], k_bias: Optional[Tensor], cos: Optional[Tensor],
               sin: Optional[Tensor]) -> Optional["PreAttentionCall"]:
        """The inverse of (code(), tensors()); None for code() of an empty PreAttentionCall."""
        if code == NO_PRE_ATTENTION:
            return None
        q_code, k_code, rope_code = code.split(";")

        def norm(text: str, weight, bias) -> Optional[NormCall]:
            if text == "-":
                return None
            kind, over, eps, start, stop = text.split(",")
            return NormCall(int(kind), over == "1", float(eps), int(start),
                            int(stop) if stop else None, weight, bias)

        rope = None
        if rope_code != "-":
            style, start = rope_code.split(",")
            rope = RopeCall(int(style), cos, sin, int(start), 2 * cos.shape[-1] == head_dim)
        return PreAttentionCall(norm(q_code, q_weight, q_bias), norm(k_code, k_weight, k_bias),
                                rope)


NO_PRE_ATTENTION = "-;-;-"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_param(argument: str, t, allowed: dict[str, tuple[int, ...]], device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{argument}: expected a tensor or None, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{argument}: expected a floating-point tensor, got {_dtype_name(t.dtype)}")
    if tuple(t.shape) not in allowed.values():
        options = " or ".join(f"{name} = {shape}" for name, shape in allowed.items())
        raise ValueError(f"{argument}: expected shape {options}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{argument}: must be on {device} like q, k, v, got {t.device}")


def _as_heads(t: Optional[Tensor], heads: int, head_dim: int) -> Optional[Tensor]:
    """A (D,), (H·D,) or (H, D) parameter as an (H, D) view (differentiable, never a copy)."""
    if t is None:
        return None
    if t.dim() == 2:
        return t
    if t.shape[0] == head_dim and heads * head_dim != head_dim:
        return t.expand(heads, head_dim)
    if heads == 1:
        return t.unsqueeze(0)
    return t.unflatten(0, (heads, head_dim))


def _token_range(argument: str, tokens, seq_len: int) -> tuple[int, Optional[int]]:
    """(start, stop) of the normalised tokens; stop None for all of them (PreAttentionCall.
    bounded)."""
    if tokens is None:
        return 0, None
    if (not isinstance(tokens, (tuple, list)) or len(tokens) != 2
            or any(isinstance(t, bool) or not isinstance(t, int) for t in tokens)):
        raise TypeError(f"{argument}.tokens: expected None or (start, stop) ints, got {tokens!r}")
    start, stop = tokens
    side = argument.split("_")[0]
    if not 0 <= start <= stop <= seq_len:
        raise ValueError(f"{argument}.tokens: need 0 <= start <= stop <= {seq_len} (the sequence "
                         f"length of {side}), got {(start, stop)}")
    return start, stop


def _resolve_norm(argument: str, norm, heads: int, head_dim: int, seq_len: int,
                  dtype: torch.dtype, device) -> Optional[NormCall]:
    if norm is None:
        return None
    if not isinstance(norm, QKNorm):
        raise TypeError(f"{argument}: expected a linattn.QKNorm or None, got {type(norm).__name__}")
    if norm.kind not in NORM_KINDS:
        raise ValueError(f"{argument}.kind: expected one of {sorted(NORM_KINDS)}, "
                         f"got {norm.kind!r}")
    if norm.over not in NORM_OVER:
        raise ValueError(f"{argument}.over: expected 'head' (each head's D values) or 'heads' (all "
                         f"H·D values of a token), got {norm.over!r}")
    eps = torch.finfo(dtype).eps if norm.eps is None else norm.eps
    # A chained comparison rather than math.isfinite, which dynamo (torch 2.11) cannot trace on
    # the float torch.finfo returns; NaN and inf fail it as they should.
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"{argument}.eps: expected a finite number > 0 (or None), "
                         f"got {norm.eps!r}")
    if norm.over == "heads":
        shapes = {"(H·D,)": (heads * head_dim,), "(H, D)": (heads, head_dim)}
    else:
        shapes = {"(D,)": (head_dim,), "(H, D)": (heads, head_dim)}
    for name in ("weight", "bias"):
        t = getattr(norm, name)
        if t is not None:
            _check_param(f"{argument}.{name}", t, shapes, device)
    start, stop = _token_range(argument, norm.tokens, seq_len)
    return NormCall(NORM_KINDS[norm.kind], norm.over == "heads", float(eps), start, stop,
                    _as_heads(norm.weight, heads, head_dim), _as_heads(norm.bias, heads, head_dim))


def _resolve_rope(rope, batch: int, heads: int, head_dim: int, seq_lens: tuple[int, ...],
                  device) -> Optional[RopeCall]:
    if rope is None:
        return None
    if not isinstance(rope, RoPE):
        raise TypeError(f"rope: expected a linattn.RoPE or None, got {type(rope).__name__}")
    if rope.style not in ROPE_STYLES:
        raise ValueError(f"rope.style: expected one of {sorted(ROPE_STYLES)}, got {rope.style!r}")
    if head_dim % 2:
        raise ValueError(f"rope: rotary embeddings rotate pairs of dims, but the head dim is "
                         f"{head_dim} (odd)")
    for name in ("cos", "sin"):
        t = getattr(rope, name)
        if not isinstance(t, Tensor):
            raise TypeError(f"rope.{name}: expected a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"rope.{name}: expected a floating-point table, got "
                            f"{_dtype_name(t.dtype)}")
        if t.device != device:
            raise ValueError(f"rope.{name}: must be on {device} like q, k, v, got {t.device}")
        if t.requires_grad:
            raise ValueError(f"rope.{name}: the table requires grad, but the fused kernels give "
                             f"no gradient to RoPE tables (detach it, or apply the RoPE yourself)")
    if rope.cos.shape != rope.sin.shape:
        raise ValueError(f"rope: cos and sin must have one shape, got {tuple(rope.cos.shape)} and "
                         f"{tuple(rope.sin.shape)}")
    shape = tuple(rope.cos.shape)
    if len(shape) not in (2, 3, 4):
        raise ValueError(f"rope.cos: expected (Nr, W), (Nr, H, W) or (B, Nr, H, W) tables, got "
                         f"shape {shape}")
    width = shape[-1]
    if width not in (head_dim, head_dim // 2):
        raise ValueError(f"rope.cos: the last dim must be the head dim {head_dim} (one angle per "
                         f"dim) or {head_dim // 2} (one per pair), got {width}")
    table_heads = shape[-2] if len(shape) >= 3 else 1
    table_batch = shape[0] if len(shape) == 4 else 1
    if table_heads not in (1, heads):
        raise ValueError(f"rope.cos: the heads dim of the tables must be 1 or H = {heads}, got "
                         f"{table_heads} (shape {shape})")
    if table_batch not in (1, batch):
        raise ValueError(f"rope.cos: the batch dim of the tables must be 1 or B = {batch}, got "
                         f"{table_batch} (shape {shape})")
    length = shape[-3] if len(shape) >= 3 else shape[0]
    start = rope.start
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise ValueError(f"rope.start: expected an int >= 0, got {start!r}")
    if start + length > min(seq_lens):
        raise ValueError(f"rope: the tables rotate tokens [{start}, {start + length}), past the "
                         f"{min(seq_lens)} tokens of q and k")

    def canonical(t: Tensor) -> Tensor:
        if t.dim() == 2:
            return t[None, :, None, :]
        if t.dim() == 3:
            return t[None]
        return t
    return RopeCall(ROPE_STYLES[rope.style], canonical(rope.cos), canonical(rope.sin), start,
                    2 * width == head_dim)


def resolve(q_norm, k_norm, rope, *, batch: int, heads: int, head_dim: int, q_len: int,
            kv_len: int, dtype: torch.dtype, device) -> Optional[PreAttentionCall]:
    """Check the pre-attention arguments of one call ((B, N, H, D) sizes of q and k) and return
    their canonical form, or None when all three are None."""
    if q_norm is None and k_norm is None and rope is None:
        return None
    return PreAttentionCall(
        _resolve_norm("q_norm", q_norm, heads, head_dim, q_len, dtype, device),
        _resolve_norm("k_norm", k_norm, heads, head_dim, kv_len, dtype, device),
        _resolve_rope(rope, batch, heads, head_dim, (q_len, kv_len), device))
