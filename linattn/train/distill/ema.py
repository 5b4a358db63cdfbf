"""An exponential moving average (EMA) of the generator's weights, the model DMD ships.

With batch 4–8 and Adam β₁ = 0 (the published DMD recipes), the generator's weights move by a
full, unsmoothed step each update, and its samples swing between updates: on the toy teacher,
evaluations 50 steps apart differed by a factor 2 in Fréchet distance (../../../docs/distill.md).
Self-Forcing's Wan DMD configs therefore keep an EMA of the generator (ema_weight 0.99, started
at step 200) and sample from it. Here:

* until ``start_step`` updates are done the average is the live weights (copied each update),
  so a run that starts averaging late does not average its first, far-off weights;
* after that, ``ema ← decay · ema + (1 − decay) · weights`` after every generator update, in
  float32, over the trainable parameters (frozen ones never change);
* the average is part of each checkpoint (resume stays bit-exact), is evaluated beside the live
  weights, and is what the stage saves as its final model (the live weights go to final_raw/).

Under FSDP2 the parameters are DTensor shards and so is the average: every operation here is
shard-local, and the checkpoint writes it with the rest of the sharded state.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class GeneratorEMA:
    """The EMA of ``named_parameters`` (name, parameter) pairs, updated in place."""

    def __init__(self, named_parameters: list[tuple[str, nn.Parameter]], decay: float,
                 start_step: int):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"distill.ema_decay: expected a number in (0, 1), got {decay!r}")
        if start_step < 0:
            raise ValueError(f"distill.ema_start_step: must be >= 0, got {start_step}")
        self.decay, self.start_step = float(decay), int(start_step)
        self.params = {name: p for name, p in named_parameters}
        with torch.no_grad():
            self.shadow = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self, updates_done: int) -> None:
        """Fold in the weights after generator update number ``updates_done`` (1-based)."""
        for name, p in self.params.items():
            if updates_done <= self.start_step:
                self.shadow[name].copy_(p.detach())
            else:
                self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    def averaging(self, updates_done: int) -> bool:
        """Whether the average differs from the live weights after ``updates_done`` updates."""
        return updates_done > self.start_step

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The average's tensors by parameter name; a checkpoint saves and loads them in place."""
        return self.shadow

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the live weights with the average (at the end of training)."""
        for name, p in self.params.items():
            p.copy_(self.shadow[name])

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the model's parameters for the block's duration, then the live
        weights back, bit for bit."""
        with torch.no_grad():
            live = {name: p.detach().clone() for name, p in self.params.items()}
            self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(live[name])
