"""Reading teacher trajectory points, and the deterministic order they are trained on.

The order is a pure function of (seed, optimiser step): epoch e is a permutation of all points
drawn from a generator seeded with (seed, e); step s takes the global batch
[b·G, (b+1)·G) of epoch s // batches_per_epoch (b = s mod batches_per_epoch, the incomplete tail
of an epoch is dropped) and rank r of W takes the r-th of W equal slices of it. A resumed run
therefore needs only its step to continue on exactly the same data, on any number of processes
that divides the global batch.
"""
from __future__ import annotations

import bisect
import os
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from .conditioning import EXTRA_KEYS, NEGATIVE_KEY, PROMPT_KEY, prompts_batch
from .teacher_data import CONDITIONING, DataSpec, missing_shards, read_manifest, shard_name


class TeacherDataset:
    """Random access to the stored points of a complete teacher-data folder."""

    def __init__(self, data_dir: str):
        manifest = read_manifest(data_dir)
        if manifest is None:
            raise FileNotFoundError(f"data.dir: {data_dir!r} has no teacher data (no "
                                    f"manifest.json); generate it first")
        spec_dict = dict(manifest["spec"])
        spec_dict["latent_shape"] = tuple(spec_dict["latent_shape"])
        self.spec = DataSpec(**spec_dict)
        missing = missing_shards(data_dir, self.spec)
        if missing:
            raise FileNotFoundError(f"data.dir: {data_dir!r} lacks {len(missing)} of "
                                    f"{self.spec.num_shards} shards (first: "
                                    f"{shard_name(missing[0])}); rerun generation to finish")
        self.data_dir = data_dir
        self.sigmas = torch.tensor(manifest["sigmas"], dtype=torch.float32)
        self._files = [safe_open(os.path.join(data_dir, shard_name(k)), "pt")
                       for k in range(self.spec.num_shards)]
        counts = [f.get_slice("t").get_shape()[0] for f in self._files]
        self._starts = np.cumsum([0] + counts).tolist()
        self._cond = safe_open(os.path.join(data_dir, CONDITIONING), "pt")
        self._extras = None  # the text masks and pooled embeddings, read on first use
        if self.spec.guided and NEGATIVE_KEY not in self._cond.keys():
            raise ValueError(f"data.dir: {data_dir!r} was generated with guidance "
                             f"{self.spec.guidance_scale} but its {CONDITIONING} has no "
                             f"{NEGATIVE_KEY!r}")

    @property
    def guided(self) -> bool:
        """Whether the teacher sampled with classifier-free guidance (the batches then carry
        negative_cond and velocity_uncond)."""
        return self.spec.guided

    @property
    def guidance_scale(self) -> float:
        return self.spec.guidance_scale

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"point index {index} out of range [0, {len(self)})")
        shard = bisect.bisect_right(self._starts, index) - 1
        return shard, index - self._starts[shard]

    def batch(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """x_t, velocity (B, C, F, H, W) float32; t, t_next (B,) float32; cond (B, L, D);
        with guidance also velocity_uncond (B, C, F, H, W) and negative_cond (B, L, D)."""
        keys = ["x_t", "velocity", "t", "t_next", "cond_index"]
        if self.guided:
            keys.append("velocity_uncond")
        rows: dict[str, list[Tensor]] = {k: [] for k in keys}
        for index in indices:
            shard, row = self._locate(int(index))
            f = self._files[shard]
            for key in rows:
                rows[key].append(f.get_slice(key)[row:row + 1])
        out = {k: torch.cat(v) for k, v in rows.items()}
        for key in ("x_t", "velocity", "velocity_uncond"):
            if key in out:
                out[key] = out[key].float()
        out["cond"] = self._rows(PROMPT_KEY, out["cond_index"].tolist())
        if self.guided:
            out["negative_cond"] = self._rows(NEGATIVE_KEY, out["cond_index"].tolist())
        return out

    def _rows(self, key: str, rows: Sequence[int]):
        """Rows i mod P of a (P, L, D) conditioning tensor (P = 1: the same row for all); a
        families.Prompts batch when the conditioning has a text mask or pooled embeddings."""
        table = self._cond.get_slice(key)
        count = table.get_shape()[0]
        embeds = torch.cat([table[int(i) % count:int(i) % count + 1] for i in rows]).float()
        if self._extras is None:
            self._extras = {k: self._cond.get_tensor(k) for k in EXTRA_KEYS
                            if k in self._cond.keys()}
            self._extras = {k: t if t.dtype == torch.int64 else t.float()
                            for k, t in self._extras.items()}
        index = torch.tensor([int(i) % count for i in rows])
        return prompts_batch(embeds, self._extras, index,
                             negative=key == NEGATIVE_KEY)

    def samples(self, trajectories: Sequence[int]) -> Tensor:
        """The teacher's final samples of the given trajectories: (n, C, F, H, W) float32."""
        out = []
        for traj in trajectories:
            if not 0 <= traj < self.spec.num_trajectories:
                raise IndexError(f"trajectory {traj} out of range [0, "
                                 f"{self.spec.num_trajectories})")
            shard, row = divmod(traj, self.spec.trajectories_per_shard)
            out.append(self._files[shard].get_slice("sample")[row:row + 1].float())
        return torch.cat(out)

    def conditioning(self, trajectories: Sequence[int]) -> Tensor:
        """(n, L, D) float32 conditioning of trajectory numbers (row i mod P), including
        numbers past the generated ones (held-out evaluation noise)."""
        return self._rows(PROMPT_KEY, trajectories)

    def negative_conditioning(self, trajectories: Sequence[int]) -> Tensor:
        """(n, L, D) float32 negative conditioning of trajectory numbers (guided data only)."""
        if not self.guided:
            raise ValueError("negative_conditioning: this teacher data was sampled without "
                             "guidance (guidance_scale 1)")
        num_prompts = self._cond.get_slice(PROMPT_KEY).get_shape()[0]
        return self._rows(NEGATIVE_KEY, [i % num_prompts for i in trajectories])


class BatchSchedule:
    """Which points each rank trains on at each step (see the module docstring)."""

    def __init__(self, num_points: int, global_batch_size: int, world_size: int, seed: int):
        if global_batch_size % world_size:
            raise ValueError(f"train.global_batch_size: {global_batch_size} is not divisible "
                             f"by the {world_size} processes")
        if num_points < global_batch_size:
            raise ValueError(f"train.global_batch_size: {global_batch_size} exceeds the "
                             f"{num_points} stored teacher points; generate more trajectories")
        self.num_points = num_points
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.seed = seed
        self.batches_per_epoch = num_points // global_batch_size
        self._epoch, self._perm = -1, None

    def position(self, step: int) -> dict:
        """The data position of a step, as stored in checkpoints."""
        return {"epoch": step // self.batches_per_epoch,
                "batch_in_epoch": step % self.batches_per_epoch}

    def global_indices(self, step: int) -> list[int]:
        pos = self.position(step)
        if pos["epoch"] != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + pos["epoch"])
            self._perm = torch.randperm(self.num_points, generator=gen)
            self._epoch = pos["epoch"]
        start = pos["batch_in_epoch"] * self.global_batch_size
        return self._perm[start:start + self.global_batch_size].tolist()

    def rank_indices(self, step: int, rank: int) -> list[int]:
        per_rank = self.global_batch_size // self.world_size
        return self.global_indices(step)[rank * per_rank:(rank + 1) * per_rank]
