"""The last step of selective transfer: which layers end linear.

finalize() (linattn.dit.transfer) rounds every gate: r < 0.5 becomes linear. L_con pulls the
rounded count toward n_linear, but does not pin it: a gate sitting at 0 or 1 is held there by
L_reg's slope 2α, which L_con's push 2 |count − n_linear| overcomes only while
|count − n_linear| > α. A run can therefore end one or two layers off its target.

train.final_selection:
* "exact" (default): the n_linear layers with the lowest r become linear, the others softmax
  (a stable sort: on equal r the earlier layer goes linear). When training met its target this
  is the same choice rounding makes; otherwise it keeps the latency budget the user asked for.
* "round": plain rounding, as the paper states.
Both warn when rounding and the target disagree.

A gate that ends far from 0 / 1 is a layer trained as a hybrid (r · softmax + (1 − r) · linear)
that finalize() turns into one branch: the saved model is then a function training never ran.
warn_untrained_rounding says so by name; train.select_steps (select early, then train the final
selection) is the cure (docs/toy_study.md §3 and §6h: at 1000 steps, gates left at 0.11-0.13 took
the finalized model from the hybrid's held-out rel-MSE 0.124 to 0.251).
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn


#: How far finalize() may move a gate before the saved model counts as one that training never
#: ran: a layer that trained with 5 % or more of the branch finalize() drops.
FINALIZE_TOLERANCE = 0.05


def rounded_count(gates: Sequence[nn.Parameter]) -> int:
    return sum(int(torch.round(g.detach().clamp(0, 1)).item() == 0) for g in gates)


@torch.no_grad()
def apply_final_selection_(gates: Sequence[nn.Parameter], n_linear: int, rule: str) -> int:
    """Prepare the gates for finalize() under ``rule``; return how many end linear."""
    count = rounded_count(gates)
    if rule == "round":
        if count != n_linear:
            warnings.warn(f"linattn.train: {count} gates round to linear, the target was "
                          f"{n_linear}; final_selection 'round' keeps {count}", RuntimeWarning,
                          stacklevel=2)
        return count
    if rule != "exact":
        raise ValueError(f"train.final_selection: expected 'exact' or 'round', got {rule!r}")
    values = [float(g) for g in gates]
    order = sorted(range(len(values)), key=lambda i: values[i])
    linear = set(order[:n_linear])
    if count != n_linear:
        warnings.warn(f"linattn.train: {count} gates round to linear, the target was "
                      f"{n_linear}; final_selection 'exact' makes the {n_linear} lowest "
                      f"linear (gates: {[round(v, 3) for v in values]})", RuntimeWarning,
                      stacklevel=2)
    for i, g in enumerate(gates):
        g.fill_(0.0 if i in linear else 1.0)
    return n_linear


def warn_untrained_rounding(before: Sequence[float], after: Sequence[float],
                            names: Sequence[str],
                            tolerance: float = FINALIZE_TOLERANCE) -> list[str]:
    """Warn, naming each layer, when finalize() moves a gate from its trained value ``before``
    to its final 0 / 1 ``after`` by more than ``tolerance``; return those layers' names."""
    moved = [(name, b, a) for name, b, a in zip(names, before, after) if abs(b - a) > tolerance]
    if moved:
        listed = ", ".join(f"{name} r = {b:.3f} -> {'linear' if a == 0.0 else 'softmax'}"
                           for name, b, a in moved)
        warnings.warn(f"linattn.train: finalize() moves {len(moved)} gate(s) by more than "
                      f"{tolerance}: {listed}. The saved model is not the hybrid training ran "
                      f"(metrics.jsonl's eval_*_rounded measure the saved one); "
                      f"train.select_steps selects early and then trains the final selection",
                      RuntimeWarning, stacklevel=2)
    return [name for name, _, _ in moved]
