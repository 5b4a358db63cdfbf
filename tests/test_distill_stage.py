"""The distillation stage in one process: it runs from a linearised generator folder, an
interrupted run resumes bit-exact, the distilled model is saved with its sampler and
``linattn sample`` generates with it at its step count; configuration errors name the field."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import linattn.dit as dit
from linattn.train.cli import main as cli_main
from linattn.train.distill import distill, load_distill_config, load_distilled, seeded_sample
from linattn.train.distill.models import SamplerSpec
from linattn.train.distill.sample import run_conditioning
from linattn.train.flow import FlowModel
from linattn.train.metrics import read_metrics

from checkpoints import checkpoint_state, flat, without_timing

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=16)
STEPS = 4
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "linattn", "train", "configs")

# Tiny models: one intra-op thread (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def linear_generator(path):
    """The first stage's output in miniature: the teacher's weights with layer 0 linear
    (save_pretrained after linattn.convert, what final/ holds)."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = WanTransformer3DModel(**TINY)
    dit.convert(model, layers=[0], mode="linear", backend="reference")
    model.save_pretrained(path)
    return path


def config(root, name, **distill_kw):
    cfg = {
        "model": {"config": TINY, "init_seed": 1},
        "generator": {"path": os.path.join(root, "stage1"), "backend": "reference"},
        "conditioning": {"random_conditioning": [3, 3, 32]},
        "distill": {"latent_shape": [4, 1, 4, 4], "steps": STEPS, "global_batch_size": 2,
                    "fake_score_updates": 2, "lr": 1e-3, "fake_score_lr": 1e-3,
                    "mixed_precision": "no", "gradient_checkpointing": False, "seed": 3},
        "output": {"dir": os.path.join(root, name), "checkpoint_every": 2, "eval_every": 2,
                   "eval_num_steps": 4},
    }
    cfg["distill"].update(distill_kw)
    return cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("distill"))
    linear_generator(os.path.join(path, "stage1", "final"))
    return path


@pytest.fixture(scope="module")
def full_run(root):
    return distill(config(root, "full"), progress=False)


def test_stage_runs_from_a_linearised_generator(root, full_run):
    assert full_run.step == STEPS
    model, spec = load_distilled(full_run.final_dir, backend="reference")
    # Shifted (shift 3) default times of a 4-step generator: 1, 0.9, 0.75, 0.5.
    assert spec.num_steps == 4
    torch.testing.assert_close(torch.tensor(spec.times), torch.tensor([1.0, 0.9, 0.75, 0.5]))
    # The generator's linear layer stayed linear, and it was trained.
    assert [r.kind for r in dit.layer_report(model)] == ["linear", "softmax"]
    start = dit.load_converted(os.path.join(root, "stage1", "final"), backend="reference")
    moved = [n for n, p in model.state_dict().items()
             if not torch.equal(p, start.state_dict()[n])]
    assert moved

    records = read_metrics(full_run.metrics_path)
    assert [r["step"] for r in records] == list(range(STEPS + 1))
    for key in ("dmd_push", "fake_score_loss", "score_gap", "generator_grad_norm"):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in records[1:]), key
    assert "eval_rel_mse" in records[0] and "eval_rel_mse" in records[-1]
    assert os.path.isfile(os.path.join(full_run.output_dir, "distill.png"))


def test_interrupted_run_resumes_bit_exact(root, full_run):
    stopped = distill(config(root, "resumed"), stop_at_step=3, progress=False)
    assert stopped.step == 3 and stopped.final_dir is None and stopped.model is None
    resumed = distill(config(root, "resumed"), progress=False)  # from the step-2 checkpoint
    assert resumed.step == STEPS

    a = flat(checkpoint_state(os.path.join(root, "full"), STEPS))
    b = flat(checkpoint_state(os.path.join(root, "resumed"), STEPS))
    assert a.keys() == b.keys()
    assert any(k.startswith("fake_score_model.") for k in a)   # the fake score is in it
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (without_timing(read_metrics(resumed.metrics_path))
            == without_timing(read_metrics(full_run.metrics_path)))


