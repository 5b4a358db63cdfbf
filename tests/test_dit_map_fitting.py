"""linattn.dit.map_fitting: feature maps fitted to their layers' softmax outputs, with the rest of
the model untouched, and the trainer's train.map_fit_steps (fresh runs fit, resumed runs don't)."""
from __future__ import annotations

import copy

import pytest
import torch

import linattn.dit as dit
from linattn.dit.map_fitting import map_parameters, recording
from linattn.train import train
from linattn.train.metrics import read_metrics
from test_dit_families import run, wan_inputs, wan_model
from test_train_trainer import config, root  # noqa: F401  (root: the module's tiny-run fixture)

from checkpoints import checkpoint_state, flat, without_timing

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.filterwarnings(
    "ignore:linattn. backend='auto' uses the slow float64 reference:RuntimeWarning"),
    # The tiny runs select over their 4 steps, so finalize() rounds hybrid gates (and says so).
    pytest.mark.filterwarnings("ignore:linattn.train. finalize.. moves:RuntimeWarning")]


def converted(feature_map="hedgehog", mode="linear"):
    torch.manual_seed(0)
    original = wan_model().eval()
    model = dit.convert(copy.deepcopy(original), feature_map=feature_map, mode=mode,
                        backend="reference")
    return original, model


def test_recording_passes_the_softmax_output_on_and_records_each_layer():
    original, model = converted(mode="linear")
    gen = torch.Generator().manual_seed(1)
    inputs = wan_inputs(gen)
    with torch.no_grad():
        expected = run(original, inputs)
        assert not torch.allclose(run(model, inputs), expected, atol=1e-3)  # linear differs
        with recording(model) as sink:
            recorded = run(model, inputs)
    torch.testing.assert_close(recorded, expected, rtol=1e-5, atol=1e-5)
    errors = sink.per_layer()
    assert list(errors) == [name for name, _, _ in dit.processor.converted_layers(model)]
    assert all(float(e) > 1e-3 for e in errors.values())
    # Outside the block the layers run their linear branch again.
    with torch.no_grad():
        assert not torch.allclose(run(model, inputs), expected, atol=1e-3)


@pytest.mark.parametrize("mode", ["linear", "hybrid"])
def test_fit_lowers_every_layers_error_and_trains_only_the_maps(mode):
    _, model = converted(mode=mode)
    gen = torch.Generator().manual_seed(2)
    held_out = wan_inputs(gen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # Fresh inputs every step: on a random model a few fixed ones are overfitted (held-out
    # error up), the layers' attention patterns vary that much between inputs.
    fit = dit.fit_feature_maps(model, lambda step: run(model, wan_inputs(gen)), 30, lr=1e-2,
                               progress=False, evaluate=lambda: run(model, held_out))
    assert set(fit["before"]) == set(fit["after"]) == set(fit["layers"]) and fit["layers"]
    for layer in fit["layers"]:
        assert fit["after"][layer] < 0.75 * fit["before"][layer], layer
    assert len(fit["loss"]) == 30 and sum(fit["loss"][-5:]) / 5 < fit["loss"][0]
    maps = {id(p) for p in map_parameters(model)}
    for name, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[name])
        assert changed == (id(p) in maps), name
        assert p.requires_grad == grad_flags[name] and p.grad is None, name


def test_fit_needs_learnable_maps_and_a_forward_over_the_model():
    _, fixed = converted(feature_map="relu")
    with pytest.raises(ValueError, match="no parameters to fit"):
        dit.fit_feature_maps(fixed, lambda step: None, 3, progress=False)
    _, model = converted()
    with pytest.raises(RuntimeError, match="recorded no converted layer"):
        dit.fit_feature_maps(model, lambda step: None, 3, progress=False)
    with pytest.raises(ValueError, match="steps: expected an int >= 1"):
        dit.fit_feature_maps(model, lambda step: None, 0, progress=False)
    with pytest.raises(ValueError, match="no converted layer"):
        with recording(wan_model()):
            pass


def test_trainer_fits_the_maps_on_a_fresh_run_and_resumes_bit_exact(root):  # noqa: F811
    fitted = train(config(root, "fit_full", map_fit_steps=6, map_fit_lr=3e-2), progress=False)
    start = read_metrics(fitted.metrics_path)[0]
    fit = start["map_fit"]
    assert fit["steps"] == 6 and set(fit["before"]) == set(fit["after"])
    assert sum(fit["after"].values()) < sum(fit["before"].values())
    # Without the fit the run starts from other maps, so it trains another model.
    plain = train(config(root, "fit_none"), progress=False)
    assert "map_fit" not in read_metrics(plain.metrics_path)[0]
    a = flat(checkpoint_state(f"{root}/fit_full", 4))
    b = flat(checkpoint_state(f"{root}/fit_none", 4))
    assert any(not torch.equal(a[k], b[k]) for k in a if "_map" in k)
    # Stopped and resumed: the resumed trainer takes its maps from the checkpoint, fits nothing.
    train(config(root, "fit_resumed", map_fit_steps=6, map_fit_lr=3e-2), stop_at_step=3,
          progress=False)
    resumed = train(config(root, "fit_resumed", map_fit_steps=6, map_fit_lr=3e-2),
                    progress=False)
    c = flat(checkpoint_state(f"{root}/fit_resumed", 4))
    assert a.keys() == c.keys()
    for key in a:
        assert torch.equal(a[key], c[key]), key
    assert without_timing(read_metrics(fitted.metrics_path)) == \
        without_timing(read_metrics(resumed.metrics_path))


@pytest.mark.parametrize("edit, message", [
    ({"map_fit_steps": -1}, "train.map_fit_steps: expected an int >= 0"),
    ({"map_fit_steps": 2, "map_fit_lr": 0.0}, "train.map_fit_lr: must be > 0"),
])
def test_map_fit_configuration_errors(root, edit, message):  # noqa: F811
    with pytest.raises(ValueError, match=message):
        train(config(root, "fit_errors", **edit), progress=False)


def test_trainer_fit_over_micro_batches_matches_one_batch(root):  # noqa: F811
    # The fit splits its batch as training does: micro-batches (or processes) of one global
    # batch give the same steps, to rounding.
    runs = {}
    for name, micro in (("fit_whole", None), ("fit_micro", 2)):
        cfg = config(root, name, steps=1, map_fit_steps=4, map_fit_lr=3e-2,
                     micro_batch_size=micro)
        runs[name] = read_metrics(train(cfg, progress=False).metrics_path)[0]["map_fit"]
    whole, micro = runs["fit_whole"], runs["fit_micro"]
    assert whole["loss_first"] > 0
    for key in ("loss_first", "loss_last"):
        assert micro[key] == pytest.approx(whole[key], rel=1e-5), key
    assert whole["loss_last"] < whole["loss_first"]
