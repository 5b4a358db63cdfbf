"""Fidelity of a (converted) toy teacher: the three metric kinds of fidelity.md, with seed spread.

    reference = teacher_reference()                  # the shipped teacher, 3 seeds x 16 samples
    report = evaluate(student, reference)            # same sampler, same noise, same labels
    print(report.table())

Per sampling seed s, the model samples num_samples videos (balanced labels, noise from (s, i))
with the teacher's sampler and guidance, and:

1. teacher-relative: rel_mse = mean_i ‖x_i − x_teacher,i‖² / ‖x_teacher,i‖² and
   psnr = mean_i 10 log10(peak² / mse_i), peak = 2 (values span [−1, 1]), capped at PSNR_CAP
   dB (an identical sample would be +inf);
2. distribution-level, in the feature space of the video classifier (linattn.toy.classifier):
   class_accuracy (how often the classifier reads the label that was asked for) and
   frechet_distance between the samples' features and those of NUM_REAL real procedural videos
   (the FVD analogue; with few samples it is biased upwards, so compare it with the teacher's
   and the real videos' own at the same num_samples, which the report carries);
3. temporal: jitter, the per-video median over frames of ‖c_{f+1} − 2 c_f + c_{f−1}‖ (pixels),
   c_f the centroid of the bright pixels of frame f: objects move at constant speed, so real
   videos score ~0 (a bounce is one or two frames, which the median ignores) and frame-to-frame
   wobble scores above; and flicker, the per-video std / mean of the bright mass over frames.

Each figure is the mean over seeds with its spread (the standard deviation across seeds, ddof 1).
The report holds the same figures for the teacher (the reference a converted model is judged
against: "teacher-level" means within the teacher's spread) and for real videos (the floor).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from ..train.evaluate import relative_mse
from .classifier import VideoClassifier, load_classifier
from .sampling import balanced_labels, sample
from .teacher import SAMPLER, Sampler, load_teacher
from .videos import procedural_videos

PSNR_CAP = 100.0
PEAK = 2.0                 # values span [−1, 1]
NUM_REAL = 512             # real videos of the Fréchet reference
REAL_SEED = 3              # their data seed (the teacher trained on seed 1, the classifier on 2)
REAL_SAMPLE_SEED = 4       # data seed of the real videos scored as if they were samples
BRIGHT_FROM = -0.5         # pixels count towards centroids from this value up (weight 0 -> 1 at 1)
METRICS = ("rel_mse", "psnr", "class_accuracy", "frechet_distance", "jitter", "flicker")


@dataclass(frozen=True)
class Figure:
    """A metric over sampling seeds: mean, spread (std across seeds, ddof 1), per-seed values."""

    mean: float
    spread: float
    values: tuple

    @classmethod
    def of(cls, values: Sequence[float]) -> "Figure":
        v = torch.tensor([float(x) for x in values], dtype=torch.float64)
        spread = float(v.std()) if v.numel() > 1 else 0.0
        return cls(float(v.mean()), spread, tuple(float(x) for x in v))

    def __str__(self) -> str:
        return f"{_fmt(self.mean)} ± {_fmt(self.spread)}"


@dataclass(frozen=True)
class PairedGap:
    """A model's class accuracy minus the teacher's, in points, paired video by video.

    Both sample from the same noise and label per video, so most of the sampling noise that
    makes each accuracy's seed spread wide (a few videos that are hard for any model) is shared
    and cancels in the per-video difference d_i = correct_model,i − correct_teacher,i. ``points``
    is 100 · mean d over every video of every seed, ``standard_error`` 100 · std(d) / √n (ddof
    1): the resolution a claim like "within 2 points of the teacher" needs, which the unpaired
    seed spreads (±10 points at 16 videos a seed) cannot give."""

    points: float
    standard_error: float
    num_videos: int

    @classmethod
    def of(cls, model_correct: Sequence[Tensor], teacher_correct: Sequence[Tensor]
           ) -> "PairedGap":
        if len(model_correct) != len(teacher_correct):
            raise ValueError(f"model_correct: expected one tensor per seed of teacher_correct "
                             f"({len(teacher_correct)}), got {len(model_correct)}")
        for m, t in zip(model_correct, teacher_correct):
            if m.shape != t.shape or m.dim() != 1:
                raise ValueError(f"model_correct: expected per-video flags of shape "
                                 f"{tuple(t.shape)} like teacher_correct's, got {tuple(m.shape)}")
        d = (torch.cat(list(model_correct)).double() - torch.cat(list(teacher_correct)).double())
        if d.numel() < 2:
            raise ValueError(f"model_correct: a standard error needs >= 2 videos, got {d.numel()}")
        return cls(float(100 * d.mean()), float(100 * d.std() / math.sqrt(d.numel())),
                   int(d.numel()))

    def __str__(self) -> str:
        return f"{self.points:+.1f} ± {self.standard_error:.1f} points ({self.num_videos} videos)"


def _fmt(x: float) -> str:
    if x == 0 or math.isinf(x) or math.isnan(x):
        return f"{x:g}"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


# ---------------------------------------------------------------- per-video measurements

def psnr(x: Tensor, reference: Tensor) -> Tensor:
    """(N,) PSNR in dB of each sample against its reference (peak PEAK), capped at PSNR_CAP."""
    mse = (x.float() - reference.float()).flatten(1).square().mean(1).double()
    value = 10.0 * torch.log10(PEAK ** 2 / mse.clamp_min(1e-300))
    return value.clamp(max=PSNR_CAP).float()


def bright_weights(videos: Tensor) -> Tensor:
    """(N, F, H, W) weights in [0, 1]: 0 up to BRIGHT_FROM, 1 at the foreground value +1."""
    return ((videos.float()[:, 0] - BRIGHT_FROM) / (1.0 - BRIGHT_FROM)).clamp(0.0, 1.0)


def centroids(videos: Tensor) -> Tensor:
    """(N, F, 2) centroid (y, x) of the bright pixels of every frame, in pixels (frame centre
    for an empty frame)."""
    w = bright_weights(videos)
    size_y, size_x = w.shape[-2:]
    ys = torch.arange(size_y, dtype=torch.float32) + 0.5
    xs = torch.arange(size_x, dtype=torch.float32) + 0.5
    mass = w.sum((-1, -2))
    safe = mass.clamp_min(1e-6)
    cy = (w.sum(-1) * ys).sum(-1) / safe
    cx = (w.sum(-2) * xs).sum(-1) / safe
    empty = mass < 1e-6
    cy = torch.where(empty, torch.full_like(cy, size_y / 2), cy)
    cx = torch.where(empty, torch.full_like(cx, size_x / 2), cx)
    return torch.stack([cy, cx], dim=-1)


def trajectory_jitter(paths: Tensor) -> Tensor:
    """(N,) median over frames of the second difference ‖c_{f+1} − 2 c_f + c_{f−1}‖ of
    trajectories (N, F, 2)."""
    if paths.ndim != 3 or paths.shape[1] < 3:
        raise ValueError(f"paths: expected (N, F >= 3, 2), got {tuple(paths.shape)}")
    accel = paths[:, 2:] - 2 * paths[:, 1:-1] + paths[:, :-2]
    return accel.norm(dim=-1).median(dim=1).values


def jitter(videos: Tensor) -> Tensor:
    """(N,) trajectory_jitter of each video's bright-pixel centroid."""
    return trajectory_jitter(centroids(videos))


