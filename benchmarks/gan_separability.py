"""Can the distillation stage's GAN head tell the teacher's samples from a few-step generator's,
and at which noise levels? (docs/distill.md, "DMD2's GAN head").

The head (linattn.train.distill.gan) is trained alone on the frozen toy teacher's features (the
fake score's starting weights) to separate the teacher's final samples (a teacher-data folder)
from a distilled generator's samples, at times U(t_min, t_max) shifted by --shift, then scored
on held-out samples of both at fixed times. A head that stays at chance at the stage's score
times says the GAN term would be noise there.

    PYTHONPATH=. python benchmarks/gan_separability.py runs/ode_d1024_s0/distill_linear/final \
        --data runs/toy_pairs_1024 --t-max 0.3 --shift 1
"""
from __future__ import annotations

import argparse
import time

import torch

from linattn.toy.teacher import load_teacher
from linattn.train.distill import load_distilled, seeded_sample
from linattn.train.distill.gan import FeatureDiscriminator, discriminator_loss
from linattn.train.distill.objectives import noised, score_times
from linattn.train.distill.regression import RegressionPairs
from linattn.train.flow import FlowModel

SHAPE = (1, 16, 32, 32)          # the toy's latent
GUIDANCE = 3.0                   # the toy teacher's sampler
EVAL_TIMES = (0.02, 0.1, 0.3, 0.6, 0.9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("generator", help="a distilled generator (load_distilled)")
    p.add_argument("--data", required=True, help="teacher-data folder of the toy teacher")
    p.add_argument("--t-min", type=float, default=0.02)
    p.add_argument("--t-max", type=float, default=0.98)
    p.add_argument("--shift", type=float, default=3.0)
    p.add_argument("--block", type=int, default=4)
    p.add_argument("--train", type=int, default=512, help="samples of each kind to train on")
    p.add_argument("--held-out", type=int, default=128)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8, help="samples of each kind per step")
    p.add_argument("--lr", type=float, default=1e-3)
    args = p.parse_args()
    torch.set_num_threads(1)

    n, held = args.train, args.held_out
    pairs = RegressionPairs(args.data, latent_shape=SHAPE, guidance_scale=GUIDANCE)
    _, real, cond = pairs.batch(list(range(n + held)), torch.device("cpu"))
    generator, spec = load_distilled(args.generator)
    start = time.time()
    with torch.no_grad():
        fake = torch.cat([
            seeded_sample(FlowModel(generator, input_dtype=torch.float32), cond[i:i + 64],
                          spec.times, seed=77, indices=list(range(i, i + 64)), shape=SHAPE,
                          step_rule=spec.renoise)
            for i in range(0, n + held, 64)])
    print(f"generated {tuple(fake.shape)} in {time.time() - start:.0f} s", flush=True)

    model = load_teacher().float().requires_grad_(False)
    disc = FeatureDiscriminator(model, block=args.block, seed=0)
    flow = FlowModel(model, input_dtype=torch.float32)
    optimizer = torch.optim.AdamW(disc.head.parameters(), lr=args.lr, betas=(0.0, 0.999),
                                  weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)

    def logits(x, t, c):
        with disc.capture() as out:
            flow(x, t, c)
        return out[0]

    batch = args.batch
    for step in range(args.steps):
        i = torch.randint(n, (batch,), generator=gen)
        j = torch.randint(n, (batch,), generator=gen)
        t_real, t_fake = (score_times(torch.rand(batch, generator=gen), t_min=args.t_min,
                                      t_max=args.t_max, shift=args.shift) for _ in range(2))
        x = torch.cat([noised(real[i], t_real, torch.randn(real[i].shape, generator=gen)),
                       noised(fake[j], t_fake, torch.randn(fake[j].shape, generator=gen))])
        out = logits(x, torch.cat([t_real, t_fake]), torch.cat([cond[i], cond[j]]))
        loss = discriminator_loss(out[:batch], out[batch:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: discriminator loss {float(loss.detach()):.4f}", flush=True)

    print("| t | held-out accuracy | mean logit, teacher | mean logit, generator |")
    print("|---|---|---|---|")
    with torch.no_grad():
        for value in EVAL_TIMES:
            noise_gen = torch.Generator().manual_seed(1)
            mean = {}
            for name, samples in (("real", real), ("fake", fake)):
                parts = []
                for k in range(n, n + held, 32):
                    rows = samples[k:k + 32]
                    t = torch.full((rows.shape[0],), value)
                    noise = torch.randn(rows.shape, generator=noise_gen)
                    parts.append(logits(noised(rows, t, noise), t, cond[k:k + 32]).mean(1))
                mean[name] = torch.cat(parts)
            accuracy = 0.5 * (float((mean["real"] > 0).float().mean())
                              + float((mean["fake"] < 0).float().mean()))
            print(f"| {value} | {accuracy:.3f} | {float(mean['real'].mean()):.3f} | "
                  f"{float(mean['fake'].mean()):.3f} |")
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
