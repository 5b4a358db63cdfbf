"""A sample grid on the toy teacher: the teacher, the untrained conversion of a layer set, and
trained models, from the same noise, one sample per class.

    PYTHONPATH=. python benchmarks/toy_grid.py "local mixing=runs/toy_teacher_level/final" \\
        --untrained 0 1 2 5 6 --out docs/toy_teacher_level_samples.png

One group of rows per class (right-1, right-2, left-1, left-2, down-1, down-2, up-1, up-2), in
each group one row per model in the order given (the teacher first, then the untrained
conversion), every other frame; each model samples with the teacher's own sampler
(linattn.toy.SAMPLER) from sampling seed --seed's noise. Prints the caption to use.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch

from linattn import dit
from linattn.toy import NUM_CLASSES, SAMPLER, class_name, load_teacher, sample
from linattn.toy.grid import save_grid
from linattn.train.distill.models import generator_folder, load_model_folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="*", metavar="LABEL=DIR",
                   help="trained models (linattn.load_converted folders)")
    p.add_argument("--untrained", type=int, nargs="+", metavar="LAYER",
                   help="also the untrained conversion (identity Hedgehog maps) of these layers")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher = load_teacher().eval()
    rows = [("teacher", teacher)]
    if args.untrained:
        converted = dit.convert(copy.deepcopy(teacher), layers=args.untrained, mode="linear")
        rows.append((f"untrained conversion of {args.untrained}", converted.eval()))
    for item in args.models:
        if "=" not in item:
            p.error(f"models: expected LABEL=DIR, got {item!r}")
        label, path = item.split("=", 1)
        rows.append((label, load_model_folder(generator_folder(path)).eval()))
    labels = torch.arange(NUM_CLASSES)
    samples = []
    for label, model in rows:
        print(f"sampling {label}", flush=True)
        with torch.no_grad():
            samples.append(sample(model, labels, seed=args.seed, sampler=SAMPLER, progress=True))
    videos = [s[i] for i in range(NUM_CLASSES) for s in samples]
    save_grid(torch.stack(videos), args.out, frames=range(0, videos[0].shape[1], 2))
    print(f"Sampling seed {args.seed}, one group of {len(rows)} rows per class "
          f"({', '.join(class_name(int(c)) for c in labels)}): "
          + " / ".join(label for label, _ in rows) + "; every other frame.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