def flicker(videos: Tensor) -> Tensor:
    """(N,) std / mean over frames of each video's bright mass (0 for constant mass)."""
    mass = bright_weights(videos).sum((-1, -2))
    return mass.std(dim=1) / mass.mean(dim=1).clamp_min(1e-6)


def frechet_distance(features: Tensor, reference: Tensor) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between two feature sets (N, d), in float64.

    tr (Σ_a Σ_b)^½ is the sum of square roots of the eigenvalues of Σ_a^½ Σ_b Σ_a^½ (symmetric,
    positive semi-definite), so no general matrix square root is needed."""
    a, b = features.double(), reference.double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"features, reference: expected (N >= 2, d) each with the same d, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    evals, evecs = torch.linalg.eigh(cov_a)
    root_a = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return float(value.clamp_min(0))


# ---------------------------------------------------------------- references and evaluation

@torch.no_grad()
def classifier_features(classifier: VideoClassifier, videos: Tensor,
                        batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """(features (N, FEATURE_DIM), predicted labels (N,))."""
    feats = torch.cat([classifier.features(videos[i:i + batch_size])
                       for i in range(0, videos.shape[0], batch_size)])
    return feats, classifier.head(feats).argmax(-1)


def real_features(classifier: VideoClassifier) -> Tensor:
    """(NUM_REAL, FEATURE_DIM) features of the real videos every Fréchet distance is against
    (balanced classes, data seed REAL_SEED); computed once per classifier (frozen)."""
    cached = _REAL_FEATURES.get(classifier)
    if cached is None:
        real = procedural_videos(NUM_REAL, REAL_SEED, labels=balanced_labels(NUM_REAL))
        cached = _REAL_FEATURES[classifier] = classifier_features(classifier, real.videos)[0]
    return cached


_REAL_FEATURES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclass
class TeacherReference:
    """What every evaluation against one teacher shares: its samples per seed, the real-video
    features, and the teacher's and the real videos' own figures. Build once, evaluate many."""

    teacher: nn.Module
    classifier: VideoClassifier
    seeds: tuple
    num_samples: int
    sampler: Sampler
    labels: Tensor
    samples: Dict[int, Tensor]
    real_features: Tensor
    teacher_figures: Dict[str, Figure] = field(default_factory=dict)
    real_figures: Dict[str, Figure] = field(default_factory=dict)


def teacher_reference(teacher: Optional[nn.Module] = None, *, seeds: Sequence[int] = (0, 1, 2),
                      num_samples: int = 16, sampler: Sampler = SAMPLER,
                      classifier: Optional[VideoClassifier] = None,
                      progress: bool = False,
                      samples: Optional[Dict[int, Tensor]] = None) -> TeacherReference:
    """Sample the teacher (default: the shipped one) for every seed and score it, and score
    real procedural videos the same way. Seeds must be >= 3 for a spread worth the name; fewer
    are accepted for quick checks. ``samples`` (optional): the teacher's samples per seed from
    an earlier call with the same teacher, seeds, num_samples and sampler (a cache the caller
    keys; benchmarks/toy_score.py --teacher-cache), used instead of sampling again."""
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct sampling seeds, got {seeds}")
    if num_samples < 2:
        raise ValueError(f"num_samples: a Fréchet distance needs >= 2 samples, got {num_samples}")
    teacher = teacher if teacher is not None else load_teacher()
    classifier = classifier if classifier is not None else load_classifier()
    labels = balanced_labels(num_samples)
    if samples is None:
        samples = {s: sample(teacher, labels, seed=s, sampler=sampler, progress=progress)
                   for s in seeds}
    else:
        samples = dict(samples)
        if sorted(samples) != sorted(seeds):
            raise ValueError(f"samples: expected the teacher's samples for seeds {list(seeds)}, "
                             f"got seeds {sorted(samples)}")
        wrong = {s: tuple(v.shape) for s, v in samples.items() if v.shape[0] != num_samples}
        if wrong:
            raise ValueError(f"samples: expected {num_samples} videos per seed, got shapes "
                             f"{wrong}")
    ref = TeacherReference(teacher, classifier, seeds, num_samples, sampler, labels, samples,
                           real_features(classifier))
    ref.teacher_figures = _figures(ref, samples, with_teacher_relative=False)
    real_sets = {s: procedural_videos(num_samples, REAL_SAMPLE_SEED, labels=labels,
                                      start=k * num_samples).videos
                 for k, s in enumerate(seeds)}
    ref.real_figures = _figures(ref, real_sets, with_teacher_relative=False)
    return ref


def class_correct(samples: Tensor, labels: Tensor, classifier: VideoClassifier) -> Tensor:
    """(N,) bool: whether the classifier reads, for each video, the label it was asked for (the
    per-video flags behind class_accuracy, for PairedGap)."""
    return classifier_features(classifier, samples)[1] == labels


def sample_figures(samples: Tensor, labels: Tensor, classifier: VideoClassifier,
                   real_features: Tensor, teacher_samples: Optional[Tensor] = None
                   ) -> Dict[str, float]:
    """Every figure of one set of samples (one sampling seed): the distribution-level and
    temporal ones, and with ``teacher_samples`` (the teacher's from the same noise) rel_mse and
    psnr."""
    out = {}
    if teacher_samples is not None:
        out["rel_mse"] = relative_mse(samples, teacher_samples)
        out["psnr"] = float(psnr(samples, teacher_samples).mean())
    feats, predicted = classifier_features(classifier, samples)
    out["class_accuracy"] = float((predicted == labels).float().mean())
    out["frechet_distance"] = frechet_distance(feats, real_features)
    out["jitter"] = float(jitter(samples).mean())
    out["flicker"] = float(flicker(samples).mean())
    return out


def _figures(ref: TeacherReference, samples: Dict[int, Tensor],
             with_teacher_relative: bool) -> Dict[str, Figure]:
    per_seed = [sample_figures(samples[s], ref.labels, ref.classifier, ref.real_features,
                               ref.samples[s] if with_teacher_relative else None)
                for s in ref.seeds]
    return {name: Figure.of([f[name] for f in per_seed]) for name in METRICS
            if name in per_seed[0]}


@dataclass
class FidelityReport:
    """The model's figures beside the teacher's and the real videos' (module docstring)."""

    model: Dict[str, Figure]
    teacher: Dict[str, Figure]
    real: Dict[str, Figure]
    seeds: tuple
    num_samples: int
    samples: Dict[int, Tensor]

    def as_log(self, prefix: str = "eval_") -> Dict[str, float]:
        """Flat floats for a metrics log: prefix + name and prefix + name + '_spread'."""
        out = {}
        for name, fig in self.model.items():
            out[f"{prefix}{name}"] = fig.mean
            out[f"{prefix}{name}_spread"] = fig.spread
        return out

    def within_teacher_spread(self, name: str, k: float = 1.0) -> bool:
        """|model − teacher| <= k · max(teacher spread, model spread) for a distribution or
        temporal metric ("teacher-level")."""
        m, t = self.model[name], self.teacher[name]
        return abs(m.mean - t.mean) <= k * max(t.spread, m.spread)

    def table(self) -> str:
        """A plain-text table: metric, model, teacher, real videos (mean ± spread)."""
        rows = [("metric", "model", "teacher", "real videos")]
        for name in METRICS:
            if name not in self.model:
                continue
            rows.append((name, str(self.model[name]),
                         str(self.teacher[name]) if name in self.teacher else "-",
                         str(self.real[name]) if name in self.real else "-"))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"({len(self.seeds)} sampling seeds x {self.num_samples} samples; "
                     f"mean ± std across seeds)")
        return "\n".join(lines)


