"""The metrics log (JSON lines) and its plots: the selective-transfer gates over training, and
any logged quantities (the distillation stage's losses) over training.

One line per logged step, written by rank 0. Linearisation: step, loss and its parts
(objective, l_con, l_reg), alpha, lr, gates (every r_l in layer order), n_linear_rounded (how
many gates round to linear), with train.select_steps also phase ("select" / "final") and, on
the first step of phase 2, selected (the step, the gates before the selection, the linear
layers); distillation: its losses (linattn.train.distill); both:
step_time_s, samples_per_s, and eval_* entries on evaluation steps. When a run is resumed,
lines past the checkpoint's step are dropped so the log reads like one run.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional


class MetricsLog:
    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate_after(self, step: int) -> None:
        """Keep only records with record['step'] <= step (used on resume)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)

    def reset(self) -> None:
        if self.enabled and os.path.isfile(self.path):
            os.remove(self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        for key, value in record.items():
            if isinstance(value, float) and not math.isfinite(value):
                record[key] = str(value)  # JSON has no NaN/inf; keep them visible as text
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_gates(metrics_path: str, png_path: str, layer_names: Optional[list[str]] = None,
               n_linear: Optional[int] = None) -> bool:
    """Draw every gate r_l against the step into ``png_path``. False when there is nothing to
    draw (no log yet, or a run without gates)."""
    if not os.path.isfile(metrics_path):
        return False
    records = [r for r in read_metrics(metrics_path) if r.get("gates")]
    if not records:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: training nodes have no display
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    num = len(records[0]["gates"])
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 1]})
    cmap = plt.get_cmap("viridis")
    for layer in range(num):
        label = layer_names[layer] if layer_names and layer < len(layer_names) else f"layer {layer}"
        ax.plot(steps, [r["gates"][layer] for r in records], color=cmap(layer / max(num - 1, 1)),
                linewidth=1.2, label=label)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    # train.select_steps: the gates are fixed at the selection from this step on.
    switch = next((r["selected"]["step"] for r in records if r.get("selected")), None)
    if switch is not None:
        for axis in (ax, ax_count):
            axis.axvline(switch, color="red", linestyle="-.", linewidth=0.9)
        ax.text(switch, 1.02, " gates fixed", color="red", fontsize=7, va="bottom")
    ax.set_ylabel("gate r_l (1 = softmax, 0 = linear)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Selective transfer: gates over training")
    if num <= 16:
        ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax_count.plot(steps, [r.get("n_linear_rounded", 0) for r in records], color="black")
    if n_linear is not None:
        ax_count.axhline(n_linear, color="red", linestyle=":", label=f"target {n_linear}")
        ax_count.legend(fontsize=7)
    ax_count.set_ylabel("linear layers")
    ax_count.set_xlabel("step")
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True


def plot_series(metrics_path: str, png_path: str, keys, *, title: str = "",
                eval_prefix: Optional[str] = None) -> bool:
    """One panel per logged quantity against the step: each of ``keys`` that the log holds,
    and every entry starting with ``eval_prefix`` (evaluations). False when the log holds none
    of them."""
    if not os.path.isfile(metrics_path):
        return False
    records = read_metrics(metrics_path)
    names = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
    if eval_prefix:
        names += sorted({k for r in records for k, v in r.items()
                         if k.startswith(eval_prefix) and isinstance(v, (int, float))})
    if not names:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: training nodes have no display
    import matplotlib.pyplot as plt

    cols = min(len(names), 3)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        points = [(r["step"], r[name]) for r in records
                  if isinstance(r.get(name), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points],
                marker="o" if len(points) < 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return True
