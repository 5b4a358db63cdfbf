"""linattn.toy.study: the run grid, the verdicts of the document, and the runner end to end on
tiny settings (1 training step, a 2-step sampler, 2 samples per seed), with its cache."""
import json

import pytest
import torch

pytest.importorskip("diffusers")

from linattn.toy.study import Settings, layer_choice, plan  # noqa: E402
from linattn.toy.study.document import (DISCUSSION_END, DISCUSSION_START, Results,  # noqa: E402
                                        target_verdicts, write_document)
from linattn.toy.study.plan import ADM_VARIANTS, ALPHA_VARIANTS, headline_name  # noqa: E402
from linattn.toy.teacher import Sampler  # noqa: E402


def test_layer_choices():
    assert layer_choice("first", 5) == (0, 1, 2, 3, 4)
    assert layer_choice("last", 5) == (3, 4, 5, 6, 7)
    assert layer_choice("even", 5) == (0, 2, 4, 5, 7)
    assert layer_choice("even", 2) == (0, 7) and layer_choice("even", 8) == tuple(range(8))
    sens = [0.5, 0.1, 0.3, 0.1, 0.9, 0.2, 0.8, 0.7]
    assert layer_choice("heuristic", 3, sensitivity=sens) == (1, 3, 5)   # ties: earlier
    with pytest.raises(ValueError, match="sensitivity"):
        layer_choice("heuristic", 3)
    with pytest.raises(ValueError, match="rule"):
        layer_choice("random", 3)
    with pytest.raises(ValueError, match="k"):
        layer_choice("first", 9)


def test_plan_keys_follow_settings_and_share_runs():
    s = Settings()
    p = plan(s, sensitivity=[0.5, 0.1, 0.3, 0.1, 0.9, 0.2, 0.8, 0.7])
    assert set(p.studies) == {"a", "b", "c", "d"}
    names = {r.name for runs in p.studies.values() for r in runs}
    assert {"teacher", "all 8 linear + ADM", "velocity-MSE", "manual: first 5",
            "heuristic: 5 least sensitive", *ALPHA_VARIANTS} - {"config α 1.5 → 1 (default)"} \
        <= names
    runs = p.runs()
    assert len({r.key for r in runs}) == len(runs)
    # The headline run is one run shared by every sub-study, and it comes first.
    head = [r for r in runs if r.name == headline_name(s)]
    assert [r.train_seed for r in head] == [0, 1] and runs[0] is head[0]
    assert all(any(r.key == head[0].key for r in p.studies[k]) for k in "abcd")
    # Keys: a change of settings is a new run, the same settings the same run.
    assert plan(Settings()).studies["a"][1].key == p.studies["a"][1].key
    assert plan(Settings(steps=61)).studies["a"][1].key != p.studies["a"][1].key
    fixed = next(r for r in runs if r.name == "manual: last 5")
    assert "convert.mode=linear" in fixed.overrides and fixed.layers == (3, 4, 5, 6, 7)
    # A heuristic picking a manual rule's layers is that run, trained once.
    same = plan(s, sensitivity=[0, 0, 0, 0, 0, 1, 1, 1])
    b = {r.name: r.key for r in same.studies["b"] if r.train_seed == 0}
    assert b["heuristic: 5 least sensitive"] == b["manual: first 5"]
    with pytest.raises(ValueError, match="sub-studies"):
        plan(Settings(studies=("e",)))


def test_plan_has_the_phased_selective_runs_beside_first_k_over_training_seeds():
    s = Settings(select_steps=(30,))
    b = plan(s).studies["b"]
    phased = [r for r in b if "then train final" in r.name]
    assert [r.name for r in phased] == ["selective + ADM, 5 linear (select 30 steps, then train "
                                        "final)"] * 2
    assert [r.train_seed for r in phased] == [0, 1]
    assert all("train.select_steps=30" in r.overrides and r.steps == 60 for r in phased)
    first = [r for r in b if r.name == "manual: first 5"]
    assert [r.train_seed for r in first] == [0, 1] and first[0].layers == (0, 1, 2, 3, 4)
    # The headline run is unchanged (its cached key stays valid), and two fractions are two runs.
    assert plan(s).studies["b"][0].key == plan(Settings(select_steps=())).studies["b"][0].key
    two = plan(Settings(select_steps=(20, 30, 60), train_seeds=(0,))).studies["b"]
    assert [r.overrides[-1] for r in two if "then train final" in r.name] == \
        ["train.select_steps=20", "train.select_steps=30"]
    assert not [r for r in plan(Settings(select_steps=())).studies["b"]
                if "then train final" in r.name or (r.train_seed and "manual" in r.name)]


