"""The study's document: docs/toy_study.md with its tables, verdicts and plots (PNG in docs/).

Everything here is computed from the cached run and score records (``Results``); nothing is
measured. The hand-written discussion between the DISCUSSION markers of an existing document is
kept when the document is written again, so a rerun refreshes the numbers without losing it.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..fidelity import _fmt
from .plan import NUM_LAYERS, Plan, Run, headline_name, phased_name, run_select_steps

# metric, column label, better direction, kind
METRICS = (("rel_mse", "rel-MSE", "lower", "teacher-relative"),
           ("psnr", "PSNR dB", "higher", "teacher-relative"),
           ("class_accuracy", "class acc.", "higher", "distribution"),
           ("frechet_distance", "Fréchet", "lower", "distribution"),
           ("jitter", "jitter px", "lower", "temporal"),
           ("flicker", "flicker", "lower", "temporal"))
DIRECTION = {m: d for m, _, d, _ in METRICS}
LABEL = {m: l for m, l, _, _ in METRICS}
DISCUSSION_START = "<!-- DISCUSSION (hand-written; kept when the document is regenerated) -->"
DISCUSSION_END = "<!-- /DISCUSSION -->"
STUDY_TITLES = {"a": "a. Number of linear layers: fidelity against sampling speed",
                "b": "b. Which layers: selective transfer against manual choices and a heuristic",
                "c": "c. Objective: ADM variants against velocity-MSE",
                "d": "d. The binarisation loss: α schedules and no L_reg"}


@dataclass
class Results:
    """What the runner gathered: per run key its training record and score (None if not done)."""

    plan: Plan
    trained: Dict[str, Optional[dict]] = field(default_factory=dict)
    scores: Dict[str, Optional[dict]] = field(default_factory=dict)
    untrained_of: Dict[str, Run] = field(default_factory=dict)   # run key -> its untrained twin
    sensitivity: Optional[dict] = None
    timing: Optional[dict] = None
    diagnostics: Dict[str, dict] = field(default_factory=dict)   # run key -> seed-0 checks
    meta: dict = field(default_factory=dict)   # command, date, commit, machine, wall time

    def score(self, run: Run) -> Optional[dict]:
        return self.scores.get(run.key)

    def teacher(self) -> Optional[dict]:
        return next((s for s in self.scores.values() if s and s["key"].startswith("teacher")),
                    None)


# ---------------------------------------------------------------- numbers

def fig(score: Optional[dict], metric: str) -> Optional[dict]:
    if score is None:
        return None
    return score["figures"].get(metric)


def cell(f: Optional[dict]) -> str:
    return "-" if f is None else f"{_fmt(f['mean'])} ± {_fmt(f['spread'])}"


def better(a: float, b: float, metric: str) -> bool:
    return a < b if DIRECTION[metric] == "lower" else a > b


def beyond_spread(a: dict, b: dict) -> bool:
    """The two means differ by more than the larger of their spreads."""
    return abs(a["mean"] - b["mean"]) > max(a["spread"], b["spread"])


def not_worse_than_teacher(f: dict, teacher: dict, metric: str) -> bool:
    """Within the teacher's own seed spread, one-sided: at most one teacher std worse."""
    gap = f["mean"] - teacher["mean"]
    worse = gap if DIRECTION[metric] == "lower" else -gap
    return worse <= teacher["spread"]


def layers_text(layers: Optional[Sequence[int]]) -> str:
    if layers is None:
        return "-"
    return "none" if len(layers) == 0 else ", ".join(map(str, layers))


# ---------------------------------------------------------------- tables

