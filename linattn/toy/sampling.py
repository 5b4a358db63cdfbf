"""Sampling the toy teacher (or any converted copy of it) from seeds, with guidance.

Noise is a function of (seed, sample index) alone (linattn.train.teacher_data.sampling_noise),
so two models asked for the same seed and labels start from the same noise: that is what
teacher-relative metrics compare. It is drawn from the sampling stream, never the teacher-data
stream: no scored sample starts from a trajectory a model trained on. Labels default to a
balanced cycle 0, 1, ..., 7, 0, ...
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..train.flow import FlowModel, euler_sample, flow_sigmas
from ..train.teacher_data import sampling_noise
from .teacher import SAMPLER, Sampler, embed_labels, null_embedding
from .videos import NUM_CLASSES, VIDEO_SHAPE


def balanced_labels(num: int) -> Tensor:
    """(num,) int64: 0, 1, ..., NUM_CLASSES − 1, 0, 1, ... (every class equally often)."""
    return torch.arange(num, dtype=torch.int64) % NUM_CLASSES


def sample_noise(num: int, seed: int) -> Tensor:
    """(num, 1, 16, 32, 32) float32 starting noise; sample i depends on (seed, i) only."""
    return torch.stack([sampling_noise(seed, i, VIDEO_SHAPE) for i in range(num)])


@torch.no_grad()
def sample(model: nn.Module, labels: Union[Tensor, Sequence[int], None] = None, *,
           seed: int = 0, num: Optional[int] = None, noise: Optional[Tensor] = None,
           sampler: Sampler = SAMPLER, batch_size: int = 16, progress: bool = False) -> Tensor:
    """Guided samples (N, 1, 16, 32, 32) float32 of a flow transformer on the toy classes.

    labels: class per sample (default balanced_labels(num)); noise: the starting noise
    (default sample_noise(N, seed)). Euler over sampler.num_steps shifted sigmas; with
    sampler.guidance_scale > 1 every step runs both branches (class and null embedding).
    """
    if labels is None:
        if num is None:
            num = noise.shape[0] if noise is not None else NUM_CLASSES
        labels = balanced_labels(num)
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if noise is None:
        noise = sample_noise(labels.numel(), seed)
    if noise.shape != (labels.numel(), *VIDEO_SHAPE):
        raise ValueError(f"noise: expected shape {(labels.numel(), *VIDEO_SHAPE)}, got "
                         f"{tuple(noise.shape)}")
    device = next(model.parameters()).device
    flow = model if isinstance(model, FlowModel) else FlowModel(model, input_dtype=torch.float32)
    sigmas = flow_sigmas(sampler.num_steps, sampler.shift)
    out = []
    chunks = range(0, labels.numel(), batch_size)
    for start in tqdm(chunks, desc="sampling", unit="batch", disable=not progress):
        lab = labels[start:start + batch_size]
        x = noise[start:start + batch_size].to(device, torch.float32)
        cond = embed_labels(lab).to(device)
        negative = null_embedding(lab.numel()).to(device)
        out.append(euler_sample(flow, x, cond, sigmas, negative_cond=negative,
                                guidance_scale=sampler.guidance_scale).cpu())
    return torch.cat(out)
