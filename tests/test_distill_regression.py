"""DMD's regression anchor in the distillation stage (linattn.train.distill.regression): its
pairs are the teacher data's (starting noise, guided sample), its inputs are what the
generator's step sees at inference ("renoised"), the teacher's own trajectory at the
generator's times ("trajectory", exact on the Euler path) or the generator's own earlier steps
("generated"), it pulls the generator's samples
onto the teacher's, a run with it resumes bit-exact, regression alone (the ODE
initialisation) trains no fake score, and its settings are checked."""
import os

import pytest
import torch
from diffusers import WanTransformer3DModel

from linattn.train.conditioning import Conditioning
from linattn.train.data import TeacherDataset
from linattn.train.distill import distill, load_distill_config
from linattn.train.distill.regression import RegressionPairs, regression_input
from linattn.train.distill.sampler import (backward_simulation, clean_prediction, few_step_sample,
                                           generator_input)
from linattn.train.flow import FlowModel
from linattn.train.metrics import read_metrics
from linattn.train.teacher_data import DataSpec, conditioning_digest, generate_teacher_data

from checkpoints import checkpoint_state, flat, without_timing
from test_distill_stage import TINY

LATENT = [4, 1, 4, 4]
GUIDANCE = 3.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_teacher():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)     # model.init_seed 1 of the stage's config below
        return WanTransformer3DModel(**TINY).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """Teacher data of the tiny teacher: 6 guided 4-step trajectories."""
    path = str(tmp_path_factory.mktemp("pairs"))
    gen = torch.Generator().manual_seed(5)
    cond = Conditioning(torch.randn(3, 3, 32, generator=gen),
                        torch.randn(1, 3, 32, generator=gen))
    spec = DataSpec(num_trajectories=6, trajectories_per_shard=4, num_steps=4, shift=3.0,
                    num_train_timesteps=1000, latent_shape=tuple(LATENT),
                    guidance_scale=GUIDANCE, store_dtype="float32", seed=9,
                    conditioning_id=conditioning_digest(cond))
    generate_teacher_data(tiny_teacher(), path, spec, cond, progress=False)
    return path


def config(root, name, pairs_dir, **distill_kw):
    cfg = {
        "model": {"config": TINY, "init_seed": 1},
        "conditioning": {"random_conditioning": [3, 3, 32]},
        "distill": {"latent_shape": LATENT, "steps": 4, "global_batch_size": 2,
                    "fake_score_updates": 1, "lr": 1e-3, "fake_score_lr": 1e-3,
                    "guidance_scale": GUIDANCE, "regression_data": pairs_dir,
                    "regression_weight": 1.0, "mixed_precision": "no",
                    "gradient_checkpointing": False, "seed": 3},
        "output": {"dir": os.path.join(root, name), "checkpoint_every": 2, "eval_every": 0},
    }
    cfg["distill"].update(distill_kw)
    return cfg


def test_pairs_are_each_trajectorys_starting_noise_and_final_sample(pairs_dir):
    pairs = RegressionPairs(pairs_dir, latent_shape=LATENT, guidance_scale=GUIDANCE)
    ds = TeacherDataset(pairs_dir)
    assert len(pairs) == 6
    noise, sample, cond = pairs.batch([4, 1], torch.device("cpu"))
    for row, traj in enumerate([4, 1]):
        first = ds.batch([traj * 4])          # the trajectory's first point: t = 1, x_t = noise
        assert float(first["t"][0]) == 1.0
        assert torch.equal(noise[row], first["x_t"][0])
        assert torch.equal(sample[row], ds.samples([traj])[0])
        assert torch.equal(cond[row], ds.conditioning([traj])[0])


def test_inputs_are_the_pair_noise_at_t1_and_the_renoised_sample_after():
    noise, sample, fresh = torch.randn(3, 2, 4, 4, 4).unbind(0)
    assert torch.equal(regression_input(noise, sample, 1.0, fresh), noise)
    torch.testing.assert_close(regression_input(noise, sample, 0.75, fresh),
                               0.25 * sample + 0.75 * fresh)