def test_longer_run_continues_a_finished_shorter_one(root, full_run):
    """With a constant learning rate nothing depends on distill.steps, so a run asked for more
    steps continues a finished shorter run from its last checkpoint, bit for bit the longer
    run; a cosine schedule (which does depend on it) refuses."""
    short = distill(config(root, "extended", steps=STEPS // 2), progress=False)
    assert short.step == STEPS // 2 and short.final_dir is not None
    longer = distill(config(root, "extended"), progress=False)
    assert longer.step == STEPS
    a = flat(checkpoint_state(os.path.join(root, "full"), STEPS))
    b = flat(checkpoint_state(os.path.join(root, "extended"), STEPS))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert (without_timing(read_metrics(longer.metrics_path))
            == without_timing(read_metrics(full_run.metrics_path)))
    distill(config(root, "cosine", steps=STEPS // 2, lr_schedule="cosine"), progress=False)
    with pytest.raises(ValueError, match="steps"):
        distill(config(root, "cosine", lr_schedule="cosine"), progress=False)


def test_sample_command_generates_at_the_distilled_step_count(root, full_run, tmp_path,
                                                              capsys):
    path = tmp_path / "distill.json"
    path.write_text(json.dumps(config(root, "full")))
    out = tmp_path / "samples.safetensors"
    args = ["sample", str(path), "--num", "3", "--seed", "7", "--batch-size", "2", "--out",
            str(out), "--backend", "reference", "--no-progress"]
    assert cli_main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_steps"] == 4 and summary["shape"] == [3, 4, 1, 4, 4]
    first = load_file(str(out))["samples"]
    assert torch.isfinite(first).all()
    # Same seed, other batching: the same samples (noise is a function of (seed, sample)).
    assert cli_main(args[:6] + ["--batch-size", "3"] + args[8:]) == 0
    torch.testing.assert_close(load_file(str(out))["samples"], first, rtol=1e-5, atol=1e-5)


def test_implied_step_rule_is_trained_recorded_and_sampled(root, tmp_path, capsys):
    """distill.renoise "implied": the run's sampler.json records the rule, load_distilled
    returns it, and `linattn sample` samples with it: its samples are the deterministic
    rule's (equal to sampling with it directly, unlike the fresh rule's from the same seed).
    A sampler.json written before the rule was a setting reads as "fresh"."""
    run = distill(config(root, "implied", steps=2, renoise="implied"), progress=False)
    model, spec = load_distilled(run.final_dir, backend="reference")
    assert spec.renoise == "implied"
    path = tmp_path / "distill.json"
    path.write_text(json.dumps(config(root, "implied", steps=2, renoise="implied")))
    out = tmp_path / "samples.safetensors"
    assert cli_main(["sample", str(path), "--num", "2", "--seed", "4", "--out", str(out),
                     "--backend", "reference", "--no-progress"]) == 0
    capsys.readouterr()
    written = load_file(str(out))
    conditioning = run_conditioning(load_distill_config(json.loads(path.read_text())))
    cond = conditioning.rows(written["rows"].tolist())[0]
    flow = FlowModel(model, input_dtype=torch.float32)
    kw = dict(seed=4, shape=[4, 1, 4, 4])
    implied = seeded_sample(flow, cond, spec.times, step_rule="implied", **kw)
    fresh = seeded_sample(flow, cond, spec.times, **kw)
    torch.testing.assert_close(written["samples"], implied, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(written["samples"], fresh, rtol=1e-3, atol=1e-3)

    data = json.loads((Path(run.final_dir) / "sampler.json").read_text())
    del data["renoise"]
    old = tmp_path / "old"
    old.mkdir()
    (old / "sampler.json").write_text(json.dumps(data))
    assert SamplerSpec.load(old).renoise == "fresh"


def test_example_configs_load():
    tiny = load_distill_config(os.path.join(CONFIGS, "tiny_wan_distill_cpu.yaml"))
    assert tiny.distill.num_steps == 4
    wan = load_distill_config(os.path.join(CONFIGS, "wan2.1_t2v_1.3b_distill.yaml"))
    d = wan.distill
    # The published Wan 2.1 DMD recipe (docs/distill.md).
    assert (d.num_steps, d.fake_score_updates, d.lr, d.fake_score_lr, d.guidance_scale) == \
        (4, 5, 2e-6, 4e-7, 3.0)
    assert d.betas == [0.0, 0.999] and d.strategy == "fsdp"
    assert (d.ema_decay, d.ema_start_step) == (0.99, 200)
    assert wan.generator_times == [1.0, 0.75, 0.5, 0.25]
    ode = load_distill_config(os.path.join(CONFIGS, "wan2.1_t2v_1.3b_ode_init.yaml")).distill
    assert (ode.fake_score_updates, ode.dmd_weight, ode.regression_inputs, ode.renoise) == \
        (0, 0.0, "trajectory", "implied")
    assert (ode.latent_shape, ode.guidance_scale, ode.times) == (d.latent_shape, d.guidance_scale,
                                                                 d.times)


@pytest.mark.parametrize("override, message", [
    (["distill.num_steps=0"], "distill.num_steps"),
    (["distill.times=[1.0, 0.5]"], "distill.times"),
    (["distill.times=[0.9, 0.6, 0.4, 0.2]"], "distill.times"),
    (["distill.guidance_scale=0.5"], "distill.guidance_scale"),
    (["distill.score_t_min=0.99"], "distill.score_t_min"),
    (["distill.stategy=ddp"], "stategy"),
    (["distill.renoise=ddim"], "distill.renoise: expected one of"),
    (["conditioning.prompts=[a cat]"], "conditioning"),
])
def test_config_errors_name_the_field(root, override, message):
    with pytest.raises(ValueError, match=message):
        load_distill_config(config(root, "bad"), override)


def test_cli_routes_by_section(root, tmp_path, capsys):
    path = tmp_path / "distill.json"
    path.write_text(json.dumps(config(root, "cli")))
    assert cli_main(["generate-data", str(path)]) == 2
    assert "distillation config" in capsys.readouterr().err
    first_stage = {k: v for k, v in config(root, "cli").items() if k not in ("distill",)}
    path.write_text(json.dumps(first_stage))
    assert cli_main(["sample", str(path)]) == 2
    assert "no `distill` section" in capsys.readouterr().err


def test_bf16_autocast_and_gradient_checkpointing_run(root):
    cfg = config(root, "bf16", steps=2, mixed_precision="bf16", gradient_checkpointing=True)
    cfg["output"].update(eval_every=0, checkpoint_every=2)
    cfg["model"]["teacher_dtype"] = "bfloat16"
    result = distill(cfg, progress=False)
    records = read_metrics(result.metrics_path)
    assert result.step == 2
    assert all(r["dmd_push"] > 0 and r["fake_score_loss"] > 0 for r in records[1:])
    # The saved generator keeps float32 master weights.
    model, _ = load_distilled(result.final_dir, backend="reference")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_toy_teacher_run_names_its_classes_and_logs_the_toy_figures(tmp_path):
    """On the toy teacher (model.pretrained and conditioning.embeddings "linattn:toy"), the stage
    needs no conditioning file of its own: it distils on the toy's class rows (with the null row
    as the real score's unconditional branch), and every evaluation logs the toy's fidelity
    figures with their spread and the teacher's, as the first stage's evaluations do."""
    import linattn.toy as toy
    from linattn.train.conditioning import Conditioning

    cfg = {
        "model": {"pretrained": "linattn:toy"},
        "conditioning": {"embeddings": "linattn:toy"},
        "distill": {"latent_shape": list(toy.VIDEO_SHAPE), "steps": 1, "global_batch_size": 2,
                    "fake_score_updates": 1, "lr": 1e-4, "fake_score_lr": 1e-4,
                    "mixed_precision": "no", "gradient_checkpointing": False},
        "output": {"dir": str(tmp_path / "toy"), "checkpoint_every": 1, "eval_every": 1,
                   "eval_num_samples": 6, "eval_num_steps": 2},
    }
    assert load_distill_config(cfg).conditioning.embeddings == str(toy.CLASS_EMBEDDINGS_FILE)
    result = distill(cfg, progress=False)
    used = Conditioning.load(os.path.join(result.output_dir, "conditioning.safetensors"))
    classes = toy.class_conditioning()
    assert torch.equal(used.embeds, classes.embeds) and torch.equal(used.negative,
                                                                    classes.negative)
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        for name in ("rel_mse", "psnr", "class_accuracy", "frechet_distance", "jitter",
                     "flicker"):
            assert f"eval_{name}" in record and f"eval_{name}_spread" in record, name
        for name in ("class_accuracy", "frechet_distance", "jitter", "flicker"):
            assert f"eval_teacher_{name}" in record, name
    # The teacher's figures are of its own samples (the same at every evaluation); the
    # generator's 4-step samples are not the teacher's.
    assert records[0]["eval_teacher_frechet_distance"] == records[1]["eval_teacher_frechet_distance"]
    assert records[0]["eval_rel_mse"] > 0


def test_feature_map_lr_moves_the_maps_at_their_own_rate_and_resumes(root):
    """distill.feature_map_lr gives the linear layers' Hedgehog maps their own learning rate:
    with the rest at a negligible one, the maps move and nothing else does; the two-group
    optimiser resumes bit-exact; a generator without maps is refused naming the field."""
    def run(name, **kw):
        cfg = config(root, name, steps=2, lr=1e-12, feature_map_lr=1e-2, **kw)
        cfg["output"].update(eval_every=0, checkpoint_every=1)
        return cfg

    result = distill(run("maps_lr"), progress=False)
    start = dit.load_converted(os.path.join(root, "stage1", "final"), backend="reference")
    trained, _ = load_distilled(result.final_dir, backend="reference")
    before, after = start.state_dict(), trained.state_dict()
    for name in after:
        change = (after[name].float() - before[name].float()).abs().max().item()
        if ".processor." in name:
            assert change > 1e-3, name
        else:
            assert change < 1e-6, name
    assert [r["feature_map_lr"] for r in read_metrics(result.metrics_path)[1:]] == [1e-2, 1e-2]

    distill(run("maps_lr_resumed"), stop_at_step=1, progress=False)
    resumed = distill(run("maps_lr_resumed"), progress=False)
    a = flat(checkpoint_state(os.path.join(root, "maps_lr"), 2))
    b = flat(checkpoint_state(resumed.output_dir, 2))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a run of the other kind (one optimiser group) does not resume from these checkpoints
    with pytest.raises(ValueError, match="feature_map_lr=0.01, this run has None"):
        distill({**run("maps_lr"), "distill": {**run("maps_lr")["distill"],
                                               "feature_map_lr": None, "steps": 3}},
                progress=False)

    softmax = run("maps_lr_softmax")
    softmax["generator"]["path"] = None
    with pytest.raises(ValueError, match="distill.feature_map_lr: the generator has no"):
        distill(softmax, progress=False)
    with pytest.raises(ValueError, match="distill.feature_map_lr: must be > 0"):
        load_distill_config(config(root, "bad"), ["distill.feature_map_lr=0"])


def test_trainable_narrows_the_generator_to_the_named_parameters(root):
    """distill.trainable trains only the generator parameters whose names contain one of its
    substrings (here its self-attention, as the first stage trains): those move, every other
    parameter of the distilled model is bit-identical to the first stage's; a substring that
    matches nothing is refused naming the field."""
    cfg = config(root, "attn_only", steps=2, lr=1e-2, trainable=["attn1."])
    cfg["output"].update(eval_every=0)
    result = distill(cfg, progress=False)
    start = dit.load_converted(os.path.join(root, "stage1", "final"), backend="reference")
    trained, _ = load_distilled(result.final_dir, backend="reference")
    before, after = start.state_dict(), trained.state_dict()
    moved = {name for name in after if not torch.equal(after[name], before[name])}
    assert moved and all("attn1." in name for name in moved), sorted(moved)
    assert any("attn1.processor." in name for name in moved)    # the feature maps train too
    assert all(torch.equal(after[n], before[n]) for n in after if "attn1." not in n)

    bad = config(root, "attn_none", steps=1, trainable=["no_such_parameter"])
    with pytest.raises(ValueError, match="distill.trainable: .*matches no model parameter"):
        distill(bad, progress=False)
