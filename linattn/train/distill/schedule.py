"""Every random choice of a distillation step, as a function of the step number.

Data-free distillation has no data order to restore, but every update draws: the conditioning
rows, the generator's starting noise and the fresh noise it is re-noised with between steps,
the exit step of backward simulation, and the times and noise at which the scores are compared.
Each draw here is a pure function of (seed, step, update, purpose, global sample index), so

* a checkpoint's step is all a resumed run needs to continue on the same draws (bit-exact);
* a sample's draws do not depend on how the global batch is split over processes or
  micro-batches, so one process and several compute the same update (up to the order in
  which gradients are summed);
* the exit step is the same on every process (FSDP2 needs every process to run the same
  number of forwards).

Update u of a step is a fake-score update for u < fake_score_updates and the generator update
for u = fake_score_updates.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

# Purposes (the fourth entry of a draw's seed sequence).
EXIT_STEP = 0
SCORE_TIME = 1
SCORE_NOISE = 2
REGRESSION_PAIR = 3    # which teacher pair a sample's regression term uses
REGRESSION_NOISE = 4   # the fresh noise a pair's sample is carried to t_k with
GAN_REAL_PAIR = 5      # which teacher sample a discriminator update's real row is
GAN_REAL_TIME = 6      # the time it is noised to
GAN_REAL_NOISE = 7     # and the noise
GAN_FAKE_TIME = 8      # the time a generator sample is noised to for the GAN head
GAN_FAKE_NOISE = 9     # and the noise
GENERATOR_NOISE = 16   # + k: the noise the generator's step k starts from (k = 0: pure noise)
REGRESSION_STEP_NOISE = 48   # + k: step k's fresh noise in a "generated" regression input


def _generator(*entries: int) -> torch.Generator:
    state = np.random.SeedSequence([int(e) for e in entries]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class StepDraws:
    """The draws of update ``update`` of optimiser step ``step`` (module docstring)."""

    def __init__(self, seed: int, step: int, update: int, device: torch.device):
        self.seed, self.step, self.update, self.device = seed, step, update, device

    def exit_step(self, num_steps: int) -> int:
        """The generator step whose output this update trains on, uniform in [0, num_steps):
        steps before it run without gradient from the generator's own samples (backward
        simulation). The same on every process."""
        gen = _generator(self.seed, self.step, self.update, EXIT_STEP)
        return int(torch.randint(num_steps, (1,), generator=gen))

    def normal(self, purpose: int, indices: Sequence[int], shape) -> Tensor:
        """(len(indices), *shape) float32 standard normal; row i from global sample
        indices[i]."""
        rows = [torch.randn(tuple(shape), generator=_generator(self.seed, self.step, self.update,
                                                               purpose, i))
                for i in indices]
        return torch.stack(rows).to(self.device)

    def integers(self, purpose: int, indices: Sequence[int], high: int) -> list[int]:
        """One integer uniform in [0, high) per global sample index in ``indices``."""
        return [int(torch.randint(high, (1,), generator=_generator(
            self.seed, self.step, self.update, purpose, i))) for i in indices]

    def uniform(self, purpose: int, indices: Sequence[int]) -> Tensor:
        """(len(indices),) float32 uniform in [0, 1); entry i from global sample indices[i]."""
        values = [torch.rand((), generator=_generator(self.seed, self.step, self.update,
                                                       purpose, i)) for i in indices]
        return torch.stack(values).to(self.device)


class ConditioningOrder:
    """Which conditioning rows (of P) each update trains on: a stream of independent
    permutations of the P rows (epoch e drawn from (seed, e)), read G = global_batch_size at
    a time, update after update; rank r of W takes the r-th of W equal slices. Every row is
    seen equally often, whether P is smaller or larger than G."""

    def __init__(self, num_rows: int, global_batch_size: int, updates_per_step: int, seed: int):
        if num_rows < 1:
            raise ValueError(f"conditioning: expected at least one row, got {num_rows}")
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.updates_per_step = updates_per_step
        self.seed = seed
        self._perms: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.num_rows, generator=gen)
        return self._perms[epoch]

    def global_rows(self, step: int, update: int) -> list[int]:
        start = (step * self.updates_per_step + update) * self.global_batch_size
        return [int(self._perm(p // self.num_rows)[p % self.num_rows])
                for p in range(start, start + self.global_batch_size)]

    def position(self, step: int) -> dict:
        """Where the stream stands before ``step`` (recorded in checkpoints, for a reader)."""
        start = step * self.updates_per_step * self.global_batch_size
        return {"epoch": start // self.num_rows, "row_in_epoch": start % self.num_rows}