def chord(ds, traj, tau):
    """The teacher's Euler path at tau, from its stored states alone (no velocities): the
    straight line between the two states around tau (the final sample after the last)."""
    sigmas = ds.sigmas.tolist()
    n = len(sigmas) - 1
    for j in range(n):
        if sigmas[j] >= tau >= sigmas[j + 1]:
            start = ds.batch([traj * n + j])["x_t"][0]
            end = (ds.batch([traj * n + j + 1])["x_t"][0] if j + 1 < n
                   else ds.samples([traj])[0])
            w = (sigmas[j] - tau) / (sigmas[j] - sigmas[j + 1])
            return start + w * (end - start)
    raise AssertionError(tau)


def test_trajectory_inputs_lie_on_the_teachers_euler_path(pairs_dir):
    """"trajectory" inputs are the teacher's sampler state at the generator's times: a stored
    state at a stored time, and between two stored times the point of the straight Euler step
    that joins them, checked against the stored states only."""
    times = [1.0, 0.9, 0.75, 0.5]          # the default 4-step times after shift 3
    pairs = RegressionPairs(pairs_dir, latent_shape=LATENT, guidance_scale=GUIDANCE,
                            inputs="trajectory", times=times)
    ds = TeacherDataset(pairs_dir)
    stored = ds.sigmas.tolist()
    assert not any(abs(t - s) < 1e-3 for t in times[1:] for s in stored)   # all in between
    for tau in times[1:] + [stored[1], 0.5 * (stored[-2] + stored[-1])]:
        got = pairs.trajectory_points([5, 0, 3], tau)
        for row, traj in enumerate([5, 0, 3]):
            torch.testing.assert_close(got[row], chord(ds, traj, tau), atol=2e-5, rtol=1e-5)
    at_stored = pairs.trajectory_points([2], stored[2])
    assert torch.equal(at_stored[0], ds.batch([2 * 4 + 2])["x_t"][0])
    noise, sample, _ = pairs.batch([2], torch.device("cpu"))
    fresh = torch.randn_like(noise)
    assert torch.equal(pairs.inputs_at([2], noise, sample, 1.0, lambda: fresh), noise)
    torch.testing.assert_close(pairs.inputs_at([2], noise, sample, 0.75, lambda: fresh),
                               chord(ds, 2, 0.75)[None], atol=2e-5, rtol=1e-5)


def test_trajectory_inputs_off_the_euler_path_are_refused(tmp_path):
    """UniPC's states are exact only at its own times: a generator time between them is
    refused, naming the setting, and a stored time is accepted."""
    path = str(tmp_path / "unipc")
    cond = Conditioning(torch.randn(2, 3, 32), torch.randn(1, 3, 32))
    spec = DataSpec(num_trajectories=1, trajectories_per_shard=1, num_steps=3, shift=3.0,
                    num_train_timesteps=1000, latent_shape=tuple(LATENT),
                    guidance_scale=GUIDANCE, store_dtype="float32", seed=2,
                    conditioning_id=conditioning_digest(cond), sampler="unipc")
    generate_teacher_data(tiny_teacher(), path, spec, cond, progress=False)
    stored = TeacherDataset(path).sigmas.tolist()
    with pytest.raises(ValueError, match="distill.regression_inputs: 'trajectory' .*'unipc'"):
        RegressionPairs(path, latent_shape=LATENT, guidance_scale=GUIDANCE,
                        inputs="trajectory", times=[1.0, 0.5 * (stored[1] + stored[2])])
    pairs = RegressionPairs(path, latent_shape=LATENT, guidance_scale=GUIDANCE,
                            inputs="trajectory", times=[1.0, stored[1]])
    assert torch.equal(pairs.trajectory_points([0], stored[1])[0],
                       TeacherDataset(path).batch([1])["x_t"][0])
    # renoised inputs need no stored points at the generator's times
    RegressionPairs(path, latent_shape=LATENT, guidance_scale=GUIDANCE,
                    times=[1.0, 0.5 * (stored[1] + stored[2])])


