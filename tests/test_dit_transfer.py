"""linattn.transfer: the selective-transfer losses on hand-computed cases, the α schedule, gate
clamping and finalize()."""
from __future__ import annotations

import copy

import pytest
import torch

import linattn.dit as dit
from linattn.dit import transfer
from linattn.dit.processor import LinAttnProcessor
from test_dit_families import CASES, processors, randomize_linattn_, run

pytestmark = pytest.mark.filterwarnings(
    "ignore:linattn. backend='auto' uses the slow float64 reference:RuntimeWarning")


def leaves(*values):
    return [torch.tensor(v, requires_grad=True) for v in values]


def grads(loss, gates):
    loss.backward()
    return [g.grad.item() for g in gates]


def test_constraint_loss_counts_rounded_linear_layers_with_straight_through_gradient():
    # round(r) = [1, 0, 1, 0]: two linear layers; target 1 -> (2 - 1)^2 = 1.
    gates = leaves(0.9, 0.2, 0.6, 0.4)
    loss = transfer.constraint_loss(gates, n_linear=1)
    assert loss.item() == 1.0
    # d/dr_l (Σ(1 − r_l) − n)² = −2 (Σ(1 − round r) − n) = −2 for every layer (STE).
    assert grads(loss, gates) == [-2.0] * 4

    gates = leaves(0.9, 0.2, 0.6, 0.4)
    loss = transfer.constraint_loss(gates, n_linear=2)
    assert loss.item() == 0.0 and grads(loss, gates) == [0.0] * 4

    # Too few linear layers: the gradient is +2 · 3 = 6 (a descent step lowers every r).
    gates = leaves(0.9, 0.8, 0.6, 0.7)
    loss = transfer.constraint_loss(gates, n_linear=3)
    assert loss.item() == 9.0 and grads(loss, gates) == [6.0] * 4


def test_constraint_loss_rounds_a_half_to_linear_as_finalize_does():
    gates = leaves(0.5)
    assert transfer.hard(gates[0]).item() == 0.0
    assert transfer.constraint_loss(gates, n_linear=1).item() == 0.0


def test_binarization_loss_values_and_gradients():
    # α = 2: 1 − (2r − 1)² per gate = [1, 0, 0.75]; d/dr = −2α (2r − 1)^(α−1) sign = [0, −4, 2].
    gates = leaves(0.5, 1.0, 0.25)
    loss = transfer.binarization_loss(gates, alpha=2.0)
    assert loss.item() == pytest.approx(1.75, abs=1e-7)
    assert grads(loss, gates) == pytest.approx([0.0, -4.0, 2.0], abs=1e-6)

    # α = 20 at r = 0.75: |0.5|^20 = 2^-20; gradient −2 · 20 · 0.5^19 = −40 / 2^19.
    gates = leaves(0.75)
    loss = transfer.binarization_loss(gates, alpha=20.0)
    assert loss.item() == pytest.approx(1 - 2.0 ** -20, abs=1e-7)
    assert grads(loss, gates) == pytest.approx([-40 / 2 ** 19], rel=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: transfer.constraint_loss([], 0), "empty"),
    (lambda: transfer.constraint_loss(leaves(0.3, 0.4), 3), "n_linear"),
    (lambda: transfer.constraint_loss(leaves(0.3), 0.5), "n_linear"),
    (lambda: transfer.binarization_loss(leaves(0.3), 0.5), "alpha"),
    (lambda: transfer.binarization_loss([torch.ones(2)], 2.0), r"gates\[0\]"),
    (lambda: transfer.alpha_at(-1, 10), "step"),
    (lambda: transfer.alpha_at(0, 0), "total_steps"),
])
def test_invalid_arguments_are_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_alpha_schedule_is_linear_from_start_to_end():
    assert transfer.alpha_at(0, 11) == 20.0
    assert transfer.alpha_at(5, 11) == 11.0
    assert transfer.alpha_at(10, 11) == 2.0
    assert transfer.alpha_at(30, 11) == 2.0           # past the run: stays at the end value
    assert transfer.alpha_at(1, 3, start=8.0, end=4.0) == 6.0
    assert transfer.alpha_at(0, 1) == 2.0
    values = [transfer.alpha_at(s, 50) for s in range(50)]
    assert all(a > b for a, b in zip(values, values[1:]))


def hybrid_wan():
    case = CASES["wan"]
    model = case.model()
    dit.convert(model, layers="all", mode="hybrid")
    randomize_linattn_(model, seed=21)
    return model, case.example()


def test_gates_in_layer_order_and_clamped_into_the_unit_interval():
    model, _ = hybrid_wan()
    gates = transfer.gates(model)
    by_name = dict(model.named_parameters())
    assert all(g is by_name[f"blocks.{i}.attn1.processor.gate"] for i, g in enumerate(gates))
    assert len(gates) == 2
    with torch.no_grad():
        gates[0].fill_(-0.3)
        gates[1].fill_(1.7)
    transfer.clamp_gates_(model)
    assert [g.item() for g in gates] == [0.0, 1.0]


def test_finalize_keeps_only_the_chosen_branch():
    model, inputs = hybrid_wan()
    original = {name: p.original for name, p in processors(model).items()
                if isinstance(p, LinAttnProcessor)}
    near = [0.03, 0.96]
    with torch.no_grad():
        for g, r in zip(transfer.gates(model), near):
            g.fill_(r)
    q_weight = model.blocks[0].attn1.processor.q_map.weight
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for g in transfer.gates(rounded):
            g.copy_(transfer.hard(g))
        expected = run(rounded, inputs)

    decisions = transfer.finalize(model)

    assert decisions == {"blocks.0.attn1": "linear", "blocks.1.attn1": "softmax"}
    linear = model.blocks[0].attn1.processor
    assert isinstance(linear, LinAttnProcessor) and linear.mode == "linear" and linear.gate is None
    assert linear.q_map.weight is q_weight              # the trained map is kept
    assert model.blocks[1].attn1.processor is original["blocks.1.attn1"]
    assert transfer.gates(model) == []
    assert sorted(k for k in model.state_dict() if ".processor." in k) == [
        "blocks.0.attn1.processor.k_map.weight", "blocks.0.attn1.processor.q_map.weight"]
    assert {n: e["mode"] for n, e in model.config["_linattn"]["layers"].items()} == \
        {"blocks.0.attn1": "linear"}
    with torch.no_grad():
        assert torch.equal(run(model, inputs), expected)


def test_finalize_leaves_linear_layers_linear_and_round_trips(tmp_path):
    case = CASES["wan"]
    model, inputs = case.model(), case.example()
    dit.convert(model, layers=[0], mode="linear")
    dit.convert(model, layers=[1], mode="hybrid")
    randomize_linattn_(model, seed=22, gates=(0.1, 0.2))
    assert transfer.finalize(model) == {"blocks.0.attn1": "linear", "blocks.1.attn1": "linear"}
    model.save_pretrained(tmp_path)
    loaded = dit.load_converted(tmp_path)
    assert [r.kind for r in dit.layer_report(loaded)] == ["linear", "linear"]
    with torch.no_grad():
        assert torch.equal(run(loaded, inputs), run(model, inputs))
