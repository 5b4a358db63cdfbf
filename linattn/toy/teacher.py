"""The toy teacher: a small diffusers WanTransformer3DModel trained on the procedural videos.

What it is, all in one place: the architecture (TEACHER_CONFIG), the class conditioning (a fixed
table of class embeddings fed through Wan's text-embedding path, with a null row for the
unconditional branch of classifier-free guidance), the sampler it was made for (SAMPLER: Euler on
linattn.train.flow's rectified-flow convention, a shifted schedule, guidance on both branches),
and loading the weights shipped in linattn/toy/weights/ (offline, no hub):

    teacher = linattn.toy.load_teacher()                  # frozen, eval mode, float32, CPU
    videos = linattn.toy.sample(teacher, labels=[0, 5], seed=0)   # (2, 1, 16, 32, 32)

The class embeddings are data, not weights: rows of N(0, 1) drawn from a fixed seed, never
trained, so the conditioning of any run (teacher data for LinVideo, the metrics) is the same
tensor. ``class_conditioning()`` gives it as a linattn.train.Conditioning, and
``CLASS_EMBEDDINGS_FILE`` is the same tensors as a safetensors file that a training config
takes as ``data.embeddings``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .videos import NUM_CLASSES, VIDEO_SHAPE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEACHER_DIR = WEIGHTS_DIR / "teacher"                 # config.json + diffusion_pytorch_model.safetensors
CLASS_EMBEDDINGS_FILE = WEIGHTS_DIR / "class_embeddings.safetensors"
PROVENANCE_FILE = WEIGHTS_DIR / "provenance.json"

# 16 x 32 x 32 videos, patch (2, 4, 4): 8 x 8 x 8 = 512 tokens; hidden 64 = 2 heads x 32;
# 8 blocks, so 8 self-attention layers for selective transfer to choose from.
TEACHER_CONFIG = {
    "patch_size": [2, 4, 4],
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "in_channels": VIDEO_SHAPE[0],
    "out_channels": VIDEO_SHAPE[0],
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 256,
    "num_layers": 8,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 32,
}
TEXT_TOKENS = 4          # tokens per class embedding (the "prompt" length)
EMBEDDING_SEED = 20261202
NULL_CLASS = NUM_CLASSES  # row of the null ("empty prompt") embedding in class_embedding_table()


@dataclass(frozen=True)
class Sampler:
    """How the teacher samples: Euler over FlowMatchEulerDiscreteScheduler(shift) sigmas, with
    classifier-free guidance u_null + scale · (u_class − u_null)."""

    num_steps: int = 20
    shift: float = 3.0
    guidance_scale: float = 3.0


SAMPLER = Sampler()


def class_embedding_table() -> Tensor:
    """(NUM_CLASSES + 1, TEXT_TOKENS, text_dim) float32: one row per class, then the null row
    (all zeros, the unconditional branch). Fixed: drawn from EMBEDDING_SEED, never trained."""
    gen = torch.Generator().manual_seed(EMBEDDING_SEED)
    rows = torch.randn(NUM_CLASSES, TEXT_TOKENS, TEACHER_CONFIG["text_dim"], generator=gen)
    return torch.cat([rows, torch.zeros(1, *rows.shape[1:])])


def embed_labels(labels: Union[Tensor, Sequence[int]]) -> Tensor:
    """(B, TEXT_TOKENS, text_dim) encoder_hidden_states of class labels; NULL_CLASS gives the
    unconditional embedding."""
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    if labels.numel() and (labels.min() < 0 or labels.max() > NULL_CLASS):
        raise ValueError(f"labels: expected class labels in [0, {NUM_CLASSES}) or NULL_CLASS "
                         f"({NULL_CLASS}), got {labels.tolist()}")
    return class_embedding_table()[labels]


def null_embedding(batch: int) -> Tensor:
    """(batch, TEXT_TOKENS, text_dim): the unconditional branch's conditioning."""
    return embed_labels([NULL_CLASS] * batch)


def class_conditioning():
    """The class embeddings as a linattn.train.Conditioning: embeds (NUM_CLASSES, L, D), row i
    the embedding of class i (so teacher trajectory i gets class i mod 8), and negative (1, L, D)
    the null embedding, for guidance. Training-data-free post-training needs nothing else."""
    from ..train.conditioning import Conditioning

    table = class_embedding_table()
    return Conditioning(table[:NUM_CLASSES].clone(), table[NULL_CLASS:].clone())


INITS = ("diffusers", "adaln-zero")


def build_teacher(seed: Optional[int] = 0, init: str = "diffusers") -> nn.Module:
    """A WanTransformer3DModel with TEACHER_CONFIG and random weights (seeded, without touching
    the caller's random state); the architecture training starts from.

    init: "diffusers" (the model's own initialisation) or "adaln-zero" (then adaln_zero_()).
    """
    from diffusers import WanTransformer3DModel

    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}, got {init!r}")
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = WanTransformer3DModel(**TEACHER_CONFIG)
    if init == "adaln-zero":
        adaln_zero_(model)
    return model


@torch.no_grad()
def adaln_zero_(model: nn.Module) -> nn.Module:
    """DiT's adaLN-Zero initialisation for a Wan transformer trained from scratch: every block
    starts as the identity (its modulation table and the shared timestep projection at 0, so
    the residual gates are 0; cross-attention's output projection at 0, as PixArt-α does for
    its ungated cross-attention) and the output projection at 0. DiT measured it to train
    markedly faster than adaLN with random modulation, which is what diffusers' Wan has."""
    model.condition_embedder.time_proj.weight.zero_()
    model.condition_embedder.time_proj.bias.zero_()
    model.scale_shift_table.zero_()
    model.proj_out.weight.zero_()
    model.proj_out.bias.zero_()
    for block in model.blocks:
        block.scale_shift_table.zero_()
        block.attn2.to_out[0].weight.zero_()
        block.attn2.to_out[0].bias.zero_()
    return model


def load_teacher(path: Union[str, os.PathLike, None] = None, *,
                 device: Union[str, torch.device] = "cpu") -> nn.Module:
    """The trained toy teacher: frozen (no gradients), eval mode, float32.

    path: a folder with config.json and diffusion_pytorch_model.safetensors (what
    save_pretrained writes); default the weights shipped with linattn. Loaded with safetensors
    directly (no hub, no accelerate)."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    directory = Path(path) if path is not None else TEACHER_DIR
    config_file = directory / "config.json"
    weights_file = directory / "diffusion_pytorch_model.safetensors"
    for file in (config_file, weights_file):
        if not file.is_file():
            hint = (" (the shipped weights are missing: reinstall linattn, or rebuild them with "
                    "`python -m linattn.toy.train teacher --export`)" if path is None else "")
            raise FileNotFoundError(f"load_teacher: no {file.name} in {directory}{hint}")
    model = WanTransformer3DModel.from_config(json.loads(config_file.read_text()))
    model.load_state_dict(load_file(str(weights_file)), strict=True)
    model.requires_grad_(False)
    return model.to(device).eval()


def save_teacher(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write config.json and diffusion_pytorch_model.safetensors (diffusers' layout, so that
    WanTransformer3DModel.from_pretrained and model.pretrained in a train config read it)."""
    model.save_pretrained(str(directory), safe_serialization=True)


def save_class_embeddings(path: Union[str, os.PathLike] = CLASS_EMBEDDINGS_FILE) -> None:
    class_conditioning().save(str(path))
