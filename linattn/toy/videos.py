"""Procedural videos for the toy teacher: squares and discs moving and bouncing, with a class.

A video is 16 frames of 32 × 32 pixels, one channel, values in [−1, 1] (background −1, objects
+1, edges anti-aliased so that sub-pixel motion is smooth). Its class is the direction the
objects start moving in (right, left, down, up) × how many there are (1 or 2): 8 classes. Every
object of a video moves along that axis at its own constant speed and bounces off the walls, so
to draw frame f a model must know where each object was in the other frames: attention has to
carry the motion, the object count and the shapes across the whole clip.

Everything is a function of (seed, index): video i of ``procedural_videos(n, seed)`` is the
same whatever n is, so a test, the teacher's training and the metrics can all call it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

NUM_FRAMES = 16
SIZE = 32
CHANNELS = 1
VIDEO_SHAPE = (CHANNELS, NUM_FRAMES, SIZE, SIZE)  # (C, F, H, W), what the teacher generates
DIRECTIONS = ("right", "left", "down", "up")
COUNTS = (1, 2)
NUM_CLASSES = len(DIRECTIONS) * len(COUNTS)
# (dy, dx) of each direction: rows grow downwards.
_UNIT = {"right": (0.0, 1.0), "left": (0.0, -1.0), "down": (1.0, 0.0), "up": (-1.0, 0.0)}
SPEED = (1.0, 2.0)          # pixels per frame, uniform per object
SQUARE_HALF = (3.0, 4.5)    # half side of a square
DISC_RADIUS = (3.0, 4.5)
FIRST_BOUNCE = 4            # no bounce before this frame, so the start direction is visible
BACKGROUND, FOREGROUND = -1.0, 1.0


def class_name(label: int) -> str:
    """'right, 1 object', 'up, 2 objects', ..."""
    direction, count = split_label(label)
    return f"{DIRECTIONS[direction]}, {COUNTS[count]} object{'s' if COUNTS[count] > 1 else ''}"


def split_label(label: int) -> tuple[int, int]:
    """(direction index, count index) of a class label (label = direction · 2 + count)."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label: expected an int in [0, {NUM_CLASSES}), got {label!r}")
    return divmod(int(label), len(COUNTS))


@dataclass
class Videos:
    videos: Tensor       # (N, 1, 16, 32, 32) float32 in [−1, 1]
    labels: Tensor       # (N,) int64 class labels
    centers: Tensor      # (N, 2, 16, 2) float32 (y, x) object centres per frame; NaN for absent
    #                      second objects of one-object videos


def procedural_videos(num: int, seed: int = 0, labels: Optional[Sequence[int]] = None, *,
                      start: int = 0) -> Videos:
    """``num`` videos, video i drawn from (seed, start + i) alone.

    labels: the class of each video (length num); None draws them uniformly from the same seed.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num: expected an int >= 1, got {num!r}")
    if labels is not None:
        labels = [int(x) for x in (labels.tolist() if isinstance(labels, Tensor) else labels)]
        if len(labels) != num:
            raise ValueError(f"labels: expected {num} labels, got {len(labels)}")
        for x in labels:
            split_label(x)
    videos = np.empty((num, *VIDEO_SHAPE), dtype=np.float32)
    centers = np.full((num, max(COUNTS), NUM_FRAMES, 2), np.nan, dtype=np.float32)
    out_labels = np.empty(num, dtype=np.int64)
    for i in range(num):
        rng = np.random.default_rng(np.random.SeedSequence([seed, start + i]))
        label = int(rng.integers(NUM_CLASSES)) if labels is None else labels[i]
        frames, paths = _one_video(rng, label)
        videos[i, 0] = frames
        centers[i, :len(paths)] = paths
        out_labels[i] = label
    return Videos(torch.from_numpy(videos), torch.from_numpy(out_labels),
                  torch.from_numpy(centers))


def _bounce(p: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Positions of a point moving freely, folded into [lo, hi] by reflection at the walls."""
    span = hi - lo
    q = np.mod(p - lo, 2 * span)
    return lo + np.where(q <= span, q, 2 * span - q)


def _one_video(rng: np.random.Generator, label: int) -> tuple[np.ndarray, np.ndarray]:
    direction, count = split_label(label)
    dy, dx = _UNIT[DIRECTIONS[direction]]
    along = 0 if dy != 0 else 1                  # the axis of motion: 0 = y, 1 = x
    sign = dy + dx                               # +1 towards growing index, −1 away
    n = COUNTS[count]
    shapes = rng.integers(2, size=n)             # 0 square, 1 disc
    sizes = np.where(shapes == 0, rng.uniform(*SQUARE_HALF, size=n), rng.uniform(*DISC_RADIUS, size=n))
    speeds = rng.uniform(*SPEED, size=n)
    # Across the motion: objects in separate lanes, so that two objects never overlap.
    lanes = _lanes(rng, sizes)
    t = np.arange(NUM_FRAMES, dtype=np.float64)
    paths = np.empty((n, NUM_FRAMES, 2))
    for j in range(n):
        lo, hi = sizes[j], SIZE - sizes[j]
        room = (hi - lo) - FIRST_BOUNCE * speeds[j]   # start far enough from the wall ahead
        offset = rng.uniform(0.0, max(room, 0.0))
        start = lo + offset if sign > 0 else hi - offset
        paths[j, :, along] = _bounce(start + sign * speeds[j] * t, lo, hi)
        paths[j, :, 1 - along] = lanes[j]
    return _render(paths, shapes, sizes), paths.astype(np.float32)


def _lanes(rng: np.random.Generator, sizes: np.ndarray) -> np.ndarray:
    """Centres across the motion axis: one object anywhere; two in disjoint halves."""
    if len(sizes) == 1:
        return np.array([rng.uniform(sizes[0], SIZE - sizes[0])])
    first_low = rng.integers(2) == 0
    a = rng.uniform(sizes[0], SIZE / 2 - sizes[0] - 0.5)
    b = rng.uniform(SIZE / 2 + sizes[1] + 0.5, SIZE - sizes[1])
    return np.array([a, b]) if first_low else np.array([SIZE - a, SIZE - b])


def _render(paths: np.ndarray, shapes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """(F, H, W) frames: coverage = clip(0.5 − signed distance, 0, 1) at pixel centres."""
    coords = np.arange(SIZE, dtype=np.float64) + 0.5
    y = coords[None, :, None]
    x = coords[None, None, :]
    coverage = np.zeros((NUM_FRAMES, SIZE, SIZE))
    for j in range(len(shapes)):
        cy = paths[j, :, 0][:, None, None]
        cx = paths[j, :, 1][:, None, None]
        if shapes[j] == 0:
            distance = np.maximum(np.abs(y - cy), np.abs(x - cx)) - sizes[j]
        else:
            distance = np.sqrt((y - cy) ** 2 + (x - cx) ** 2) - sizes[j]
        coverage = np.maximum(coverage, np.clip(0.5 - distance, 0.0, 1.0))
    return (BACKGROUND + (FOREGROUND - BACKGROUND) * coverage).astype(np.float32)
