"""The run grid of the study: which models each sub-study compares, as keyed settings.

A run (``Run``) is one model to score: the teacher itself, an untrained conversion of fixed
layers, or a training run of the toy config (linattn/train/configs/toy_wan_cpu.yaml) with
overrides. Its ``key`` is a hash of everything that decides its outcome (kind, layers, config
overrides, steps, training seed, teacher data), so a rerun, or a larger run that shares some
settings, finds finished work under the same key and reuses it.

``Settings`` holds the study's sizes (steps, samples, seeds, which variants); ``plan(settings)``
lists the sub-studies of issue 9 §4, each a list of named runs:

a. number of linear layers: selective transfer + ADM at each count (0: the teacher; all: every
   layer linear, trained the same steps), with their sampling speed;
b. layer choice at ``k`` linear layers: selective transfer against manual choices (first k, last
   k, evenly spaced) and the sensitivity heuristic (the k layers whose single-layer untrained
   conversion moves samples least), the fixed choices trained with mode linear; and selective
   transfer with a selection phase (train.select_steps: select for S steps, then train the
   fixed final model for the rest), over the headline's training seeds, beside the first k
   trained with mode linear on the same training seeds;
c. objective: ADM (every variant the trainer has) against velocity-MSE, selective transfer at k;
d. the binarisation loss: the config's α, α annealed 20 → 2, fixed α, no L_reg.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..teacher import SAMPLER, Sampler

NUM_LAYERS = 8
MANUAL_RULES = ("first", "last", "even")
# name -> config overrides of the ADM variants the trainer has (linattn.train.objectives);
# "dmd + anchor" is the config's default, the baseline of every other sub-study.
ADM_VARIANTS: Dict[str, Tuple[str, ...]] = {
    "ADM dmd + velocity anchor (default)": (),
    "ADM dmd, no anchor (paper's ADM)": ("train.adm_velocity_weight=0.0",),
    "ADM clip + velocity anchor": ("train.adm_weighting=clip",),
    "ADM normalize + velocity anchor": ("train.adm_weighting=normalize",),
    "ADM trained fake score + velocity anchor": ("train.adm_fake_score=trained",),
}
VELOCITY_MSE = ("train.objective=velocity_mse",)
ALPHA_VARIANTS: Dict[str, Tuple[str, ...]] = {
    "config α 1.5 → 1 (default)": (),
    "α annealed 20 → 2 (paper)": ("train.alpha_start=20.0", "train.alpha_end=2.0"),
    "α fixed at 2": ("train.alpha_start=2.0", "train.alpha_end=2.0"),
    "no binarisation loss": ("train.binarization=false",),
}


@dataclass(frozen=True)
class Settings:
    """The study's sizes. The defaults are the full study; ``quick()`` a smoke run."""

    steps: int = 60                      # optimiser steps of every training run
    batch_size: int = 4                  # train.global_batch_size
    num_trajectories: int = 16           # teacher trajectories (data.num_trajectories)
    data_num_steps: int = 20             # their sampler steps (the toy's own: 20)
    seeds: Tuple[int, ...] = (0, 1, 2)   # sampling seeds of every score
    num_samples: int = 8                 # samples per seed (balanced: one per class at 8)
    sampler: Sampler = SAMPLER           # how every model samples for its score
    train_seeds: Tuple[int, ...] = (0, 1)  # training seeds of the headline comparisons
    k: int = 5                           # linear layers of sub-studies b-d (5 of 8 = 62.5%)
    # train.select_steps of sub-study b's "select S steps, then train final" runs (those below
    # ``steps``). In steps, not a fraction of the run: the gates' lockstep descent from r = 1
    # to 0.5 takes ~17 steps at the toy's gate_lr 0.03 whatever the run's length, and their
    # ranking settles right after it (step ~21 in the 60-step runs, docs/toy_study.md §3): 20,
    # and 30 (half of the 60 steps) as the one other value measured.
    select_steps: Tuple[int, ...] = (20, 30)
    counts: Tuple[int, ...] = (0, 2, 4, 5, 6, 8)
    manual_rules: Tuple[str, ...] = MANUAL_RULES
    adm_variants: Tuple[str, ...] = tuple(ADM_VARIANTS)
    alpha_variants: Tuple[str, ...] = tuple(ALPHA_VARIANTS)
    studies: Tuple[str, ...] = ("a", "b", "c", "d")
    sensitivity_seed: int = 100          # noise of the heuristic's per-layer probe (not a score seed)
    sensitivity_samples: int = 4
    timing_samples: int = 2              # videos per timed sampling call
    timing_repeats: int = 3              # median of this many
    extra_overrides: Tuple[str, ...] = ()  # applied to every training run

    @classmethod
    def quick(cls) -> "Settings":
        """A smoke setting: every sub-study, minutes not an hour (4-step sampler and data)."""
        return cls(steps=4, num_trajectories=2, data_num_steps=4, num_samples=2,
                   sampler=Sampler(num_steps=4, shift=SAMPLER.shift,
                                   guidance_scale=SAMPLER.guidance_scale),
                   train_seeds=(0,), sensitivity_samples=2, timing_samples=1,
                   timing_repeats=1)

    def data_overrides(self) -> Tuple[str, ...]:
        return (f"data.num_trajectories={self.num_trajectories}",
                f"data.num_steps={self.data_num_steps}",
                f"data.generation_batch_size={min(8, self.num_trajectories)}")

    def train_overrides(self) -> Tuple[str, ...]:
        """Overrides of every training run (besides the data's and the run's own)."""
        return (f"train.global_batch_size={self.batch_size}", *self.extra_overrides)


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Run:
    """One model of the study (module docstring)."""

    name: str                            # its label in the document
    kind: str                            # "teacher", "untrained" or "train"
    layers: Optional[Tuple[int, ...]] = None   # the linear layers, when fixed in advance
    overrides: Tuple[str, ...] = ()      # config overrides of a training run
    steps: int = 0
    train_seed: int = 0
    data: Tuple[str, ...] = ()           # the teacher-data settings it trains on

    def settings(self) -> dict:
        return {"kind": self.kind, "layers": self.layers, "overrides": sorted(self.overrides),
                "steps": self.steps, "train_seed": self.train_seed, "data": list(self.data)}

    @property
    def key(self) -> str:
        slug = {"teacher": "teacher", "untrained": "untrained", "train": "train"}[self.kind]
        return f"{slug}-{_hash(self.settings())}"

    def train_overrides(self) -> List[str]:
        """The overrides of its linattn.train run (without the directories)."""
        return [*self.data, f"train.steps={self.steps}", f"train.seed={self.train_seed}",
                *self.overrides]


