"""The trainer in one process: bit-exact resume, the metrics log and plot, gradient
accumulation, bf16 autocast, the saved model, and configuration errors."""
import json
import os
import warnings

import pytest
import torch
from safetensors.torch import save_file

import linattn.dit as dit
from linattn.train import FlowModel, train
from linattn.train.metrics import read_metrics

from checkpoints import checkpoint_state, flat, without_timing

TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=16, in_channels=4,
            out_channels=4, text_dim=32, freq_dim=16, ffn_dim=64, num_layers=2,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
            rope_max_seq_len=16)

# Tiny models: one intra-op thread (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("trainer"))
    gen = torch.Generator().manual_seed(0)
    save_file({"prompt_embeds": torch.randn(2, 3, 32, generator=gen)},
              os.path.join(path, "emb.safetensors"))
    return path


def config(root, name, **train_kw):
    cfg = {
        "model": {"config": TINY, "init_seed": 1},
        # Both layers linear is the target: the gates leave r = 1 from the first step.
        "convert": {"mode": "hybrid", "n_linear": 2, "options": {"backend": "reference"}},
        "data": {"dir": os.path.join(root, "data"), "latent_shape": [4, 1, 4, 4],
                 "num_trajectories": 4, "trajectories_per_shard": 2, "num_steps": 3,
                 "store_dtype": "float32", "embeddings": os.path.join(root, "emb.safetensors")},
        "train": {"steps": 4, "global_batch_size": 4, "lr": 1e-3, "gate_lr": 0.15,
                  "alpha_start": 1.5, "alpha_end": 1.0, "mixed_precision": "no",
                  "gradient_checkpointing": False, "seed": 2},
        "output": {"dir": os.path.join(root, name), "checkpoint_every": 2},
    }
    cfg["train"].update(train_kw)
    return cfg