@pytest.mark.parametrize("kw, message", [
    (dict(latent_shape=[4, 2, 4, 4]), "latents of shape"),
    (dict(guidance_scale=1.0), "sampled with guidance 3.0"),
])
def test_pairs_must_match_the_generators_shape_and_guidance(pairs_dir, kw, message):
    args = {"latent_shape": LATENT, "guidance_scale": GUIDANCE, **kw}
    with pytest.raises(ValueError, match=f"distill.regression_data: .*{message}"):
        RegressionPairs(pairs_dir, **args)


@pytest.mark.parametrize("override, message", [
    (["distill.regression_weight=-1"], "distill.regression_weight: must be a number >= 0"),
    (["distill.regression_data=null"], "distill.regression_data: .*needs a teacher-data"),
    (["distill.regression_weight=0"], "distill.regression_weight: .*would do nothing"),
    (["distill.regression_inputs=noisy"], "distill.regression_inputs: expected one of"),
    (["distill.fake_score_updates=0"], "distill.fake_score_updates: 0 leaves the fake score"),
    (["distill.fake_score_updates=-1"], "distill.fake_score_updates: expected an integer"),
])
def test_config_errors_name_the_regression_fields(tmp_path, pairs_dir, override, message):
    with pytest.raises(ValueError, match=message):
        load_distill_config(config(str(tmp_path), "bad", pairs_dir), override)


def step0_error(model, pairs_dir):
    """mean ‖G(z) − x(z)‖² of a one-step generator over every pair."""
    pairs = RegressionPairs(pairs_dir, latent_shape=LATENT, guidance_scale=GUIDANCE)
    noise, sample, cond = pairs.batch(range(len(pairs)), torch.device("cpu"))
    with torch.no_grad():
        x = clean_prediction(FlowModel(model, 1000, input_dtype=torch.float32), noise, 1.0, cond)
    return float((x - sample).square().mean())


def test_anchor_pulls_a_one_step_generator_onto_the_teachers_samples(tmp_path, pairs_dir):
    """K = 1 is DMD's own setting: the generator maps the pair's noise to a sample in one step,
    and the regression target is the teacher's sample from that noise. With the anchor
    dominating, the generator's error on the pairs falls; the logged regression loss falls."""
    teacher = tiny_teacher()
    before = step0_error(teacher, pairs_dir)
    result = distill(config(str(tmp_path), "one_step", pairs_dir, num_steps=1, steps=6,
                            regression_weight=100.0), progress=False)
    after = step0_error(result.model, pairs_dir)
    assert after < 0.5 * before, (before, after)
    losses = [r["regression_loss"] for r in read_metrics(result.metrics_path)[1:]]
    assert len(losses) == 6 and losses[-1] < losses[0], losses


ODE_INIT = dict(fake_score_updates=0, dmd_weight=0.0, regression_inputs="trajectory")


GENERATED = dict(fake_score_updates=0, dmd_weight=0.0, regression_inputs="generated",
                 renoise="implied")


@pytest.mark.parametrize("kw", [{}, ODE_INIT, GENERATED],
                         ids=["dmd_anchored", "ode_initialisation", "generated_inputs"])
def test_anchored_run_resumes_bit_exact(tmp_path, pairs_dir, kw):
    root = str(tmp_path)
    full = distill(config(root, "full", pairs_dir, **kw), progress=False)
    records = read_metrics(full.metrics_path)
    assert all(r["regression_loss"] > 0 for r in records[1:])
    stopped = distill(config(root, "resumed", pairs_dir, **kw), stop_at_step=3, progress=False)
    assert stopped.step == 3
    resumed = distill(config(root, "resumed", pairs_dir, **kw), progress=False)
    assert resumed.step == 4
    a = flat(checkpoint_state(os.path.join(root, "full"), 4))
    b = flat(checkpoint_state(os.path.join(root, "resumed"), 4))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert without_timing(read_metrics(resumed.metrics_path)) == without_timing(records)


