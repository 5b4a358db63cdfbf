"""Sample grids: videos as rows of frames in one PNG (small enough to commit)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor


def grid_image(rows: Sequence[Tensor], frames: Optional[Sequence[int]] = None,
               scale: int = 2) -> np.ndarray:
    """uint8 (H, W) image: one row per video (each (1, F, h, w), values in [−1, 1]), the chosen
    frames side by side with a 1-pixel grey border."""
    lines = []
    for video in rows:
        v = video.detach().float().reshape(-1, *video.shape[-2:])
        picked = v if frames is None else v[list(frames)]
        tiles = [np.pad(((f.clamp(-1, 1).numpy() + 1) * 127.5), 1, constant_values=128)
                 for f in picked]
        lines.append(np.concatenate(tiles, axis=1))
    img = np.concatenate(lines, axis=0).astype(np.uint8)
    return np.kron(img, np.ones((scale, scale), dtype=np.uint8))


def save_grid(videos: Union[Tensor, Sequence[Tensor]], path: Union[str, os.PathLike],
              frames: Optional[Sequence[int]] = None, scale: int = 2) -> None:
    """Write videos (N, 1, F, h, w) as a PNG, one video per row."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid_image(list(videos), frames, scale)).save(path, optimize=True)