def _score(key, name, **means):
    return {"key": key, "name": name, "figures": {
        m: {"mean": v[0], "spread": v[1], "values": [v[0]] * 3} for m, v in means.items()}}


def test_verdicts_state_met_and_not_met_with_numbers(tmp_path):
    s = Settings(studies=("a", "c"), counts=(0, 5), adm_variants=tuple(ADM_VARIANTS)[:1],
                 train_seeds=(0,))
    p = plan(s)
    head = p.studies["a"][1]
    mse = next(r for r in p.studies["c"] if r.name == "velocity-MSE")
    base = dict(psnr=(20, 1), jitter=(1, 0.1), flicker=(0.1, 0.01))
    results = Results(p)
    results.trained[head.key] = {"linear_layers": [0, 1, 2, 3, 4], "curve": []}
    results.scores = {
        "teacher-x": _score("teacher-x", "teacher", class_accuracy=(0.9, 0.05),
                            frechet_distance=(100, 10), jitter=(1, 0.1), flicker=(0.1, 0.01)),
        # Fréchet 115 is 1.5 teacher spreads worse: not teacher level.
        head.key: _score(head.key, head.name, rel_mse=(0.1, 0.01), class_accuracy=(0.9, 0.0),
                         frechet_distance=(115, 5), **base),
        mse.key: _score(mse.key, "velocity-MSE", rel_mse=(0.2, 0.01),
                        class_accuracy=(0.9, 0.0), frechet_distance=(120, 5), **base),
    }
    lines = target_verdicts(results)
    assert any(line.startswith("- **NOT met**: 5 of 8 linear") and "Fréchet 115 ± 5" in line
               and "(outside)" in line for line in lines)
    # ADM not worse anywhere, better beyond the spread on rel-MSE (0.1 vs 0.2, spreads 0.01).
    assert any(line.startswith("- **met**: selective + ADM") and "better beyond the spread on "
               "rel-MSE;" in line for line in lines)
    results.scores[head.key]["figures"]["frechet_distance"]["mean"] = 105
    assert any(line.startswith("- **met**: 5 of 8") for line in target_verdicts(results))

    # The hand-written discussion survives a rewrite.
    doc = tmp_path / "study.md"
    write_document(results, doc, tmp_path, plots=False)
    text = doc.read_text().replace("(not written yet: the hand-written reading of the numbers "
                                   "goes here)", "Measured and read by hand.")
    doc.write_text(text)
    write_document(results, doc, tmp_path, plots=False)
    again = doc.read_text()
    assert f"{DISCUSSION_START}\nMeasured and read by hand.\n{DISCUSSION_END}" in again
    assert "| velocity-MSE | - | 0.2 ± 0.01 |" in again      # scored, no training record
    assert "| teacher | none | not run |" in again               # the plan's teacher: no score


