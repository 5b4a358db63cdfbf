"""The distillation stage's only data: the conditioning rows, kept in output.dir.

The rows come from the conditioning section (an embeddings file, prompts through a text
encoder, or random embeddings; linattn.train.conditioning) and are written once, on rank 0, to
output.dir/conditioning.safetensors with the identity of their source; every process, every
resumed run and ``linattn sample`` read that file, so a text encoder runs once per run and a
resumed run trains on the very same tensors. The negative conditioning (negative_prompt_embeds,
or the encoded negative_prompt) is the real score's unconditional branch.
"""
from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import torch

from .. import distributed as D
from ..conditioning import (NEGATIVE_KEY, Conditioning, build_conditioning,
                            random_conditioning)
from ..teacher_data import source_id

CONDITIONING_FILE = "conditioning.safetensors"
SOURCE_FILE = "conditioning.json"


def _as_data_config(conditioning_config, guidance_scale: float) -> SimpleNamespace:
    """The conditioning section in the shape linattn.train.conditioning and source_id read
    (the first stage's data section)."""
    return SimpleNamespace(**dataclasses.asdict(conditioning_config),
                           guidance_scale=guidance_scale)


def build(conditioning_config, guidance_scale: float, device: torch.device) -> Conditioning:
    """The Conditioning the section asks for; with guidance it must have negative rows."""
    c, guided = conditioning_config, guidance_scale > 1.0
    if c.embeddings is not None:
        cond = Conditioning.load(c.embeddings)
    elif c.random_conditioning is not None:
        cond = random_conditioning(c.random_conditioning, c.seed, negative=guided)
    else:
        cond = build_conditioning(_as_data_config(c, guidance_scale), device)
    if guided and cond.negative is None:
        raise ValueError(f"conditioning.embeddings: distill.guidance_scale {guidance_scale} > 1 "
                         f"needs the unconditional branch's conditioning: add "
                         f"{NEGATIVE_KEY!r} (1 or P rows) to {c.embeddings!r}")
    return cond


def prepare(conditioning_config, guidance_scale: float, out_dir: str, ctx: D.DistContext,
            resuming: bool) -> Conditioning:
    """The run's conditioning, from output.dir (written there first if needed; every rank
    calls this). A resumed run whose conditioning source changed is refused."""
    path = os.path.join(out_dir, CONDITIONING_FILE)
    record = os.path.join(out_dir, SOURCE_FILE)
    wanted = source_id(_as_data_config(conditioning_config, guidance_scale))
    if ctx.is_main:
        stored = None
        if os.path.isfile(path) and os.path.isfile(record):
            with open(record) as f:
                stored = json.load(f).get("source_id")
        if stored != wanted:
            if resuming and stored is not None:
                raise ValueError(f"conditioning: {out_dir!r} holds a run distilled on other "
                                 f"conditioning; use another output.dir or the same source")
            os.makedirs(out_dir, exist_ok=True)
            build(conditioning_config, guidance_scale, ctx.device).save(path)
            with open(record + ".tmp", "w") as f:
                json.dump({"source_id": wanted, "guided": guidance_scale > 1.0}, f)
            os.replace(record + ".tmp", record)
    ctx.barrier()
    return Conditioning.load(path)
