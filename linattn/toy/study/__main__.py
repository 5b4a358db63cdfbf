"""``python -m linattn.toy.study``: run the study (or reuse its cached runs) and write the
document. ``--quick`` is a smoke setting of every sub-study (minutes); ``--time-budget`` stops
starting runs after that many minutes and documents what was left out."""
from __future__ import annotations

import argparse
import shlex
import sys

import torch

from .plan import Settings
from .runner import run_study


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linattn.toy.study",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke setting: 4 steps, 4-step sampler, 2 samples per seed")
    parser.add_argument("--steps", type=int, help="optimiser steps per training run")
    parser.add_argument("--num-samples", type=int, help="samples per sampling seed")
    parser.add_argument("--seeds", type=int, nargs="+", help="sampling seeds (>= 3)")
    parser.add_argument("--train-seeds", type=int, nargs="+",
                        help="training seeds of the headline comparison")
    parser.add_argument("--studies", default="abcd", help="which sub-studies (default abcd)")
    parser.add_argument("--select-steps", type=int, nargs="*", metavar="S",
                        help="train.select_steps of sub-study b's phased selective runs "
                             "(default 20 30; none given: no phased runs)")
    parser.add_argument("--counts", type=int, nargs="+",
                        help="linear-layer counts of sub-study a (default 0 2 4 5 6 8)")
    parser.add_argument("--manual-rules", nargs="+", choices=("first", "last", "even"),
                        help="manual layer choices of sub-study b (default first last even)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--root", default="runs/study", help="run and cache directory")
    parser.add_argument("--doc", default=None,
                        help="the document to write (default docs/toy_study.md; with --quick "
                             "ROOT/quick/toy_study.md, so a smoke run never overwrites it)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                        help="start no new run after this many minutes")
    parser.add_argument("--document-only", action="store_true",
                        help="train, sample and time nothing: write the document from the cache")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.doc is None:
        args.doc = f"{args.root}/quick/toy_study.md" if args.quick else "docs/toy_study.md"
    torch.set_num_threads(args.threads)
    settings = Settings.quick() if args.quick else Settings()
    changes = {"steps": args.steps, "num_samples": args.num_samples,
               "seeds": tuple(args.seeds) if args.seeds else None,
               "train_seeds": tuple(args.train_seeds) if args.train_seeds else None,
               "studies": tuple(args.studies),
               "select_steps": (tuple(args.select_steps)
                                if args.select_steps is not None else None),
               "counts": tuple(args.counts) if args.counts else None,
               "manual_rules": tuple(args.manual_rules) if args.manual_rules else None}
    settings = settings.__class__(**{**settings.__dict__,
                                     **{k: v for k, v in changes.items() if v is not None}})
    command = "python -m linattn.toy.study " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    results = run_study(settings, args.root, args.doc, command=command.strip(),
                        time_budget_s=None if args.time_budget is None else 60 * args.time_budget,
                        document_only=args.document_only, progress=not args.no_progress)
    missing = [r for r in results.plan.runs() if results.score(r) is None]
    print(f"wrote {args.doc}" + (f" ({len(missing)} runs not run)" if missing else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