def test_interrupted_run_resumes_bit_exact(root):
    full = train(config(root, "full"), progress=False)
    stopped = train(config(root, "resumed"), stop_at_step=3, progress=False)
    assert stopped.step == 3 and stopped.final_dir is None and stopped.model is None
    resumed = train(config(root, "resumed"), progress=False)  # from the step-2 checkpoint
    assert resumed.step == 4

    a = flat(checkpoint_state(os.path.join(root, "full"), 4))
    b = flat(checkpoint_state(os.path.join(root, "resumed"), 4))
    assert a.keys() == b.keys() and any(".exp_avg" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert without_timing(read_metrics(full.metrics_path)) == \
        without_timing(read_metrics(resumed.metrics_path))
    assert full.selection == resumed.selection
    # keep_checkpoints = 2: steps 2 and 4 are kept, and no partial checkpoint is left.
    assert sorted(os.listdir(os.path.join(root, "full", "checkpoints"))) == \
        ["step-00000002", "step-00000004"]
    with open(os.path.join(root, "full", "checkpoints", "step-00000004",
                           "trainer_state.json")) as f:
        state = json.load(f)
    assert state["step"] == 4 and state["data_position"] == {"epoch": 1, "batch_in_epoch": 1}


def test_metrics_plot_and_saved_model(root):
    # Already done: finalize only. The gates end part-way (below), so finalize() says which
    # layers it turns from the hybrid training ran into one branch.
    with pytest.warns(RuntimeWarning, match=r"finalize\(\) moves 2 gate\(s\).*blocks.0.attn1"):
        result = train(config(root, "full"), progress=False)
    records = read_metrics(result.metrics_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["gates"] == [1.0, 1.0]
    for r in records[1:]:
        assert {"loss", "objective", "l_con", "l_reg", "alpha", "lr", "gates",
                "n_linear_rounded", "step_time_s", "samples_per_s"} <= r.keys()
        assert len(r["gates"]) == 2 and all(0.0 <= g <= 1.0 for g in r["gates"])
    assert records[1]["alpha"] == 1.5 and records[-1]["alpha"] == 1.0
    # gate_lr 0.15: the gates cross 0.5 within the 4 steps, so finalize() keeps linear layers.
    assert all(g < 0.5 for g in records[-1]["gates"])
    assert result.selection == {"blocks.0.attn1": "linear", "blocks.1.attn1": "linear"}
    assert os.path.getsize(os.path.join(root, "full", "gates.png")) > 1000
    assert os.path.isfile(os.path.join(root, "full", "config.yaml"))

    # save_pretrained output reloads (linattn.load_converted) into the same function.
    reloaded = dit.load_converted(result.final_dir, backend="reference")
    with open(os.path.join(result.final_dir, "selection.json")) as f:
        assert json.load(f) == result.selection
    gen = torch.Generator().manual_seed(5)
    x, cond = torch.randn(2, 4, 1, 4, 4, generator=gen), torch.randn(2, 3, 32, generator=gen)
    t = torch.tensor([0.3, 0.9])
    torch.testing.assert_close(FlowModel(reloaded)(x, t, cond),
                               FlowModel(result.model.eval())(x, t, cond))


def test_without_binarization_loss_the_gates_follow_only_the_constraint(root):
    """train.binarization false (the paper's ablation): L_reg is logged, not trained on. With
    both gates linear as the target, L_con alone pushes them down; L_reg (at α 1.5 → 1 its slope
    at r = 1 is 2α) holds them back, so the ablated gates end lower."""
    on = read_metrics(train(config(root, "reg_on", steps=2), progress=False).metrics_path)
    off = read_metrics(train(config(root, "reg_off", steps=2, binarization=False),
                             progress=False).metrics_path)
    assert off[-1]["l_reg"] > 0                   # step 1 starts at r = 1, where L_reg is 0
    for r in off[1:]:
        assert r["loss"] == pytest.approx(r["objective"] + 0.01 * r["l_con"])
    for r in on[1:]:
        assert r["loss"] == pytest.approx(r["objective"] + 0.01 * (r["l_con"] + r["l_reg"]))
    assert all(a < b for a, b in zip(off[-1]["gates"], on[-1]["gates"]))


def test_gradient_accumulation_matches_one_batch(root):
    """Two micro-batches of 2 accumulate to the gradient of one batch of 4: Adam's first
    moment after one step is (1 − β1) · gradient, compared to 1e-4 of its largest entry."""
    def bf16_teacher(cfg):
        # A bf16 teacher differs from the float32 student from step 0, so the gradients are
        # real; a float32 teacher equals the student there (ADM's push is exactly 0) and the
        # compared moments would be rounding noise.
        cfg["model"]["teacher_dtype"] = "bfloat16"
        cfg["data"]["dir"] = os.path.join(root, "data-bf16-teacher")
        return cfg

    train(bf16_teacher(config(root, "one", steps=1, gradient_checkpointing=True)),
          progress=False)
    train(bf16_teacher(config(root, "accum", steps=1, micro_batch_size=2)), progress=False)
    a = flat(checkpoint_state(os.path.join(root, "one"), 1))
    b = flat(checkpoint_state(os.path.join(root, "accum"), 1))
    moments = [k for k in a if k.endswith(".exp_avg")]
    assert moments
    for key in moments:
        scale = float(a[key].abs().max())
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4 * scale + 1e-12)


def test_bf16_autocast_and_velocity_mse(root):
    result = train(config(root, "bf16", steps=2, mixed_precision="bf16",
                          objective="velocity_mse"), progress=False)
    records = read_metrics(result.metrics_path)[1:]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[0]["objective"] == records[0]["velocity_gap"] > 0


@pytest.mark.parametrize("edit, error, message", [
    ({"train": {"trainable": ["no_such_param"]}}, ValueError, "train.trainable"),
    ({"train": {"strategy": "fsdp"}}, ValueError, "needs torch.distributed"),
    ({"train": {"global_batch_size": 3, "micro_batch_size": 2}}, ValueError,
     "whole micro-batches"),
    ({"model": {"config": None}}, ValueError, "give model.pretrained or model.config"),
])
def test_configuration_errors(root, edit, error, message):
    cfg = config(root, "errors")
    for section, values in edit.items():
        cfg[section].update(values)
    with pytest.raises(error, match=message):
        train(cfg, progress=False)


def test_resume_refuses_another_batch_order(root):
    train(config(root, "refuse", steps=2), progress=False)
    with pytest.raises(ValueError, match="global_batch_size=4"):
        train(config(root, "refuse", steps=2, global_batch_size=2), progress=False)


def test_cli_runs_the_shipped_tiny_config(tmp_path, capsys):
    import linattn.train
    from linattn.train import cli

    path = os.path.join(os.path.dirname(linattn.train.__file__), "configs", "tiny_wan_cpu.yaml")
    args = [path, "--no-progress", "--set", f"data.dir={tmp_path / 'data'}",
            "--set", f"output.dir={tmp_path / 'run'}", "--set", "data.num_trajectories=4",
            "--set", "train.steps=2", "--set", "output.eval_every=1"]
    assert cli.main(["generate-data", *args]) == 0
    assert "1 shard(s) written" in capsys.readouterr().out  # 4 trajectories, 8 per shard
    assert cli.main(["train", *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 2 and os.path.isdir(summary["final"])
    records = read_metrics(summary["metrics"])
    assert "eval_rel_mse" in records[0] and "eval_rel_mse_rounded" in records[-1]
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2


def test_final_selection_rules():
    from linattn.train.selection import apply_final_selection_

    def gates(*values):
        return [torch.nn.Parameter(torch.tensor(v)) for v in values]

    g = gates(0.2, 0.6, 0.4, 0.9)  # rounding makes 2 linear; the target is 1
    with pytest.warns(RuntimeWarning, match="2 gates round to linear, the target was 1"):
        assert apply_final_selection_(g, 1, "exact") == 1
    assert [float(x) for x in g] == [0.0, 1.0, 1.0, 1.0]  # the lowest gate goes linear
    g = gates(0.2, 0.6, 0.4, 0.9)
    with pytest.warns(RuntimeWarning, match="'round' keeps 2"):
        assert apply_final_selection_(g, 1, "round") == 2
    assert [float(x) for x in g] == pytest.approx([0.2, 0.6, 0.4, 0.9])  # finalize() rounds
    g = gates(0.0, 1.0, 0.5)  # torch.round(0.5) = 0: already 2 linear, as the target
    assert apply_final_selection_(g, 2, "exact") == 2
    assert [float(x) for x in g] == [0.0, 1.0, 0.0]


def test_finalize_warns_by_name_when_it_moves_a_trained_gate():
    from linattn.train.selection import warn_untrained_rounding

    names = ["blocks.0.attn1", "blocks.1.attn1", "blocks.2.attn1"]
    with pytest.warns(RuntimeWarning, match=r"moves 2 gate\(s\).*blocks.1.attn1 r = 0.120 -> "
                      r"linear, blocks.2.attn1 r = 0.520 -> softmax.*train.select_steps"):
        moved = warn_untrained_rounding([0.0, 0.12, 0.52], [0.0, 0.0, 1.0], names)
    assert moved == ["blocks.1.attn1", "blocks.2.attn1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # within the tolerance: nothing to say
        assert warn_untrained_rounding([0.04, 0.96, 1.0], [0.0, 1.0, 1.0], names) == []


def test_guided_fake_score_run_evaluates_with_guidance_and_resumes_bit_exact(root):
    """Guided teacher data: the student trains its guided velocity with a trained fake score,
    the evaluation samples with the data's guidance and runs extra metric functions, and the
    fake score and its optimiser are checkpointed so the run resumes bit for bit."""
    from linattn.train import rel_mse_metric, teacher_sample
    from linattn.train.data import TeacherDataset

    seen = []

    def mean_abs(samples, eval_set):
        seen.append(eval_set)
        return {"mean_abs": float(samples.abs().mean())}

    def guided(name, **kw):
        cfg = config(root, name, adm_fake_score="trained", fake_score_updates=2,
                     fake_score_lr=1e-3, **kw)
        cfg["data"].update(dir=os.path.join(root, "guided-data"), embeddings=None,
                           random_conditioning=[2, 3, 32], guidance_scale=3.0)
        cfg["output"]["eval_every"] = 2
        return cfg

    full = train(guided("guided-full"), progress=False, eval_metrics=[rel_mse_metric, mean_abs])
    records = read_metrics(full.metrics_path)
    for r in records[1:]:
        assert {"fake_score_loss", "adm_push", "velocity_error", "velocity_gap"} <= r.keys()
    assert {"eval_rel_mse", "eval_mean_abs", "eval_mean_abs_rounded"} <= records[-1].keys()
    eval_set = seen[0]
    assert eval_set.guidance_scale == 3.0 and eval_set.negative_cond is not None
    from linattn.train.config import load_config
    from linattn.train.models import load_transformer

    model = load_transformer(load_config(guided("x")).model, torch.float32).eval()
    reference = teacher_sample(FlowModel(model), eval_set.noise, eval_set.cond,
                               sampler="euler", num_steps=3, shift=3.0,
                               negative_cond=eval_set.negative_cond, guidance_scale=3.0)
    torch.testing.assert_close(eval_set.teacher_samples, reference)
    assert TeacherDataset(os.path.join(root, "guided-data")).guided

    stopped = train(guided("guided-resumed"), stop_at_step=3, progress=False)
    assert stopped.final_dir is None
    train(guided("guided-resumed"), progress=False)
    a = flat(checkpoint_state(os.path.join(root, "guided-full"), 4))
    b = flat(checkpoint_state(os.path.join(root, "guided-resumed"), 4))
    assert any(k.startswith("fake_score_optim.") and k.endswith(".exp_avg") for k in a)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---------------------------------------------------------------- selection phase

SELECT_STEPS = 2


def phased(root, name, select_steps=SELECT_STEPS):
    """5 steps: 2 select, then 3 train the fixed model. n_linear 1 of 2 layers, and no L_reg
    (train.binarization false), so that L_con moves the gates off r = 1 during selection."""
    cfg = config(root, name, steps=5, select_steps=select_steps, binarization=False)
    cfg["convert"]["n_linear"] = 1
    return cfg


class ProbedTrainer:
    """Runs a Trainer whose finish() first records the trained (hybrid, gates 0 / 1) student's
    velocity on fixed inputs: the function phase 2 trained, before finalize()."""

    def __init__(self, cfg):
        from linattn.train.config import load_config
        from linattn.train.trainer import Trainer

        gen = torch.Generator().manual_seed(5)
        self.inputs = (torch.randn(2, 4, 1, 4, 4, generator=gen), torch.tensor([0.3, 0.9]),
                       torch.randn(2, 3, 32, generator=gen))
        probe = self

        class Probed(Trainer):
            def finish(self):
                self.student.eval()
                with torch.no_grad():
                    probe.before = FlowModel(self.student)(*probe.inputs)
                    probe.gates = [float(g) for g in self.gates]
                return super().finish()

        self.trainer = Probed(load_config(cfg), progress=False)

    def run(self, **kw):
        try:
            return self.trainer.run(**kw)
        finally:
            self.trainer.close()


def test_select_steps_switch_fixes_the_gates_and_saves_the_trained_function(root):
    probe = ProbedTrainer(phased(root, "phased"))
    was = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch's autograd warnings, every time (once per process else)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = probe.run()
    finally:
        torch.set_warn_always(was)
    # Phase 2 trained the final selection: finalize() moves no gate; and reading the trained
    # gates to finalize them does not trip autograd's scalar-conversion warning.
    assert not [w for w in caught if "finalize() moves" in str(w.message)]
    assert not [w for w in caught if "requires_grad=True to a scalar" in str(w.message)]
    records = read_metrics(result.metrics_path)
    assert [r.get("phase") for r in records] == [None, "select", "select", "final", "final",
                                                 "final"]
    # Selection: L_con / α logged and the gates moving; the switch on the first final step.
    for r in records[1:SELECT_STEPS + 1]:
        assert {"l_con", "l_reg", "alpha"} <= r.keys() and "selected" not in r
    assert records[1]["alpha"] == 1.5 and records[SELECT_STEPS]["alpha"] == 1.0  # over S steps
    moved = records[SELECT_STEPS]["gates"]
    assert all(0.0 < g < 1.0 for g in moved)
    switch = records[SELECT_STEPS + 1]["selected"]
    assert switch["step"] == SELECT_STEPS and switch["gates_before"] == moved
    lowest = min(range(2), key=lambda i: moved[i])
    assert switch["linear"] == [f"blocks.{lowest}.attn1"]
    # Phase 2: gates exactly 0 / 1 and unchanged, no selective-transfer loss.
    expected = [0.0 if i == lowest else 1.0 for i in range(2)]
    for r in records[SELECT_STEPS + 1:]:
        assert r["gates"] == expected and r["n_linear_rounded"] == 1
        assert not {"l_con", "l_reg", "alpha"} & r.keys()
        assert r["loss"] == r["objective"]
    assert "selected" not in records[-1]
    assert probe.gates == expected
    assert result.selection == {f"blocks.{i}.attn1": "linear" if i == lowest else "softmax"
                                for i in range(2)}
    # The saved (finalized) model is exactly the function phase 2 trained, and reloads as it.
    after = FlowModel(result.model.eval())(*probe.inputs)
    assert torch.equal(after, probe.before)
    reloaded = dit.load_converted(result.final_dir, backend="reference")
    torch.testing.assert_close(FlowModel(reloaded)(*probe.inputs), probe.before)
    assert os.path.getsize(os.path.join(root, "phased", "gates.png")) > 1000

    # No gate update after the switch: the gates' optimiser state at step 4 is the one of the
    # last selection step (checkpoint 2 is gone, keep_checkpoints 2: compare with step 2's
    # record through AdamW's step count), while the model's moments moved on.
    state = flat(checkpoint_state(os.path.join(root, "phased"), 4))
    gate_steps = [v for k, v in state.items() if k.endswith(".step") and "gate" in k]
    model_steps = [v for k, v in state.items() if k.endswith(".step") and "gate" not in k]
    assert gate_steps and all(float(s) == SELECT_STEPS for s in gate_steps)
    assert model_steps and all(float(s) == 4 for s in model_steps)
    with open(os.path.join(root, "phased", "checkpoints", "step-00000004",
                           "trainer_state.json")) as f:
        trainer_state = json.load(f)
    assert trainer_state["phase_next"] == "final" and "alpha_next" not in trainer_state
    assert trainer_state["select_steps"] == SELECT_STEPS


def test_select_steps_resume_across_the_switch_is_bit_exact(root):
    """Stopped at step 3, resumed from checkpoint 2 (before the switch: it happens after the
    resume) and stopped at step 4, resumed from checkpoint 4 (after it): the same run as
    uninterrupted (test above, run "phased")."""
    full = os.path.join(root, "phased")
    if not os.path.isdir(os.path.join(full, "final")):
        train(phased(root, "phased"), progress=False)
    assert train(phased(root, "phased-resumed"), stop_at_step=3, progress=False).step == 3
    assert train(phased(root, "phased-resumed"), stop_at_step=4, progress=False).step == 4
    resumed = train(phased(root, "phased-resumed"), progress=False)
    assert resumed.step == 5
    a = flat(checkpoint_state(full, 5))
    b = flat(checkpoint_state(os.path.join(root, "phased-resumed"), 5))
    assert a.keys() == b.keys() and any("gate" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert without_timing(read_metrics(os.path.join(full, "metrics.jsonl"))) == \
        without_timing(read_metrics(resumed.metrics_path))
    # Another select_steps is another run: resuming it from these checkpoints is refused.
    with pytest.raises(ValueError, match="select_steps=2, this run has 3"):
        train(phased(root, "phased-resumed", select_steps=3), progress=False)


@pytest.mark.parametrize("edit, message", [
    ({"select_steps": 4}, r"train.select_steps: expected an int in \[1, train.steps - 1\] = "
                          r"\[1, 3\]"),
    ({"select_steps": 0}, "train.select_steps: expected an int"),
    ({"select_steps": 1.5}, "train.select_steps: 1.5 matches none of the allowed types"),
    ({"select_steps": True}, "train.select_steps: True matches none of the allowed types"),
])
def test_select_steps_configuration_errors(root, edit, message):
    from linattn.train.config import load_config

    with pytest.raises(ValueError, match=message):
        load_config(config(root, "errors", **edit))
    cfg = config(root, "errors", select_steps=2)
    cfg["convert"].update(mode="linear", n_linear=None)
    with pytest.raises(ValueError, match="train.select_steps: selects among the gates of mode "
                                         "'hybrid', but convert.mode is 'linear'"):
        load_config(cfg)
