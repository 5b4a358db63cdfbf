"""Recompute the figures of docs/toy_teacher.md: ``python -m linattn.toy.report``.

1. The teacher's fidelity figures (3 sampling seeds) beside real videos' (and, with
   --random-weights, an untrained model's).
2. Attention entropy per layer: the trained teacher on its own sampling trajectories (measured
   while it samples the reference, so at no extra cost), the same architecture with random
   weights and the tiny random-weight Wan of linattn/train/configs/tiny_wan_cpu.yaml.
3. What an untrained conversion (Hedgehog maps at their identity initialisation, mode "linear")
   does to the samples: all 8 layers, and half of them (every other layer); with --per-layer
   also every single layer and the first / last k, k = 2 .. 7.
4. A sample grid PNG: per class, a real video, the teacher's sample and the all-linear untrained
   conversion's sample from the same noise (every other frame).

Writes a JSON of every figure (--json) and prints the tables as markdown. With the defaults
(3 seeds x 8 samples, 2 conversions) it samples 3 models x 3 seeds: a few minutes on 2 idle
CPU cores; --per-layer adds 20 models.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import dit
from ..train.flow import FlowModel, euler_sample, flow_sigmas
from .entropy import entropy_probes
from .fidelity import METRICS, FidelityReport, evaluate, teacher_reference
from .grid import save_grid
from .sampling import sample
from .train import _git_commit, _machine
from .teacher import SAMPLER, build_teacher, load_teacher
from .videos import NUM_CLASSES, procedural_videos

TINY_WAN_CONFIG = Path(__file__).resolve().parents[1] / "train" / "configs" / "tiny_wan_cpu.yaml"


def own_trajectory_entropy(model: nn.Module, num: int = 8, seed: int = 0) -> list:
    """Per-layer normalised entropy while ``model`` samples the toy classes (guided)."""
    with entropy_probes(model) as result:
        sample(model, num=num, seed=seed)
    return result


def tiny_wan_entropy(seed: int = 0) -> list:
    """The same, for the random-weight tiny Wan of tiny_wan_cpu.yaml on its own latent shape
    and random conditioning (8 tokens), with its config's 8-step sampler and no guidance."""
    import yaml
    from diffusers import WanTransformer3DModel

    from ..train.conditioning import random_conditioning

    cfg = yaml.safe_load(TINY_WAN_CONFIG.read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg["model"]["init_seed"])
        model = WanTransformer3DModel(**cfg["model"]["config"]).eval()
    shape = cfg["data"]["latent_shape"]
    cond = random_conditioning(cfg["data"]["random_conditioning"], seed).embeds
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(cond.shape[0], *shape, generator=gen)
    with entropy_probes(model) as result, torch.no_grad():
        euler_sample(FlowModel(model), noise, cond, flow_sigmas(cfg["data"]["num_steps"], 3.0))
    return result


def sampler_sweep(teacher: nn.Module, reference, seeds=(0, 1, 2)) -> dict:
    """The teacher's distribution and temporal figures under other samplers: guidance scale,
    shift and number of steps, one varied at a time from SAMPLER (how SAMPLER was chosen)."""
    variants = [dataclasses.replace(SAMPLER, guidance_scale=g) for g in (1.0, 2.0, 4.0, 5.0)]
    variants += [dataclasses.replace(SAMPLER, shift=s) for s in (1.0, 5.0)]
    variants += [dataclasses.replace(SAMPLER, num_steps=n) for n in (10, 30)]
    rows = {}
    for variant in tqdm([SAMPLER] + variants, desc="samplers", unit="sampler"):
        ref = teacher_reference(teacher, seeds=seeds, num_samples=reference.num_samples,
                                sampler=variant, classifier=reference.classifier)
        name = (f"guidance {variant.guidance_scale:g}, shift {variant.shift:g}, "
                f"{variant.num_steps} steps")
        rows[name] = {k: [f.mean, f.spread] for k, f in ref.teacher_figures.items()}
    return rows


def converted(teacher: nn.Module, layers) -> nn.Module:
    model = copy.deepcopy(teacher)
    dit.convert(model, layers=layers, feature_map="hedgehog", mode="linear")
    return model.eval()


