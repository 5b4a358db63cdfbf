"""linattn.toy: the procedural videos, the shipped teacher and classifier, the fidelity metrics.

Everything runs in seconds: the teacher samples with a 2-step sampler, the metrics see a few
videos. The shipped weights are loaded as a user would, offline from the package folder.
"""
import copy
import math

import pytest
import torch

pytest.importorskip("diffusers")

import linattn.toy as toy  # noqa: E402
from linattn.toy import fidelity, videos  # noqa: E402
from linattn.train.conditioning import Conditioning  # noqa: E402

FAST = toy.Sampler(num_steps=2, shift=3.0, guidance_scale=3.0)


# ---------------------------------------------------------------- procedural videos

def test_videos_shapes_range_and_labels():
    v = toy.procedural_videos(24, seed=7)
    assert v.videos.shape == (24, *toy.VIDEO_SHAPE) and v.videos.dtype == torch.float32
    assert v.labels.shape == (24,) and v.labels.dtype == torch.int64
    assert v.videos.min() >= -1 and v.videos.max() <= 1
    assert ((v.labels >= 0) & (v.labels < toy.NUM_CLASSES)).all()
    assert v.centers.shape == (24, 2, toy.NUM_FRAMES, 2)


def test_videos_deterministic_and_independent_of_batching():
    a = toy.procedural_videos(6, seed=3)
    b = toy.procedural_videos(6, seed=3)
    assert torch.equal(a.videos, b.videos) and torch.equal(a.labels, b.labels)
    tail = toy.procedural_videos(2, seed=3, start=4)
    assert torch.equal(tail.videos, a.videos[4:]) and torch.equal(tail.labels, a.labels[4:])
    assert not torch.equal(toy.procedural_videos(6, seed=4).videos, a.videos)


def test_videos_follow_their_label():
    labels = list(range(toy.NUM_CLASSES)) * 3
    v = toy.procedural_videos(len(labels), seed=11, labels=labels)
    assert v.labels.tolist() == labels
    for i, label in enumerate(labels):
        direction, count = videos.split_label(label)
        present = ~torch.isnan(v.centers[i, :, 0, 0])
        assert int(present.sum()) == videos.COUNTS[count]
        start_move = v.centers[i, present, 1] - v.centers[i, present, 0]   # (objects, 2)
        dy, dx = videos._UNIT[videos.DIRECTIONS[direction]]
        along, sign = (0, dy) if dy else (1, dx)
        assert (start_move[:, along] * sign > 0.5).all()          # moving the named way
        assert (start_move[:, 1 - along].abs() < 1e-6).all()      # and only that way
        # The drawn frames hold the objects where the centres say.
        frame = v.videos[i, 0, 0]
        for y, x in v.centers[i, present, 0].tolist():
            assert frame[int(y), int(x)] > 0.5


def test_videos_reject_bad_labels():
    with pytest.raises(ValueError, match="label"):
        toy.procedural_videos(1, labels=[toy.NUM_CLASSES])
    with pytest.raises(ValueError, match="labels"):
        toy.procedural_videos(2, labels=[0])


# ---------------------------------------------------------------- teacher and conditioning

@pytest.fixture(scope="module")
def teacher():
    return toy.load_teacher()


def test_teacher_loads_frozen_with_eight_self_attention_layers(teacher):
    from linattn.dit import layer_report

    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert len(layer_report(teacher)) == 8
    assert dict(teacher.config)["num_layers"] == 8


def test_teacher_samples_right_shape_deterministically(teacher, one_torch_thread):
    a = toy.sample(teacher, labels=[0, 5], seed=1, sampler=FAST)
    b = toy.sample(teacher, labels=[0, 5], seed=1, sampler=FAST)
    assert a.shape == (2, *toy.VIDEO_SHAPE) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, toy.sample(teacher, labels=[0, 5], seed=2, sampler=FAST))


