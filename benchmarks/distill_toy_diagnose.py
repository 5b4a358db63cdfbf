"""Why the distilled toy models collapse to blank videos (docs/distill.md, "On the trained toy
teacher"): three checks on the shipped toy teacher, each printed as a small table.

1. The teacher's denoiser on a noised all-background video: its clean prediction x̂_0 at t =
   0.3, 0.6, 0.9 with guidance 1, 2, 3 (mean, share of pixels above the brightness threshold
   −0.5 and below −1.05), beside the same for real videos. A blank prediction at moderate t
   means a blank video is a fixed point the reverse KL can settle on.
2. Where the generator starts: the 4-step x̂_0 sampler (unguided, times 1, 0.75, 0.5, 0.25
   before the shift) of the teacher and of a linearised model (``--linear``), per shift.
3. The DMD push's direction in sample space: x <- x − eta · g on the teacher's 4-step samples,
   with the fake score held at the teacher's conditional branch (so g is the guidance
   direction at every t): a push in the right direction lowers the Fréchet distance.

    python benchmarks/distill_toy_diagnose.py [--linear runs/toy_linvideo/final]

Run with the repository root on PYTHONPATH to measure a worktree's linattn.
"""
from __future__ import annotations

import argparse
import sys

import torch

import linattn.toy as toy
from linattn.toy.fidelity import (BRIGHT_FROM, classifier_features, frechet_distance, jitter,
                                  real_features)
from linattn.train.distill import generator_times, noised, score_times, seeded_sample
from linattn.train.distill.models import load_model_folder
from linattn.train.distill.objectives import dmd_push
from linattn.train.flow import FlowModel, combine_guidance


def pixel_shares(x: torch.Tensor) -> str:
    return (f"mean {float(x.mean()):.3f}, above {BRIGHT_FROM} {float((x > BRIGHT_FROM).float().mean()):.4f}, "
            f"below -1.05 {float((x < -1.05).float().mean()):.3f}")


def figures(x: torch.Tensor, labels: torch.Tensor, classifier, features) -> str:
    feats, predicted = classifier_features(classifier, x)
    return (f"class accuracy {float((predicted == labels).float().mean()):.3f}, Fréchet "
            f"{frechet_distance(feats, features):.0f}, jitter {float(jitter(x).mean()):.2f}, "
            + pixel_shares(x))


@torch.no_grad()
def blank_fixed_point(flow: FlowModel) -> None:
    print("1. the teacher's x̂_0 of noised videos (8, one per class)")
    labels = torch.arange(toy.NUM_CLASSES)
    cond, negative = toy.embed_labels(labels), toy.null_embedding(labels.numel())
    real = toy.procedural_videos(labels.numel(), seed=3, labels=labels).videos
    gen = torch.Generator().manual_seed(0)
    for name, clean in (("blank", torch.full_like(real, -1.0)), ("real", real)):
        for t in (0.3, 0.6, 0.9):
            t_vec = torch.full((labels.numel(),), t)
            x_t = noised(clean, t_vec, torch.randn(clean.shape, generator=gen))
            u_cond, u_uncond = flow(torch.cat([x_t, x_t]), torch.cat([t_vec, t_vec]),
                                    torch.cat([cond, negative])).chunk(2)
            for scale in (1.0, 2.0, 3.0):
                x0 = x_t - t * combine_guidance(u_cond, u_uncond, scale)
                print(f"  {name:5s} t={t} guidance {scale:g}: {pixel_shares(x0)}")


@torch.no_grad()
def starting_point(models: dict, classifier, features) -> None:
    print("2. the 4-step unguided x̂_0 sampler at step 0 of the distillation (16 videos)")
    labels = torch.arange(16) % toy.NUM_CLASSES
    cond = toy.embed_labels(labels)
    for name, flow in models.items():
        for shift in (3.0, 1.0):
            times = generator_times([1.0, 0.75, 0.5, 0.25], shift)
            x = seeded_sample(flow, cond, times, seed=7, shape=toy.VIDEO_SHAPE)
            print(f"  {name}, shift {shift:g}: {figures(x, labels, classifier, features)}")


@torch.no_grad()
def push_direction(flow: FlowModel, classifier, features, eta: float, iterations: int) -> None:
    print(f"3. x <- x - {eta} g in sample space, fake = the teacher's conditional branch")
    labels = torch.arange(16) % toy.NUM_CLASSES
    cond, negative = toy.embed_labels(labels), toy.null_embedding(labels.numel())
    times = generator_times([1.0, 0.75, 0.5, 0.25], toy.SAMPLER.shift)
    x = seeded_sample(flow, cond, times, seed=5, shape=toy.VIDEO_SHAPE)
    print(f"  start: {figures(x, labels, classifier, features)}")
    gen = torch.Generator().manual_seed(0)
    for it in range(1, iterations + 1):
        t = score_times(torch.rand(labels.numel(), generator=gen), shift=toy.SAMPLER.shift)
        x_t = noised(x, t, torch.randn(x.shape, generator=gen))
        u_cond, u_uncond = flow(torch.cat([x_t, x_t]), torch.cat([t, t]),
                                torch.cat([cond, negative])).chunk(2)
        u_real = combine_guidance(u_cond, u_uncond, toy.SAMPLER.guidance_scale)
        x = x - eta * dmd_push(x, x_t, t, u_real, u_cond)
        if it % 10 == 0:
            print(f"  after {it}: {figures(x, labels, classifier, features)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--linear", help="a linearised model folder (the first stage's final/)")
    p.add_argument("--eta", type=float, default=0.05)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = FlowModel(toy.load_teacher(), input_dtype=torch.float32)
    classifier = toy.load_classifier()
    features = real_features(classifier)
    blank_fixed_point(teacher)
    models = {"teacher": teacher}
    if args.linear:
        models["linear"] = FlowModel(load_model_folder(args.linear).eval(),
                                     input_dtype=torch.float32)
    starting_point(models, classifier, features)
    push_direction(teacher, classifier, features, args.eta, args.iterations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
