"""Selective transfer (method.md §3): the gates r_l of hybrid layers, their two losses, the α
schedule, and finalize().

A hybrid layer computes o = r · SoftmaxAttn + (1 − r) · LinearAttn with r ∈ [0, 1] (r = 1: pure
softmax, the value every gate starts at). Training adds λ (L_con + L_reg) to the distillation
loss, calls clamp_gates_(model) after each optimizer step, and ends with finalize(model).

Rounding convention, shared by L_con and finalize() so that the count L_con constrains is the
count finalize() produces: hard(r) = round(clamp(r, 0, 1)) with torch.round (half to even, so
r = 0.5 rounds to 0: linear); hard(r) = 1 keeps softmax, 0 keeps linear attention.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from . import record
from .processor import converted_layers, restore_original, set_processor


def gates(model: nn.Module) -> list[nn.Parameter]:
    """r_l of every hybrid layer, in layer (model) order."""
    return [p.gate for _, _, p in converted_layers(model) if p.mode == "hybrid"]


def hard(r: Tensor) -> Tensor:
    """The layer decision for gate values r: 1 = softmax, 0 = linear (module docstring)."""
    return torch.round(r.clamp(0.0, 1.0))


def _stack(gates: Sequence[Tensor]) -> Tensor:
    gates = list(gates)
    if not gates:
        raise ValueError("gates: empty; convert layers with mode='hybrid' and pass "
                         "linattn.transfer.gates(model)")
    for i, g in enumerate(gates):
        if not isinstance(g, Tensor):
            raise TypeError(f"gates[{i}]: expected a one-element tensor (a gate r), got "
                            f"{type(g).__name__}")
        if g.numel() != 1:
            raise TypeError(f"gates[{i}]: expected a one-element tensor (a gate r), got shape "
                            f"{tuple(g.shape)}")
    return torch.stack([g.reshape(()) for g in gates]).to(torch.float32)


def constraint_loss(gates: Sequence[Tensor], n_linear: int) -> Tensor:
    """L_con = (Σ_l (1 − round(r_l)) − n_linear)² (Eq. 9), round() with a straight-through
    estimator: the forward value uses hard(r), the gradient flows as if round were the identity,
    so ∂L_con/∂r_l = −2 (Σ_l (1 − hard(r_l)) − n_linear) for every l."""
    r = _stack(gates)
    if isinstance(n_linear, bool) or not isinstance(n_linear, int) or not 0 <= n_linear <= r.numel():
        raise ValueError(f"n_linear: expected an int in [0, {r.numel()}] (the number of gated "
                         f"layers), got {n_linear!r}")
    rounded = r + (hard(r) - r).detach()
    return ((1.0 - rounded).sum() - n_linear) ** 2


def binarization_loss(gates: Sequence[Tensor], alpha: float) -> Tensor:
    """L_reg = Σ_l (1 − |2 r_l − 1|^α) (Eq. 10): 0 when every r is 0 or 1, largest at r = 1/2.
    α ≥ 1 is required: below 1 the term is not differentiable at r = 1/2 (its gradient is NaN)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 1.0:
        raise ValueError(f"alpha: expected a number >= 1, got {alpha!r}")
    r = _stack(gates)
    return (1.0 - (2.0 * r - 1.0).abs().pow(float(alpha))).sum()


def alpha_at(step: int, total_steps: int, start: float = 20.0, end: float = 2.0) -> float:
    """The annealed α of L_reg at `step` of a run of `total_steps` steps (0-based).

    Shape [choice; the paper says only "from 20 to 2"]: linear in the step, as AdaRound's decay of
    the same regulariser, α = start + (end − start) · step / (total_steps − 1), so the first step
    uses `start` and the last uses `end`; steps past the end keep `end`. Large α makes the loss
    flat over most of [0, 1] (free exploration); α = 2 pushes every r to 0 or 1.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0, got {step!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps: expected an int >= 1, got {total_steps!r}")
    if total_steps == 1:
        return float(end)
    progress = min(step / (total_steps - 1), 1.0)
    return float(start + (end - start) * progress)


@torch.no_grad()
def clamp_gates_(model: nn.Module) -> None:
    """Keep every gate in [0, 1]; call after each optimizer.step()."""
    for gate in gates(model):
        gate.clamp_(0.0, 1.0)


@torch.no_grad()
def finalize(model: nn.Module) -> dict[str, str]:
    """Round every gate and keep only the chosen branch of each converted layer.

    hard(r) = 1: the layer gets its original processor back (maps and gate are dropped);
    hard(r) = 0: it becomes a linear layer with the trained maps (gate and softmax dropped), so it
    runs only the op. Layers already linear stay linear. Rebuild the optimizer afterwards: the
    dropped parameters leave the model.

    Returns {layer name: "softmax" | "linear"} for every layer that was converted.
    """
    decisions = {}
    for name, attn, processor in list(converted_layers(model)):
        if processor.mode == "hybrid" and hard(processor.gate).item() == 1.0:
            restore_original(attn, processor)
            decisions[name] = "softmax"
        else:
            if processor.mode == "hybrid":
                set_processor(attn, processor.as_linear())
            decisions[name] = "linear"
    record.sync(model)
    return decisions
