"""Score first-stage models on the toy teacher (linattn.toy.fidelity), beside the teacher.

    PYTHONPATH=. python benchmarks/toy_score.py "select 20, 1000 steps=runs/toy_1000/final" \\
        "select 20, 200 steps=runs/toy_linvideo/final" --num-samples 8 --out runs/score.md

Every model samples with the teacher's own sampler (linattn.toy.SAMPLER: 20 guided Euler steps)
from the same noise and labels as the teacher, on each sampling seed; each figure is the mean
over seeds ± the std across them, and the teacher's row is the reference "teacher level" is
judged against (within its spread). With --num-samples 8 and seeds 0 1 2 the figures are
those of the toy study's tables (docs/toy_study*.md); 16 gives those of the distillation
table (docs/distill.md). A model is a linattn.load_converted folder (a stage's final/, or its
output.dir); a folder with a metrics.jsonl beside its final/ also prints that run's
evaluations over steps (its learning curve), if it logged any. Writes markdown to --out.
--teacher-cache FILE keeps the teacher's samples between calls (at 128 videos per seed they are
about half of a call's time); the file is checked against the teacher's weights, seeds, count
and sampler before it is used.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from linattn.toy import SAMPLER, load_teacher
from linattn.toy.fidelity import evaluate, paired_class_gap, teacher_reference
from linattn.train.distill.models import generator_folder, load_model_folder

SHOWN = ("rel_mse", "class_accuracy", "frechet_distance", "jitter")
CURVE = ("eval_class_accuracy", "eval_frechet_distance", "eval_teacher_frechet_distance")


def learning_curve(model_dir) -> list:
    """The run's evaluation records (step and the CURVE figures) from its metrics.jsonl."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            if any(k in record for k in CURVE):
                rows.append({"step": record["step"], **{k: record[k] for k in CURVE
                                                        if k in record}})
    return rows


def cache_key(seeds, num_samples: int) -> dict[str, str]:
    """What a cached teacher sample set must have been drawn with: the shipped teacher's
    weights (a digest of its state dict), the seeds, the sample count and the sampler."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_teacher().state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return {"teacher_sha256": digest.hexdigest(), "seeds": json.dumps(list(seeds)),
            "num_samples": str(num_samples), "sampler": repr(SAMPLER)}


def read_teacher_cache(path: str, seeds, num_samples: int) -> dict:
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
        expected = cache_key(seeds, num_samples)
        differing = [k for k in expected if metadata.get(k) != expected[k]]
        if differing:
            raise SystemExit(f"--teacher-cache: {path} was written for another "
                             f"{', '.join(differing)} (file: "
                             f"{ {k: metadata.get(k) for k in differing} }); delete it or pass "
                             f"another path")
        return {int(key.split("_")[1]): f.get_tensor(key) for key in f.keys()}


def write_teacher_cache(path: str, ref) -> None:
    save_file({f"seed_{s}": v.contiguous() for s, v in ref.samples.items()}, path,
              metadata=cache_key(ref.seeds, ref.num_samples))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", metavar="LABEL=DIR")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--teacher-cache", metavar="FILE.safetensors",
                   help="the teacher's samples: read when the file exists and was written for "
                        "the same teacher weights, seeds, sample count and sampler (an error "
                        "otherwise), else sampled and written there; sampling the teacher is "
                        "most of a call's time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = []
    for item in args.models:
        if "=" not in item:
            p.error(f"models: expected LABEL=DIR, got {item!r}")
        label, path = item.split("=", 1)
        models.append((label, generator_folder(path)))

    print("sampling the teacher", flush=True)
    cached = None
    if args.teacher_cache and os.path.exists(args.teacher_cache):
        cached = read_teacher_cache(args.teacher_cache, args.seeds, args.num_samples)
        print(f"(the teacher's samples from {args.teacher_cache})", flush=True)
    ref = teacher_reference(seeds=args.seeds, num_samples=args.num_samples, progress=True,
                            samples=cached)
    if args.teacher_cache and cached is None:
        write_teacher_cache(args.teacher_cache, ref)
    lines = ["| model | " + " | ".join(SHOWN) + " | class accuracy - teacher's, paired |",
             "|" + "---|" * (len(SHOWN) + 2)]
    teacher = ref.teacher_figures
    lines.append("| teacher | " + " | ".join(str(teacher[m]) if m in teacher else "-"
                                           for m in SHOWN) + " | - |")
    curves = []
    for label, folder in models:
        print(f"sampling {label} ({folder})", flush=True)
        report = evaluate(load_model_folder(folder).eval(), ref, progress=True)
        gap = paired_class_gap(report.samples, ref)
        lines.append(f"| {label} | " + " | ".join(str(report.model[m]) for m in SHOWN)
                     + f" | {gap} |")
        curve = learning_curve(folder)
        if curve:
            curves += ["", f"{label}: evaluations during training (24 held-out samples)", "",
                       "| step | " + " | ".join(CURVE) + " |", "|" + "---|" * (len(CURVE) + 1)]
            curves += [f"| {r['step']} | " + " | ".join(f"{r[k]:.4g}" if k in r else "-"
                                                        for k in CURVE) + " |" for r in curve]
    real = ref.real_figures
    lines.append("| real videos | " + " | ".join(str(real[m]) if m in real else "-"
                                               for m in SHOWN) + " | - |")
    lines.append(f"\n{len(args.seeds)} sampling seeds x {args.num_samples} videos, mean ± std "
                 f"across seeds; the paired gap: class accuracy minus the teacher's over the "
                 f"same videos' noise and labels, ± its standard error (linattn.toy.PairedGap); "
                 f"command: python {' '.join(sys.argv)}")
    text = "\n".join(lines + curves) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