@torch.no_grad()
def paired_class_gap(samples: Dict[int, Tensor], reference: TeacherReference) -> PairedGap:
    """Class accuracy minus the teacher's, paired video by video (PairedGap), of ``samples``
    {seed: videos} drawn from the reference's noise and labels (every seed of the reference;
    FidelityReport.samples, say)."""
    missing = [s for s in reference.seeds if s not in samples]
    if missing:
        raise ValueError(f"samples: expected videos for every seed of the reference "
                         f"{reference.seeds}, missing {missing}")
    correct = lambda videos: class_correct(videos, reference.labels, reference.classifier)
    return PairedGap.of([correct(samples[s]) for s in reference.seeds],
                        [correct(reference.samples[s]) for s in reference.seeds])


@torch.no_grad()
def evaluate(model: nn.Module, reference: Optional[TeacherReference] = None, *,
             sampler: Optional[Sampler] = None, progress: bool = False,
             **reference_options) -> FidelityReport:
    """Every fidelity figure of ``model`` (a converted or post-trained copy of the teacher, or
    any flow transformer with its interface) against the teacher.

    reference: a TeacherReference (build one with teacher_reference() and reuse it: it holds
    the teacher's samples); None builds one from ``reference_options`` (teacher_reference's
    keyword arguments). The model samples with the reference's seeds and labels, from the same
    noise as the teacher, and with the reference's sampler unless ``sampler`` is given (a
    few-step distilled student: Sampler(num_steps=4, guidance_scale=1.0), say; the teacher's
    samples and figures stay those of its own sampler).
    """
    if reference is None:
        reference = teacher_reference(progress=progress, **reference_options)
    elif reference_options:
        raise ValueError(f"{sorted(reference_options)}: options of teacher_reference(); with "
                         f"reference= given they are fixed by it")
    sampler = sampler if sampler is not None else reference.sampler
    was_training = model.training
    model.eval()
    try:
        samples = {s: sample(model, reference.labels, seed=s, sampler=sampler,
                             progress=progress) for s in reference.seeds}
    finally:
        model.train(was_training)
    return FidelityReport(_figures(reference, samples, with_teacher_relative=True),
                          reference.teacher_figures, reference.real_figures, reference.seeds,
                          reference.num_samples, samples)


