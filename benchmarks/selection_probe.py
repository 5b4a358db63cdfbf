"""Can a measurement at the end of the selection phase break a tie between near-equal gates?

After train.select_steps the final selection keeps the n_linear lowest gates. On the toy
teacher the gates of layers 3-6 end the 20-step phase within 0.01 of each other, so which two
of them go linear is a coin toss worth ~10 points of class accuracy after 1000 steps
(docs/toy_study.md §6c-6d). This script runs a first-stage config to the switch (no checkpoint,
no finalize), then for every candidate set (the --fixed layers plus any --choose of the
--tied layers) sets the gates to exactly 0 / 1 and measures, without training:

* velocity-MSE on fixed stored teacher points (batches of 8, the same for every set);
* the trainer's own held-out evaluation (output.eval_num_samples videos, the data's sampler).

Compare its ranking with the sets' scores after full training (benchmarks/toy_score.py).

    PYTHONPATH=. python benchmarks/selection_probe.py linattn/train/configs/toy_wan_cpu.yaml \\
        --set data.dir=runs/toy_pairs_1024 --set data.num_trajectories=1024 \\
        --set data.trajectories_per_shard=64 --set train.steps=1000 --set train.seed=0 \\
        --fixed 0 1 2 --tied 3 4 5 6 --choose 2 --out runs/probe_s0.md
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time

import torch

from linattn.train.config import load_config
from linattn.train.evaluate import run_metrics
from linattn.train.objectives import velocity_mse_objective
from linattn.train.trainer import Trainer

SHOWN = ("rel_mse", "class_accuracy", "frechet_distance")


def evaluate_once(trainer: Trainer) -> dict:
    """The trainer's held-out evaluation of the student as its gates stand. Trainer.evaluate()
    would sample a second time with the gates rounded, the same model here (they are 0 / 1)."""
    eval_set = trainer.eval_set()
    trainer.student.eval()
    try:
        with trainer.autocast():
            return run_metrics(trainer.eval_metrics, eval_set.sample(trainer.student_eval),
                               eval_set)
    finally:
        trainer.student.train()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a first-stage config with train.select_steps and gates")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="SECTION.KEY=VALUE")
    p.add_argument("--fixed", type=int, nargs="*", default=[],
                   help="gate indices linear in every candidate set")
    p.add_argument("--tied", type=int, nargs="+", required=True,
                   help="gate indices to choose from")
    p.add_argument("--choose", type=int, required=True, help="how many of --tied go linear")
    p.add_argument("--batches", type=int, default=8, help="velocity-MSE batches of 8 points")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="markdown file to write")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        cfg = load_config(args.config, args.overrides + [
            "output.eval_every=0", "output.checkpoint_every=1000000",
            f"output.dir={os.path.join(scratch, 'run')}"])
        if cfg.train.select_steps is None:
            raise SystemExit("selection_probe: the config has no train.select_steps")
        trainer = Trainer(cfg, progress=True)
        try:
            trainer.run(stop_at_step=cfg.train.select_steps)
            gates = trainer.gates
            for i in [*args.fixed, *args.tied]:
                if not 0 <= i < len(gates):
                    raise SystemExit(f"selection_probe: gate {i} out of range 0..{len(gates) - 1}")
            at_switch = [float(g.detach()) for g in gates]
            batches = [trainer.to_device(trainer.dataset.batch(list(range(8 * i, 8 * i + 8))))
                       for i in range(args.batches)]
            rows = []
            for chosen in itertools.combinations(args.tied, args.choose):
                linear = sorted({*args.fixed, *chosen})
                start = time.perf_counter()
                with torch.no_grad():
                    for i, g in enumerate(gates):
                        g.fill_(0.0 if i in linear else 1.0)
                    losses = [float(velocity_mse_objective(
                        trainer.student_fn, b, guidance_scale=trainer.guidance_scale)[0])
                        for b in batches]
                    evaluation = evaluate_once(trainer)
                    for g, value in zip(gates, at_switch):
                        g.fill_(value)
                rows.append({"linear": linear, "velocity_mse": sum(losses) / len(losses),
                             **{m: evaluation.get(f"eval_{m}") for m in SHOWN}})
                print(json.dumps(rows[-1]), f"({time.perf_counter() - start:.0f} s)", flush=True)
        finally:
            trainer.close()

    lines = [f"Gates at the switch (step {cfg.train.select_steps}): "
             + ", ".join(f"{i}: {v:.4f}" for i, v in enumerate(at_switch)), "",
             "| linear layers | velocity-MSE | " + " | ".join(SHOWN) + " |",
             "|---" * (2 + len(SHOWN)) + "|"]
    for r in sorted(rows, key=lambda r: r["velocity_mse"]):
        lines.append(f"| {', '.join(map(str, r['linear']))} | {r['velocity_mse']:.4f} | "
                     + " | ".join(f"{r[m]:.4g}" for m in SHOWN) + " |")
    lines.append(f"\n{args.batches} batches of 8 stored points; held-out evaluation on "
                 f"{cfg.output.eval_num_samples} videos; command: python "
                 f"benchmarks/selection_probe.py {args.config} "
                 + " ".join(f"--set {o}" for o in args.overrides)
                 + f" --fixed {' '.join(map(str, args.fixed))} --tied "
                 f"{' '.join(map(str, args.tied))} --choose {args.choose}")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