def test_class_conditioning_matches_shipped_file():
    cond = toy.class_conditioning()
    assert cond.embeds.shape == (toy.NUM_CLASSES, 4, 32)
    assert cond.negative.shape == (1, 4, 32) and not cond.negative.any()
    shipped = Conditioning.load(str(toy.CLASS_EMBEDDINGS_FILE))
    assert torch.equal(shipped.embeds, cond.embeds) and torch.equal(shipped.negative, cond.negative)
    assert torch.equal(toy.embed_labels([3, toy.NULL_CLASS]),
                       torch.stack([cond.embeds[3], cond.negative[0]]))
    with pytest.raises(ValueError, match="labels"):
        toy.embed_labels([toy.NULL_CLASS + 1])


# ---------------------------------------------------------------- metrics

def test_identical_model_scores_zero_error_and_capped_psnr(teacher, one_torch_thread):
    reference = toy.teacher_reference(teacher, seeds=(0, 1, 2), num_samples=4, sampler=FAST)
    report = toy.evaluate(copy.deepcopy(teacher), reference)
    assert report.model["rel_mse"].mean == 0 and report.model["rel_mse"].spread == 0
    assert report.model["psnr"].mean == fidelity.PSNR_CAP
    for name in ("class_accuracy", "frechet_distance", "jitter", "flicker"):
        assert report.model[name] == report.teacher[name]
    assert len(report.model["jitter"].values) == 3
    assert "rel_mse" in report.table() and set(report.as_log()) >= {"eval_rel_mse",
                                                                    "eval_rel_mse_spread"}
    gap = toy.paired_class_gap(report.samples, reference)
    assert (gap.points, gap.standard_error, gap.num_videos) == (0.0, 0.0, 12)
    with pytest.raises(ValueError, match=r"samples: .*missing \[2\]"):
        toy.paired_class_gap({s: report.samples[s] for s in (0, 1)}, reference)


def test_converted_model_moves_away_from_teacher(teacher, one_torch_thread):
    from linattn import dit

    reference = toy.teacher_reference(teacher, seeds=(0, 1), num_samples=2, sampler=FAST)
    student = copy.deepcopy(teacher)
    dit.convert(student, layers=[0, 1], mode="linear")
    report = toy.evaluate(student, reference)
    assert report.model["rel_mse"].mean > 0
    assert report.model["psnr"].mean < fidelity.PSNR_CAP


def test_teacher_samples_given_again_give_the_same_reference(teacher, one_torch_thread,
                                                             tmp_path):
    """teacher_reference(samples=...) and toy_score.py's --teacher-cache, which feeds it."""
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    reference = toy.teacher_reference(teacher, seeds=(0, 1), num_samples=2, sampler=FAST)
    again = toy.teacher_reference(teacher, seeds=(0, 1), num_samples=2, sampler=FAST,
                                  samples=reference.samples)
    assert again.teacher_figures == reference.teacher_figures
    with pytest.raises(ValueError, match=r"seeds \[0, 2\]"):
        toy.teacher_reference(teacher, seeds=(0, 2), num_samples=2, sampler=FAST,
                              samples=reference.samples)
    with pytest.raises(ValueError, match="expected 3 videos per seed"):
        toy.teacher_reference(teacher, seeds=(0, 1), num_samples=3, sampler=FAST,
                              samples=reference.samples)

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_score.py"
    spec = importlib.util.spec_from_file_location("toy_score_under_test", script)
    toy_score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy_score)
    cache = str(tmp_path / "teacher.safetensors")
    toy_score.write_teacher_cache(cache, SimpleNamespace(samples=reference.samples, seeds=(0, 1),
                                                         num_samples=2))
    read = toy_score.read_teacher_cache(cache, (0, 1), 2)
    assert sorted(read) == [0, 1]
    assert all(torch.equal(read[s], reference.samples[s]) for s in (0, 1))
    with pytest.raises(SystemExit, match="another seeds, num_samples"):
        toy_score.read_teacher_cache(cache, (0, 1, 2), 4)


