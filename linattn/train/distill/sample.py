"""``linattn sample CONFIG``: samples of the distilled generator at its own step count.

Reads the distillation config for where the model is (output.dir/final, or --model), the
conditioning rows the run was distilled on (output.dir/conditioning.safetensors) and the latent
shape; sample i uses conditioning row i mod P and the noise of (seed, i)
(linattn.train.distill.sampler.sample_step_noise), so the same seed gives the same samples.
The samples (latents, (N, C, F, H, W) float32) and the rows are written to a safetensors file;
decoding latents into video is the pipeline's VAE's job (README).
"""
from __future__ import annotations

import os
import time
from typing import Optional, Union

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..conditioning import Conditioning
from ..flow import FlowModel
from . import conditioning as conditioning_store
from .config import DistillConfig, load_distill_config
from .models import load_distilled
from .sampler import seeded_sample

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def run_conditioning(cfg: DistillConfig) -> Conditioning:
    """The conditioning rows of a distillation run (its stored copy; built from the config's
    conditioning section if the run has not stored one)."""
    path = os.path.join(cfg.output.dir, conditioning_store.CONDITIONING_FILE)
    if os.path.isfile(path):
        return Conditioning.load(path)
    return conditioning_store.build(cfg.conditioning, 1.0, torch.device("cpu"))


@torch.no_grad()
def sample_from_config(config: Union[str, os.PathLike, dict, DistillConfig], *,
                       overrides=None, model_dir: Optional[str] = None, num: int = 8,
                       seed: int = 0, batch_size: int = 1, out: Optional[str] = None,
                       device: str = "auto", dtype: Optional[str] = None,
                       backend: str = "auto", progress: bool = True) -> dict:
    """Sample ``num`` latents with the distilled model; write them to ``out`` (default
    output.dir/samples-seed<seed>.safetensors) and return a summary (path, shape, steps, wall
    time of the sampling alone, seconds per sample)."""
    cfg = load_distill_config(config, overrides)
    if num < 1 or batch_size < 1:
        raise ValueError(f"num, batch_size: must be >= 1, got {num}, {batch_size}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                       if device == "auto" else device)
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    model, spec = load_distilled(model_dir or os.path.join(cfg.output.dir, "final"),
                                 backend=backend)
    model = model.to(dev, DTYPES[dtype])
    flow = FlowModel(model, spec.num_train_timesteps, input_dtype=DTYPES[dtype])
    conditioning = run_conditioning(cfg)
    rows = [i % conditioning.embeds.shape[0] for i in range(num)]
    cond = conditioning.rows(rows)[0].to(dev)
    chunks = []
    start = time.perf_counter()
    for first in tqdm(range(0, num, batch_size), desc="linattn sample", unit="batch",
                      disable=not progress):
        indices = list(range(first, min(first + batch_size, num)))
        chunks.append(seeded_sample(flow, cond[indices[0]:indices[-1] + 1], spec.times,
                                    seed=seed, indices=indices,
                                    shape=cfg.distill.latent_shape,
                                    step_rule=spec.renoise).cpu())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - start
    samples = torch.cat(chunks)
    out = out or os.path.join(cfg.output.dir, f"samples-seed{seed}.safetensors")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file({"samples": samples.contiguous(), "rows": torch.tensor(rows)}, out,
              metadata={"seed": str(seed), "num_steps": str(spec.num_steps),
                        "times": ",".join(f"{t:.6g}" for t in spec.times),
                        "renoise": spec.renoise})
    return {"out": out, "shape": list(samples.shape), "num_steps": spec.num_steps,
            "times": list(spec.times), "device": str(dev), "dtype": dtype,
            "wall_s": wall, "s_per_sample": wall / num}
