"""The command line: ``linattn train CONFIG`` and ``linattn generate-data CONFIG``.

Both read a YAML/TOML config (linattn.train.config) and accept ``--set section.key=value``
overrides. Under torchrun every process runs the same command:

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
    for name, text in (("train", "generate teacher data if needed, train with ADM and "
                                 "selective transfer, finalize and save"),
                       ("generate-data", "only sample the teacher's trajectories into "
                                         "data.dir (resumable)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("config", help="a .yaml, .yml, .toml or .json training config")
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.KEY=VALUE",
                       help="override one config entry (value parsed as YAML); repeatable")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"linattn {args.command}: {e}", file=sys.stderr)
        return 2
    if args.command == "generate-data":
        from .generate import generate_from_config

        made = generate_from_config(config, progress=not args.no_progress)
        print(f"linattn generate-data: {made} shard(s) written to {config.data.dir}")
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