def test_evaluate_with_its_own_sampler(teacher, one_torch_thread):
    # A few-step student samples with its own sampler; the teacher's figures stay its own.
    reference = toy.teacher_reference(teacher, seeds=(0, 1, 2), num_samples=2, sampler=FAST)
    one_step = toy.Sampler(num_steps=1, shift=3.0, guidance_scale=3.0)
    report = toy.evaluate(copy.deepcopy(teacher), reference, sampler=one_step)
    assert report.model["rel_mse"].mean > 0
    assert report.teacher == reference.teacher_figures
    with pytest.raises(ValueError, match="teacher_reference"):
        toy.evaluate(teacher, reference, seeds=(0,))


def _eval_set(videos, trajectories, cond=None):
    from linattn.train.evaluate import EvalSet

    labels = torch.tensor(trajectories) % toy.NUM_CLASSES
    return EvalSet(noise=torch.zeros_like(videos),
                   cond=toy.embed_labels(labels) if cond is None else cond,
                   negative_cond=None, guidance_scale=1.0, sampler="euler", num_steps=2,
                   shift=3.0, trajectories=list(trajectories), teacher_samples=videos)


def test_trainer_metrics_on_the_trainers_eval_set():
    from linattn.train.evaluate import run_metrics

    ids = list(range(40, 64))                        # 3 groups of 8 held-out trajectories
    real = toy.procedural_videos(24, seed=9, labels=[i % toy.NUM_CLASSES for i in ids]).videos
    eval_set = _eval_set(real, ids)
    metric = toy.TrainerMetrics(groups=3)
    same = run_metrics([metric], real, eval_set)
    assert same["eval_rel_mse"] == 0 and same["eval_psnr"] == fidelity.PSNR_CAP
    for name in ("class_accuracy", "frechet_distance", "jitter", "flicker"):
        assert same[f"eval_{name}"] == same[f"eval_teacher_{name}"]
        assert f"eval_{name}_spread" in same
    assert same["eval_class_accuracy"] >= 0.9
    # A broken model: its samples' objects smeared into noise.
    noisy = (real + torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    broken = run_metrics([metric], noisy, eval_set)
    assert broken["eval_rel_mse"] > 0.1 and broken["eval_psnr"] < 20
    assert broken["eval_frechet_distance"] > 2 * same["eval_frechet_distance"]
    assert broken["eval_teacher_frechet_distance"] == same["eval_teacher_frechet_distance"]
    with pytest.raises(ValueError, match="class conditioning"):
        metric(real, _eval_set(real, ids, cond=torch.randn(24, 4, 32)))
    with pytest.raises(ValueError, match="eval_num_samples"):
        metric(real[:4], _eval_set(real[:4], ids[:4]))


def test_psnr_known_values():
    x = torch.zeros(2, 4)
    assert torch.allclose(fidelity.psnr(x + 0.2, x), torch.full((2,), 10 * math.log10(4 / 0.04)))
    assert (fidelity.psnr(x, x) == fidelity.PSNR_CAP).all()


def test_classifier_reads_real_videos():
    classifier = toy.load_classifier()
    v = toy.procedural_videos(96, seed=123)
    with torch.no_grad():
        predicted = classifier(v.videos).argmax(-1)
    assert (predicted == v.labels).float().mean() >= 0.9


def test_frechet_distance_known_cases():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=gen)
    assert fidelity.frechet_distance(a, a) < 1e-8
    shifted = a + torch.tensor([2.0, 0.0, 0.0])
    assert fidelity.frechet_distance(shifted, a) == pytest.approx(4.0, rel=1e-6)
    scaled = a * 2   # covariances I and 4I: tr(I + 4I - 2 * 2I) = 3
    assert fidelity.frechet_distance(scaled, a) == pytest.approx(3.0, rel=0.05)


def test_frechet_distance_in_classifier_space_separates_real_from_noise():
    classifier = toy.load_classifier()
    labels = toy.balanced_labels(64)
    ref, _ = fidelity.classifier_features(classifier, toy.procedural_videos(
        256, seed=fidelity.REAL_SEED, labels=toy.balanced_labels(256)).videos)
    real, _ = fidelity.classifier_features(classifier, toy.procedural_videos(
        64, seed=99, labels=labels).videos)
    noise = torch.randn(64, *toy.VIDEO_SHAPE, generator=torch.Generator().manual_seed(0))
    fake, _ = fidelity.classifier_features(classifier, noise.clamp(-1, 1))
    real_fd = fidelity.frechet_distance(real, ref)
    assert fidelity.frechet_distance(fake, ref) > 10 * real_fd