def metric_table(rows: List[tuple], results: Results, extra_columns: Sequence[str] = (),
                 extra_cells: Optional[Dict[str, List[str]]] = None) -> str:
    """Markdown: one row per (label, run or score), every metric as mean ± spread."""
    head = ["model", "linear layers", *[f"{LABEL[m]} ({DIRECTION[m]})" for m, *_ in METRICS],
            *extra_columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, (label, layers, score) in enumerate(rows):
        cells = [label, layers_text(layers)]
        cells += [cell(fig(score, m)) if score is not None else "not run" for m, *_ in METRICS]
        cells += (extra_cells or {}).get(label, [""] * len(extra_columns))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_layers(results: Results, run: Run) -> Optional[List[int]]:
    if run.kind == "teacher":
        return []
    if run.kind == "untrained" or run.layers is not None:
        return list(run.layers)
    rec = results.trained.get(run.key)
    return rec["linear_layers"] if rec else None


def reference_rows(results: Results) -> List[tuple]:
    teacher = results.teacher()
    rows = [("teacher", [], teacher)]
    if teacher is not None and "real" in teacher:
        rows.append(("real procedural videos", None, {"figures": teacher["real"]}))
    return rows


def study_rows(results: Results, study: str) -> List[tuple]:
    rows = []
    for run in results.plan.studies.get(study, []):
        label = run.name + (f" (training seed {run.train_seed})" if run.train_seed else "")
        rows.append((label, run_layers(results, run), results.score(run)))
        twin = results.untrained_of.get(run.key)
        if study == "a" and twin is not None:
            rows.append((f"  untrained conversion of the same layers",
                         list(twin.layers), results.score(twin)))
    return rows


def by_training_seed(results: Results, name: str) -> Optional[dict]:
    """Mean over training seeds of the per-run means, ± std across training seeds, per metric,
    for the runs of this name that are scored (None if fewer than one)."""
    runs = {r.key: r for rs in results.plan.studies.values() for r in rs if r.name == name}
    scored = [results.score(r) for r in runs.values() if results.score(r) is not None]
    if not scored:
        return None
    out = {}
    for m, *_ in METRICS:
        vals = [s["figures"][m]["mean"] for s in scored if m in s["figures"]]
        if not vals:
            continue
        mean = sum(vals) / len(vals)
        spread = (math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
                  if len(vals) > 1 else 0.0)
        out[m] = {"mean": mean, "spread": spread, "values": vals}
    return {"figures": out, "n": len(scored)}


def phased_runs(results: Results, train_seed: Optional[int] = 0) -> List[Run]:
    """Sub-study b's selective runs with a selection phase (of one training seed; None: all)."""
    s = results.plan.settings
    names = {phased_name(s, n) for n in s.select_steps}
    return [r for r in results.plan.studies.get("b", []) if r.name in names
            and (train_seed is None or r.train_seed == train_seed)]


# ---------------------------------------------------------------- plots

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_counts(results: Results, path: Path) -> bool:
    """Fidelity against seconds per video, one point per linear-layer count (study a)."""
    timing = (results.timing or {}).get("seconds_per_video", {})
    teacher = results.teacher()
    points = []
    for run in results.plan.studies.get("a", []):
        score, layers = results.score(run), run_layers(results, run)
        if score is None or run.key not in timing or layers is None:
            continue
        twin = results.untrained_of.get(run.key)
        points.append((len(layers), timing[run.key], score,
                       results.score(twin) if twin is not None else None))
    if len(points) < 2 or teacher is None:
        return False
    plt = _plt()
    shown = ("frechet_distance", "class_accuracy", "rel_mse", "jitter")
    figure, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6))
    for ax, metric in zip(axes, shown):
        t = fig(teacher, metric)
        if t is not None:
            ax.axhspan(t["mean"] - t["spread"], t["mean"] + t["spread"], color="0.85",
                       label="teacher ± spread")
        for label, which, marker in (("LinVideo (trained)", 2, "o"),
                                     ("untrained conversion", 3, "x")):
            xs, ys, es, ns = [], [], [], []
            for p in points:
                f = fig(p[which], metric)
                if f is not None:
                    xs.append(p[1]), ys.append(f["mean"]), es.append(f["spread"]), ns.append(p[0])
            if xs:
                ax.errorbar(xs, ys, yerr=es, fmt=marker, capsize=3, label=label)
                if which == 2:
                    for x, y, n in zip(xs, ys, ns):
                        ax.annotate(f"{n}", (x, y), textcoords="offset points", xytext=(5, 4),
                                    fontsize=8)
        ax.set_xlabel("seconds per video (CPU, 1 thread)")
        ax.set_title(f"{LABEL[metric]} ({DIRECTION[metric]} is better)")
    axes[0].legend(fontsize=7)
    figure.suptitle("number of linear layers (annotated) against sampling time")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def plot_bars(rows: List[tuple], teacher: Optional[dict], path: Path, title: str) -> bool:
    """One panel per metric, one bar per row (mean ± spread), the teacher's band behind."""
    rows = [r for r in rows if r[2] is not None]
    if not rows:
        return False
    plt = _plt()
    shown = [m for m, *_ in METRICS]
    figure, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    for ax, metric in zip(axes.flat, shown):
        t = fig(teacher, metric)
        if t is not None:
            ax.axhspan(t["mean"] - t["spread"], t["mean"] + t["spread"], color="0.85")
            ax.axhline(t["mean"], color="0.5", lw=1)
        vals = [fig(r[2], metric) for r in rows]
        xs = range(len(rows))
        ax.bar(xs, [v["mean"] if v else 0 for v in vals],
               yerr=[v["spread"] if v else 0 for v in vals], capsize=3,
               color=[f"C{i}" for i in xs])
        ax.set_xticks(list(xs))
        ax.set_xticklabels([_short(r[0]) for r in rows], rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{LABEL[metric]} ({DIRECTION[metric]} is better)", fontsize=9)
    figure.suptitle(f"{title} (mean ± std over sampling seeds; grey: teacher ± its spread)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _short(label: str) -> str:
    label = re.sub(r" \(select (\d+) steps, then train final\)", r" S=\1+final", label)
    label = label.replace("(training seed ", "(seed ")
    return label.replace(" + velocity anchor", " +anchor").replace("selective + ", "sel. + ")[:42]


def plot_gates(curves: Dict[str, List[dict]], path: Path, n_linear: int,
               switches: Optional[Dict[str, int]] = None) -> bool:
    """Gate trajectories r_l over the steps, one panel per run; ``switches``: the step at
    which a run's gates were fixed at the selection (train.select_steps), marked."""
    curves = {k: v for k, v in curves.items() if v and "gates" in v[-1]}
    if not curves:
        return False
    plt = _plt()
    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    figure, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.3 * rows), squeeze=False)
    for ax, (name, curve) in zip(axes.flat, curves.items()):
        steps = [r["step"] for r in curve if "gates" in r]
        gates = [r["gates"] for r in curve if "gates" in r]
        for layer in range(len(gates[0])):
            ax.plot(steps, [g[layer] for g in gates], label=f"layer {layer}",
                    color=f"C{layer}")
        ax.axhline(0.5, color="0.6", lw=0.8, ls="--")
        if name in (switches or {}):
            ax.axvline(switches[name], color="red", lw=0.9, ls="-.")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(_short(name), fontsize=9)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    axes[0][0].set_ylabel("gate r (1 softmax, 0 linear)")
    axes[0][0].legend(fontsize=6, ncol=2)
    figure.suptitle(f"selective-transfer gates (target {n_linear} linear; below 0.5 rounds "
                    f"to linear)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


# ---------------------------------------------------------------- verdicts

def target_verdicts(results: Results) -> List[str]:
    """The issue's targets, met or not, with the numbers (no interpretation)."""
    s = results.plan.settings
    teacher = results.teacher()
    out = []
    if teacher is None:
        return ["- the teacher was not scored: no target can be judged."]
    # 1. >= 60% linear at teacher level (class accuracy and Fréchet distance).
    for run in [*results.plan.studies.get("a", []), *phased_runs(results)]:
        layers = run_layers(results, run)
        score = results.score(run)
        if score is None or layers is None or len(layers) < math.ceil(0.6 * NUM_LAYERS):
            continue
        parts, ok = [], True
        for m in ("class_accuracy", "frechet_distance"):
            f, t = fig(score, m), fig(teacher, m)
            good = not_worse_than_teacher(f, t, m)
            ok &= good
            parts.append(f"{LABEL[m]} {cell(f)} vs teacher {cell(t)} "
                         f"({'within' if good else 'outside'})")
        out.append(f"- **{'met' if ok else 'NOT met'}**: {len(layers)} of {NUM_LAYERS} linear "
                   f"({run.name}) at teacher level: " + "; ".join(parts) + ".")
    # 2. selective > manual > heuristic, per metric.
    b = {r.name: r for r in results.plan.studies.get("b", []) if r.train_seed == 0}
    sel = results.score(b.get(headline_name(s))) if headline_name(s) in b else None
    manual = {n: results.score(r) for n, r in b.items() if n.startswith("manual")}
    heur = next((results.score(r) for n, r in b.items() if n.startswith("heuristic")), None)
    selectives = [("selective", sel)] + [
        (f"selective, select {r.name.split('select ')[1].split(' steps')[0]} steps then train "
         f"final", results.score(r)) for r in phased_runs(results)]
    if sel is not None and manual and heur is not None and all(manual.values()):
        for label, score in selectives:
            if score is None:
                continue
            for m, *_ in METRICS:
                best_manual = max(manual.values(), key=lambda sc: (sc["figures"][m]["mean"]
                                  * (-1 if DIRECTION[m] == "lower" else 1)))
                a = better(fig(score, m)["mean"], fig(best_manual, m)["mean"], m) and all(
                    better(fig(score, m)["mean"], fig(sc, m)["mean"], m)
                    for sc in manual.values())
                c = better(fig(best_manual, m)["mean"], fig(heur, m)["mean"], m)
                out.append(f"- {LABEL[m]}: {label} {cell(fig(score, m))}, best manual "
                           f"{cell(fig(best_manual, m))} ({best_manual['name']}), heuristic "
                           f"{cell(fig(heur, m))}: {label} > every manual "
                           f"**{'yes' if a else 'no'}**, best manual > heuristic "
                           f"**{'yes' if c else 'no'}**.")
    else:
        out.append("- selective > manual > heuristic: not judged (sub-study b incomplete).")
    # 3. ADM >= velocity-MSE on every metric, better on one beyond spread: every ADM variant
    # against velocity-MSE with gates, and ADM on fixed layers against velocity-MSE on them.
    c_runs = [r for r in results.plan.studies.get("c", []) if r.train_seed == 0]
    gated_mse = next((results.score(r) for r in c_runs if r.name == "velocity-MSE"), None)
    fixed_mse = next((results.score(r) for r in c_runs
                      if r.name.startswith("fixed first")), None)
    for run in c_runs:
        if "velocity-MSE" in run.name or results.score(run) is None:
            continue
        mse = fixed_mse if run.name.startswith("manual") else gated_mse
        if mse is None:
            continue
        sc = results.score(run)
        not_worse = [m for m, *_ in METRICS
                     if not better(fig(mse, m)["mean"], fig(sc, m)["mean"], m)]
        beyond = [m for m, *_ in METRICS
                  if better(fig(sc, m)["mean"], fig(mse, m)["mean"], m)
                  and beyond_spread(fig(sc, m), fig(mse, m))]
        worse_beyond = [m for m, *_ in METRICS
                        if better(fig(mse, m)["mean"], fig(sc, m)["mean"], m)
                        and beyond_spread(fig(sc, m), fig(mse, m))]
        ok = len(not_worse) == len(METRICS) and bool(beyond)
        out.append(f"- **{'met' if ok else 'NOT met'}**: {run.name} vs {mse['name']}: not "
                   f"worse on {len(not_worse)} of {len(METRICS)} metrics by mean "
                   f"({', '.join(LABEL[m] for m in not_worse) or 'none'}); better beyond the "
                   f"spread on {', '.join(LABEL[m] for m in beyond) or 'none'}; worse beyond "
                   f"the spread on {', '.join(LABEL[m] for m in worse_beyond) or 'none'}.")
    return out


# ---------------------------------------------------------------- the document

def write_document(results: Results, doc: Path, images: Path, plots: bool = True) -> Path:
    """Write the markdown (and its PNGs into ``images``, beside it in docs/; plots=False
    leaves the plots out)."""
    s = results.plan.settings
    meta = results.meta
    doc, images = Path(doc), Path(images)
    images.mkdir(parents=True, exist_ok=True)
    rel = lambda p: Path(p).relative_to(doc.parent).as_posix() if Path(p).is_relative_to(
        doc.parent) else str(p)
    teacher = results.teacher()
    L = []
    L.append("# The LinVideo study on the toy video DiT (issue 9 §4)\n")
    L.append("Generated by `linattn.toy.study` from its cached runs; the numbers below are "
             "measured, nothing is asserted. Regenerate (reusing every finished run and score):\n")
    L.append(f"```bash\n{meta.get('command', 'python -m linattn.toy.study')}\n```\n")
    if "--time-budget" in meta.get("command", ""):
        L.append("(`--time-budget` only stops new runs from starting; from scratch, "
                 "`python -m linattn.toy.study --threads 1` runs the whole grid.)\n")
    L.append(f"- date: {meta.get('date', '?')}; commit: {meta.get('commit', '?')}")
    L.append(f"- machine: {meta.get('machine', '?')}; shared with other jobs, so the timings "
             f"are not idle-machine figures (ratios measured within one timing pass are what "
             f"count). No GPU: every time here is CPU time.")
    L.append(f"- wall time of that invocation: {meta.get('wall_minutes', float('nan')):.1f} "
             f"min (finished runs and scores are cached; earlier invocations' time not "
             f"included)")
    if meta.get("regenerated"):
        L.append(f"- this document regenerated from the cache {meta['regenerated']}")
    L.append(f"- settings: {s.steps} optimiser steps per training run (batch {s.batch_size}, "
             f"toy_wan_cpu.yaml otherwise), teacher data {s.num_trajectories} trajectories x "
             f"{s.data_num_steps} steps; scores over sampling seeds {list(s.seeds)} x "
             f"{s.num_samples} samples (balanced classes), sampler {s.sampler.num_steps} Euler "
             f"steps, shift {s.sampler.shift}, guidance {s.sampler.guidance_scale}; training "
             f"seeds of the headline comparison {list(s.train_seeds)}; k = {s.k} linear layers "
             f"(of {NUM_LAYERS}) in sub-studies b-d")
    missing = [r for r in results.plan.runs() if results.score(r) is None]
    if missing:
        L.append(f"- **not run** (stopped for time or left out): "
                 + "; ".join(f"{r.name}" + (f" (training seed {r.train_seed})"
                                            if r.train_seed else "") for r in missing)
                 + ". The full grid is the command above without `--time-budget`.")
    L.append("")
    L.append("**Spread.** Unless a table says otherwise, `mean ± spread` is the mean over the "
             f"{len(s.seeds)} sampling seeds and the standard deviation across them (ddof 1) "
             "for one trained model: it measures sampling noise, not training noise. The "
             "training-seed table of the headline comparison gives the spread across training "
             "seeds. rel-MSE and PSNR are against the teacher's samples from the same noise; "
             "class accuracy and Fréchet distance are in the shipped video classifier's "
             "features (Fréchet against 512 real videos, biased upwards at few samples: compare "
             "with the teacher's at the same count); jitter and flicker are temporal "
             "(linattn.toy.fidelity).\n")

    L.append("## Reference: the teacher and real videos\n")
    L.append(metric_table(reference_rows(results), results))
    L.append("")

    L.append("## Targets (issue 9 §4)\n")
    L.extend(target_verdicts(results))
    L.append("")

    discussion = _existing_discussion(doc)
    L.append("## Discussion and diagnosis\n")
    L.append(DISCUSSION_START)
    L.append(discussion if discussion is not None else
             "(not written yet: the hand-written reading of the numbers goes here)")
    L.append(DISCUSSION_END)
    L.append("")

    # Headline over training seeds.
    names = [headline_name(s), "velocity-MSE",
             *dict.fromkeys(r.name for r in phased_runs(results, None)), f"manual: first {s.k}"]
    seeded = {n: by_training_seed(results, n) for n in names}
    if any(v and v["n"] > 1 for v in seeded.values()):
        L.append("## Headline over training seeds\n")
        L.append(f"Selective transfer at {s.k} linear, ADM (default) against velocity-MSE, "
                 f"and selective transfer with a selection phase against the first {s.k} "
                 f"layers trained linear from step 1; here `mean ± spread` is over **training "
                 f"seeds** {list(s.train_seeds)} (each run's mean over the sampling seeds, then "
                 f"mean and std across training seeds).\n")
        rows = [(f"{n} ({v['n']} training seeds)", None, v) for n, v in seeded.items() if v]
        L.append(metric_table(rows, results))
        L.append("")

    for study in ("a", "b", "c", "d"):
        if study not in results.plan.studies:
            continue
        L.append(f"## {STUDY_TITLES[study]}\n")
        rows = study_rows(results, study)
        extra_cols, extra = (), None
        if study == "a":
            timing = (results.timing or {}).get("seconds_per_video", {})
            base = timing.get(next((r.key for r in results.plan.studies["a"]
                                    if r.kind == "teacher"), ""), None)
            extra_cols = ("s / video", "speed-up")
            extra = {}
            for run in results.plan.studies["a"]:
                label = run.name
                t = timing.get(run.key)
                extra[label] = ([f"{t:.2f}", f"{base / t:.2f}x" if base else "-"]
                                if t else ["-", "-"])
            L.append(f"Selective transfer + ADM (the config's defaults) at each count; 0 is "
                     f"the teacher, {NUM_LAYERS} converts every layer (mode linear, trained "
                     f"the same steps). Under each, the untrained conversion of the same "
                     f"layers. Sampling time: seconds per video of a full guided sampling "
                     f"({s.sampler.num_steps} steps, both branches), batch "
                     f"{s.timing_samples}, median of {s.timing_repeats} interleaved repeats, "
                     f"{(results.timing or {}).get('threads', '?')} thread(s), this CPU.\n")
        if study == "b" and results.sensitivity:
            sens = results.sensitivity["rel_mse"]
            L.append(f"Heuristic: each layer alone converted without training; rel-MSE of "
                     f"{results.sensitivity['num_samples']} samples (seed "
                     f"{results.sensitivity['seed']}) against the teacher's; the {s.k} least "
                     f"sensitive become linear.\n")
            L.append("| layer | " + " | ".join(map(str, range(NUM_LAYERS))) + " |")
            L.append("|---|" + "---|" * NUM_LAYERS)
            L.append("| rel-MSE, layer alone linear | " + " | ".join(_fmt(v) for v in sens)
                     + " |\n")
            L.append("Manual and heuristic choices train with mode linear on their fixed "
                     "layers (no gates), the same steps and objective.\n")
            L.extend(same_choices(results))
        L.append(metric_table(rows, results, extra_cols, extra))
        L.append("")
        # Named after the document, so that two documents sharing docs/ keep their own plots.
        plot = images / f"{doc.stem}_{study}.png"
        drawn = plots and (plot_counts(results, plot) if study == "a"
                           else plot_bars(rows, teacher, plot, STUDY_TITLES[study]))
        if plots and study == "a" and drawn is False:
            drawn = plot_bars(rows, teacher, plot, STUDY_TITLES[study])
        if drawn:
            L.append(f"![{STUDY_TITLES[study]}]({rel(plot)})\n")
        # The gate trajectories: after d (its runs and b's phased ones), or after b when the
        # study has no d.
        if study == "d" or (study == "b" and "d" not in results.plan.studies):
            gated = [r for r in results.plan.studies[study]
                     if r.train_seed == 0 and r.kind == "train" and r.layers is None
                     and run_select_steps(r) is None]
            gated += phased_runs(results, None)
            curves = {r.name + (f" (training seed {r.train_seed})" if r.train_seed else ""):
                      (results.trained.get(r.key) or {}).get("curve", []) for r in gated}
            gates_png = images / f"{doc.stem}_gates.png"
            switches = {r.name + (f" (training seed {r.train_seed})" if r.train_seed else ""):
                        run_select_steps(r) for r in gated if run_select_steps(r) is not None}
            if plots and plot_gates(curves, gates_png, s.k, switches):
                L.append(f"Gate trajectories of these runs (from each run's metrics.jsonl):\n")
                L.append(f"![gate trajectories]({rel(gates_png)})\n")
            L.append(gate_table(results, gated))
            L.append("")

    if results.diagnostics:
        L.append("## What the samples look like (first sampling seed)\n")
        L.append(diagnostics_table(results))
        L.append("")
    grid = meta.get("grid")
    if grid:
        L.append("## Samples: teacher / untrained conversion / LinVideo, same noise\n")
        L.append(f"{meta.get('grid_caption', '')}\n")
        L.append(f"![samples]({rel(grid)})\n")
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(L) + "\n")
    return doc


