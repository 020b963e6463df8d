"""The loss curve: training loss per step and held-out loss at each evaluation, as a PNG.

Drawn with matplotlib's ``Agg`` backend (no display needed) on a log scale, where a loss falling
from 2 to 0.002 stays readable. A light line shows each step's loss, a darker one its moving
average over ``window`` steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_losses(records: list[dict[str, Any]], path: Path, title: str = "", window: int = 10):
    """Write the curve of ``metrics.jsonl`` records to ``path``; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]
    evals = [(r["step"], r["loss"]) for r in records if r["kind"] == "eval" and "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1)
        smooth = [
            sum(losses[max(0, i - window + 1) : i + 1])
            / len(losses[max(0, i - window + 1) : i + 1])
            for i in range(len(losses))
        ]
        ax.plot(steps, smooth, color="tab:blue", label=f"train (mean of {window} steps)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, "o-", color="tab:orange", label="held-out")
    if train or evals:
        ax.set_yscale("log")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss per trained token")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
