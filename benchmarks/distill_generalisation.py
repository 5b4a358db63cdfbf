"""How far a distilled toy generator generalises beyond the teacher trajectories it regressed on.

The ODE initialisation (docs/distill.md) regresses the generator onto the teacher's samples of
a fixed set of trajectories. This scores it twice with the same measures, against the
teacher's sample from the same noise and class: on the first --num trajectories of its
training data (their own noise and class) and on --num held-out samples (the sampling noise
stream, linattn.train.teacher_data.sampling_noise). A generator that learned the teacher's flow
map scores the same on both; one that memorised its trajectories is closer on the first.
Measures: rel-MSE to the teacher's sample, and the paired class-accuracy gap (model minus
teacher over the same videos, points ± standard error; linattn.toy.fidelity.PairedGap).

    PYTHONPATH=. python benchmarks/distill_generalisation.py --data runs/toy_pairs_1024 \\
        "linear, seed 0=runs/ode_linear_s0/distill_linear" --num 64 --out generalisation.md
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from linattn.toy import load_teacher
from linattn.toy.classifier import load_classifier
from linattn.toy.fidelity import PairedGap, class_correct
from linattn.toy.sampling import balanced_labels, sample, sample_noise
from linattn.toy.teacher import class_embedding_table, embed_labels
from linattn.toy.videos import NUM_CLASSES
from linattn.train.data import TeacherDataset
from linattn.train.distill.models import load_distilled
from linattn.train.distill.sampler import few_step_sample, sample_step_noise
from linattn.train.evaluate import relative_mse
from linattn.train.flow import FlowModel
from linattn.train.teacher_data import trajectory_noise


def training_set(data_dir: str, num: int):
    """(noise, labels, teacher samples) of trajectories 0..num-1 of a toy teacher-data folder;
    refuses a folder whose conditioning rows are not the toy's classes in order (labels are
    trajectory mod 8 only then)."""
    data = TeacherDataset(data_dir)
    if num > data.spec.num_trajectories:
        raise ValueError(f"--num: the data holds {data.spec.num_trajectories} trajectories, "
                         f"asked for {num}")
    trajectories = list(range(num))
    cond = data.conditioning(trajectories)
    labels = torch.tensor(trajectories) % NUM_CLASSES
    if not torch.equal(cond.float(), class_embedding_table()[labels]):
        raise ValueError(f"--data: {data_dir!r} is not toy teacher data (its conditioning rows "
                         f"are not the toy's class embeddings, class i at row i)")
    noise = torch.stack([trajectory_noise(data.spec.seed, i, data.spec.latent_shape)
                         for i in trajectories])
    return noise, labels, data.samples(trajectories)


def generator_samples(model, spec, noise, labels, seed: int) -> torch.Tensor:
    indices = list(range(labels.numel()))
    return few_step_sample(FlowModel(model, input_dtype=torch.float32), noise,
                           embed_labels(labels), spec.times,
                           lambda k: sample_step_noise(seed, indices, k, noise.shape[1:]),
                           step_rule=spec.renoise)


def measures(samples, teacher_samples, labels, classifier) -> tuple[float, PairedGap]:
    rel = relative_mse(samples, teacher_samples)
    gap = PairedGap.of([class_correct(samples, labels, classifier)],
                       [class_correct(teacher_samples, labels, classifier)])
    return rel, gap


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", metavar="LABEL=DIR",
                   help="distilled models (a distillation output.dir, or its final_raw)")
    p.add_argument("--data", required=True, help="the teacher-data folder they trained on")
    p.add_argument("--num", type=int, default=64, help="videos per set")
    p.add_argument("--seed", type=int, default=1, help="sampling seed of the held-out set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="markdown file to write")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    classifier = load_classifier()
    train_noise, train_labels, train_teacher = training_set(args.data, args.num)
    held_labels = balanced_labels(args.num)
    held_teacher = sample(load_teacher(), held_labels, seed=args.seed, progress=True)
    held_noise = sample_noise(args.num, args.seed)

    lines = [f"| model | rel-MSE, its training trajectories | rel-MSE, held-out noise "
             f"| class accuracy - teacher's, training trajectories (points) "
             f"| same, held-out noise |", "|---|---|---|---|---|"]
    for entry in args.models:
        label, path = entry.split("=", 1)
        model, spec = load_distilled(path)
        seen = measures(generator_samples(model, spec, train_noise, train_labels, args.seed),
                        train_teacher, train_labels, classifier)
        held = measures(generator_samples(model, spec, held_noise, held_labels, args.seed),
                        held_teacher, held_labels, classifier)
        lines.append(f"| {label} | {seen[0]:.3f} | {held[0]:.3f} | {seen[1]} | {held[1]} |")
        print(lines[-1], flush=True)
    lines.append(f"\n{args.num} videos per set: trajectories 0..{args.num - 1} of {args.data} "
                 f"(their noise and class) and sampling seed {args.seed} (balanced classes); "
                 f"command: python {' '.join(sys.argv)}")
    table = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
