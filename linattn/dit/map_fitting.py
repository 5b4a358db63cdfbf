"""Fit the feature maps of converted layers to their own softmax attention (LoLCATs' "attention
transfer"), before any end-to-end training.

A converted layer starts with identity-initialised Hedgehog maps, whose linear attention is far
from the softmax it replaces (on the toy teacher the output error, relative to the softmax
output's size, is 0.10-0.60 per layer). This step trains only the maps, layer by layer, to make
LinearAttn(q, k, v) match SoftmaxAttn(q, k, v) on the model's own activations:

    L = mean over layers l of  ‖LinearAttn_l − SoftmaxAttn_l‖² / ‖SoftmaxAttn_l‖²

While it runs, every converted layer passes its *softmax* output on (recording()), so each layer
sees exactly the original model's inputs and the layers' fits are independent of each other;
the gradient reaches only the maps. LinVideo starts from identity maps and says nothing about
this step; it is our addition (measured on the toy: docs/toy_study.md §6j-6k), data-free like
the rest: the activations come from the teacher's own trajectory points.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .processor import converted_layers


class ErrorSink:
    """Where converted layers in recording mode put their relative output errors."""

    def __init__(self):
        self.errors: dict[str, list[Tensor]] = {}

    def add(self, layer: str, linear: Tensor, softmax: Tensor) -> None:
        # Per sample, then averaged (dim 0 is the batch in both layouts): the mean over a batch
        # split between processes or micro-batches is then the mean over the whole batch.
        softmax = softmax.float().flatten(1)
        error = ((linear.float().flatten(1) - softmax).pow(2).mean(1)
                 / softmax.pow(2).mean(1).clamp_min(1e-12))
        self.errors.setdefault(layer, []).append(error.mean())

    def per_layer(self) -> dict[str, Tensor]:
        """Each layer's mean error over the calls recorded since the last clear()."""
        return {name: torch.stack(v).mean() for name, v in self.errors.items()}

    def clear(self) -> None:
        self.errors.clear()


@contextlib.contextmanager
def recording(model: nn.Module) -> Iterator[ErrorSink]:
    """Within the block, every converted layer of ``model`` computes both branches, records the
    linear branch's error against the softmax output in the yielded sink, and passes the softmax
    output on (the model computes the original function, with the maps on the side)."""
    layers = list(converted_layers(model))
    if not layers:
        raise ValueError("model: no converted layer to fit (call linattn.convert first)")
    sink = ErrorSink()
    for name, _, processor in layers:
        processor.map_fitting = (sink, name)
    try:
        yield sink
    finally:
        for _, _, processor in layers:
            processor.map_fitting = None


def map_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The learnable parameters of the converted layers' feature maps, and of their local mixing
    where they have it (it is part of the linear branch being fitted), in model order."""
    params = []
    for _, _, processor in converted_layers(model):
        for feature_map in (processor.q_map, processor.k_map):
            params.extend(feature_map.parameters())
        if processor.local_mixing is not None:
            params.extend(processor.local_mixing.parameters())
    return params


def fit_feature_maps(model: nn.Module, run_forward: Callable[..., None], steps: int, *,
                     lr: float = 1e-2, progress: bool = True, accumulation: int = 1,
                     reduce_gradients: Optional[Callable[[list], None]] = None,
                     evaluate: Optional[Callable[[], None]] = None) -> dict:
    """Train only the feature maps of ``model``'s converted layers for ``steps`` Adam steps.

    run_forward(step) runs the model's forward pass(es) on that step's inputs (the caller owns
    the data: the trainer passes its teacher trajectory points, both guidance branches); the
    loss is the mean over layers of the errors recorded during it. With accumulation = A > 1,
    run_forward(step, a) is called for a = 0 .. A−1, each followed by its own backward (one
    micro-batch's activations at a time), and the gradients are averaged. reduce_gradients
    (optional) is called with the maps' parameters before each optimiser step (the trainer
    averages their gradients over its processes there). evaluate() (optional) runs forwards on
    held-out inputs, recorded without gradients before and after the fit.

    The other parameters' requires_grad is restored afterwards. Returns {"layers": names,
    "loss": [per-step loss], "before"/"after": {layer: held-out error}} (held-out figures only
    with evaluate).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if not lr > 0:
        raise ValueError(f"lr: must be > 0, got {lr!r}")
    if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
        raise ValueError(f"accumulation: expected an int >= 1, got {accumulation!r}")
    params = map_parameters(model)
    if not params:
        raise ValueError("model: the converted layers' feature maps have no parameters to fit "
                         "(a fixed map such as relu or elu); fitting needs learnable maps "
                         "(feature_map 'hedgehog')")
    saved = {p: p.requires_grad for p in model.parameters()}
    result: dict = {"loss": []}
    try:
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        with recording(model) as sink:
            result["layers"] = [name for name, _, _ in converted_layers(model)]
            if evaluate is not None:
                result["before"] = _held_out(sink, evaluate)
            for step in tqdm(range(steps), desc="fitting feature maps", unit="step",
                             disable=not progress):
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for a in range(accumulation):
                    sink.clear()
                    run_forward(step) if accumulation == 1 else run_forward(step, a)
                    errors = sink.per_layer()
                    if not errors:
                        raise RuntimeError("run_forward: recorded no converted layer; it must "
                                           "run the model that was passed to fit_feature_maps")
                    loss = torch.stack(list(errors.values())).mean() / accumulation
                    loss.backward()
                    total += float(loss.detach())
                if reduce_gradients is not None:
                    reduce_gradients(params)
                optimizer.step()
                result["loss"].append(total)
            if evaluate is not None:
                result["after"] = _held_out(sink, evaluate)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        for p in params:
            p.grad = None
    return result


def _held_out(sink: ErrorSink, evaluate: Callable[[], None]) -> dict[str, float]:
    sink.clear()
    with torch.no_grad():
        evaluate()
    out = {name: float(v) for name, v in sink.per_layer().items()}
    sink.clear()
    return out