class TrainerMetrics:
    """The fidelity figures as an eval metric of linattn.train (the trainer's ``eval_metrics``
    hook: (student samples, EvalSet) -> {name: value}), for a run on the toy teacher.

    The trainer samples its held-out noise once per evaluation; the samples are split into
    ``groups`` consecutive groups of distinct noise, which play the part of sampling seeds:
    every figure is the mean over groups, with ``<name>_spread`` the std across them, and the
    teacher's own figures on the same noise come as ``teacher_<name>`` (+ ``_spread``), the
    reference a student is judged against. Trajectory i has class i mod 8 (the conditioning
    rows of ``class_conditioning()``); a run whose conditioning is not the toy's class
    embeddings is refused, since the class accuracy would be meaningless. Needs
    output.eval_num_samples >= 2 x groups (a multiple of 8 x groups keeps the classes
    balanced).
    """

    def __init__(self, groups: int = 3, classifier: Optional[VideoClassifier] = None):
        if groups < 1:
            raise ValueError(f"groups: expected >= 1, got {groups}")
        self.groups = groups
        self.classifier = classifier
        self.real_features = None    # loaded at the first evaluation (a run may have none)
        self._teacher_cache = None   # (teacher samples tensor, its figures)

    def _split(self, n: int) -> list:
        if n < 2 * self.groups:
            raise ValueError(f"output.eval_num_samples: the toy metrics need >= "
                             f"{2 * self.groups} samples ({self.groups} groups of >= 2), got {n}")
        return [idx for idx in torch.arange(n).chunk(self.groups)]

    def _figures(self, samples: Tensor, labels: Tensor, teacher_samples: Optional[Tensor],
                 prefix: str = "") -> Dict[str, float]:
        per_group = [sample_figures(samples[idx], labels[idx], self.classifier,
                                    self.real_features,
                                    None if teacher_samples is None else teacher_samples[idx])
                     for idx in self._split(samples.shape[0])]
        out = {}
        for name in METRICS:
            if name in per_group[0]:
                fig = Figure.of([f[name] for f in per_group])
                out[prefix + name] = fig.mean
                out[prefix + name + "_spread"] = fig.spread
        return out

    def __call__(self, samples: Tensor, eval_set) -> Dict[str, float]:
        from .teacher import embed_labels
        from .videos import NUM_CLASSES

        labels = torch.as_tensor(eval_set.trajectories, dtype=torch.int64) % NUM_CLASSES
        if tuple(eval_set.cond.shape[1:]) != tuple(embed_labels([0]).shape[1:]) or not \
                torch.allclose(eval_set.cond.float().cpu(), embed_labels(labels)):
            raise ValueError("eval_metrics: the toy fidelity metrics need the toy teacher's "
                             "class conditioning (data.embeddings: linattn:toy)")
        if self.real_features is None:
            self.classifier = self.classifier if self.classifier is not None else load_classifier()
            self.real_features = real_features(self.classifier)
        samples = samples.float().cpu()
        teacher = eval_set.teacher_samples.float().cpu()
        out = self._figures(samples, labels, teacher)
        if self._teacher_cache is None or not torch.equal(self._teacher_cache[0], teacher):
            self._teacher_cache = (teacher, self._figures(teacher, labels, None, "teacher_"))
        out.update(self._teacher_cache[1])
        return out
