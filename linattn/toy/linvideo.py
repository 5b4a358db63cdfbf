"""LinVideo on the toy teacher, scored: the recipe run end to end, then teacher / untrained
conversion / LinVideo side by side (what ``python -m linattn.demo`` shows).

    result = run_linvideo(steps=60, n_linear=5, workdir="runs/toy_demo")
    print(comparison_table(result.rows))
    result.linvideo_beats_untrained          # the demo's exit status

1. linattn.train.train on linattn/train/configs/toy_wan_cpu.yaml (the shipped teacher, selective
   transfer + ADM with main's defaults, ``n_linear`` of the 8 self-attention layers linear);
2. the untrained conversion: the teacher with the same layers converted by linattn.convert
   (Hedgehog maps at their identity initialisation) and no training, the baseline the recipe
   must beat;
3. every model scored by linattn.toy.fidelity.evaluate against one teacher reference (same
   seeds, noise, labels and sampler), with its sampling time.

"Beats" is judged on the distribution-level metrics, paired seed by seed (same noise, so the
pairs are comparable): LinVideo's Fréchet distance is lower than the untrained conversion's on
every sampling seed, and its class accuracy is not lower on average. Not on rel-MSE: the toy's
videos are mostly black background, so a conversion that draws blank videos scores a rel-MSE
close to one that draws the right objects slightly displaced (measured 2026-12-02: untrained
5-linear 0.311 ± 0.100, LinVideo 0.320 ± 0.097, while the Fréchet distance fell 2.07e3 → 1.18e3
and class accuracy rose 0.17 → 0.25). rel-MSE stays in the table.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .fidelity import FidelityReport, Figure, evaluate, teacher_reference
from .grid import save_grid
from .teacher import SAMPLER, Sampler, load_teacher
from .videos import NUM_CLASSES

TOY_CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "toy_wan_cpu.yaml"
# What the table shows per metric, and which way is better.
COLUMNS = (("rel_mse", "rel-MSE", "lower"), ("psnr", "PSNR dB", "higher"),
           ("class_accuracy", "class acc.", "higher"), ("frechet_distance", "Fréchet", "lower"),
           ("jitter", "jitter px", "lower"))


@dataclass
class Row:
    """One model of the table: its fidelity figures (the teacher's own for the teacher) and
    the seconds it took to sample every seed."""

    name: str
    figures: Dict[str, Figure]
    sampling_seconds: float


@dataclass
class LinVideoResult:
    rows: list                      # [teacher, untrained conversion, LinVideo] Rows
    linear_layers: list             # indices of the layers LinVideo made linear
    reports: Dict[str, FidelityReport]
    linvideo_beats_untrained: bool
    train_seconds: float
    model: nn.Module                # the finalized LinVideo student


def layer_names(model: nn.Module) -> list:
    from ..dit.selectors import resolve_selector

    return [name for name, _ in resolve_selector(model, None).layers(model)]


def untrained_conversion(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A copy of the teacher with ``layers`` converted to linear attention, no training."""
    from .. import dit

    model = copy.deepcopy(teacher)
    dit.convert(model, layers=list(layers), feature_map="hedgehog", mode="linear")
    return model.eval()


def beats(candidate: FidelityReport, baseline: FidelityReport) -> bool:
    """Paired (module docstring): the candidate's Fréchet distance is below the baseline's on
    every sampling seed and its mean class accuracy is at least the baseline's."""
    a = candidate.model["frechet_distance"].values
    b = baseline.model["frechet_distance"].values
    fewer_errors = len(a) == len(b) > 0 and all(x < y for x, y in zip(a, b))
    return fewer_errors and (candidate.model["class_accuracy"].mean
                             >= baseline.model["class_accuracy"].mean)


def run_linvideo(*, steps: int = 60, n_linear: int = 5, workdir: str = "runs/toy_demo",
                 seeds: Sequence[int] = (0, 1, 2), num_samples: int = NUM_CLASSES,
                 overrides: Sequence[str] = (), sampler: Sampler = SAMPLER,
                 grid: Optional[str] = None, progress: bool = True) -> LinVideoResult:
    """Train LinVideo on the shipped toy teacher and score it (module docstring).

    workdir: the run's teacher data and output (data is reused by a later run with the same
    settings). overrides: more "section.key=value" settings of the toy config. sampler: how
    every model samples for the metrics (default the teacher's own). grid: write a sample grid
    there (per class: teacher, untrained conversion, LinVideo; same noise).
    """
    from ..train import train

    teacher = load_teacher()
    start = time.perf_counter()
    result = train(str(TOY_CONFIG), overrides=[
        f"data.dir={workdir}/teacher_data", f"output.dir={workdir}/run", f"train.steps={steps}",
        f"convert.n_linear={n_linear}", f"output.checkpoint_every={steps}", "output.eval_every=0",
        "output.resume=never", *overrides], teacher=teacher, progress=progress)
    train_seconds = time.perf_counter() - start
    names = layer_names(teacher)
    linear = sorted(names.index(name) for name, kind in result.selection.items()
                    if kind == "linear")
    student = result.model.eval()

    bar = tqdm(total=3, desc="scoring teacher / untrained / LinVideo", unit="model",
               disable=not progress)
    reference, seconds = _timed(lambda: teacher_reference(
        teacher, seeds=seeds, num_samples=num_samples, sampler=sampler))
    bar.update(1)
    untrained = untrained_conversion(teacher, linear)
    reports = {}
    rows = [Row("teacher", reference.teacher_figures, seconds)]
    for name, model in ((f"untrained conversion ({len(linear)} linear)", untrained),
                        (f"LinVideo ({len(linear)} linear, {steps} steps)", student)):
        reports[name], seconds = _timed(lambda: evaluate(model, reference))
        rows.append(Row(name, reports[name].model, seconds))
        bar.update(1)
    bar.close()
    untrained_report, linvideo_report = reports.values()
    if grid is not None:
        first = reference.seeds[0]
        videos = [v for triple in zip(reference.samples[first], untrained_report.samples[first],
                                      linvideo_report.samples[first]) for v in triple]
        save_grid(torch.stack(videos), grid, frames=range(0, 16, 2))
    return LinVideoResult(rows, linear, reports, beats(linvideo_report, untrained_report),
                          train_seconds, student)


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def comparison_table(rows: Sequence[Row]) -> str:
    """Plain-text table: one line per model, mean ± spread across sampling seeds per metric
    (teacher-relative figures are '-' for the teacher itself), then the sampling time
    relative to the first row's."""
    header = ["model"] + [f"{label} ({better})" for _, label, better in COLUMNS] + ["sampling"]
    lines = [header]
    base = rows[0].sampling_seconds if rows else 0.0
    for row in rows:
        cells = [row.name]
        for key, _, _ in COLUMNS:
            cells.append(str(row.figures[key]) if key in row.figures else "-")
        ratio = f" ({row.sampling_seconds / base:.2f}x)" if base > 0 and row is not rows[0] else ""
        cells.append(f"{row.sampling_seconds:.1f} s{ratio}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()
                     for line in lines)


__all__ = ["run_linvideo", "comparison_table", "beats", "untrained_conversion", "Row",
           "LinVideoResult", "TOY_CONFIG"]