def layer_choice(rule: str, k: int, num_layers: int = NUM_LAYERS,
                 sensitivity: Optional[Sequence[float]] = None) -> Tuple[int, ...]:
    """The k layers a manual rule or the heuristic picks (sorted).

    first / last: layers 0..k−1 / the last k; even: k evenly spaced over all layers,
    round(i (L − 1) / (k − 1)); heuristic: the k layers of least ``sensitivity`` (ties: earlier).
    """
    if not 0 <= k <= num_layers:
        raise ValueError(f"k: expected 0 <= k <= {num_layers}, got {k}")
    if rule == "first":
        return tuple(range(k))
    if rule == "last":
        return tuple(range(num_layers - k, num_layers))
    if rule == "even":
        if k <= 1:
            return tuple(range(k))
        return tuple(sorted({int(round(i * (num_layers - 1) / (k - 1))) for i in range(k)}))
    if rule == "heuristic":
        if sensitivity is None or len(sensitivity) != num_layers:
            raise ValueError(f"sensitivity: the heuristic needs one value per layer "
                             f"({num_layers}), got {sensitivity!r}")
        order = sorted(range(num_layers), key=lambda i: (sensitivity[i], i))
        return tuple(sorted(order[:k]))
    raise ValueError(f"rule: expected one of {[*MANUAL_RULES, 'heuristic']}, got {rule!r}")


@dataclass
class Plan:
    """The sub-studies' runs, in the order they should run (most informative first)."""

    settings: Settings
    studies: Dict[str, List[Run]] = field(default_factory=dict)

    def runs(self) -> List[Run]:
        """Every distinct run once (a run shared by sub-studies appears once), the most
        informative first, so that a study stopped for time has its headline comparisons:
        the headline and velocity-MSE, then the rest of training seed 0 in sub-study order,
        then the further training seeds."""
        seen, out = set(), []
        for runs in self.studies.values():
            for run in runs:
                if run.key not in seen:
                    seen.add(run.key)
                    out.append(run)
        return sorted(out, key=self.order)

    def _priority(self, run: Run) -> int:
        """The headline pair; the teacher and the all-linear end of a; the layer choices of b;
        the paper's ADM (no anchor) and no L_reg, the ablations the paper reports; the other
        α variants of d; a's count above k; velocity-MSE on fixed layers; the other ADM
        variants of c; the other counts."""
        k = self.settings.k
        if run.name in (headline_name(self.settings), "velocity-MSE"):
            return 0
        if run.kind == "teacher":
            return 1
        if run.name.startswith("all "):
            return 2
        if run.name.startswith(("manual", "heuristic")) or "then train final" in run.name:
            return 3
        if run.name in ("ADM dmd, no anchor (paper's ADM)", "no binarisation loss"):
            return 4
        if run.name in ALPHA_VARIANTS:
            return 5
        if run.name.startswith("selective + ADM, ") and run.name != f"selective + ADM, {k} linear" \
                and int(run.name.split(", ")[1].split()[0]) > k:
            return 6
        if run.name.startswith("fixed first"):
            return 7
        if run.name in ADM_VARIANTS:
            return 9
        return 10

    def order(self, run: Run) -> tuple:
        """Sort key of runs(): training seed 0 by priority; the headline pair's further
        training seeds right after velocity-MSE on fixed layers (priority 8)."""
        if run.train_seed > 0:
            return (8, run.train_seed)
        return (self._priority(run), 0)