def test_jitter_grows_with_wobble():
    v = toy.procedural_videos(16, seed=5)
    straight = v.centers[:, 0]
    assert fidelity.trajectory_jitter(straight).max() < 1e-4   # constant speed, first bounce late
    wobble = straight + 0.5 * torch.randn(straight.shape, generator=torch.Generator().manual_seed(1))
    assert fidelity.trajectory_jitter(wobble).mean() > 0.3
    shaken = v.videos.clone()
    gen = torch.Generator().manual_seed(2)
    for i in range(shaken.shape[0]):
        for f in range(toy.NUM_FRAMES):
            dy, dx = torch.randint(-1, 2, (2,), generator=gen).tolist()
            shaken[i, 0, f] = torch.roll(shaken[i, 0, f], (dy, dx), (0, 1))
    assert fidelity.jitter(shaken).mean() > 5 * fidelity.jitter(v.videos).mean()


def test_paired_gap_is_the_accuracy_difference_with_its_standard_error():
    model = [torch.tensor([True, True, False, True]), torch.tensor([False, True, True, True])]
    teacher = [torch.tensor([True, False, False, True]), torch.tensor([False, True, True, True])]
    gap = fidelity.PairedGap.of(model, teacher)
    # d = (0, 1, 0, 0, 0, 0, 0, 0): accuracy 6/8 against 5/8, std(d) = sqrt(1/8) over sqrt(8)
    assert gap.points == pytest.approx(12.5) and gap.num_videos == 8
    assert gap.standard_error == pytest.approx(100 * math.sqrt(1 / 8) / math.sqrt(8))
    assert str(gap) == "+12.5 ± 12.5 points (8 videos)"


def test_paired_gap_is_tighter_than_the_accuracies_when_models_agree():
    # The same hard videos fail for both: pairing cancels them; only the 2 disagreements count.
    gen = torch.Generator().manual_seed(0)
    teacher = torch.rand(200, generator=gen) < 0.5
    model = teacher.clone()
    model[:2] = ~model[:2]
    gap = fidelity.PairedGap.of([model], [teacher])
    unpaired_se = 100 * math.sqrt(2 * 0.25 / 200)
    assert gap.standard_error < unpaired_se / 4
    assert gap.points == pytest.approx(100 * (model.float().mean() - teacher.float().mean()))


def test_paired_gap_rejects_mismatched_flags():
    with pytest.raises(ValueError, match="model_correct: expected one tensor per seed"):
        fidelity.PairedGap.of([torch.ones(3, dtype=torch.bool)], [])
    with pytest.raises(ValueError, match=r"model_correct: expected per-video flags of shape \(3,\)"):
        fidelity.PairedGap.of([torch.ones(4, dtype=torch.bool)], [torch.ones(3, dtype=torch.bool)])
    with pytest.raises(ValueError, match="needs >= 2 videos"):
        fidelity.PairedGap.of([torch.ones(1, dtype=torch.bool)], [torch.ones(1, dtype=torch.bool)])


def test_figure_spread_is_std_across_seeds():
    fig = fidelity.Figure.of([1.0, 2.0, 3.0])
    assert fig.mean == 2.0 and fig.spread == pytest.approx(1.0) and fig.values == (1.0, 2.0, 3.0)


# ---------------------------------------------------------------- entropy, training

