"""DMD2's GAN head: a discriminator on the fake score's features (../../../docs/distill.md).

DMD2 (Yin et al. 2024, §4.3) puts a small classifier on the fake score's intermediate features
and trains it, beside the fake score's flow-matching loss, to tell noised real samples from
noised generator samples; the generator gets the non-saturating GAN loss through the same
features. Distribution matching compares scores, which average over the whole distribution;
the classifier looks at each sample, and can see what a few-step generator leaves out of it
(on the toy teacher: single small objects fade and the class is misread).

This stage is data-free, so "real" means the teacher's own guided samples: the final samples
of a teacher-data folder (the first stage's data.dir or ``linattn generate-data``, the same
folders the regression anchor reads), each with its conditioning row, so the classifier is
conditional through the fake score's cross-attention.

    discriminator (fake-score update):  L_D = mean softplus(−D(real_t)) + mean softplus(D(fake_t))
    generator:                          L_G_gan = mean softplus(−D(G(z)_t))

D(·) is a per-token logit of the fake score's hidden states after block ``gan_block``
(``DiscriminatorHead``: LayerNorm, Linear, SiLU, Linear to one logit, its last layer zero at
the start so the term starts neutral), averaged in the loss over tokens: a patch
discriminator. The head is a submodule of the fake score (``attach``), so it is wrapped
(DDP, FSDP2), checkpointed and optimised with it.

How the features are read: a forward hook on the block keeps its output while a capture is
open, and a forward hook on the model itself applies the head after the model's forward. The
head never runs inside the block's call, so gradient checkpointing (which re-runs the block in
the backward) recomputes exactly what it computed the first time; and it runs inside the
model's call, where FSDP2 holds the root's parameters (the head's) unsharded.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HEAD_NAME = "gan_head"          # the head's attribute on the fake score model


class DiscriminatorHead(nn.Module):
    """Per-token real/fake logits from a block's hidden states (B, L, C) -> (B, L)."""

    def __init__(self, width: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or width
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, hidden)
        self.out = nn.Linear(hidden, 1)
        # Logit 0 everywhere at the start: the generator's GAN term starts as a constant
        # push-free loss and the discriminator's at log 4, whatever the features.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        h = F.silu(self.proj(self.norm(hidden_states)))
        return self.out(h).squeeze(-1)


def transformer_blocks(model: nn.Module) -> list:
    """The model's transformer blocks in order (diffusers video DiTs keep them in a
    ModuleList named ``blocks`` or ``transformer_blocks``)."""
    for name in ("blocks", "transformer_blocks"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return list(blocks)
    raise ValueError(f"distill.gan_weight: {type(model).__name__} has no 'blocks' or "
                     f"'transformer_blocks' list to read the discriminator's features from")


def hidden_width(model: nn.Module) -> int:
    """The width of the blocks' hidden states: heads × head dim in every supported family."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "attention_head_dim", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise ValueError(f"distill.gan_weight: cannot tell the hidden width of "
                         f"{type(model).__name__} (its config has no num_attention_heads and "
                         f"attention_head_dim)")
    return heads * head_dim


class FeatureDiscriminator:
    """The GAN head attached to a fake score model: ``capture()`` opens a window in which
    every forward of the model appends its logits (B, L) to the yielded list."""

    def __init__(self, model: nn.Module, block: Optional[int] = None, seed: int = 0):
        blocks = transformer_blocks(model)
        index = len(blocks) // 2 if block is None else block
        if not (isinstance(index, int) and -len(blocks) <= index < len(blocks)):
            raise ValueError(f"distill.gan_block: expected a block index in [0, {len(blocks)}) "
                             f"or null (the middle block), got {block!r}")
        if hasattr(model, HEAD_NAME):
            raise ValueError(f"{type(model).__name__} already has a {HEAD_NAME!r}")
        self.block_index = index % len(blocks)
        # Initialised from the seed, not the global random state: every process builds the
        # same head (FSDP2 shards each process's own copy) and a rerun builds it again.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = DiscriminatorHead(hidden_width(model))
        param = next(model.parameters())
        self.head.to(device=param.device)
        model.add_module(HEAD_NAME, self.head)
        self._features: list = []
        self._logits: Optional[list] = None
        blocks[self.block_index].register_forward_hook(self._keep_features)
        model.register_forward_hook(self._apply_head)

    def _keep_features(self, module, args, output):
        if self._logits is not None:
            self._features.append(output[0] if isinstance(output, tuple) else output)

    def _apply_head(self, module, args, output):
        if self._logits is not None:
            if len(self._features) != 1:
                raise RuntimeError(f"distill.gan_block: expected block {self.block_index} to "
                                   f"run once per forward, it ran {len(self._features)} times")
            self._logits.append(self.head(self._features.pop()))

    @contextmanager
    def capture(self):
        """Collect the logits of every forward of the model inside the block."""
        self._logits, self._features = [], []
        try:
            yield self._logits
        finally:
            self._logits, self._features = None, []


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """mean softplus(−D(real)) + mean softplus(D(fake)): the classifier's logistic loss."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def generator_gan_loss(fake_logits: Tensor) -> Tensor:
    """mean softplus(−D(G(z))): the non-saturating generator loss."""
    return F.softplus(-fake_logits.float()).mean()