def test_regression_only_control_ignores_the_fake_score(tmp_path, pairs_dir):
    """distill.dmd_weight 0: the generator learns from the anchor alone, so how the fake score
    trains cannot change it (two fake-score learning rates, the same generator bit for bit),
    while with DMD on it does; the push is still logged."""
    root = str(tmp_path)

    def generator(name, **kw):
        result = distill(config(root, name, pairs_dir, steps=2, fake_score_updates=2, **kw),
                         progress=False)
        return result.model.state_dict(), read_metrics(result.metrics_path)

    slow, records = generator("slow", dmd_weight=0.0, fake_score_lr=1e-4)
    fast, _ = generator("fast", dmd_weight=0.0, fake_score_lr=1e-1)
    assert all(torch.equal(slow[k], fast[k]) for k in slow)
    assert all(r["dmd_push"] > 0 and r["regression_loss"] > 0 for r in records[1:])
    slow_dmd, _ = generator("slow_dmd", fake_score_lr=1e-4)
    fast_dmd, _ = generator("fast_dmd", fake_score_lr=1e-1)
    assert not all(torch.equal(slow_dmd[k], fast_dmd[k]) for k in slow_dmd)
    moved = [k for k in slow if not torch.equal(slow[k], slow_dmd[k])]
    assert moved


def test_regression_only_needs_the_anchor(tmp_path, pairs_dir):
    with pytest.raises(ValueError, match="distill.dmd_weight: 0 with no regression anchor"):
        load_distill_config(config(str(tmp_path), "bad", pairs_dir, regression_data=None,
                                   regression_weight=0.0, dmd_weight=0.0))
    with pytest.raises(ValueError, match="distill.dmd_weight: must be"):
        load_distill_config(config(str(tmp_path), "bad", pairs_dir, dmd_weight=-1.0))


def flow_map_error(model, pairs_dir, times):
    """mean over the generator's times of ‖G_k(teacher's state at t_k) − x(z)‖², every pair."""
    pairs = RegressionPairs(pairs_dir, latent_shape=LATENT, guidance_scale=GUIDANCE,
                            inputs="trajectory", times=times)
    ids = list(range(len(pairs)))
    noise, sample, cond = pairs.batch(ids, torch.device("cpu"))
    fn = FlowModel(model, 1000, input_dtype=torch.float32)
    errors = []
    with torch.no_grad():
        for t in times:
            x = pairs.inputs_at(ids, noise, sample, t, lambda: torch.zeros_like(noise))
            errors.append(float((clean_prediction(fn, x, t, cond) - sample).square().mean()))
    return errors


def test_ode_initialisation_learns_the_teachers_flow_map_and_trains_no_fake_score(
        tmp_path, pairs_dir):
    """Regression alone on the teacher's trajectory states (fake_score_updates 0, dmd_weight
    0): the generator's prediction of the teacher's sample from its state at each of the K
    times improves at every time, no push is computed or logged, and the fake score is
    never trained (it stays the teacher's copy)."""
    teacher = tiny_teacher()
    times = [1.0, 0.9, 0.75, 0.5]
    before = flow_map_error(teacher, pairs_dir, times)
    result = distill(config(str(tmp_path), "ode", pairs_dir, steps=12, **ODE_INIT),
                     progress=False)
    after = flow_map_error(result.model, pairs_dir, times)
    assert all(a < 0.7 * b for a, b in zip(after, before)), (before, after)
    records = read_metrics(result.metrics_path)[1:]
    assert len(records) == 12
    assert not any("dmd_push" in r or "fake_score_loss" in r for r in records)
    assert all(r["generator_loss"] == pytest.approx(r["regression_loss"]) for r in records)
    state = flat(checkpoint_state(os.path.join(str(tmp_path), "ode"), 12))
    fake = {k[len("fake_score_model."):]: v for k, v in state.items()
            if k.startswith("fake_score_model.")}
    reference = teacher.state_dict()
    assert set(fake) == set(reference)
    for name, value in fake.items():
        assert torch.equal(value, reference[name].float()), name
    moved = [k for k in reference if not torch.equal(state[f"model.{k}"], reference[k])]
    assert moved      # while the generator did train