def same_choices(results: Results) -> List[str]:
    """Sentences naming the choices of sub-study b that picked the same layers (one run when
    both are fixed choices; selective transfer's own pick trained with gates is another)."""
    runs = [r for r in results.plan.studies.get("b", []) if r.train_seed == 0]
    chosen = {r.name: run_layers(results, r) for r in runs}
    out, done = [], set()
    for name, layers in chosen.items():
        if layers is None or name in done:
            continue
        same = [n for n, other in chosen.items() if other == layers and n != name]
        if same:
            done.update(same)
            out.append(f"- **{name}** and **{'**, **'.join(same)}** chose the same layers "
                       f"({layers_text(layers)}); fixed choices of the same layers are one run "
                       f"(trained once), so only selective transfer's gated training differs "
                       f"among them.")
    if out:
        out.append("")
    return out


def diagnostics_table(results: Results) -> str:
    """Per scored model: how many of the first seed's videos hold no object, and the class the
    classifier reads for each (label i mod 8 was asked for)."""
    from ..videos import COUNTS, DIRECTIONS, split_label

    def class_name(label: int) -> str:
        direction, count = split_label(label)
        return f"{DIRECTIONS[direction]}-{COUNTS[count]}"

    s = results.plan.settings
    lines = [f"Seed {s.seeds[0]}'s {s.num_samples} samples (label i mod 8 asked for sample i): "
             f"videos with no object in most frames (bright mass under 8 pixels), and the class "
             f"the metrics' classifier reads for each sample, the figure class accuracy "
             f"counts.\n",
             "| model | empty videos | classes read |", "|---|---|---|"]
    seen = set()
    named = [*((r.name + (f" (training seed {r.train_seed})" if r.train_seed else ""), r)
               for r in results.plan.runs()),
             *((f"untrained conversion, layers {list(t.layers)}", t)
               for t in results.untrained_of.values())]
    for name, run in named:
        d = results.diagnostics.get(run.key)
        if d is None or run.key in seen:
            continue
        seen.add(run.key)
        lines.append(f"| {name} | {d['empty_count']} of {d['num']} | "
                     f"{', '.join(class_name(c) for c in d['predicted'])} |")
    return "\n".join(lines)


