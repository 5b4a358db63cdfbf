"""The generator's weight average in the distillation stage (linattn.train.distill.ema): it is
the live weights until distill.ema_start_step, then decay · ema + (1 − decay) · weights after
each update; final/ holds it and final_raw/ the live weights; it is checkpointed (a run with it
resumes bit-exact), evaluated beside the live weights, and its settings are checked."""
import os

import pytest
import torch
from safetensors.torch import load_file

from linattn.train.distill import distill, load_distill_config, load_distilled
from linattn.train.distill.ema import GeneratorEMA
from linattn.train.metrics import read_metrics

from checkpoints import checkpoint_state, flat, without_timing
from test_distill_stage import config, linear_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("distill_ema"))
    linear_generator(os.path.join(path, "stage1", "final"))
    return path


def weights(folder):
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert len(files) == 1, files
    return load_file(os.path.join(folder, files[0]))


def test_average_follows_its_definition_and_applied_restores_the_live_weights():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = GeneratorEMA([("p", p)], decay=0.75, start_step=1)
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 5.0]))
    ema.update(1)                                   # up to the start: a copy
    assert torch.equal(ema.shadow["p"], torch.tensor([3.0, 5.0]))
    with torch.no_grad():
        p.copy_(torch.tensor([7.0, 1.0]))
    ema.update(2)                                   # then 0.75 · ema + 0.25 · weights
    torch.testing.assert_close(ema.shadow["p"], torch.tensor([4.0, 4.0]))
    live = p.detach().clone()
    with ema.applied():
        assert torch.equal(p.detach(), torch.tensor([4.0, 4.0]))
    assert torch.equal(p.detach(), live)
    with pytest.raises(ValueError, match="distill.ema_decay"):
        GeneratorEMA([("p", p)], decay=1.0, start_step=0)


def test_final_is_the_average_of_the_live_weights_and_final_raw_the_live_ones(root):
    """Two runs of the same settings: 1 update, and 3 updates averaged from update 1 on; the
    second's final/ must be the average of its live weights after updates 1, 2 and 3 (the
    first run's final and its own checkpoint at update 2 and final_raw)."""
    decay = 0.75
    kw = dict(ema_decay=decay, ema_start_step=1)
    one = distill(config(root, "one", steps=1, **kw), progress=False)
    three = distill(_three_steps(root, kw), progress=False)
    w1 = weights(one.final_dir)                       # before the start: the live weights
    assert all(torch.equal(w1[k], v) for k, v in weights(os.path.join(one.output_dir,
                                                                     "final_raw")).items())
    w3 = weights(os.path.join(three.output_dir, "final_raw"))
    state2 = flat(checkpoint_state(three.output_dir, 2))
    w2 = {k: state2[f"model.{k}"] for k in w1}
    expected = {k: decay * (decay * w1[k] + (1 - decay) * w2[k]) + (1 - decay) * w3[k]
                for k in w1}
    final = weights(three.final_dir)
    moved = [k for k in w1 if not torch.equal(w1[k], w3[k])]
    assert moved                                      # the run trained something
    for k in w1:
        torch.testing.assert_close(final[k], expected[k], rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(final[k], w3[k]) for k in moved)
    # The returned model is final/'s, and load_distilled reads both folders with their sampler.
    returned = three.model.state_dict()
    assert all(torch.equal(returned[k], final[k]) for k in final)
    _, spec = load_distilled(os.path.join(three.output_dir, "final_raw"), backend="reference")
    assert spec.num_steps == 4

    records = read_metrics(three.metrics_path)
    by_step = {r["step"]: r for r in records}
    assert "eval_rel_mse_raw" in by_step[2] and "eval_rel_mse" in by_step[2]
    assert "eval_rel_mse_raw" not in by_step[0]       # step 0: average = live weights


def _three_steps(root, kw):
    cfg = config(root, "three", steps=3, **kw)
    cfg["output"].update(checkpoint_every=1, keep_checkpoints=5, eval_every=2)
    return cfg


def test_run_with_an_average_resumes_bit_exact(root):
    kw = dict(ema_decay=0.9, ema_start_step=1)
    full = distill(config(root, "ema_full", **kw), progress=False)
    stopped = distill(config(root, "ema_resumed", **kw), stop_at_step=3, progress=False)
    assert stopped.final_dir is None
    resumed = distill(config(root, "ema_resumed", **kw), progress=False)  # from step 2
    a = flat(checkpoint_state(full.output_dir, resumed.step))
    b = flat(checkpoint_state(resumed.output_dir, resumed.step))
    assert any(k.startswith("generator_ema.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fa, fb = weights(full.final_dir), weights(resumed.final_dir)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert (without_timing(read_metrics(resumed.metrics_path))
            == without_timing(read_metrics(full.metrics_path)))
    # A checkpoint written with another average is refused, naming the setting.
    with pytest.raises(ValueError, match="ema_decay"):
        distill(config(root, "ema_resumed", steps=6, ema_decay=0.8, ema_start_step=1),
                progress=False)
    with pytest.raises(ValueError, match="ema_decay"):
        distill(config(root, "ema_resumed", steps=6), progress=False)


@pytest.mark.parametrize("override, message", [
    (["distill.ema_decay=1.0"], "distill.ema_decay"),
    (["distill.ema_decay=0"], "distill.ema_decay"),
    (["distill.ema_decay=0.99", "distill.ema_start_step=-1"], "distill.ema_start_step"),
    (["distill.ema_start_step=5"], "distill.ema_start_step"),
])
def test_settings_are_checked(root, override, message):
    with pytest.raises(ValueError, match=message):
        load_distill_config(config(root, "bad"), override)
