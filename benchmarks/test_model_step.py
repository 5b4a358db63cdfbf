"""Whole-model speed: one denoising step of a diffusers video DiT, as a user runs it.

Per model (dit_models.py: tiny configs of every family on the CPU, the real Wan 2.1 1.3B / 14B,
CogVideoX-5B and HunyuanVideo shapes on a GPU, in bf16), one transformer forward (inference,
no gradients) and one forward + backward (training: gradients of every parameter), for:

  all-SDPA                the model as diffusers builds it (softmax attention everywhere)
  k / all linear, fused   k or every self-attention layer converted (Hedgehog maps), the
                          layer's q/k norm and RoPE fused into the kernels
  k / all linear, unfused the same layers, the stock norm and RoPE run in PyTorch before the op
  k / all linear, fused + local mixing   the fused layers with convert(local_mixing=3): a
                          depthwise 3x3x3 convolution of V over the token grid added to each
                          (linattn/dit/local_mixing.py), what that option costs a whole step
  k / all ceiling         the same layers' attention replaced by a free stand-in (o = v) after
                          the projections: what no attention kernel can beat
  k / all ceiling + stock norm/RoPE   the free stand-in after diffusers' unfused norm and RoPE:
                          the cap of a layer that keeps them (kernels.md: 1.43x at 16/30)

eager and under torch.compile (on the CPU: the Wan model, with and without every layer linear;
LINATTN_BENCH_COMPILE=all compiles every model there too). The summary (conftest.py) reports ms
per step (and per block), the speed-up over all-SDPA and the share of the ceiling reached
(speed-up / the ceiling's speed-up, same layers, same run).
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

import linattn
from linattn.dit import set_fuse_pre_attention
from linattn.dit.selectors import resolve_selector

from conftest import record_model_step
from dit_models import CPU_SPECS, GPU_SPECS, install_zero_cost, self_attention_count
from measure import cuda_median_seconds, synchronize

ON_CUDA = torch.cuda.is_available()
SPECS = GPU_SPECS if ON_CUDA else CPU_SPECS
DTYPE = torch.bfloat16 if ON_CUDA else torch.float32

#: (variant name, which layers: "none" | "k" | "all", how: sdpa | fused | fused-mixing | unfused |
#: ceiling | ceiling-stock).
VARIANTS = [("all-SDPA", "none", "sdpa")] + [
    (f"{which} {label}", which, how)
    for which in ("k", "all")
    for label, how in (("linear, fused", "fused"),
                       ("linear, fused + local mixing", "fused-mixing"),
                       ("linear, unfused", "unfused"),
                       ("ceiling", "ceiling"), ("ceiling + stock norm/RoPE", "ceiling-stock"))]


def _compiled_here(spec_index: int, variant: tuple) -> bool:
    """Whether this (model, variant) runs under torch.compile in this session."""
    if ON_CUDA or os.environ.get("LINATTN_BENCH_COMPILE") == "all":
        return True
    # CPU: inductor compiles each variant for tens of seconds; the Wan model (the first-class
    # target), with and without every layer linear, tells the story.
    return spec_index == 0 and variant[1] in ("none", "all") and variant[2] != "ceiling-stock"


_MODELS: dict[int, torch.nn.Module] = {}


def _model(index: int, device: torch.device) -> torch.nn.Module:
    """The spec's transformer, built once per session (random weights, seed 0)."""
    if index not in _MODELS:
        _MODELS.clear()
        gc.collect()
        if ON_CUDA:
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        with torch.device(device):
            model = SPECS[index].build()
        _MODELS[index] = model.to(DTYPE)
    return _MODELS[index]


def _layers(model, spec, which: str) -> list[int]:
    n = self_attention_count(model)
    return [] if which == "none" else (spec.k_layers(n) if which == "k" else list(range(n)))


def _set_up(model, layers: list[int], how: str):
    """Install the variant on `model`; returns the function that undoes it."""
    if how == "sdpa":
        return lambda: None
    if how in ("ceiling", "ceiling-stock"):
        return install_zero_cost(model, layers, stock_pre=how == "ceiling-stock")
    mixing = 3 if how == "fused-mixing" else None
    linattn.convert(model, layers=layers, feature_map="hedgehog", mode="linear",
                    local_mixing=mixing)
    set_fuse_pre_attention(model, how in ("fused", "fused-mixing"))
    return lambda: linattn.revert(model)


def _step_fn(model, inputs: dict, step: str):
    if step == "inference":
        model.eval()

        def run():
            with torch.no_grad():
                return model(**inputs).sample
    else:
        model.train()

        def run():
            for p in model.parameters():
                p.grad = None
            out = model(**inputs).sample
            out.float().square().mean().backward()
            return out
    return run


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("step", ["inference", "training"])
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0].replace(" ", "_") for v in VARIANTS])
@pytest.mark.parametrize("spec_index", range(len(SPECS)), ids=[s.name.split(",")[0].split(" (")[0]
                                                               for s in SPECS])
def test_model_step(benchmark, device, spec_index, variant, step, mode):
    if mode == "compile" and not _compiled_here(spec_index, variant):
        pytest.skip("torch.compile on the CPU runs the Wan model with 0 and all layers linear "
                    "(LINATTN_BENCH_COMPILE=all compiles the rest)")
    spec = SPECS[spec_index]
    name, which, how = variant
    model = _model(spec_index, device)
    if how == "fused-mixing" and not resolve_selector(model, None).has_token_grid():
        pytest.skip(f"local mixing needs the video token grid, which {spec.name.split(' (')[0]}'s "
                    f"joint video-text attention does not have (built in for Wan and LTX-Video)")
    inputs = spec.inputs(model, device, DTYPE)
    layers = _layers(model, spec, which)
    undo = _set_up(model, layers, how)
    try:
        target = model
        if mode == "compile":
            torch._dynamo.reset()
            target = torch.compile(model)
        run = _step_fn(target, inputs, step)
        try:
            run()  # warm-up: compilation, autotuning, first touch
        except torch.OutOfMemoryError as error:
            pytest.skip(f"{spec.name} {step} needs more memory than the device has: {error}")
        synchronize(device)

        def timed():
            result = run()
            synchronize(device)
            return result

        benchmark.pedantic(timed, rounds=3 if ON_CUDA else 5, warmup_rounds=1)
        seconds = cuda_median_seconds(run) if ON_CUDA else benchmark.stats.stats.median
    finally:
        undo()
        for p in model.parameters():
            p.grad = None
        if mode == "compile":
            torch._dynamo.reset()
    n = self_attention_count(model)
    record_model_step(model=spec.name, blocks=spec.blocks, block_count=spec.block_count,
                      step=step, mode=mode, variant=name, how=how,
                      layers=f"{len(layers)}/{n}", seconds=seconds)
