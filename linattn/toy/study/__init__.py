"""The LinVideo study on the toy teacher (issue 9 §4): ``python -m linattn.toy.study``.

On the shipped toy video DiT (linattn.toy), four sub-studies, every figure over >= 3 sampling
seeds: (a) the number of linear layers against measured sampling speed; (b) selective transfer
against manual layer choices and a sensitivity heuristic; (c) ADM's variants against
velocity-MSE; (d) the binarisation loss's α schedule against fixed α and no L_reg. Writes
docs/toy_study.md with tables, verdicts against the issue's targets, plots and a sample grid.

Modules, one job each: plan (the run grid: runs keyed by their settings, the study's sizes),
training (one training run, cached as run.json beside its saved model), scoring (fidelity
scores, the heuristic's per-layer probe and the speed pass, cached as JSON), runner (runs the
plan), document (the markdown and its plots), __main__ (the command line). Every training run
and score is cached under the run directory (default runs/study) by its settings, so a rerun,
or a larger study sharing some settings, reuses finished work.
"""
from .plan import Run, Settings, layer_choice, plan
from .runner import run_study

__all__ = ["Settings", "Run", "plan", "layer_choice", "run_study"]
