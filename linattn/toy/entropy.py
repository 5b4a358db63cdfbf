"""How peaked a model's self-attention is: the entropy of its softmax attention rows.

For every self-attention layer, every call, head and query, H = −Σ_j p_j log p_j over the keys;
reported per layer as the mean H divided by log N (N keys): 1 is uniform attention (a layer that
linear attention reproduces for free), lower is attention that picks tokens out. Measured on the
inputs the model meets when it samples (its own trajectories), through probes that compute q and
k exactly as the stock processor does (linattn.dit's Wan selector) and leave the output alone.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from ..dit.selectors import resolve_selector


class _EntropyProbe:
    """A processor that records attention-row entropies, then runs the layer's own processor."""

    def __init__(self, original, selector, sums: list, index: int):
        self.original = original
        self.selector = selector
        self.sums = sums
        self.index = index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 rotary_emb=None, **kwargs):
        p = self.selector.project(attn, hidden_states, None, attention_mask, rotary_emb)
        q, k = p.q.float(), p.k.float()                      # (B, N, H, D)
        scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
        logp = torch.log_softmax(scores, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)               # (B, H, N)
        total, count = self.sums[self.index]
        self.sums[self.index] = (total + float(entropy.sum()) / math.log(k.shape[1]),
                                 count + entropy.numel())
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask,
                             rotary_emb, **kwargs)


@contextlib.contextmanager
def entropy_probes(model: nn.Module) -> Iterator[list]:
    """Within the block, every self-attention layer of ``model`` (unconverted) records its
    normalised attention entropy; the yielded list holds, after the block, one value per layer
    (mean H / log N; NaN for a layer never called)."""
    selector = resolve_selector(model, None)
    layers = selector.layers(model)
    sums = [(0.0, 0) for _ in layers]
    result: list = []
    originals = []
    try:
        for i, (_, attn) in enumerate(layers):
            originals.append(attn.processor)
            attn.set_processor(_EntropyProbe(attn.processor, selector, sums, i))
        yield result
    finally:
        for (_, attn), original in zip(layers, originals):
            attn.set_processor(original)
        result.extend(total / count if count else float("nan") for total, count in sums)

