"""Running the study: every run of the plan trained (or found cached) and scored, the
sampling-speed pass, the sample grid, then the document.

``run_study(settings, root, doc)`` is what ``python -m linattn.toy.study`` calls. Runs go in
Plan.runs()'s order (the headline comparison first); with ``time_budget_s`` no new run starts
after that many seconds, and the document lists what was not run.
"""
from __future__ import annotations

import datetime
import hashlib
import platform
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..grid import save_grid
from ..teacher import load_teacher
from ..train import _git_commit
from .document import Results, write_document
from .plan import Plan, Run, Settings, headline_name, plan, untrained
from .scoring import Scorer
from .training import load_trained, read_json, train_run, trained_record, write_json

# The last measuring invocation of one settings: command, date, commit.
INVOCATION_FILE = "invocation-{}.json"


def machine() -> str:
    return (f"{platform.machine()} ({platform.processor() or 'cpu'}), {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")


def run_study(settings: Settings, root: str | os.PathLike = "runs/study",
              doc: str | os.PathLike = "docs/toy_study.md",
              images: Optional[str | os.PathLike] = None, *, command: str = "",
              time_budget_s: Optional[float] = None, document_only: bool = False,
              progress: bool = True) -> Results:
    """Run (or reuse) the plan and write the document (module docstring). document_only:
    train, sample and time nothing; write the document from what is cached."""
    start = time.perf_counter()
    root, doc = Path(root), Path(doc)
    images = Path(images) if images is not None else doc.parent
    teacher = load_teacher()
    scorer = Scorer(root, settings, teacher, progress=progress)

    sensitivity = None
    if "b" in settings.studies:
        sensitivity = scorer.sensitivity_cached() if document_only else scorer.sensitivity()
    the_plan = plan(settings, sensitivity["rel_mse"] if sensitivity else None)
    results = Results(the_plan, sensitivity=sensitivity)
    runs = the_plan.runs()
    out_of_time = lambda: document_only or (time_budget_s is not None
                                            and time.perf_counter() - start > time_budget_s)

    bar = tqdm(runs, desc="study runs", unit="run", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.name[:40])
        if scorer.cached(run) is None and out_of_time():
            results.trained[run.key] = trained_record(root, run)
            results.scores[run.key] = None
            continue
        if run.kind == "train":
            results.trained[run.key] = train_run(root, run, teacher, progress=False)
        results.scores[run.key] = scorer.score(run)
    bar.close()

    # Untrained conversions of the same layers: the headline's (the grid's middle row, scored
    # whatever the time budget), then every count of study a.
    twins = [r for r in the_plan.runs() if r.name == headline_name(settings)
             and r.train_seed == settings.train_seeds[0]]
    twins += [r for r in the_plan.studies.get("a", []) if r.kind == "train"]
    for i, run in enumerate(tqdm(twins, desc="untrained conversions", unit="model",
                                 disable=not progress)):
        rec = results.trained.get(run.key)
        if rec is None or run.key in results.untrained_of:
            continue
        twin = untrained(rec["linear_layers"])
        results.untrained_of[run.key] = twin
        if scorer.cached(twin) is None and (i > 0 or document_only) and out_of_time():
            results.scores[twin.key] = None
            continue
        results.scores[twin.key] = scorer.score(twin)

    results.diagnostics = seed_diagnostics(scorer, the_plan, results)
    results.timing = speed_pass(scorer, the_plan, results, root, teacher, document_only)
    grid, caption = sample_grid(scorer, the_plan, results, settings, images, doc.stem)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    invocation = {"command": command or "python -m linattn.toy.study", "date": now,
                  "commit": _git_commit(), "machine": machine(),
                  "wall_minutes": (time.perf_counter() - start) / 60}
    # One record per settings: a --quick run sharing the root keeps the full study's.
    record = root / INVOCATION_FILE.format(hashlib.sha1(repr(settings).encode()).hexdigest()[:10])
    if document_only:
        # The figures are the last measuring invocation's: say so, and when it ran.
        previous = read_json(record)
        if previous is not None:
            invocation = {**previous, "regenerated": f"{now} by `{invocation['command']}`"}
    else:
        write_json(record, invocation)
    results.meta = {**invocation, "grid": grid, "grid_caption": caption}
    write_document(results, doc, images)
    return results


# A frame with less bright mass than this (pixels of weight 1) holds no object: the smallest
# square or disc of the procedural videos covers ~28 pixels.
EMPTY_MASS = 8.0


def seed_diagnostics(scorer: Scorer, the_plan: Plan, results: Results) -> dict:
    """Per scored run, from its first seed's saved samples: the fraction of videos with no
    object in most frames, and the class the metrics' classifier reads for each sample (what
    class accuracy counts)."""
    from ..classifier import load_classifier
    from ..fidelity import bright_weights

    classifier = load_classifier()
    runs = [*the_plan.runs(), *results.untrained_of.values()]
    out = {}
    for run in runs:
        samples = scorer.samples(run) if results.scores.get(run.key) else None
        if samples is None:
            continue
        mass = bright_weights(samples).sum((-1, -2))             # (N, F)
        empty = (mass < EMPTY_MASS).float().mean(1) > 0.5
        with torch.no_grad():
            predicted = classifier(samples).argmax(-1)
        out[run.key] = {"empty": float(empty.float().mean()), "empty_count": int(empty.sum()),
                        "num": int(samples.shape[0]), "predicted": predicted.tolist()}
    return out


def speed_pass(scorer: Scorer, the_plan: Plan, results: Results, root: Path, teacher,
               document_only: bool = False) -> Optional[dict]:
    """Seconds per video of the teacher and of every trained count of study a (a minute or
    two; it runs whatever the time budget, being what sub-study a plots against)."""
    models = {}
    for run in the_plan.studies.get("a", []):
        if run.kind == "teacher":
            models[run.key] = lambda: teacher
        elif results.trained.get(run.key) is not None:
            models[run.key] = (lambda r=run: load_trained(root, r))
    if len(models) < 2 or (document_only and not scorer.timing_cached(models)):
        return None
    return scorer.timing(models)


def sample_grid(scorer: Scorer, the_plan: Plan, results: Results, settings: Settings,
                images: Path, stem: str = "toy_study"):
    """Per sample of the first sampling seed: teacher / untrained conversion / LinVideo (the
    headline run), every other frame; written as PNG beside the document."""
    head = next((r for r in the_plan.runs() if r.name == headline_name(settings)
                 and r.train_seed == settings.train_seeds[0]), None)
    teacher_run = Run("teacher", "teacher")
    twin = results.untrained_of.get(head.key) if head is not None else None
    if head is None or twin is None:
        return None, ""
    rows = [scorer.samples(r) for r in (teacher_run, twin, head)]
    if any(r is None for r in rows):
        return None, ""
    videos = [v for triple in zip(*rows) for v in triple]
    path = images / f"{stem}_samples.png"
    save_grid(torch.stack(videos), path, frames=range(0, videos[0].shape[1], 2))
    layers = results.trained[head.key]["linear_layers"]
    caption = (f"Sampling seed {settings.seeds[0]}, one triple of rows per sample (classes in "
               f"label order: right-1, right-2, left-1, left-2, down-1, down-2, up-1, up-2): "
               f"the teacher, the untrained conversion of layers {layers}, and the headline "
               f"LinVideo run ({head.name}, {settings.steps} steps) with the same layers linear; "
               f"every other frame.")
    return str(path), caption
