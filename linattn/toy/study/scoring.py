"""Scoring the study's models, cached as JSON beside each run.

* ``Scorer.score(run)``: every fidelity figure (linattn.toy.fidelity: rel-MSE, PSNR, class
  accuracy, Fréchet distance, jitter, flicker; mean ± std over the sampling seeds) against the
  teacher's samples from the same noise, in ``<root>/runs/<key>/score-<hash>.json``, the hash
  naming the seeds, samples per seed and sampler; the first seed's samples are kept beside it
  (``.pt``) for the sample grid. The teacher's own score carries the real videos' figures.
* ``Scorer.sensitivity()``: the heuristic's per-layer probe. Each layer alone converted with no
  training (Hedgehog maps at their identity initialisation), rel-MSE of its samples against
  the teacher's on noise of a seed no score uses.
* ``Scorer.timing(models)``: sampling seconds per video of each model (median of repeats,
  models interleaved so that a change of the shared machine's load hits all of them), one
  thread, on this machine's CPU.

The teacher's reference samples are built once per process, and only when a score is missing.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..fidelity import Figure, evaluate, teacher_reference
from ..linvideo import untrained_conversion
from ..sampling import balanced_labels, sample
from ...train.evaluate import relative_mse
from ...train.teacher_data import SAMPLING_STREAM
from .plan import NUM_LAYERS, Run, Settings
from .training import load_trained, read_json, run_dir, write_json


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def figures_json(figures: Dict[str, Figure]) -> dict:
    return {name: {"mean": f.mean, "spread": f.spread, "values": list(f.values)}
            for name, f in figures.items()}


class Scorer:
    def __init__(self, root: Path, settings: Settings, teacher: nn.Module,
                 progress: bool = True):
        self.root, self.settings, self.teacher, self.progress = Path(root), settings, teacher, progress
        self._reference = None
        # The noise stream is part of the tag: scores from before sampling noise had a stream
        # of its own (seed 0 was the teacher data's noise) are not reused.
        self.score_tag = _digest({"seeds": list(settings.seeds),
                                  "num_samples": settings.num_samples,
                                  "sampler": asdict(settings.sampler),
                                  "noise_stream": list(SAMPLING_STREAM)})

    # ------------------------------------------------------------------ scores

    def reference(self):
        if self._reference is None:
            s = self.settings
            self._reference = teacher_reference(self.teacher, seeds=s.seeds,
                                                num_samples=s.num_samples, sampler=s.sampler)
        return self._reference

    def score_path(self, run: Run) -> Path:
        return run_dir(self.root, run) / f"score-{self.score_tag}.json"

    def samples_path(self, run: Run) -> Path:
        return run_dir(self.root, run) / f"samples-{self.score_tag}.pt"

    def cached(self, run: Run) -> Optional[dict]:
        return read_json(self.score_path(run))

    def score(self, run: Run, model: Optional[Callable[[], nn.Module]] = None) -> dict:
        """The run's score (module docstring), computed unless cached. ``model``: a function
        returning the model to score (default: the teacher, the untrained conversion of
        run.layers, or the finished training run's saved model)."""
        done = self.cached(run)
        if done is not None:
            return done
        ref = self.reference()
        start = time.perf_counter()
        if run.kind == "teacher":
            figures, samples = ref.teacher_figures, ref.samples
            extra = {"real": figures_json(ref.real_figures)}
            seconds = None                  # sampled inside teacher_reference, not timed alone
        else:
            module = model() if model is not None else self._model(run)
            report = evaluate(module, ref)
            figures, samples, extra = report.model, report.samples, {}
            seconds = time.perf_counter() - start
        record = {"name": run.name, "key": run.key, "seeds": list(ref.seeds),
                  "num_samples": ref.num_samples, "sampler": asdict(ref.sampler),
                  "figures": figures_json(figures), "sampling_seconds": seconds, **extra}
        self.samples_path(run).parent.mkdir(parents=True, exist_ok=True)
        torch.save(samples[ref.seeds[0]].to(torch.float16), self.samples_path(run))
        write_json(self.score_path(run), record)
        return record

    def _model(self, run: Run) -> nn.Module:
        if run.kind == "untrained":
            return untrained_conversion(self.teacher, run.layers)
        return load_trained(self.root, run)

    def samples(self, run: Run) -> Optional[torch.Tensor]:
        """The first seed's samples of a scored run (float32), or None."""
        path = self.samples_path(run)
        return torch.load(path).float() if path.exists() else None

    # ------------------------------------------------------------------ the heuristic's probe

    def _sensitivity_path(self) -> Path:
        s = self.settings
        tag = _digest({"seed": s.sensitivity_seed, "num": s.sensitivity_samples,
                       "sampler": asdict(s.sampler), "noise_stream": list(SAMPLING_STREAM)})
        return self.root / f"sensitivity-{tag}.json"

    def sensitivity_cached(self) -> Optional[dict]:
        return read_json(self._sensitivity_path())

    def sensitivity(self) -> dict:
        """{"rel_mse": [per layer], ...}: each layer alone converted, untrained (cached)."""
        s = self.settings
        path = self._sensitivity_path()
        done = read_json(path)
        if done is not None:
            return done
        labels = balanced_labels(s.sensitivity_samples)
        opts = dict(seed=s.sensitivity_seed, sampler=s.sampler)
        reference = sample(self.teacher, labels, **opts)
        values = []
        for layer in tqdm(range(NUM_LAYERS), desc="per-layer sensitivity", unit="layer",
                          disable=not self.progress):
            converted = untrained_conversion(self.teacher, [layer])
            values.append(relative_mse(sample(converted, labels, **opts), reference))
        record = {"rel_mse": values, "seed": s.sensitivity_seed,
                  "num_samples": s.sensitivity_samples, "sampler": asdict(s.sampler)}
        write_json(path, record)
        return record

    # ------------------------------------------------------------------ speed

    def _timing_path(self, models) -> Path:
        s = self.settings
        tag = _digest({"names": sorted(models), "num": s.timing_samples,
                       "repeats": s.timing_repeats, "sampler": asdict(s.sampler),
                       "threads": torch.get_num_threads()})
        return self.root / f"timing-{tag}.json"

    def timing_cached(self, models) -> bool:
        return self._timing_path(models).exists()

    def timing(self, models: Dict[str, Callable[[], nn.Module]]) -> dict:
        """{name: seconds per video} (median of repeats, interleaved), cached by the names'
        set and the timing settings: name models by their run keys."""
        s = self.settings
        path = self._timing_path(models)
        done = read_json(path)
        if done is not None:
            return done
        built = {name: fn() for name, fn in models.items()}
        labels = balanced_labels(s.timing_samples)
        times: Dict[str, list] = {name: [] for name in built}
        for model in built.values():             # warm-up
            sample(model, labels[:1], seed=0, sampler=s.sampler)
        bar = tqdm(total=s.timing_repeats * len(built), desc="timing sampling", unit="call",
                   disable=not self.progress)
        for _ in range(s.timing_repeats):
            for name, model in built.items():
                start = time.perf_counter()
                sample(model, labels, seed=0, sampler=s.sampler)
                times[name].append((time.perf_counter() - start) / s.timing_samples)
                bar.update(1)
        bar.close()
        record = {"seconds_per_video": {n: sorted(v)[len(v) // 2] for n, v in times.items()},
                  "all": times, "threads": torch.get_num_threads(),
                  "num_samples": s.timing_samples, "sampler": asdict(s.sampler)}
        write_json(path, record)
        return record