def figures_row(report: FidelityReport) -> dict:
    return {name: [fig.mean, fig.spread] for name, fig in report.model.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linattn.toy.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="teacher folder (default: shipped)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--num-samples", type=int, default=8,
                        help="samples per seed (balanced classes: a multiple of 8)")
    parser.add_argument("--json", default="docs/toy_teacher_results.json")
    parser.add_argument("--grid", default="docs/toy_teacher_samples.png")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sampler-sweep", action="store_true",
                        help="also score the teacher under other samplers (8 more references)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also convert every single layer and the first / last k")
    parser.add_argument("--random-weights", action="store_true",
                        help="also score the architecture with random weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    teacher = load_teacher(args.teacher)
    out: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec="seconds"),
                 "commit": _git_commit(), "machine": _machine(), "teacher": args.teacher or
                 "shipped (linattn/toy/weights/teacher)", "command": " ".join(sys.argv),
                 "sampler": dataclasses.asdict(SAMPLER), "seeds": args.seeds,
                 "num_samples": args.num_samples}

    print("teacher reference and its attention entropy ...", flush=True)
    with entropy_probes(teacher) as teacher_entropy:
        reference = teacher_reference(teacher, seeds=args.seeds, num_samples=args.num_samples,
                                      progress=True)
    out["teacher_figures"] = {k: [f.mean, f.spread] for k, f in reference.teacher_figures.items()}
    out["real"] = {k: [f.mean, f.spread] for k, f in reference.real_figures.items()}
    if args.random_weights:
        out["random_weights"] = figures_row(evaluate(build_teacher(0).eval(), reference))

    if args.sampler_sweep:
        print("sampler sweep ...", flush=True)
        out["sampler_sweep"] = sampler_sweep(teacher, reference, args.seeds)

    print("attention entropy ...", flush=True)
    out["entropy"] = {"teacher": teacher_entropy,
                      "random_weights": own_trajectory_entropy(build_teacher(0).eval(), num=2),
                      "tiny_wan_cpu": tiny_wan_entropy()}

    print("untrained conversions ...", flush=True)
    count = len(dit.layer_report(teacher))
    half = count // 2
    plans = [(f"all {count}", list(range(count))),
             (f"every other ({half})", list(range(0, count, 2)))]
    if args.per_layer:
        plans += [(f"layer {i}", [i]) for i in range(count)]
        plans += [(f"first {k}", list(range(k))) for k in range(2, count)]
        plans += [(f"last {k}", list(range(count - k, count))) for k in range(2, count)]
    out["untrained_conversion"] = {}
    reports = {}
    for name, layers in tqdm(plans, desc="conversions", unit="model"):
        reports[name] = evaluate(converted(teacher, layers), reference)
        out["untrained_conversion"][name] = {"layers": layers, **figures_row(reports[name])}

    print("sample grid ...", flush=True)
    # The reference's first seed: the teacher's and the all-linear model's samples of one
    # sample per class from the same noise (already computed above).
    first = reference.seeds[0]
    labels = reference.labels[:NUM_CLASSES]
    real = procedural_videos(NUM_CLASSES, 5, labels=labels).videos
    teacher_videos = reference.samples[first][:NUM_CLASSES]
    linear_videos = reports[f"all {count}"].samples[first][:NUM_CLASSES]
    rows = [v for triple in zip(real, teacher_videos, linear_videos) for v in triple]
    save_grid(torch.stack(rows), args.grid, frames=range(0, 16, 2))

    out["seconds"] = round(time.time() - start)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(markdown(out))
    return 0


def _cell(pair) -> str:
    mean, spread = pair
    fmt = (lambda x: f"{x:.3g}") if abs(mean) >= 1e-3 or mean == 0 else (lambda x: f"{x:.2e}")
    return f"{fmt(mean)} ± {fmt(spread)}"


def markdown(out: dict) -> str:
    lines = ["| | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for name in ("teacher_figures", "real", "random_weights"):
        if name not in out:
            continue
        row = out[name]
        lines.append(f"| {name} | " + " | ".join(_cell(row[m]) if m in row else "-"
                                               for m in METRICS) + " |")
    for name, row in out.get("sampler_sweep", {}).items():
        lines.append(f"| teacher, {name} | " + " | ".join(
            _cell(row[m]) if m in row else "-" for m in METRICS) + " |")
    lines += ["", "| layer | " + " | ".join(out["entropy"]) + " |",
              "|---" * (len(out["entropy"]) + 1) + "|"]
    depth = max(len(v) for v in out["entropy"].values())
    for i in range(depth):
        cells = [f"{v[i]:.3f}" if i < len(v) else "-" for v in out["entropy"].values()]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += ["", "| converted (untrained) | " + " | ".join(METRICS) + " |",
              "|---" * (len(METRICS) + 1) + "|"]
    for name, row in out["untrained_conversion"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[m]) for m in METRICS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