def gate_table(results: Results, runs: Sequence[Run]) -> str:
    """Final gates of each gated run; for a run with a selection phase, the gates when they
    were selected (the last step of the phase) instead."""
    lines = ["| run | final gates r (layer 0 .. 7) | rounded linear | finalized linear layers |",
             "|---|---|---|---|"]
    for run in runs:
        rec = results.trained.get(run.key)
        if not rec or not rec["curve"] or "gates" not in rec["curve"][-1]:
            continue
        last = rec["curve"][-1]
        select = run_select_steps(run)
        label = run.name + (f" (training seed {run.train_seed})" if run.train_seed else "")
        if select is not None:
            last = next(r for r in rec["curve"] if r["step"] == select)
            label += f": gates at step {select}, when selected"
        lines.append(f"| {label} | {', '.join(f'{g:.2f}' for g in last['gates'])} | "
                     f"{last.get('n_linear_rounded', '-')} | "
                     f"{layers_text(rec['linear_layers'])} |")
    return "\n".join(lines)


def _existing_discussion(doc: Path) -> Optional[str]:
    if not doc.exists():
        return None
    text = doc.read_text()
    m = re.search(re.escape(DISCUSSION_START) + r"\n(.*?)\n?" + re.escape(DISCUSSION_END),
                  text, re.S)
    if m is None or m.group(1).startswith("(not written yet"):
        return None
    return m.group(1)
