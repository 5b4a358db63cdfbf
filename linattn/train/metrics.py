"""The metrics log (JSON lines) and the plot of the selective-transfer gates over training.

One line per logged step, written by rank 0: step, loss and its parts (objective, l_con,
l_reg), alpha, lr, gates (every r_l in layer order), n_linear_rounded (how many gates round to
linear), step_time_s, samples_per_s, and eval_* entries on evaluation steps. When a run is
resumed, lines past the checkpoint's step are dropped so the log reads like one run.
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
