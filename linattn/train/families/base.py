"""What differs between the diffusers video DiTs when training calls them: the model call.

The trainer works in one convention (linattn.train.flow): latents (B, C, F, H, W), the flow time
t in [0, 1] (1 = noise, x_t = (1 − t) x_0 + t ε) and the velocity u = ε − x_0. A ``ModelCall``
turns that into one family's forward call (its input layout, its timestep, its conditioning
inputs) and turns the model's output back into u. One module per family; ``families.model_call``
picks it by the model's class.

Conditioning: a plain (B, L, D) tensor of text embeddings (Wan, which takes nothing else), or a
``Prompts`` batch that also carries the attention mask of the text tokens and pooled embeddings
for the families whose model takes them. ``cat_conditioning`` and ``expand_conditioning`` work on
both.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Prompts:
    """A batch of text conditioning.

    embeds: (B, L, D) text embeddings; mask: (B, L) int64, 1 for a real token and 0 for padding
    (HunyuanVideo, LTX-Video, Mochi); pooled: (B, Dp) pooled embeddings (HunyuanVideo's CLIP).
    """

    embeds: Tensor
    mask: Optional[Tensor] = None
    pooled: Optional[Tensor] = None

    def __post_init__(self):
        batch, length = self.embeds.shape[:2]
        if self.mask is not None and tuple(self.mask.shape) != (batch, length):
            raise ValueError(f"prompt_attention_mask: expected ({batch}, {length}) like the "
                             f"embeddings, got {tuple(self.mask.shape)}")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != batch):
            raise ValueError(f"pooled_prompt_embeds: expected ({batch}, Dp), got "
                             f"{tuple(self.pooled.shape)}")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def to(self, *args, **kwargs) -> "Prompts":
        """Like Tensor.to for the embeddings; the mask moves to their device, keeping its
        dtype."""
        embeds = self.embeds.to(*args, **kwargs)
        mask = None if self.mask is None else self.mask.to(embeds.device)
        pooled = None if self.pooled is None else self.pooled.to(*args, **kwargs)
        return Prompts(embeds, mask, pooled)

    def index(self, rows) -> "Prompts":
        return Prompts(self.embeds[rows], None if self.mask is None else self.mask[rows],
                       None if self.pooled is None else self.pooled[rows])


Conditioning = Union[Tensor, Prompts]


def cat_conditioning(a: Conditioning, b: Conditioning) -> Conditioning:
    """The two batches one after the other (the conditional and unconditional halves of a
    guided forward)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torch.cat([a, b])
    if not (isinstance(a, Prompts) and isinstance(b, Prompts)):
        raise TypeError(f"conditioning: cannot join a {type(a).__name__} and a "
                        f"{type(b).__name__}")

    def join(x, y, what):
        if (x is None) != (y is None):
            raise ValueError(f"conditioning: one batch has a {what} and the other not")
        return None if x is None else torch.cat([x, y])

    return Prompts(torch.cat([a.embeds, b.embeds]), join(a.mask, b.mask, "mask"),
                   join(a.pooled, b.pooled, "pooled embedding"))


def conditioning_batch(c: Conditioning) -> int:
    return c.shape[0] if isinstance(c, Tensor) else len(c)


def expand_conditioning(c: Conditioning, batch: int) -> Conditioning:
    """A batch of one row repeated `batch` times (a single negative prompt for every sample)."""
    if conditioning_batch(c) == batch:
        return c
    if isinstance(c, Tensor):
        return c.expand(batch, *c.shape[1:])
    return Prompts(c.embeds.expand(batch, *c.embeds.shape[1:]),
                   None if c.mask is None else c.mask.expand(batch, -1),
                   None if c.pooled is None else c.pooled.expand(batch, -1))


class ModelCall(abc.ABC):
    """One family's forward call in the trainer's flow convention (module docstring).

    Subclasses set the class attributes and implement ``velocity``; ``OPTIONS`` are the keys
    of the config's model.call_options this family reads, with their defaults.
    """

    #: Name of the family (as linattn.dit's selectors name it).
    name: ClassVar[str] = ""
    #: diffusers class names this call serves.
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: Whether the model takes a text attention mask / pooled embeddings of this width
    #: (a model config key, or None).
    takes_mask: ClassVar[bool] = False
    pooled_dim_key: ClassVar[Optional[str]] = None
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Optional[dict] = None, pretrained: Optional[str] = None):
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise ValueError(f"model.call_options: {unknown} are not options of the "
                             f"{self.name!r} model call (its options: "
                             f"{sorted(self.OPTIONS) or 'none'})")
        self.options = {**self.OPTIONS, **options}
        self.pretrained = pretrained

    @abc.abstractmethod
    def velocity(self, module: nn.Module, x: Tensor, t: Tensor, cond: Conditioning,
                 dtype: torch.dtype, num_train_timesteps: int) -> Tensor:
        """u(x, t) of `module` (possibly a DDP/FSDP wrapper) for latents x (B, C, F, H, W) in
        float32, flow times t (B,) in float32; inputs go in as `dtype`."""
        raise NotImplementedError

    # -------------------------------------------------------------- helpers for subclasses

    @staticmethod
    def config_of(module: nn.Module):
        """The diffusers config of a model or of the model a DDP wrapper holds."""
        inner = getattr(module, "module", module)
        return inner.config

    def prompts(self, cond: Conditioning, dtype: torch.dtype) -> Prompts:
        """cond as Prompts in `dtype`, checked to carry what this family's model takes."""
        if isinstance(cond, Tensor):
            cond = Prompts(cond)
        if self.takes_mask and cond.mask is None:
            raise ValueError(f"{self.name}: the model takes a text attention mask; the "
                             f"conditioning has none (store prompt_attention_mask beside "
                             f"prompt_embeds)")
        if self.pooled_dim_key is not None and cond.pooled is None:
            raise ValueError(f"{self.name}: the model takes pooled text embeddings; the "
                             f"conditioning has none (store pooled_prompt_embeds)")
        return cond.to(dtype)

    def random_extras(self, model_config: dict, count: int, length: int,
                      generator: torch.Generator) -> dict[str, Tensor]:
        """Mask (random valid lengths, at least one token) and pooled embeddings (N(0, 1)) for
        random conditioning of a random-weight model: {key: (count, ...)} as stored."""
        extras = {}
        if self.takes_mask:
            lengths = torch.randint(1, length + 1, (count,), generator=generator)
            extras["prompt_attention_mask"] = (torch.arange(length)[None, :]
                                               < lengths[:, None]).to(torch.int64)
        if self.pooled_dim_key is not None:
            width = model_config.get(self.pooled_dim_key)
            if width is None:
                raise ValueError(f"{self.name}: model.config has no {self.pooled_dim_key!r} "
                                 f"to size random pooled embeddings")
            extras["pooled_prompt_embeds"] = torch.randn(count, int(width), generator=generator)
        return extras


__all__ = ["Prompts", "Conditioning", "ModelCall", "cat_conditioning", "expand_conditioning",
           "conditioning_batch"]