def test_phased_run_in_verdicts_gate_table_and_training_seed_table(tmp_path):
    s = Settings(studies=("b", "d"), manual_rules=("first",), alpha_variants=(),
                 train_seeds=(0, 1), select_steps=(30,))
    p = plan(s, sensitivity=[0, 0, 0, 0, 0, 1, 1, 1])
    b = p.studies["b"]
    phased = [r for r in b if "then train final" in r.name]
    first = [r for r in b if r.name == "manual: first 5"]
    results = Results(p)
    curve = [{"step": i, "gates": [1.0 - 0.02 * i] * 8} for i in range(31)]
    curve += [{"step": i, "phase": "final", "gates": [0.0] * 5 + [1.0] * 3}
              for i in range(31, 61)]
    for run in [*b]:
        results.trained[run.key] = {"linear_layers": [0, 1, 2, 3, 4], "curve":
                                    curve if run in phased else []}
    base = dict(rel_mse=(0.2, 0.01), psnr=(20, 1), jitter=(1, 0.1), flicker=(0.1, 0.01),
                class_accuracy=(0.5, 0.05))
    results.scores = {"teacher-x": _score("teacher-x", "teacher", class_accuracy=(0.9, 0.05),
                                          frechet_distance=(100, 10), jitter=(1, 0.1),
                                          flicker=(0.1, 0.01))}
    for i, run in enumerate(b):
        results.scores[run.key] = _score(run.key, run.name, frechet_distance=(100 + i, 5),
                                         **base)
    lines = target_verdicts(results)
    assert any(line.startswith("- **NOT met**: 5 of 8 linear (selective + ADM, 5 linear "
                               "(select 30 steps, then train final))") for line in lines)
    assert any(line.startswith("- Fréchet: selective, select 30 steps then train final ")
               for line in lines)
    doc = tmp_path / "study.md"
    write_document(results, doc, tmp_path, plots=False)
    text = doc.read_text()
    # Its gates when they were selected, not the fixed 0 / 1 of the end.
    assert ("| selective + ADM, 5 linear (select 30 steps, then train final): gates at step 30, "
            "when selected | " + ", ".join(["0.40"] * 8)) in text
    assert "| manual: first 5 (2 training seeds) |" in text
    assert ("| selective + ADM, 5 linear (select 30 steps, then train final) (2 training "
            "seeds) |") in text
    assert first[1].key in results.scores


def test_study_end_to_end_tiny_and_cached(tmp_path, monkeypatch, one_torch_thread):
    import linattn.train as train_module
    from linattn.toy.study import run_study

    s = Settings(steps=1, batch_size=2, num_trajectories=1, data_num_steps=2, num_samples=2,
                 sampler=Sampler(num_steps=2, shift=3.0, guidance_scale=3.0),
                 train_seeds=(0,), studies=("a",), counts=(0, 5), timing_samples=1,
                 timing_repeats=1)
    root, doc = tmp_path / "root", tmp_path / "docs" / "toy_study.md"
    results = run_study(s, root, doc, command="python -m linattn.toy.study --tiny",
                        progress=False)
    assert all(results.score(r) is not None for r in results.plan.runs())
    head = results.plan.studies["a"][1]
    assert len(results.trained[head.key]["linear_layers"]) == 5
    assert [len(f["values"]) for f in results.score(head)["figures"].values()] == [3] * 6
    assert set(results.timing["seconds_per_video"]) == {r.key for r in results.plan.studies["a"]}
    text = doc.read_text()
    for part in ("python -m linattn.toy.study --tiny", "## Targets", "## a. Number of linear",
                 "| selective + ADM, 5 linear | ", "untrained conversion of the same layers",
                 "speed-up", "toy_study_samples.png"):
        assert part in text, part
    for png in ("toy_study_a.png", "toy_study_samples.png"):
        assert (doc.parent / png).stat().st_size > 1000
    record = json.loads((root / "runs" / head.key / "run.json").read_text())
    assert record["curve"][-1]["step"] == 1 and len(record["curve"][-1]["gates"]) == 8

    # A rerun reuses every training run and score: nothing trains or samples again.
    def refuse(*args, **kwargs):
        raise AssertionError("the rerun trained or sampled again")

    monkeypatch.setattr(train_module, "train", refuse)
    monkeypatch.setattr("linattn.toy.study.scoring.evaluate", refuse)
    monkeypatch.setattr("linattn.toy.study.scoring.teacher_reference", refuse)
    again = run_study(s, root, doc, command="python -m linattn.toy.study --tiny",
                      progress=False)
    assert again.scores == results.scores
    # --document-only: the figures are the measuring invocation's, and the doc says so.
    run_study(s, root, doc, command="python -m linattn.toy.study --document-only",
              document_only=True, progress=False)
    text = doc.read_text()
    assert "python -m linattn.toy.study --tiny" in text and "regenerated from the cache" in text
