"""The command line: ``linattn train CONFIG``, ``linattn generate-data CONFIG``,
``linattn sample CONFIG`` and ``linattn widen SRC OUT --feature-dim F``.

Each reads a YAML/TOML config and accepts ``--set section.key=value`` overrides. ``train`` runs
the stage the config describes: linearisation (linattn.train.config) or, for a config with a
``distill`` section, few-step distillation (linattn.train.distill). ``sample`` generates with
a distilled model at its step count. ``widen`` rewrites a converted model with wider Hedgehog
maps and the same output (linattn/dit/widen.py), e.g. to give the distillation stage's
generator more capacity (generator.path then names the widened folder). Under torchrun every
process runs the same command:

    torchrun --nproc_per_node 8 -m linattn.train train wan.yaml
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="linattn", description="linattn: LinVideo "
                                     "post-training of video DiTs with linear attention")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "run the stage the config describes: linearisation (generate "
                                 "teacher data if needed, train with ADM and selective "
                                 "transfer, finalize and save) or, for a config with a "
                                 "`distill` section, few-step distillation (DMD2)"),
                       ("generate-data", "only sample the teacher's trajectories into "
                                         "data.dir (resumable; linearisation configs)"),
                       ("sample", "generate with the distilled model of a distillation "
                                  "config at its step count")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="a .yaml, .yml, .toml or .json config")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE",
                       help="override one config entry (value parsed as YAML); repeatable")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        if name == "sample":
            p.add_argument("--model", help="the distilled model folder (default: "
                                           "output.dir/final)")
            p.add_argument("--num", type=int, default=8, help="number of samples (default 8)")
            p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
            p.add_argument("--batch-size", type=int, default=1)
            p.add_argument("--out", help="safetensors file to write (default: "
                                         "output.dir/samples-seed<SEED>.safetensors)")
            p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
            p.add_argument("--dtype", choices=["float32", "bfloat16"],
                           help="model dtype (default bfloat16 on CUDA, float32 on the CPU)")
            p.add_argument("--backend", default="auto",
                           help="linattn.linear_attention backend of the linear layers")
    text = ("write a converted model (a first stage's final/) with its Hedgehog maps widened to "
            "--feature-dim: same output, more feature rank to train (linattn/dit/widen.py)")
    p = sub.add_parser("widen", help=text, description=text)
    p.add_argument("source", help="a linattn.load_converted folder (save_pretrained of a "
                                  "converted model, e.g. a first stage's output.dir/final)")
    p.add_argument("out", help="the folder to write (save_pretrained)")
    p.add_argument("--feature-dim", type=int, required=True,
                   help="the new Hedgehog width F, a multiple of the current one")
    p.add_argument("--noise", type=float, default=0.5,
                   help="perturbation of the copies, relative to each W's std, so that training "
                        "can tell them apart (default 0.5; 0 keeps the output exact)")
    p.add_argument("--seed", type=int, default=0, help="seed of the perturbation (default 0)")
    return parser


def _widen(args) -> int:
    import os

    from ..dit import load_converted
    from ..dit.widen import widen_feature_maps

    if os.path.exists(args.out) and os.listdir(args.out):
        print(f"linattn widen: out {args.out!r} exists and is not empty; give a new folder",
              file=sys.stderr)
        return 2
    try:
        model = load_converted(args.source)
        layers = widen_feature_maps(model, args.feature_dim, noise=args.noise, seed=args.seed)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"linattn widen: {e}", file=sys.stderr)
        return 2
    model.save_pretrained(args.out)
    print(json.dumps({"source": args.source, "out": args.out, "layers": layers,
                      "feature_dim": args.feature_dim, "noise": args.noise,
                      "seed": args.seed}, indent=1))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "widen":
        return _widen(args)
    from .config import load_config
    from .distill.config import is_distill_config, load_distill_config

    try:
        distill = is_distill_config(args.config, args.overrides)
        if args.command == "sample" and not distill:
            raise ValueError(f"{args.config!r} has no `distill` section; `linattn sample` "
                             f"generates with a distilled model")
        if args.command == "generate-data" and distill:
            raise ValueError(f"{args.config!r} is a distillation config: it needs no teacher "
                             f"data (the conditioning is all its data)")
        config = (load_distill_config if distill else load_config)(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"linattn {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "generate-data":
        from .generate import generate_from_config

        made = generate_from_config(config, progress=not args.no_progress)
        print(f"linattn generate-data: {made} shard(s) written to {config.data.dir}")
        return 0
    if args.command == "sample":
        from .distill.sample import sample_from_config

        summary = sample_from_config(config, model_dir=args.model, num=args.num, seed=args.seed,
                                     batch_size=args.batch_size, out=args.out,
                                     device=args.device, dtype=args.dtype,
                                     backend=args.backend, progress=not args.no_progress)
        print(json.dumps(summary, indent=1))
        return 0
    if distill:
        from .distill.trainer import distill as run_distill

        result = run_distill(config, progress=not args.no_progress)
        if result.model is not None:
            print(json.dumps({"step": result.step, "final": result.final_dir,
                              "metrics": result.metrics_path,
                              "num_steps": result.sampler.num_steps,
                              "times": list(result.sampler.times)}, indent=1))
        return 0
    from .trainer import train

    result = train(config, progress=not args.no_progress)
    if result.model is not None:
        summary = {"step": result.step, "final": result.final_dir, "metrics": result.metrics_path}
        if result.selection is not None:
            linear = sorted(k for k, v in result.selection.items() if v == "linear")
            summary.update(n_linear=len(linear), linear_layers=linear)
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
