"""The small video classifier behind the distribution-level metrics (fidelity.md §2).

A 3D convolutional network trained on the procedural videos to tell the 8 classes (direction of
motion × object count). Its penultimate layer (FEATURE_DIM numbers per video) is the feature
space of the Fréchet distance, the FVD analogue: FVD uses an I3D network trained on real videos
in the same way. Training adds a little Gaussian noise to the inputs so that the classifier reads
shapes and motion, not the exact pixel values a generator may miss by a few hundredths.

Shipped trained (weights/classifier.safetensors, ``load_classifier()``); reproduced by
``python -m linattn.toy.train classifier``.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .videos import NUM_CLASSES, VIDEO_SHAPE, procedural_videos

CLASSIFIER_FILE = Path(__file__).resolve().parent / "weights" / "classifier.safetensors"
FEATURE_DIM = 32
TRAIN_NOISE = 0.1  # std of the Gaussian noise added to training inputs


class VideoClassifier(nn.Module):
    """(B, 1, 16, 32, 32) videos in [−1, 1] -> (B, NUM_CLASSES) logits; features() gives the
    (B, FEATURE_DIM) penultimate activations."""

    def __init__(self):
        super().__init__()
        c = VIDEO_SHAPE[0]
        self.body = nn.Sequential(
            nn.Conv3d(c, 16, 3, stride=(1, 2, 2), padding=1), nn.GELU(),     # 16 x 16 x 16
            nn.Conv3d(16, 32, 3, stride=2, padding=1), nn.GELU(),            # 8 x 8 x 8
            nn.Conv3d(32, 64, 3, stride=2, padding=1), nn.GELU(),            # 4 x 4 x 4
        )
        self.project = nn.Linear(64, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, videos: Tensor) -> Tensor:
        if videos.ndim != 5 or tuple(videos.shape[1:]) != VIDEO_SHAPE:
            raise ValueError(f"videos: expected (B, {', '.join(map(str, VIDEO_SHAPE))}), got "
                             f"{tuple(videos.shape)}")
        h = self.body(videos.float()).mean(dim=(2, 3, 4))
        return F.gelu(self.project(h))

    def forward(self, videos: Tensor) -> Tensor:
        return self.head(self.features(videos))


def train_classifier(steps: int = 800, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                     data_seed: int = 2, progress: bool = True) -> tuple[VideoClassifier, dict]:
    """Train on the procedural stream (step s: videos s·B ... of data_seed); returns the model
    (eval mode) and a summary with its accuracy on 512 held-out videos."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VideoClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                    pct_start=0.1)
        losses = []
        for step in tqdm(range(steps), desc="toy classifier", unit="step", disable=not progress):
            data = procedural_videos(batch_size, data_seed, start=step * batch_size)
            x = data.videos + TRAIN_NOISE * torch.randn_like(data.videos)
            loss = F.cross_entropy(model(x), data.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    model.eval().requires_grad_(False)
    held_out = procedural_videos(512, data_seed + 1000)
    accuracy = classify_accuracy(model, held_out.videos, held_out.labels)
    curve = [(s + 1, round(sum(losses[max(0, s - 49):s + 1]) / len(losses[max(0, s - 49):s + 1]), 4))
             for s in range(49, steps, max(steps // 10, 1))]
    return model, {"steps": steps, "final_loss": curve[-1][1] if curve else losses[-1],
                   "loss_curve": curve, "held_out_accuracy": accuracy}


@torch.no_grad()
def classify_accuracy(model: VideoClassifier, videos: Tensor, labels: Tensor,
                      batch_size: int = 64) -> float:
    predictions = torch.cat([model(videos[i:i + batch_size]).argmax(-1)
                             for i in range(0, videos.shape[0], batch_size)])
    return float((predictions == labels).float().mean())


def save_classifier(model: VideoClassifier, path: Union[str, os.PathLike]) -> None:
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


def load_classifier(path: Union[str, os.PathLike, None] = None) -> VideoClassifier:
    """The trained classifier (eval mode, frozen); default the copy shipped with linattn, one
    shared instance (it never changes, and the metrics cache the real videos' features per
    classifier)."""
    if path is None:
        return _shipped_classifier()
    return _load(Path(path))


@functools.lru_cache(maxsize=1)
def _shipped_classifier() -> VideoClassifier:
    return _load(CLASSIFIER_FILE)


def _load(file: Path) -> VideoClassifier:
    from safetensors.torch import load_file

    if not file.is_file():
        raise FileNotFoundError(f"load_classifier: no {file} (rebuild it with "
                                f"`python -m linattn.toy.train classifier --export`)")
    model = VideoClassifier()
    model.load_state_dict(load_file(str(file)), strict=True)
    return model.eval().requires_grad_(False)