def test_entropy_probes_leave_outputs_unchanged(teacher, one_torch_thread):
    from linattn.toy.entropy import entropy_probes

    before = toy.sample(teacher, labels=[1], seed=0, sampler=FAST)
    with entropy_probes(teacher) as entropies:
        during = toy.sample(teacher, labels=[1], seed=0, sampler=FAST)
    assert torch.equal(before, during)
    assert len(entropies) == 8 and all(0 < e <= 1 for e in entropies)
    assert type(teacher.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"


def test_adaln_zero_init_starts_every_block_as_the_identity():
    from linattn.train.flow import FlowModel

    model = toy.build_teacher(0, init="adaln-zero").eval()
    x = torch.randn(1, *toy.VIDEO_SHAPE)
    with torch.no_grad():
        out = FlowModel(model, input_dtype=torch.float32)(x, torch.tensor([0.5]),
                                                          toy.embed_labels([2]))
    assert torch.equal(out, torch.zeros_like(out))   # output projection at 0
    assert all(not b.scale_shift_table.any() for b in model.blocks)
    with pytest.raises(ValueError, match="init"):
        toy.build_teacher(0, init="xavier")


def test_teacher_training_resumes_exactly(tmp_path, one_torch_thread):
    from linattn.toy.train import main

    common = ["teacher", "--batch-size", "1", "--log-every", "1", "--warmup", "2",
              "--threads", "1", "--checkpoint-every", "1", "--keep-every", "0"]
    main(common + ["--steps", "2", "--out", str(tmp_path / "straight")])
    main(common + ["--steps", "1", "--out", str(tmp_path / "resumed")])
    main(common + ["--steps", "2", "--out", str(tmp_path / "resumed")])
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 2
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert a["history"][-1]["loss"] == b["history"][-1]["loss"]


# ---------------------------------------------------------------- the toy in linattn.train, the demo

def test_toy_train_config_names_the_shipped_teacher_and_its_metrics(teacher):
    from linattn.toy.linvideo import TOY_CONFIG
    from linattn.train.config import load_config
    from linattn.train.evaluate import default_eval_metrics, rel_mse_metric
    from linattn.train.models import load_transformer

    cfg = load_config(TOY_CONFIG)
    assert cfg.data.embeddings == str(toy.CLASS_EMBEDDINGS_FILE)
    loaded = load_transformer(cfg.model, torch.float32)
    shipped = teacher.state_dict()
    assert all(torch.equal(v, shipped[k]) for k, v in loaded.state_dict().items())
    assert [type(m) for m in default_eval_metrics(cfg)] == [toy.TrainerMetrics]
    # Its selection phase (docs/toy_study.md §3), inside the config's own 200 steps.
    assert cfg.train.select_steps == 20 and cfg.train.steps == 200
    # The rate decays over the run (docs/toy_study.md §6e: it removes most of the seed swing).
    assert cfg.train.lr_schedule == "cosine"
    # Every parameter trains (§6i: ahead of attn1. only on every figure, four paired runs).
    assert cfg.train.trainable == "all"
    tiny = TOY_CONFIG.with_name("tiny_wan_cpu.yaml")
    assert default_eval_metrics(load_config(tiny)) == [rel_mse_metric]
    with pytest.raises(ValueError, match="class_name"):
        load_config(TOY_CONFIG, ["model.class_name=CogVideoXTransformer3DModel"])


def test_trainer_logs_the_toy_fidelity_figures(tmp_path, one_torch_thread):
    import json

    from linattn.toy.linvideo import TOY_CONFIG
    from linattn.train import train

    result = train(str(TOY_CONFIG), overrides=[
        f"data.dir={tmp_path}/data", f"output.dir={tmp_path}/run", "data.num_trajectories=1",
        "data.num_steps=2", "train.steps=1", "train.select_steps=null",
        "train.global_batch_size=2", "output.eval_every=1", "output.eval_num_samples=6", "output.checkpoint_every=1"],
        progress=False)
    records = [json.loads(line) for line in open(result.metrics_path)]
    assert [r["step"] for r in records] == [0, 1]
    for record in records:
        for name in ("rel_mse", "psnr", "class_accuracy", "frechet_distance", "jitter"):
            assert f"eval_{name}" in record and f"eval_{name}_spread" in record
            assert f"eval_{name}_rounded" in record
        for name in ("class_accuracy", "frechet_distance", "jitter", "flicker"):
            assert f"eval_teacher_{name}" in record
    assert records[0]["eval_rel_mse"] == 0          # step 0: every gate at 1, the teacher


def _report(frechet, accuracy=(0.5, 0.5, 0.5)):
    fig = fidelity.Figure.of
    return fidelity.FidelityReport({"frechet_distance": fig(frechet),
                                    "class_accuracy": fig(accuracy)}, {}, {}, (0, 1, 2), 8, {})


def test_demo_table_and_verdict():
    from linattn.toy.linvideo import Row, beats, comparison_table

    fig = fidelity.Figure.of
    teacher_figs = {"class_accuracy": fig([1.0, 0.875, 1.0]), "jitter": fig([0.1, 0.2, 0.3])}
    rows = [Row("teacher", teacher_figs, 10.0),
            Row("untrained", {"rel_mse": fig([0.3, 0.2, 0.4]), **teacher_figs}, 12.0),
            Row("LinVideo", {"rel_mse": fig([0.01, 0.02, 0.03]), "psnr": fig([30, 31, 32]),
                             **teacher_figs}, 8.0)]
    lines = comparison_table(rows).splitlines()
    assert len(lines) == 4 and "rel-MSE" in lines[0] and "class acc." in lines[0]
    teacher_cells = lines[1].split()
    assert teacher_cells[:2] == ["teacher", "-"]          # no error against itself
    assert "0.958 ± 0.0722" in lines[1] and "10.0 s" in lines[1]
    assert "0.02 ± 0.01" in lines[3] and "(0.80x)" in lines[3] and "(1.20x)" in lines[2]
    assert beats(_report([0.01, 0.02, 0.03]), _report([0.3, 0.2, 0.4]))
    assert not beats(_report([0.01, 0.5, 0.03]), _report([0.3, 0.2, 0.4]))   # one seed worse
    assert not beats(_report([0.3, 0.2, 0.4]), _report([0.3, 0.2, 0.4]))
    assert not beats(_report([0.01, 0.02, 0.03], accuracy=(0.25, 0.25, 0.25)),  # fewer classes
                     _report([0.3, 0.2, 0.4], accuracy=(0.5, 0.375, 0.5)))


def test_run_linvideo_end_to_end_on_fast_settings(tmp_path, one_torch_thread):
    from PIL import Image

    from linattn.toy.linvideo import run_linvideo

    result = run_linvideo(steps=1, n_linear=5, workdir=str(tmp_path), seeds=(0, 1, 2),
                          num_samples=2, sampler=FAST, grid=str(tmp_path / "grid.png"),
                          overrides=["data.num_trajectories=1", "data.num_steps=2",
                                     "train.global_batch_size=2", "train.select_steps=null"],
                          progress=False)
    assert len(result.linear_layers) == 5 and len(result.rows) == 3
    assert [len(r.figures["class_accuracy"].values) for r in result.rows] == [3, 3, 3]
    untrained = next(iter(result.reports.values()))
    assert untrained.model["rel_mse"].mean > 0
    assert isinstance(result.linvideo_beats_untrained, bool)
    assert Image.open(tmp_path / "grid.png").size[1] == 2 * 6 * 34   # 6 rows of 34-px tiles


def test_demo_reports_the_recipes_notices_as_lines_not_warnings(monkeypatch, capsys, tmp_path):
    import warnings
    from types import SimpleNamespace

    import linattn.toy.linvideo as linvideo
    from linattn import demo
    from linattn.toy.linvideo import Row

    def fake_run_linvideo(**kwargs):
        warnings.warn("4 gates round to linear, the target was 5", RuntimeWarning)
        report = SimpleNamespace(seeds=(0, 1, 2), num_samples=8)
        return SimpleNamespace(train_seconds=1.0, linear_layers=[0, 1, 2, 3, 4],
                               rows=[Row("teacher", {}, 1.0)], reports={"untrained": report},
                               linvideo_beats_untrained=True)

    monkeypatch.setattr(linvideo, "run_linvideo", fake_run_linvideo)
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        assert demo.run_toy_linvideo(1, 5, str(tmp_path / "grid.png")) is True
    assert escaped == []
    out = capsys.readouterr().out
    assert "note (RuntimeWarning): 4 gates round to linear, the target was 5" in out
