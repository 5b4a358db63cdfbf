"""Reproduce the shipped toy weights: ``python -m linattn.toy.train teacher|classifier``.

teacher: rectified flow (linattn.train.flow's convention: x_t = (1 − t) x_0 + t ε, the network
predicts u = ε − x_0 at timestep t · 1000) on a stream of procedural videos that never repeats
(step s trains on videos s·B ... s·B + B − 1 of the data seed). t ~ logit-normal(0, 1) as in SD3.
Labels are replaced by the null class with probability --label-dropout, so that the same network
gives the unconditional velocity that classifier-free guidance needs. AdamW at a constant rate
after warmup, and an exponential moving average of the weights: the EMA weights are what ships.
Constant rate on purpose: the weights after N steps do not depend on how many steps were
planned, so a run can be extended and ``--steps N`` still reproduces its step-N weights.

Every random draw of step s comes from a generator seeded by (seed, s), so a run resumed from a
checkpoint continues exactly as one that was never stopped (on the same machine and thread count).

classifier: the small 3D-conv classifier of linattn.toy.classifier on the same stream.

--export writes the result into linattn/toy/weights/ (or --export-dir) with provenance.json: the
exact command, the commit, the date and the final figures.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..train.flow import FlowModel
from .teacher import (INITS, NULL_CLASS, PROVENANCE_FILE, SAMPLER, TEACHER_DIR, WEIGHTS_DIR,
                      build_teacher, embed_labels, save_class_embeddings, save_teacher)
from .videos import procedural_videos

CHECKPOINT = "checkpoint.pt"


def step_generator(seed: int, step: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def flow_batch(x0: Tensor, labels: Tensor, gen: torch.Generator, label_dropout: float):
    """(x_t, t, encoder_hidden_states, target velocity) of one training batch."""
    b = x0.shape[0]
    t = torch.sigmoid(torch.randn(b, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    dropped = torch.rand(b, generator=gen) < label_dropout
    labels = torch.where(dropped, torch.full_like(labels, NULL_CLASS), labels)
    tt = t.view(b, 1, 1, 1, 1)
    return (1 - tt) * x0 + tt * noise, t, embed_labels(labels), noise - x0


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no", "linattn"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def train_teacher(args) -> dict:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = build_teacher(args.seed, args.init).float().train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99),
                            weight_decay=args.weight_decay)
    flow = FlowModel(model, input_dtype=torch.float32)
    step, history = 0, []
    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["args"]["seed"] != args.seed or state["args"]["batch_size"] != args.batch_size:
            raise ValueError(f"--out: {ckpt_path} was written with seed/batch size "
                             f"{state['args']['seed']}/{state['args']['batch_size']}; use "
                             f"another --out")
        if state["step"] > args.steps:
            raise ValueError(f"--steps: {ckpt_path} is at step {state['step']}, past {args.steps}; "
                             f"start from a kept checkpoint-NNNNNN.pt of step <= {args.steps} "
                             f"(copy it to {CHECKPOINT} in a new --out)")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        print(f"resumed from {ckpt_path} at step {step}")
    log = open(out / "log.jsonl", "a")
    window, window_start = [], time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, desc="toy teacher", unit="step")
    while step < args.steps:
        gen = step_generator(args.seed, step)
        data = procedural_videos(args.batch_size, args.data_seed, start=step * args.batch_size)
        x_t, t, cond, target = flow_batch(data.videos, data.labels, gen, args.label_dropout)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        loss = (flow(x_t, t, cond) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm))
        opt.step()
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        step += 1
        window.append(float(loss.detach()))
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            record = {"step": step, "loss": float(np.mean(window)), "grad_norm": grad_norm,
                      "s_per_step": (time.perf_counter() - window_start) / len(window)}
            history.append(record)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            window, window_start = [], time.perf_counter()
        if step % args.checkpoint_every == 0 or step == args.steps:
            state = {"model": model.state_dict(), "ema": ema.state_dict(),
                     "optimizer": opt.state_dict(), "step": step, "history": history,
                     "args": {k: v for k, v in vars(args).items() if k != "func"}}
            _atomic_save(state, ckpt_path)
            if args.keep_every and step % args.keep_every == 0:
                # Kept for good: --steps N with a copy of checkpoint-N resumes and exports there.
                _atomic_save(state, out / f"checkpoint-{step:06d}.pt")
        if args.preview_every and (step % args.preview_every == 0 or step == args.steps):
            _preview(ema, out / f"preview-{step:06d}.png")
    bar.close()
    log.close()
    save_teacher(ema, out / "teacher")
    summary = {"steps": step, "final_loss": history[-1]["loss"] if history else None,
               "loss_curve": [(r["step"], round(r["loss"], 5)) for r in history
                              if r["step"] % args.curve_every == 0 or r["step"] == step]}
    if args.export:
        export_dir = Path(args.export_dir) if args.export_dir else WEIGHTS_DIR
        save_teacher(ema, export_dir / TEACHER_DIR.name)
        save_class_embeddings(export_dir / "class_embeddings.safetensors")
        _write_provenance(export_dir, "teacher", args, summary)
    return summary


def _preview(model: nn.Module, path: Path) -> None:
    from .sampling import sample
    from .grid import save_grid

    save_grid(sample(model, num=8, seed=0, sampler=SAMPLER), path)


def train_classifier_command(args) -> dict:
    from .classifier import save_classifier, train_classifier

    torch.set_num_threads(args.threads)
    classifier, summary = train_classifier(steps=args.steps, batch_size=args.batch_size,
                                           lr=args.lr, seed=args.seed, data_seed=args.data_seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_classifier(classifier, out / "classifier.safetensors")
    if args.export:
        export_dir = Path(args.export_dir) if args.export_dir else WEIGHTS_DIR
        save_classifier(classifier, export_dir / "classifier.safetensors")
        _write_provenance(export_dir, "classifier", args, summary)
    return summary


def _write_provenance(export_dir: Path, what: str, args, summary: dict) -> None:
    export_dir.mkdir(parents=True, exist_ok=True)
    path = export_dir / PROVENANCE_FILE.name
    provenance = json.loads(path.read_text()) if path.is_file() else {}
    # The command that trains: --export only copies the result (rerun with it after a run
    # ends, it resumes at the last step and exports without training).
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip or a == "--export":
            skip = False
            continue
        if a == "--export-dir":
            skip = True
            continue
        if not a.startswith("--export-dir="):
            argv.append(a)
    provenance[what] = {
        "command": "python -m linattn.toy.train " + " ".join(shlex.quote(a) for a in argv),
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        **summary,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(provenance, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m linattn.toy.train",
                                     description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    t = sub.add_parser("teacher", help="train the toy video DiT (resumes from --out)")
    t.add_argument("--steps", type=int, default=8000)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=250)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--ema", type=float, default=0.999)
    t.add_argument("--label-dropout", type=float, default=0.1)
    t.add_argument("--init", choices=INITS, default="diffusers",
                   help="initial weights: diffusers' own, or DiT's adaLN-Zero")
    t.add_argument("--seed", type=int, default=0, help="initial weights and per-step draws")
    t.add_argument("--data-seed", type=int, default=1, help="the procedural video stream")
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--curve-every", type=int, default=500)
    t.add_argument("--checkpoint-every", type=int, default=250)
    t.add_argument("--keep-every", type=int, default=1000,
                   help="keep the checkpoint of every N-th step (0: only the latest)")
    t.add_argument("--preview-every", type=int, default=0, help="sample grid PNG every N steps")
    t.set_defaults(func=train_teacher)
    c = sub.add_parser("classifier", help="train the video classifier of the metrics")
    c.add_argument("--steps", type=int, default=800)
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--lr", type=float, default=2e-3)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--data-seed", type=int, default=2)
    c.set_defaults(func=train_classifier_command)
    for p, default_out in ((t, "runs/toy_teacher"), (c, "runs/toy_classifier")):
        p.add_argument("--out", default=default_out, help="checkpoints, log and result")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--export", action="store_true",
                       help="write the result into linattn/toy/weights/ (the shipped copy)")
        p.add_argument("--export-dir", default=None, help="export here instead")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: must be >= 1")
    summary = args.func(args)
    print(json.dumps({k: v for k, v in summary.items() if k != "loss_curve"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