def test_generated_inputs_are_the_generators_own_earlier_steps(pairs_dir):
    """"generated" inputs: the pair's noise at t = 1, else exactly what the generator's own
    steps hand the step at inference (a hand-written chain of clean predictions joined by each
    step rule), the input backward simulation's exit step predicts from; without the
    generator's steps to call, refused."""
    times = [1.0, 0.9, 0.75, 0.5]
    pairs = RegressionPairs(pairs_dir, latent_shape=LATENT, guidance_scale=GUIDANCE,
                            inputs="generated", times=times)
    ids = [4, 0, 2]
    noise, sample, cond = pairs.batch(ids, torch.device("cpu"))
    fn = FlowModel(tiny_teacher(), 1000, input_dtype=torch.float32)
    step_noise = {k: torch.randn_like(noise) for k in range(1, len(times))}
    for rule in ("implied", "fresh"):
        x, chain = noise.clone(), {0: noise}
        with torch.no_grad():
            for k in range(len(times) - 1):
                x0 = clean_prediction(fn, x, times[k], cond)
                eps = (step_noise[k + 1] if rule == "fresh"
                       else (x - (1 - times[k]) * x0) / times[k])
                x = (1 - times[k + 1]) * x0 + times[k + 1] * eps
                chain[k + 1] = x
        for k, t in enumerate(times):
            got = pairs.inputs_at(ids, noise, sample, t, lambda: pytest.fail("drew fresh noise"),
                                  generated=lambda: generator_input(
                                      fn, noise, cond, times, step_noise.__getitem__, k,
                                      step_rule=rule))
            torch.testing.assert_close(got, chain[k], atol=1e-5, rtol=1e-5)
            with torch.no_grad():
                exit_prediction = backward_simulation(fn, fn, noise, cond, times,
                                                      step_noise.__getitem__, k, grad=False,
                                                      step_rule=rule)
                torch.testing.assert_close(exit_prediction,
                                           clean_prediction(fn, got, t, cond))
    with pytest.raises(ValueError, match="'generated' inputs need the generator's own steps"):
        pairs.inputs_at(ids, noise, sample, 0.75, lambda: torch.zeros_like(noise))


def sample_error(model, pairs_dir, times):
    """mean ‖K-step sample from z − x(z)‖² over every pair, the deterministic step rule."""
    pairs = RegressionPairs(pairs_dir, latent_shape=LATENT, guidance_scale=GUIDANCE)
    noise, sample, cond = pairs.batch(range(len(pairs)), torch.device("cpu"))
    fn = FlowModel(model, 1000, input_dtype=torch.float32)
    x = few_step_sample(fn, noise, cond, times, step_rule="implied")
    return float((x - sample).square().mean())


def test_generated_inputs_pull_the_k_step_sample_onto_the_teachers(tmp_path, pairs_dir):
    """Regression on the generator's own inputs trains what the sampler computes: the 4-step
    sample's error against the teacher's sample from the same noise falls."""
    times = [1.0, 0.9, 0.75, 0.5]
    before = sample_error(tiny_teacher(), pairs_dir, times)
    result = distill(config(str(tmp_path), "generated", pairs_dir, steps=12, **GENERATED),
                     progress=False)
    after = sample_error(result.model, pairs_dir, times)
    assert after < 0.7 * before, (before, after)