def selective(s: Settings, n_linear: int, name: str, extra: Sequence[str] = (),
              train_seed: int = 0) -> Run:
    """Selective transfer (mode hybrid, every layer gated) at n_linear, plus overrides."""
    if n_linear == NUM_LAYERS:
        overrides = ("convert.mode=linear", "convert.layers=all", "convert.n_linear=null")
    else:
        overrides = (f"convert.n_linear={n_linear}",)
    return Run(name, "train", None, (*overrides, *s.train_overrides(), *extra), s.steps,
               train_seed, s.data_overrides())


def fixed(s: Settings, layers: Sequence[int], name: str, extra: Sequence[str] = (),
          train_seed: int = 0) -> Run:
    """Training with mode linear on fixed layers (no gates), the config's objective unless
    ``extra`` overrides it."""
    layers = tuple(int(i) for i in layers)
    overrides = ("convert.mode=linear", f"convert.layers=[{','.join(map(str, layers))}]",
                 "convert.n_linear=null")
    return Run(name, "train", layers, (*overrides, *s.train_overrides(), *extra), s.steps,
               train_seed, s.data_overrides())


def teacher_run() -> Run:
    return Run("teacher", "teacher")


def untrained(layers: Sequence[int], name: Optional[str] = None) -> Run:
    layers = tuple(int(i) for i in layers)
    return Run(name or f"untrained conversion, layers {list(layers)}", "untrained", layers)


def headline_name(s: Settings) -> str:
    return f"selective + ADM, {s.k} linear"


def run_select_steps(run: Run) -> Optional[int]:
    """The run's train.select_steps (None: selection over the whole run, or no gates)."""
    return next((int(o.split("=", 1)[1]) for o in run.overrides
                 if o.startswith("train.select_steps=")), None)


def phased_name(s: Settings, select_steps: int) -> str:
    return (f"selective + ADM, {s.k} linear (select {select_steps} steps, then train final)")


def variant_runs(s: Settings, names: Sequence[str], table: dict, headline: List[Run]) -> List[Run]:
    """The selective runs of sub-study c or d: one per variant name, with that variant's
    overrides from ``table``; a variant without overrides is the headline run itself."""
    runs: List[Run] = []
    for variant in names:
        if table[variant] == ():
            runs.extend(headline)
        else:
            runs.append(selective(s, s.k, variant, table[variant]))
    return runs


def plan(s: Settings, sensitivity: Optional[Sequence[float]] = None) -> Plan:
    """The sub-studies' runs (module docstring). ``sensitivity`` (per layer) places the
    heuristic's run; without it sub-study b has no heuristic run yet."""
    unknown = sorted(set(s.studies) - {"a", "b", "c", "d"})
    if unknown:
        raise ValueError(f"studies: unknown sub-studies {unknown}; expected some of a, b, c, d")
    p = Plan(s)
    headline = [selective(s, s.k, headline_name(s), train_seed=seed) for seed in s.train_seeds]
    if "a" in s.studies:
        runs = []
        for n in s.counts:
            if n == 0:
                runs.append(teacher_run())
            elif n == s.k:
                runs.append(headline[0])
            else:
                runs.append(selective(s, n, f"selective + ADM, {n} linear"
                                      if n < NUM_LAYERS else f"all {n} linear + ADM"))
        p.studies["a"] = runs
    if "b" in s.studies:
        runs = list(headline)
        for select in s.select_steps:
            if 1 <= select < s.steps:
                runs.extend(selective(s, s.k, phased_name(s, select),
                                      (f"train.select_steps={select}",), train_seed=seed)
                            for seed in s.train_seeds)
        for rule in s.manual_rules:
            runs.append(fixed(s, layer_choice(rule, s.k), f"manual: {rule} {s.k}"))
        if any(1 <= n < s.steps for n in s.select_steps) and "first" in s.manual_rules:
            # The phased runs' comparison over training seeds: the first k trained linear.
            runs.extend(fixed(s, layer_choice("first", s.k), f"manual: first {s.k}",
                              train_seed=seed) for seed in s.train_seeds[1:])
        if sensitivity is not None:
            layers = layer_choice("heuristic", s.k, sensitivity=sensitivity)
            runs.append(fixed(s, layers, f"heuristic: {s.k} least sensitive"))
        p.studies["b"] = runs
    if "c" in s.studies:
        runs = variant_runs(s, s.adm_variants, ADM_VARIANTS, headline)
        runs.extend(selective(s, s.k, "velocity-MSE", VELOCITY_MSE, train_seed=seed)
                    for seed in s.train_seeds)
        # The objectives again on the same fixed layers (mode linear, no gates), where the
        # gates cannot differ between them: the first k, the layers selection picks here.
        first = layer_choice("first", s.k)
        runs.append(fixed(s, first, f"manual: first {s.k}"))
        runs.append(fixed(s, first, f"fixed first {s.k} + velocity-MSE", VELOCITY_MSE))
        p.studies["c"] = runs
    if "d" in s.studies:
        p.studies["d"] = variant_runs(s, s.alpha_variants, ALPHA_VARIANTS, headline)
    return p
